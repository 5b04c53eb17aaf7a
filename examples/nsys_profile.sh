#!/usr/bin/env bash
# Nsight Systems timeline of stock and PROBE serving side by side on the GPUs of one node: nsys
# wraps torchrun (all ranks land in one report) and records CUDA, NVTX and OS runtime calls.
#
# NVTX ranges (domain megatron_probe, every name prefixed "probe."): per engine step
# serve.<mode>.step<N> (mode: stock or probe) and <mode>.step, inside them the PROBE layer's
# stages plan, prefetch.phase1, prefetch.phase2, wait, dispatch, experts, combine.
#
# Capture: from the start of PROBE's engine step $PROBE_NSYS_START_STEP (default 4, past the
# warm-up) to the end of the run, which stops $PROBE_NSYS_STEPS (default 8) steps later
# (--max-steps). PROBE_NSYS_START_STEP=0 records the whole run instead (needed when serving the
# stock layer alone, which never opens a probe.* step range).
#
#   examples/nsys_profile.sh                          # 8 GPUs, report results/tmp/nsys/probe_ep8.nsys-rep
#   PROBE_NPROC=2 examples/nsys_profile.sh --max-requests 32
#   PROBE_DRY_RUN=1 examples/nsys_profile.sh          # print the command only
# Environment: PROBE_NPROC (8), PROBE_NSYS (nsys), PROBE_TORCHRUN (torchrun), PROBE_NSYS_OUTPUT
# (results/tmp/nsys/probe_ep<N>), PROBE_NSYS_START_STEP (4), PROBE_NSYS_STEPS (8),
# PROBE_ARGS_FILE (examples/probe_args.txt). Open the report with nsys-ui, or summarise the
# ranges with: nsys stats --report nvtx_sum <report>.nsys-rep
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

nproc="${PROBE_NPROC:-8}"
start="${PROBE_NSYS_START_STEP:-4}"
steps="${PROBE_NSYS_STEPS:-8}"
report="${PROBE_NSYS_OUTPUT:-$PROBE_ROOT/results/tmp/nsys/probe_ep$nproc}"
[ "${PROBE_DRY_RUN:-0}" != 0 ] || mkdir -p "$(dirname "$report")"

# CPU sampling and context switches off: smaller reports, and no perf_event rights needed in a
# container.
nsys_flags=(profile "--trace=cuda,nvtx,osrt" --sample=none --cpuctxsw=none
            --force-overwrite=true --output="$report")
serve_flags=()
if [ "$start" -gt 0 ]; then
    nsys_flags+=(--capture-range=nvtx "--nvtx-capture=probe.serve.probe.step$start@megatron_probe"
                 --capture-range-end=none)
    serve_flags+=(--max-steps "$((start + steps))")
fi

run_or_print "${PROBE_NSYS:-nsys}" "${nsys_flags[@]}" \
    "${PROBE_TORCHRUN:-torchrun}" --standalone --nproc-per-node "$nproc" \
    "$PROBE_ROOT/tools/run_probe_inference.py" \
    --compare --workload shift --expert-model-parallel-size "$nproc" --bf16 --quiet \
    "${serve_flags[@]}" "${PROBE_ARGS[@]}" "$@"
