"""The command-line tools, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_equivalence.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_check_equivalence_cli_writes_json(tmp_path):
    out = tmp_path / "eq.json"
    r = _tool("--ep", "2", "--experts", "8", "--topk", "2", "--replica-slots", "2", "--trials", "8",
              "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key, typ in (("max_abs_diff", float), ("trials", int), ("ep", int), ("passed", bool)):
        assert isinstance(res[key], typ), key
    assert res["trials"] == 8 and res["ep"] == 2 and res["passed"] is True
    assert res["max_abs_diff"] < 1e-4
    assert "PASSED" in r.stdout and "one_expert" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["--ep", "3", "--experts", "8"], "not divisible by expert-parallel size 3"),
    (["--ep", "2", "--experts", "8", "--replica-slots", "5"], "exceeds the 4 experts"),
    (["--ep", "2", "--experts", "8", "--topk", "9"], "moe_router_topk=9"),
    (["--ep", "2", "--replica-slots", "-1"], "is negative"),
])
def test_check_equivalence_cli_rejects_bad_shapes(args, msg):
    r = _tool(*args, timeout=120)
    assert r.returncode == 2
    assert msg in r.stderr
