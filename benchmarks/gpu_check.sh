#!/usr/bin/env bash
# The GPU checks, as one short run for a lent device machine (/work/.library/device/README.md): the CUDA-only tests
# (tests/test_cuda.py: FSDP1 in bf16, xformers if importable and FlexAttention against per-sample SDPA, compiled DiT
# in bf16), a record of the attention kernels that passed (benchmarks/record_verified_backends.py, read by AUTO)
# and the bf16 training/sampling benchmark against diffusers' Wan transformer with MFU. Results go to $OUT (the device tool's return folder), or to
# benchmarks/results when OUT is unset.
#
# The device image has torch, lightning, torchmetrics and pytest but not PyAV or diffusers. Fetch their wheels here
# first (once; .whl/ is git-ignored through .git/info/exclude) and name .whl in the run's carry:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av diffusers importlib_metadata
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# DEVICE=cpu SIZE="--model-width 64 --depth 2 --heads 2" bash benchmarks/gpu_check.sh  is a dry run of the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
# DiT-B widths (768 wide, 12 deep, 12 heads); 2 clips of 8 x 64 x 64 latents = 16384 tokens per step
SIZE=${SIZE:---model-width 768 --depth 12 --heads 12 --frames 8 --height 64 --width 64}
PYTHON=${PYTHON:-python3}

if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi

status=0
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/test_cuda.xml" 2>&1 \
  | tee "$OUT/test_cuda.log" || status=1
# Which attention kernels AUTO may pick on this GPU: those whose equality tests just passed. The record is merged
# into a copy of the repository's file; copy $OUT/verified_backends.json back to benchmarks/results/ and commit it.
if [ "$DEVICE" = cuda ]; then
  if [ "$OUT" != benchmarks/results ] && [ -f benchmarks/results/verified_backends.json ]; then
    cp benchmarks/results/verified_backends.json "$OUT/verified_backends.json"
  fi
  "$PYTHON" benchmarks/record_verified_backends.py --junit "$OUT/test_cuda.xml" --out "$OUT/verified_backends.json" \
    2>&1 | tee "$OUT/verified_backends.log" || status=1
fi
# shellcheck disable=SC2086  # SIZE is a list of arguments
"$PYTHON" benchmarks/dit_vs_diffusers.py --device "$DEVICE" --precision bf16 --compile $SIZE \
  --repeats 10 --sampling-repeats 3 --out "$OUT/dit_vs_diffusers_${DEVICE}_bf16.json" 2>&1 \
  | tee "$OUT/dit_vs_diffusers_${DEVICE}_bf16.log" || status=1
exit $status
