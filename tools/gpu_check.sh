#!/usr/bin/env bash
# Every GPU check, in one go (foundation: 2 minutes on one H200 on 2026-11-28, before its FP8, EP 1
# CUDA-graph, copy and device-control sections were added, none yet run on a GPU: 5-6 minutes estimated,
# the issue's measured targets first; planner: about 1 minute; predictor: under a minute, not yet run on
# a GPU; engine: Megatron-Core's inference engine serving the PROBE spec, not yet run on a GPU).
# On the lent machine, one call, `.whl` carried, timeout_s 600: `PACK_TO=$OUT bash tools/gpu_check.sh`
# (a device call brings back at most 8 files from $OUT: with PACK_TO set, summary.json and one
# gpu_check_results.tar.gz of the whole results folder, logs included, are copied there at the end;
# unpack it into results/ here).
# On a machine without megatron-core (e.g. a bare CUDA image), carry wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.16.1 nvtx
# (5.7 MB). The lent H200's image already has numba and llvmlite (the host planner every GPU plan is
# compared with is compiled with numba) and tqdm (Megatron's StaticInferenceEngine needs it): carried
# too, the five wheels are 66 MiB, above the 64 MiB a device call takes along. The preflight below
# says which of them is missing.
# Each step runs under a time limit (seconds; GPU_CHECK_LIMITS="foundation planner predictor engine",
# default "360 90 45 75", under a device call's 600 s with the install and preflight): a hang costs at
# most its step, and the foundation step writes its JSON after every section, so what ran is kept.
# Results in $OUT, or results/gpu_check_<UTC date>_<GPU, e.g. h200>/: each step's JSON
# (gpu_check.json, gpu_planner.json, predictor_check.json, eq_*.json), its console log in logs/,
# and summary.json (every step's exit status and JSON in one file).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
      | sed -e 's/nvidia//' -e 's/[^a-z0-9]//g')
DEST=${OUT:-results/gpu_check_$(date -u +%Y-%m-%d)_${GPU:-cpu}}
mkdir -p "$DEST/logs"
PYTHON=${PYTHON:-python3}
if ! $PYTHON -c "import megatron.core" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    else
        echo "megatron-core is not importable and no wheels in .whl/ (see the header of this script)"; exit 1
    fi
fi
# the tools import the package: installed (pip install -e .) or, on a bare image, from this checkout
$PYTHON -c "import megatron_probe" 2>/dev/null || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
# preflight (seconds, no step depends on it): what the steps need, named once, up front: the packages,
# and a Triton kernel built and launched (Triton compiles its launcher with the C compiler against
# Python.h and loads libcuda: a missing one fails every Triton row, and only here is it named)
$PYTHON tools/gpu_preflight.py "$DEST/preflight.json" 2>&1 | tee "$DEST/logs/preflight.log"
# usage: gpu_check.sh [all|foundation|planner|predictor|engine]
MODE=${1:-all}
read -r LIM_FOUNDATION LIM_PLANNER LIM_PREDICTOR LIM_ENGINE <<<"${GPU_CHECK_LIMITS:-360 90 45 75}"
rc=0
STEPS=""
declare -A RESULT=([foundation]=gpu_check.json [planner]=gpu_planner.json [predictor]=predictor_check.json
                   [engine]=engine_ep1.json)
step() {  # step NAME SCRIPT LIMIT: run one check, its console to logs/NAME.log, its status in summary.json
    local name=$1 script=$2 limit=$3 status
    rm -f "$DEST/${RESULT[$name]}"  # a rerun into the same folder must not report the last run's JSON
    # timeout signals its whole process group: the ranks a step spawned stop with it
    timeout -k 10 "$limit" $PYTHON "$script" --out "$DEST" 2>&1 | tee "$DEST/logs/$name.log"
    status=${PIPESTATUS[0]}
    [ "$status" = 124 ] && echo "$name: stopped at its time limit of $limit s" | tee -a "$DEST/logs/$name.log"
    [ "$status" = 0 ] || rc=1
    STEPS="$STEPS $name:$status"
}
if [ "$MODE" = all ] || [ "$MODE" = foundation ]; then step foundation tools/gpu_check.py "$LIM_FOUNDATION"; fi
if [ "$MODE" = all ] || [ "$MODE" = planner ]; then step planner tools/gpu_check_planner.py "$LIM_PLANNER"; fi
if [ "$MODE" = all ] || [ "$MODE" = predictor ]; then step predictor tools/gpu_check_predictor.py "$LIM_PREDICTOR"; fi
if [ "$MODE" = all ] || [ "$MODE" = engine ]; then step engine tools/megatron_engine_check.py "$LIM_ENGINE"; fi
# one summary: each step's exit status and the JSON it wrote
$PYTHON - "$DEST" "$STEPS" <<'EOF'
import json, os, sys, time
dest, steps = sys.argv[1], sys.argv[2].split()
files = {"foundation": "gpu_check.json", "planner": "gpu_planner.json", "predictor": "predictor_check.json",
         "engine": "engine_ep1.json"}
out = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "steps": {}}
pre = os.path.join(dest, "preflight.json")
out["preflight"] = json.load(open(pre)) if os.path.exists(pre) else None
for item in steps:
    name, status = item.split(":")
    path = os.path.join(dest, files[name])
    out["steps"][name] = {"exit_status": int(status), "timed_out": int(status) == 124, "log": f"logs/{name}.log",
                          "result": json.load(open(path)) if os.path.exists(path) else None}
json.dump(out, open(os.path.join(dest, "summary.json"), "w"), indent=1)
print("summary:", os.path.join(dest, "summary.json"))
EOF
if [ -n "${PACK_TO:-}" ]; then  # two files for a destination that takes few (a device call's $OUT)
    mkdir -p "$PACK_TO"
    [ "$DEST/summary.json" -ef "$PACK_TO/summary.json" ] || cp "$DEST/summary.json" "$PACK_TO/summary.json"
    tar -czf "$PACK_TO/gpu_check_results.tar.gz" -C "$(dirname "$DEST")" "$(basename "$DEST")"
    echo "packed: $PACK_TO/summary.json $PACK_TO/gpu_check_results.tar.gz"
fi
exit $rc
