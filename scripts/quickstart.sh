#!/usr/bin/env bash
# Trains the quickstart model on the built-in synthetic captioned videos (CPU, a few minutes) and writes sample
# videos (MP4, GIF, PNG frame grid) to runs/quickstart/samples/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/kinetoscope fit -c configs/quickstart.yaml "$@"
.venv/bin/kinetoscope predict -c configs/quickstart.yaml --ckpt_path last
echo "samples written to runs/quickstart/samples/"
ls runs/quickstart/samples/
