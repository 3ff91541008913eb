#!/usr/bin/env bash
# The GPU check (issue 29) on a machine with one GPU, in one command: install the project from wheels
# brought along (such a machine may have no package index), then bench/gpu_check.py, which writes one
# JSON of figures. Under 8 minutes on an H100-class GPU.
#
#   bench/gpu_check.sh --wheels DIR [--out gpu_check.json] [any other bench/gpu_check.py option]
#   bench/gpu_check.sh --device cpu --size tiny --out check.json     # here, without a GPU (the tests)
#
# Wheels: `pip download -d DIR .` of this project's requirements on a machine with an index, for the GPU
# machine's Python and platform (torch itself is usually there already).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -n "$wheels" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$wheels" -e . || { echo "gpu_check: could not install from $wheels" >&2; exit 2; }
fi
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
