#!/usr/bin/env bash
# Train-step speed and memory on one accelerator, written to one JSON file.
#
#   bash benchmarks/device.sh [OUT_DIR]          # 135M and 1B, bf16, on a GPU or TPU (≤ 5 min on one H200)
#   bash benchmarks/device.sh OUT_DIR --tiny     # the same suite, CPU-sized (tested on CPU)
#
# Every attention implementation of the backend × remat policy (none, dots, full):
# tokens/s, MFU against the chip's bf16 datasheet peak (retention_jax/perf.py),
# compiled per-device memory, and the top XLA ops of one short profile per model, in
# OUT_DIR/device.json (OUT_DIR defaults to $OUT, else the current directory).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
shift || true
exec python benchmarks/step.py --suite=device --out="$out" "$@"
