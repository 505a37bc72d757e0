#!/usr/bin/env bash
# Download the wheels TorchTitan 0.2.2 needs on the GPU machine (Python 3.12, torch 2.11 preinstalled, no network)
# into .whl/ at the repository root; the device command installs them with pip --no-index --no-deps.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
PY=${PYTHON:-.venv/bin/python}
grep -v '^\s*#' adapters/torchtitan/wheels.txt | xargs "$PY" -m pip download --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
