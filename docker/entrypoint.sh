#!/usr/bin/env bash
# Entrypoint of the megatron-probe image (see the Dockerfile at the repository root).
#
#   (no arguments), -h, --help   print tools/run_probe_inference.py's help (no GPU needed)
#   --flag ...                   serve: tools/run_probe_inference.py with these flags
#       * already inside a launcher's job (RANK, WORLD_SIZE and MASTER_ADDR set): run it directly;
#       * N GPUs visible (nvidia-smi -L): torchrun --standalone --nproc-per-node N
#         tools/run_probe_inference.py --expert-model-parallel-size N "$@"
#         (a --expert-model-parallel-size among the flags sets N instead);
#       * no GPU: python3 tools/run_probe_inference.py "$@" (it starts its own gloo processes)
#   anything else                run as a command: bash, python3 ..., torchrun ..., nsys ...
#
# Environment (all optional):
#   PROBE_PYTHON          python to run (python3)
#   PROBE_TORCHRUN        torchrun to run (torchrun)
#   PROBE_NVIDIA_SMI      nvidia-smi to ask for the GPU count (nvidia-smi)
#   PROBE_NPROC           processes (EP size) when the flags give none (default: the GPU count)
#   PROBE_HOME            repository root (default: this script's parent folder)
#   PROBE_NGC_ENTRYPOINT  the base image's entrypoint, run once in front of this script (it sets
#                         up the CUDA compatibility libraries); empty: skip it
#   PROBE_DRY_RUN=1       print the command instead of running it
set -euo pipefail

ngc_entrypoint="${PROBE_NGC_ENTRYPOINT-/opt/nvidia/nvidia_entrypoint.sh}"
if [ -z "${PROBE_NGC_CHAINED:-}" ] && [ -n "$ngc_entrypoint" ] && [ -x "$ngc_entrypoint" ]; then
    export PROBE_NGC_CHAINED=1
    exec "$ngc_entrypoint" "$0" "$@"
fi

root="${PROBE_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
script="$root/tools/run_probe_inference.py"
python="${PROBE_PYTHON:-python3}"
torchrun="${PROBE_TORCHRUN:-torchrun}"

run() {
    if [ "${PROBE_DRY_RUN:-0}" != 0 ]; then
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}

# GPUs this container can use: nvidia-smi's list, cut to CUDA_VISIBLE_DEVICES when that is set.
gpu_count() {
    local smi="${PROBE_NVIDIA_SMI:-nvidia-smi}" listing n visible
    command -v "$smi" >/dev/null 2>&1 || { echo 0; return; }
    listing="$("$smi" -L 2>/dev/null)" || { echo 0; return; }
    n="$(grep -c '^GPU [0-9]' <<<"$listing" || true)"
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
        if [ "${#visible[@]}" -lt "$n" ]; then
            n="${#visible[@]}"
        fi
    fi
    echo "$n"
}

# The value of --expert-model-parallel-size among the flags, if any (the last one wins, as in argparse).
ep_from_flags() {
    local prev="" arg ep=""
    for arg in "$@"; do
        case "$arg" in
            --expert-model-parallel-size=*) ep="${arg#*=}" ;;
        esac
        if [ "$prev" = --expert-model-parallel-size ]; then
            ep="$arg"
        fi
        prev="$arg"
    done
    echo "$ep"
}

if [ $# -eq 0 ]; then
    run "$python" "$script" --help
fi
case "$1" in
    -*) ;;
    *) run "$@" ;;
esac
for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then
        run "$python" "$script" "$@"
    fi
done

if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ] && [ -n "${MASTER_ADDR:-}" ]; then
    run "$python" "$script" "$@"
fi

gpus="$(gpu_count)"
ep="$(ep_from_flags "$@")"
if [ "$gpus" -gt 0 ]; then
    nproc="${ep:-${PROBE_NPROC:-$gpus}}"
    launch=("$torchrun" --standalone --nproc-per-node "$nproc" "$script")
    if [ -z "$ep" ]; then
        launch+=(--expert-model-parallel-size "$nproc")
    fi
    run "${launch[@]}" "$@"
fi
if [ -z "$ep" ] && [ -n "${PROBE_NPROC:-}" ]; then
    run "$python" "$script" --expert-model-parallel-size "$PROBE_NPROC" "$@"
fi
run "$python" "$script" "$@"
