"""The Triton kernels compile for the GPU they are written for (an H200: CUDA sm_90) down to PTX,
without a GPU: Triton's interpreter, which runs them in the other tests, accepts code the compiler
refuses (a loop-carried variable whose type changes inside a ``while`` loop, an int32/int64 mix).
A subprocess with ``TRITON_INTERPRET=0`` (the kernels are made on first use and read the switch
then) compiles the planner's two kernels and the token split at small and large block sizes."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install '.[dev]' brings it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from megatron_probe.policy import planner_triton, split_triton

target = GPUTarget("cuda", 90, 32)
i = "i32"
split = split_triton._kernel()
greedy, expand = planner_triton._kernels()
kernels = [
    (split, dict(cnt_ptr="*i64", slots_ptr="*i64", y_ptr="*i64", state_ptr="*i64", ep=i, E=i, L=i, R=i, max_rounds=i,
                 EP_B="constexpr", E_B="constexpr", R_B="constexpr"),
     [dict(EP_B=1, E_B=1, R_B=1), dict(EP_B=8, E_B=128, R_B=4), dict(EP_B=64, E_B=256, R_B=4)]),
    (greedy, dict(cnt_ptr="*i64", slots_ptr="*i64", moves_ptr="*i64", ep=i, E=i, L=i, R=i, cap_in=i, cap_out=i, o_u=i,
                  ch=i, early_exit=i, EP_B="constexpr", E_B="constexpr", R_B="constexpr", K_MAX="constexpr"),
     [dict(EP_B=8, E_B=128, R_B=4, K_MAX=16), dict(EP_B=64, E_B=256, R_B=4, K_MAX=16)]),
    (expand, dict(cnt_ptr="*i64", moves_ptr="*i64", out_ptr="*i64", ep=i, E=i, L=i, EP_B="constexpr", K_MAX="constexpr"),
     [dict(EP_B=8, K_MAX=16), dict(EP_B=64, K_MAX=16)]),
]
for fn, signature, sizes in kernels:
    for constexprs in sizes:
        out = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        assert ".entry" in out.asm["ptx"], (fn, constexprs)
        print("compiled", fn.__name__, constexprs, flush=True)
"""


def test_triton_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.count("compiled") == 7, r.stdout
