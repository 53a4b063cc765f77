#!/usr/bin/env bash
# GPU evidence in one command: benchmarks/gpu_evidence.sh [--install] OUT_DIR [--smoke] [options]
#
# Runs `python -m benchmarks.gpu_evidence` (options: its --help) with this checkout's packages,
# whether or not the project is installed, offline. `lbw.train` and `lbw.models` live in the
# folders train/ and models/ (pyproject.toml's package-dir), so the checkout's root on the path
# is not enough: a temporary folder holds the links lbw/train -> train and lbw/models -> models
# and goes first on PYTHONPATH, then the root (lbw_optax, benchmarks). --install first tries
# `pip install --no-deps --no-build-isolation -e .` (it needs setuptools>=77, which an offline
# machine may lack; a failure is reported and the links are used all the same).
# PYTHON names the interpreter (default: python3).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [[ "${1:-}" == "--install" ]]; then
  shift
  if ! "${py}" -m pip install --quiet --no-deps --no-build-isolation -e "${root}"; then
    echo "gpu_evidence.sh: pip install -e ${root} failed; using the links instead" >&2
  fi
fi
links="$(mktemp -d "${TMPDIR:-/tmp}/lbw-links.XXXXXX")" || exit 1
trap 'rm -rf "${links}"' EXIT
mkdir -p "${links}/lbw"
ln -s "${root}/train" "${links}/lbw/train"
ln -s "${root}/models" "${links}/lbw/models"
export PYTHONPATH="${links}:${root}${PYTHONPATH:+:${PYTHONPATH}}"
# -P: the current folder does not go first on the path (its own benchmarks/ or lbw/ would).
"${py}" -P -m benchmarks.gpu_evidence "$@"
