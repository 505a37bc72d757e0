#!/usr/bin/env bash
# Download the wheels of adapters/megatron/wheels.txt for the GPU machine (CPython 3.12, x86-64 manylinux) into
# .whl/ at the repository root, which git ignores; a device command installs them with pip --no-index --no-deps.
set -euo pipefail
root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
cd "$root"
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
python="${PYTHON:-.venv/bin/python}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*#' adapters/megatron/wheels.txt | grep -v '^\s*$' | xargs "$python" -m pip download --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl
ls -la .whl/megatron_core-*.whl
