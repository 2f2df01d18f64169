#!/usr/bin/env bash
# The CPU side-by-side benchmark of BENCHMARKS.md ("CPU results"): ours, PyTorch and candle_nn,
# same threads, same shapes, same timing method (median of warm runs, inputs rotated past a
# 32 MiB last-level cache), one after the other in one invocation, then one table.
#
#   scripts/bench_cpu_side_by_side.sh THREADS OUTDIR [PYTHON]
#
# THREADS: RAYON_NUM_THREADS for ours and candle_nn, torch.set_num_threads and OMP_NUM_THREADS
# for PyTorch. PYTHON: an interpreter with torch (default: python3). Set NO_CANDLE=1 to skip
# candle_nn (it builds the candle bench first, a few minutes). Writes OUTDIR/{ours,torch}-
# {nchw,nhwc}.csv, OUTDIR/candle.csv, OUTDIR/machine.txt and OUTDIR/table.md; prints the table.
# Run it on a quiet machine: `uptime` before and after goes into machine.txt.
set -euo pipefail
threads=${1:?threads}
out=${2:?output directory}
py=${3:-python3}
shapes=${SHAPES:-2x320x64x64:32,8x640x32x32:32,32x1280x8x8:32,4x64x16x16:32,1x128x256x256:32,2x128x32x32:32}
runs=${RUNS:-10}
warmup=${WARMUP:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$out"
cd "$root"

cargo build --release -p groupnorm-cli --no-default-features
bin="$target/release/groupnorm"
candle_bin=
if [ -z "${NO_CANDLE:-}" ]; then
    candle_bin=$(cargo bench --no-default-features --features candle --bench candle --no-run \
        --message-format=json 2>/dev/null |
        "$py" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "candle" and m.get("executable"):
        print(m["executable"])')
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit: $(git rev-parse --short HEAD)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores visible)"
    echo "rustc: $(rustc --version)"
    echo "torch: $("$py" -c 'import torch; print(torch.__version__)')"
    echo "threads: $threads; runs $runs after $warmup warm-ups"
    echo "load before: $(uptime)"
} > "$out/machine.txt"

for lay in nchw nhwc; do
    RAYON_NUM_THREADS=$threads "$bin" bench --device cpu --shapes "$shapes" --dtype all \
        --layout "$lay" --runs "$runs" --warmup "$warmup" --csv "$out/ours-$lay.csv" >/dev/null
    OMP_NUM_THREADS=$threads "$py" scripts/bench_torch.py --device cpu --threads "$threads" \
        --impls torch --no-silu --shapes "$shapes" --dtype all --layout "$lay" --runs "$runs" \
        --warmup "$warmup" --csv "$out/torch-$lay.csv" >/dev/null
done
candle_arg=()
if [ -n "$candle_bin" ]; then
    RAYON_NUM_THREADS=$threads GROUPNORM_CANDLE_CSV="$out/candle.csv" \
        GROUPNORM_CANDLE_SHAPES="$shapes" GROUPNORM_CANDLE_RUNS=$runs "$candle_bin" >/dev/null
    candle_arg=(--candle "$out/candle.csv")
fi
echo "load after: $(uptime)" >> "$out/machine.txt"

"$py" scripts/compare_bench.py "$out/ours-nchw.csv,$out/ours-nhwc.csv" \
    "$out/torch-nchw.csv,$out/torch-nhwc.csv" "${candle_arg[@]}" --markdown | tee "$out/table.md"
cat "$out/machine.txt"
