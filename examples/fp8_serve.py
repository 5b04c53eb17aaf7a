#!/usr/bin/env python3
"""Serve with tools/run_probe_inference.py inside Transformer Engine's FP8 autocast.

One rank of a torchrun job (examples/torchrun_8gpu_fp8.sh starts eight):

  torchrun --standalone --nproc-per-node 8 examples/fp8_serve.py --fp8-recipe current \\
      --moe-token-dispatcher-type probe --expert-model-parallel-size 8 --bf16 --probe-expert-backend te

Every flag except ``--fp8-recipe`` goes to tools/run_probe_inference.py unchanged. The inference
script has no FP8 switch; this wrapper opens the autocast (the same recipes as
``tools/check_equivalence.py --fp8``) once per rank around the whole run, so the PROBE expert
backend ``te`` (Transformer Engine ``GroupedLinear``, padded to the recipe's alignment) runs its
grouped GEMMs in FP8. The rest of the tiny model uses Megatron's local layers and stays bf16.

Recipes: ``current`` (Float8CurrentScaling: scales from each tensor as it is cast, which suits one
autocast around many steps; Hopper/Ada), ``mxfp8`` (MXFP8BlockScaling, Blackwell), ``none``
(no autocast: bf16 through the same path). ``delayed`` is not offered: DelayedScaling updates its
scales when an autocast closes, which here is only at the end of the run.

Needs CUDA, Transformer Engine and torchrun (the script's own CPU processes would not inherit
the autocast). Not run yet: no GPU with Transformer Engine was at hand when it was written.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "run_probe_inference.py")
RECIPES = ("current", "mxfp8", "none")


def split_args(argv: List[str]) -> Tuple[str, List[str]]:
    """(the FP8 recipe, the flags for the inference script)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--fp8-recipe", choices=RECIPES, default="current")
    a, rest = p.parse_known_args(argv)
    return a.fp8_recipe, rest


def _flag_value(rest: List[str], flag: str) -> Optional[str]:
    value = None
    for i, arg in enumerate(rest):
        if arg == flag and i + 1 < len(rest):
            value = rest[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def refusal(recipe: str, rest: List[str], env=None, cuda: Optional[bool] = None,
            have_te: Optional[bool] = None) -> Optional[str]:
    """Why this run cannot use FP8 as asked (None: it can). ``cuda``/``have_te``: probed when None."""
    if recipe == "none":
        return None
    env = os.environ if env is None else env
    if "--compare" in rest:
        return ("--compare checks that PROBE emits the stock layer's tokens, which FP8 does not "
                "guarantee; serve PROBE alone (--moe-token-dispatcher-type probe) and compare with a "
                "bf16 run, or use --fp8-recipe none")
    backend = _flag_value(rest, "--probe-expert-backend")
    if backend not in (None, "te", "auto"):
        return f"--probe-expert-backend {backend} does not run in FP8; use te"
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return "run under torchrun: the processes the script starts itself would not inherit the FP8 autocast"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return "FP8 needs a CUDA GPU (Hopper or Ada for current scaling, Blackwell for mxfp8)"
    if have_te is None:
        from megatron_probe.mechanism import te_backend

        have_te = te_backend.HAVE_TE
    if not have_te:
        return "FP8 needs Transformer Engine (the NVIDIA PyTorch image ships it)"
    return None


def load_tool():
    spec = importlib.util.spec_from_file_location("run_probe_inference", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    recipe, rest = split_args(sys.argv[1:] if argv is None else list(argv))
    tool = load_tool()
    if "-h" in rest or "--help" in rest:
        print(f"examples/fp8_serve.py [--fp8-recipe {{{','.join(RECIPES)}}}] FLAGS: the inference script's "
              "flags, under Transformer Engine's FP8 autocast\n")
        return tool.main(rest)
    why = refusal(recipe, rest)
    if why:
        print(f"fp8_serve.py: --fp8-recipe {recipe}: {why}", file=sys.stderr)
        return 2
    if recipe == "none":
        return tool.main(rest)
    import torch

    from megatron_probe.experiments.equivalence import _fp8_context

    # the autocast probes the current device: make it this rank's before opening it
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with _fp8_context(recipe)():
        return tool.main(rest)


if __name__ == "__main__":
    sys.exit(main())
