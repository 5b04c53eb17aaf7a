"""wandb export of per-step metrics: a no-op without a project, an offline run directory with
the logged keys otherwise (read back from the run file), a clear error without wandb."""

import sys

import pytest

from megatron_probe.runtime.pipeline_metrics import step_metrics
from megatron_probe.serving.wandb_logger import WandbLogger, read_offline_run


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_no_project_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail if imported
    w = WandbLogger(None, str(tmp_path / "never"), {"a": 1})
    assert not w.enabled and w.run_path is None
    w.log({"x": 1}, step=0)
    w.finish()
    assert not (tmp_path / "never").exists()


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"project 'probe'.*wandb is not installed.*megatron-probe\[wandb\]"):
        WandbLogger("probe", str(tmp_path), {})


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="wandb mode 'cloud'"):
        WandbLogger("probe", str(tmp_path), {}, mode="cloud")


def test_offline_run_holds_the_logged_metrics(offline):
    pytest.importorskip("wandb")
    rows = [{"step": s, "layer": L, "copies": L + s, "dropped": 0, "failed": 0, "invalid": 0, "fallbacks": 0,
             "bytes": 10 * L, "wait_ms": 0.5, "ir_before": 1.4, "ir_after": 1.0, "layer_ms": 2.0}
            for s in range(3) for L in range(2)]
    w = WandbLogger("probe-test", str(offline / "run"), config={"replica_slots_per_rank": 2}, name="unit")
    assert w.enabled
    for s in range(3):
        w.log(step_metrics([r for r in rows if r["step"] == s]), step=s)
    path = w.run_path
    w.finish()
    assert path.startswith(str(offline / "run" / "wandb" / "offline-run-"))
    run = read_offline_run(path)
    assert run["complete"]
    assert [h["_step"] for h in run["history"]] == [0, 1, 2]
    assert [h["layer1/copies"] for h in run["history"]] == [1, 2, 3]
    assert [h["step/copies"] for h in run["history"]] == [1, 3, 5]
    assert run["history"][0]["layer0/ir_before"] == 1.4 and "layer0/step" not in run["history"][0]
    assert run["summary"]["step/copies"] == 5  # the last value
    assert run["config"]["replica_slots_per_rank"] == 2
    assert read_offline_run(str(offline / "run"))["history"] == run["history"]  # found from the run dir too
