#!/usr/bin/env bash
# The prepared GPU benchmark (benchmarks/gpu.py), as one command for a machine lent for a few minutes.
#
# Here, beforehand:  bash ../shared/tools/device-wheels.sh     (fills ./.whl with the wheels the GPU
#                    machine lacks; only jsonschema and its dependencies are needed by this benchmark)
# Device tool:       run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
#
# Installs what the machine lacks from the carried wheels (no index), puts ./src on the path (no
# build step), then runs gpu.py at paper size with --out "$OUT"; extra arguments go to gpu.py
# (e.g. --sections trainer_defaults,reference --budget 200). Results: $OUT/gpu-benchmark.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
needed="import jsonschema, yaml, tqdm, pandas, PIL, torchvision"
if ! python3 -c "$needed" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  python3 -c "$needed" || { echo "gpu.sh: missing packages and no usable ./.whl (run device-wheels.sh, carry .whl)" >&2; exit 3; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 benchmarks/gpu.py --out "${OUT:-./bench-out}" "$@"
