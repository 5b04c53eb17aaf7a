#!/usr/bin/env python3
"""What `tools/gpu_check.sh`'s steps need, checked in seconds before they run, into one JSON.

The packages (versions, or why one does not import), the C compiler and ``Python.h`` (Triton builds
its kernel launcher with them at the first launch), ``libcuda``, and one Triton kernel compiled,
launched and checked on the GPU. No step depends on it: it names a missing piece once, up front,
instead of in every Triton row of the later steps. Exit status 0 even when something is missing
(the JSON says what); 2 on bad arguments.

    python tools/gpu_preflight.py OUT.json
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig

PACKAGES = ("torch", "triton", "numba", "llvmlite", "megatron.core", "nvtx", "tqdm", "transformer_engine")


def package_versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "present"))
        except Exception as e:  # a broken install raises more than ImportError
            found[name] = f"missing: {type(e).__name__}: {str(e)[:160]}"
    return found


def libcuda_paths() -> list:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20).stdout
    except Exception as e:
        return [f"ldconfig failed: {type(e).__name__}: {e}"]
    return [line.split()[-1] for line in listing.splitlines() if "libcuda.so" in line][:4]


def triton_launch() -> str:
    """``ok``, or why one small Triton kernel did not build, launch or compute on the GPU."""
    try:
        import torch
        import triton
        import triton.language as tl

        if not torch.cuda.is_available():
            return "not run: no CUDA device"

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

        x = torch.zeros(8, device="cuda")
        add_one[(1,)](x, 8, BLOCK=8)
        return "ok" if bool((x.cpu() == 1).all()) else f"wrong result: {x.cpu().tolist()}"
    except Exception as e:
        return f"FAILED: {type(e).__name__}: {str(e)[:400]}"


def main(argv) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    compiler = os.environ.get("CC")
    report = {
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "c_compiler": (shutil.which(compiler) if compiler else None) or shutil.which("cc") or shutil.which("gcc")
        or shutil.which("clang"),
        "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
        "libcuda": libcuda_paths(),
        "triton_launch": triton_launch(),
    }
    with open(argv[0], "w") as f:
        json.dump(report, f, indent=1)
    print("preflight:", json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
