#!/usr/bin/env bash
# Every GPU check, in one go (foundation: about 2 minutes on one H200 before its EP 1 CUDA-graph and
# copy steps were added, neither yet run on a GPU; planner: about 1 minute; predictor: under a minute,
# not yet run on a GPU; engine: Megatron-Core's inference engine serving the PROBE spec, not yet run on a
# GPU).
# On a machine without megatron-core (e.g. a bare CUDA image), carry wheels in .whl/ (numba and
# llvmlite too: the host planner every GPU plan is compared with is compiled with numba):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 nvtx numba llvmlite tqdm
# (tqdm: Megatron's StaticInferenceEngine requires it, for the engine step)
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
# usage: gpu_check.sh [all|foundation|planner|predictor|engine]
MODE=${1:-all}
rc=0
STEPS=""
step() {  # step NAME SCRIPT: run one check, its console to logs/NAME.log, its status in summary.json
    local name=$1 script=$2 status
    $PYTHON "$script" --out "$DEST" 2>&1 | tee "$DEST/logs/$name.log"
    status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || rc=1
    STEPS="$STEPS $name:$status"
}
if [ "$MODE" = all ] || [ "$MODE" = foundation ]; then step foundation tools/gpu_check.py; fi
if [ "$MODE" = all ] || [ "$MODE" = planner ]; then step planner tools/gpu_check_planner.py; fi
if [ "$MODE" = all ] || [ "$MODE" = predictor ]; then step predictor tools/gpu_check_predictor.py; fi
if [ "$MODE" = all ] || [ "$MODE" = engine ]; then step engine tools/megatron_engine_check.py; fi
# one summary: each step's exit status and the JSON it wrote
$PYTHON - "$DEST" "$STEPS" <<'EOF'
import json, os, sys, time
dest, steps = sys.argv[1], sys.argv[2].split()
files = {"foundation": "gpu_check.json", "planner": "gpu_planner.json", "predictor": "predictor_check.json",
         "engine": "engine_ep1.json"}
out = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "steps": {}}
for item in steps:
    name, status = item.split(":")
    path = os.path.join(dest, files[name])
    out["steps"][name] = {"exit_status": int(status), "log": f"logs/{name}.log",
                          "result": json.load(open(path)) if os.path.exists(path) else None}
json.dump(out, open(os.path.join(dest, "summary.json"), "w"), indent=1)
print("summary:", os.path.join(dest, "summary.json"))
EOF
exit $rc
