#!/usr/bin/env bash
# PROBE on 8 GPUs of one node: torchrun starts 8 ranks, NCCL, expert parallelism 8, bf16 weights
# and activations, experts computed by the PROBE expert backend "te" (Transformer Engine
# GroupedLinear: native experts and replica slots in one grouped GEMM per projection) under an
# FP8 recipe.
#
# Needs Transformer Engine (the NVIDIA PyTorch image has it) and an FP8-capable GPU (Hopper or
# Ada; Blackwell for mxfp8). tools/run_probe_inference.py has no FP8 switch of its own, so the
# ranks run examples/fp8_serve.py, which opens Transformer Engine's FP8 autocast around the
# script. FP8 changes PROBE's numerics, so this serves PROBE alone (no --compare: its
# token-identity check against the stock layer would fail); compare with a bf16 run instead
# (PROBE_FP8_RECIPE=none allows --compare). Not run yet: no GPU with Transformer Engine was at hand.
# Check the TE backend's FP8 first: python3 tools/check_equivalence.py --ep 8 --backend te
#   --fp8 current --dtype bf16  (under torchrun --nproc-per-node 8).
#
#   examples/torchrun_8gpu_fp8.sh                    # 8 GPUs, Float8CurrentScaling
#   PROBE_NPROC=4 examples/torchrun_8gpu_fp8.sh      # 4 GPUs (EP 4)
#   PROBE_FP8_RECIPE=mxfp8 examples/torchrun_8gpu_fp8.sh    # Blackwell
#   PROBE_DRY_RUN=1 examples/torchrun_8gpu_fp8.sh    # print the command only
# Environment: PROBE_NPROC (8), PROBE_FP8_RECIPE (current | mxfp8 | none), PROBE_TORCHRUN
# (torchrun), PROBE_OUT (results/tmp/torchrun_fp8), PROBE_ARGS_FILE (examples/probe_args.txt).
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

nproc="${PROBE_NPROC:-8}"
recipe="${PROBE_FP8_RECIPE:-current}"
out="${PROBE_OUT:-$PROBE_ROOT/results/tmp/torchrun_fp8}"
[ "${PROBE_DRY_RUN:-0}" != 0 ] || mkdir -p "$out"

run_or_print "${PROBE_TORCHRUN:-torchrun}" --standalone --nproc-per-node "$nproc" \
    "$PROBE_ROOT/examples/fp8_serve.py" --fp8-recipe "$recipe" \
    --workload shift --moe-token-dispatcher-type probe --expert-model-parallel-size "$nproc" \
    --bf16 --quiet --json "$out/result.json" --metrics-jsonl "$out/steps.jsonl" \
    "${PROBE_ARGS[@]}" --probe-expert-backend te "$@"
