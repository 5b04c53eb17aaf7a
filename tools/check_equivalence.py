#!/usr/bin/env python3
"""Check that the PROBE MoE layer computes exactly what the stock Megatron MoE layer computes.

Launches N gloo processes itself on CPU (NCCL with one GPU per rank when CUDA is present), or
joins a torchrun job. Draws random hidden states and weights, adversarial routings (all tokens
on one expert, all on one rank, one rank sending nothing, empty batch, uniform), random replica
placements, PROBE plans made on a wrong forecast, random assignments and the live pipeline's split,
and compares the PROBE layer's output with (a) a dense
float64 reference and (b) the stock Megatron MoELayer. Prints a table, writes JSON, and exits 0
only when every trial is within tolerance (fp32: 1e-5 relative to the output's max magnitude).

  python tools/check_equivalence.py --ep 2 --experts 8 --topk 2 --replica-slots 2 --trials 20
"""

import argparse
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

from megatron_probe.experiments.equivalence import EquivalenceOptions, format_table, run_rank
from megatron_probe.mcore.launch import run_distributed


def _worker(rank, world_size, opts, result_path):
    report = run_rank(rank, world_size, opts)
    if report is not None:
        with open(result_path, "w") as f:
            json.dump(report.to_json(), f)
        print(format_table(report), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, required=True, help="expert-parallel size")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size (attention; expert TP 1): TP peers hold the same tokens unless --sp; "
                        "must divide ep x dp")
    p.add_argument("--etp", type=int, default=1,
                   help="expert tensor parallel size: 1, or --tp (each expert's weights split over the TP peers)")
    p.add_argument("--sp", action="store_true",
                   help="sequence parallel over the TP peers (needs --tp >= 2): each holds its own share of the tokens")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline stages (processes: ep x dp x pp; each stage's layer on its own expert groups)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas of the expert group (processes: ep x dp; each replica its own tokens)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--replica-slots", type=int, default=2)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", choices=["all", "auto", "grouped_mm", "loop", "te", "fp8"], default="all",
                   help="expert GEMM backend; 'all' cycles through every backend that runs here; 'fp8': "
                        "torch._scaled_grouped_mm (CUDA 9.0/10.0), checked at the FP8 tolerance")
    p.add_argument("--fp8", choices=["none", "delayed", "current", "mxfp8"], default="none",
                   help="FP8 recipe under Transformer Engine autocast (needs --backend te)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--first-trial", type=int, default=0,
                   help="run trials FIRST .. FIRST + trials - 1 (a failing trial alone: --first-trial K --trials 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="process-group backend (auto: NCCL on GPU, gloo on CPU; gloo on GPU lets "
                        "several ranks share one GPU, staging transfers through host memory)")
    p.add_argument("--control-path", choices=["host", "device"], default="host",
                   help="ProbeConfig.control_path: device keeps counts and assignment on the tokens' device "
                        "(Triton: a CUDA GPU, or TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock MoELayer comparison")
    p.add_argument("--json", help="write the result JSON here")
    a = p.parse_args(argv)

    import torch

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # validate shapes up front with the same config object the layer uses
    from megatron_probe.config import ProbeConfig

    if a.dp < 1:
        p.error(f"--dp {a.dp}: need at least 1 replica of the expert group")
    if a.pp < 1:
        p.error(f"--pp {a.pp}: need at least 1 stage")
    if a.tp < 1 or (a.ep * a.dp) % a.tp:
        p.error(f"--tp {a.tp}: must be >= 1 and divide the {a.ep * a.dp} processes of a stage (ep x dp)")
    if a.etp not in (1, a.tp):
        p.error(f"--etp {a.etp}: the PROBE layer takes expert TP 1 or equal to --tp ({a.tp})")
    if a.sp and a.tp < 2:
        p.error(f"--sp with --tp {a.tp}: sequence parallelism shards the tokens over the TP peers; valid: --tp >= 2")
    if a.first_trial < 0 or a.trials < 1:
        p.error(f"--first-trial {a.first_trial} --trials {a.trials}: need first trial >= 0 and at least one trial")
    try:
        ProbeConfig(replica_slots_per_rank=a.replica_slots).validate_for_model(a.experts, a.ep, a.topk)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    opts = EquivalenceOptions(
        ep=a.ep, experts=a.experts, topk=a.topk, replica_slots=a.replica_slots, trials=a.trials,
        dtype=a.dtype, backend=a.backend, fp8_recipe=a.fp8, hidden=a.hidden, ffn=a.ffn,
        max_tokens=a.max_tokens, seed=a.seed, device=device, compare_stock=not a.no_stock, first_trial=a.first_trial,
        dp=a.dp, tp=a.tp, pp=a.pp, sp=a.sp, etp=a.etp, control_path=a.control_path,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        backend = a.dist_backend if a.dist_backend != "auto" else ("nccl" if device == "cuda" else "gloo")
        run_distributed(_worker, a.ep * a.dp * a.pp, opts, path, backend=backend)
        if not os.path.exists(path):  # torchrun ranks other than 0
            return 0
        with open(path) as f:
            result = json.load(f)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    print(
        f"\nequivalence ep={result['ep']} dp={a.dp} tp={a.tp}{' sp' if a.sp else ''} etp={a.etp} pp={a.pp} experts={a.experts} topk={a.topk} replica_slots={a.replica_slots} "
        f"dtype={a.dtype} device={device} dist={backend}: {result['trials']} trials, "
        f"max_abs_diff={result['max_abs_diff']:.3e}, max_rel_vs_dense={result['max_rel_diff_vs_dense']:.3e}, "
        f"bit-exact vs stock in {result['bit_exact_vs_stock']}/{result['compared_with_stock']}, "
        f"{'PASSED' if result['passed'] else 'FAILED'} ({result['seconds']:.1f}s)"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
