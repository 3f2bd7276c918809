#!/usr/bin/env bash
# l2d-bench entry point.
#   ./run.sh [hydra overrides...]      run the benchmark (default: the whole default grid)
#   ./run.sh test [pytest args...]     run the test suite
# First use creates .venv/ in the repository and installs the pinned dependencies
# (requirements.txt pinned by constraints.txt); later runs reuse it and reinstall only when those files change.
# L2D_JAX=cuda installs CUDA 12 JAX instead of the CPU build (NVIDIA GPU machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=.venv
JAX_FLAVOUR=${L2D_JAX:-cpu}
STAMP="$VENV/.installed"
want=$(cat requirements.txt constraints.txt constraints-cuda.txt | sha256sum | cut -c1-16)-$JAX_FLAVOUR

if [ ! -x "$VENV/bin/python" ]; then
  echo "[run.sh] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] installing pinned dependencies (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  extra=()
  if [ "$JAX_FLAVOUR" = cuda ]; then  # the CUDA 12 plugin and libraries pinned for this JAX
    jax_version=$(grep -E '^jax==' constraints.txt | cut -d= -f3)
    extra=(-c constraints-cuda.txt "jax[cuda12]==$jax_version")
  fi
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -r requirements.txt "${extra[@]}"
  echo "$want" > "$STAMP"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = test ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m app "$@"
