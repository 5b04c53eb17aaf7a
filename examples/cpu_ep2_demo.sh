#!/usr/bin/env bash
# Stock Megatron MoE layer and PROBE side by side on CPU: expert parallelism 2 over gloo (the
# script starts its own two processes), the shift workload, the shipped tiny MoE, a short run
# (16 requests, 16 new tokens each: about a minute on 2 cores). Prints the ratio table and writes
# result.json and PNG plots to $PROBE_OUT (default results/tmp/cpu_ep2_demo).
#
#   examples/cpu_ep2_demo.sh                         # as above
#   examples/cpu_ep2_demo.sh --max-requests 64       # extra flags go last and win
#   PROBE_DRY_RUN=1 examples/cpu_ep2_demo.sh         # print the command only
# PROBE settings come from examples/probe_args.txt (PROBE_ARGS_FILE to change; see common.sh).
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

out="${PROBE_OUT:-$PROBE_ROOT/results/tmp/cpu_ep2_demo}"
[ "${PROBE_DRY_RUN:-0}" != 0 ] || mkdir -p "$out"

run_or_print "$PROBE_PYTHON" "$PROBE_ROOT/tools/run_probe_inference.py" \
    --compare --workload shift --expert-model-parallel-size 2 \
    --max-requests 16 --max-new-tokens 16 --threads 1 \
    --json "$out/result.json" --plots-dir "$out" \
    "${PROBE_ARGS[@]}" "$@"
