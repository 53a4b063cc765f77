#!/usr/bin/env bash
# GPU evidence in one command: benchmarks/gpu_evidence.sh OUT_DIR [--smoke] [options]
# Runs benchmarks/gpu_evidence.py with this checkout's packages first on the path, so it works
# whether or not the project is installed (pip install --no-deps -e . or not at all).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" "${root}/benchmarks/gpu_evidence.py" "$@"
