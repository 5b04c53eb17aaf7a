#!/usr/bin/env bash
# Every GPU check, in one go (foundation: about 2 minutes on one H200; planner: about 1 minute;
# predictor: under a minute, not yet run on a GPU).
# On a machine without megatron-core (e.g. a bare CUDA image), carry wheels in .whl/ (numba and
# llvmlite too: the host planner every GPU plan is compared with is compiled with numba):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1 nvtx numba llvmlite
# Results: $OUT (or results/gpu_check) /gpu_check.json and eq_*.json, plus the console table.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-results/gpu_check}
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
# usage: gpu_check.sh [all|foundation|planner|predictor]
MODE=${1:-all}
rc=0
if [ "$MODE" = all ] || [ "$MODE" = foundation ]; then
    $PYTHON tools/gpu_check.py --out "$DEST" || rc=1
fi
if [ "$MODE" = all ] || [ "$MODE" = planner ]; then
    $PYTHON tools/gpu_check_planner.py --out "$DEST" || rc=1
fi
if [ "$MODE" = all ] || [ "$MODE" = predictor ]; then
    $PYTHON tools/gpu_check_predictor.py --out "$DEST" || rc=1
fi
exit $rc
