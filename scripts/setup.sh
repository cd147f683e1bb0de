#!/usr/bin/env bash
# Creates .venv (once) and installs Kinetoscope with its test dependencies into it. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: on the CPU-only development machines this takes the local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine, install the torch build you want before running this.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
# litdata (the `scale` extra) without its torchvision requirement, which would replace the CPU torch with a CUDA
# build; its other requirements come with `.[dev]`.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps "litdata>=0.2.60"
