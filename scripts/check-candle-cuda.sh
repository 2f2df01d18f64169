#!/usr/bin/env bash
# The candle CUDA integration (`--features candle-cuda`) compiles: the Rust side of
# src/candle.rs's CUDA path, against candle-core's `cuda` feature. It cannot link here without
# the CUDA libraries, so this is `cargo check`.
#
#   scripts/check-candle-cuda.sh    # NVCC set (eval "$(scripts/install-nvcc.sh)"); ~15 min on 2 cores
#
# Not in .ci/run: candle-kernels' build script compiles all of candle's own kernels with nvcc,
# which took about 16 minutes of a CI run on 2 cores (the eighth session), a third of its
# budget. Run it when src/candle.rs, the candle version or the cudarc features change. CI keeps
# the cheap half: `cargo tree` shows that no CUDA version is forced on candle's graph.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NVCC:-}" ] || { echo "check-candle-cuda: set NVCC (eval \"\$(scripts/install-nvcc.sh)\")" >&2; exit 1; }
# one kernel architecture: this checks the Rust side; candle's build reads CUDA_COMPUTE_CAP and
# finds nvcc on PATH
CUDA_COMPUTE_CAP=90 GROUPNORM_CUDA_ARCHS=90 PATH="$(dirname "$NVCC"):$PATH" \
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/candle-cuda" \
  cargo check -p groupnorm --features candle-cuda --lib
echo "check-candle-cuda: the candle-cuda feature compiles"
