#!/usr/bin/env bash
# Everything one visit to a lent GPU machine should do, in one command, logging under $OUT.
#
# Here (with Rust):      eval "$(scripts/install-nvcc.sh)"; ../shared/tools/gpu-pack
#                        cargo build --release -p groupnorm-capi        # the C library, for torchcheck
#                        mkdir -p .gpu/lib && cp target/release/libgroupnorm.so .gpu/lib/
#                        pip wheel --no-deps -w .gpu/wheels ./python    # the Python package (with NVCC set)
# There (device tool):   run with carry [".gpu"]:  bash scripts/gpu-visit.sh [quick]
#
# Steps, each logged to $OUT/<step>.log, none stopping the others; a summary at the end:
#   tests      the whole suite with GROUPNORM_REQUIRE_GPU=1
#   sanitizer  compute-sanitizer memcheck, racecheck, initcheck, synccheck over the GPU parity tests
#   check      groupnorm check over the small and sd sets, every dtype pair
#   bench      groupnorm bench over sd (+ large unless quick), CSV in $OUT/ours.csv; the same
#              with the split path forced (what the cluster path replaces on 9.0+), and the
#              NHWC and SiLU variants
#   torch      scripts/bench_torch.py on the same shapes, then scripts/compare_bench.py (table+SVG)
#   torchcheck scripts/torch_check.py: the C ABI called from PyTorch on CUDA tensors
#   python_cuda the Python package's CUDA tests (python/tests/test_cuda.py), from the packed wheel
#   model_vs_measured  docs/kernel-report.md's first-order model beside the bench's measurement
# "quick" trims the sanitizer to one test and the bench to the N = 1 sd shapes; "short" (below)
# is the prioritized subset with a time limit per step, for one device call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-visit}
mkdir -p "$OUT"
quick=${1:-}
export GROUPNORM_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
bin=.gpu/bin/bin-groupnorm
[ -x "$bin" ] || { echo "no $bin: run ../shared/tools/gpu-pack first and carry .gpu"; exit 2; }
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d
done
declare -A result
# The first-order model of docs/kernel-report.md (tools/kernel-report: a model, not a
# measurement) beside what the bench measured, per shape and pass (f16, NCHW, the planner's
# path), so that the visit can correct the model's constants (latency, launch cost).
model_vs_measured() {
  python3 - "$OUT/ours.csv" docs/kernel-report.md "$(cat "$OUT/device.txt" 2>/dev/null)" <<'PY'
import csv, sys
ours, report, device = sys.argv[1], sys.argv[2], sys.argv[3]
col = 5 if "H100" in device else 7  # H100 or H200 columns of the model table (µs, %)
model, in_table = {}, False
for line in open(report):
    if line.startswith("## First-order model"):
        in_table = True
    elif line.startswith("## "):
        in_table = False
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if in_table and len(cells) >= 10 and cells[3] == "Auto" and cells[1] == "NCHW":
        model[(cells[0].split()[-1], cells[2])] = (cells[col], cells[col + 1], cells[4])
print(f"model columns: {'H100' if col == 5 else 'H200'} (device: {device.splitlines()[-1] if device else '?'}); "
      "model %: of the datasheet copy bandwidth; measured %: of the copy bandwidth the bench measured")
print(f"{'shape':24} {'pass':4} {'model path':12} {'model us':>9} {'model %':>8} | {'measured path':14} "
      f"{'measured us':>11} {'measured %':>10} {'graph us':>9} {'latency us':>10}")
for row in csv.DictReader(open(ours)):
    key = (row["shape"], row["pass"])
    if row["dtype"].split("/")[0] != "f16" or key not in model:
        continue
    t, pct, path = model.pop(key)
    us = lambda c: f"{float(row[c]) * 1e3:.1f}" if row.get(c) else "-"
    print(f"{key[0]:24} {key[1]:4} {path:12} {t:>9} {pct:>8} | {row['path']:14} "
          f"{us('time_ms'):>11} {row['pct_copy']:>10} {us('graph_ms'):>9} {us('latency_ms'):>10}")
for key in sorted(model):
    print(f"{key[0]:24} {key[1]:4} (model only: not in the bench shapes)")
PY
}
summary() {
  echo; echo "=== summary (logs in $OUT)"
  for k in "${!result[@]}"; do echo "$k: ${result[$k]}"; done | sort | tee "$OUT/summary.txt"
}

step() { # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then result[$name]="ok"; else result[$name]="FAILED (exit $?)"; fi
  result[$name]+=" in $((SECONDS - t0)) s"
  tail -n 5 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv | tee "$OUT/device.txt"

# "short": the highest-value checks only, each under its own time limit, for a visit of one
# device call (about 9 minutes of device time in all, so that a rerun still fits the 15):
# the bench's three timings on the six shapes of the first visit, NCHW and NHWC, beside
# PyTorch; the sanitizer's race, init and sync checks on the small parity tests; the
# GPU-only tests. Pack with `../shared/tools/gpu-pack --test gpu_parity --test kernels`.
if [ "$quick" = short ]; then
  Q=1x320x64x64,1x640x32x32,1x1280x16x16,1x512x128x128,2x320x64x64,1x512x64x64
  step bench timeout 120 "$bin" bench --device gpu --shapes "$Q" --dtype f16,f32 \
    --csv "$OUT/ours.csv"
  step bench_nhwc timeout 90 "$bin" bench --device gpu --shapes "$Q" --dtype f16 --layout nhwc \
    --csv "$OUT/ours_nhwc.csv"
  if python3 -c "import torch" 2>/dev/null; then
    step torch timeout 120 python3 scripts/bench_torch.py --shapes "$Q" --dtype f16,f32 \
      --impls torch --no-silu --csv "$OUT/torch.csv"
    step compare timeout 20 python3 scripts/compare_bench.py "$OUT/ours.csv" "$OUT/torch.csv" --markdown
  fi
  [ -f "$OUT/ours.csv" ] && step model_vs_measured model_vs_measured
  if command -v compute-sanitizer >/dev/null; then
    for tool in racecheck initcheck synccheck; do
      step "sanitizer-$tool" timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        .gpu/bin/test-kernels --test-threads=1 small_and_odd_shapes
    done
  fi
  step gpu_parity timeout 60 .gpu/bin/test-gpu_parity --test-threads=1
  summary
  exit 0
fi
step tests bash .gpu/run tests

if command -v compute-sanitizer >/dev/null; then
  filter=""; [ "$quick" = quick ] && filter="small_and_odd_shapes"
  for tool in memcheck racecheck initcheck synccheck; do
    # the parity checks (tests/kernels.rs), then the GPU-only ones (tests/gpu_parity.rs)
    step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      .gpu/bin/test-kernels --test-threads=1 $filter
    step "sanitizer-$tool-gpu-only" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      .gpu/bin/test-gpu_parity --test-threads=1
  done
else
  result[sanitizer]="not run: compute-sanitizer not found"
fi

step check "$bin" check --device gpu --shapes small,sd --dtype all
step check_nhwc "$bin" check --device gpu --shapes small,sd --dtype all --layout nhwc
step check_silu "$bin" check --device gpu --shapes small,sd --dtype f16,f32 --silu
step check_silu_nhwc "$bin" check --device gpu --shapes small,sd --dtype f16,f32 --silu --layout nhwc
shapes=sd; [ "$quick" = quick ] && shapes=$(printf '1x%s,' 320x64x64 640x32x32 1280x16x16 1280x8x8 512x128x128 128x512x512 | sed 's/,$//')
[ "$quick" = quick ] || shapes=sd,large
step bench "$bin" bench --device gpu --shapes "$shapes" --csv "$OUT/ours.csv" --json "$OUT/ours.json"
# the split path on the same shapes: on compute capability 9.0+ the planner takes the cluster
# path for few long rows (the `path` column says which ran), so this is what clusters replace
step bench_split "$bin" bench --device gpu --shapes "$shapes" --dtype f16 --path split --csv "$OUT/ours_split.csv"
for v in "nhwc:--layout nhwc" "silu:--silu" "silu_nhwc:--silu --layout nhwc"; do
  # shellcheck disable=SC2086
  step "bench_${v%%:*}" "$bin" bench --device gpu --shapes sd --dtype f16 ${v#*:} --csv "$OUT/ours_${v%%:*}.csv"
done
if python3 -c "import torch" 2>/dev/null; then
  step torch python3 scripts/bench_torch.py --shapes "$shapes" --csv "$OUT/torch.csv"
  step compare python3 scripts/compare_bench.py "$OUT/ours.csv" "$OUT/torch.csv" --svg "$OUT/bench.svg" --markdown
  step torch_nhwc python3 scripts/bench_torch.py --shapes sd --dtype f16 --layout nhwc --csv "$OUT/torch_nhwc.csv"
  for v in nhwc silu; do
    t="$OUT/torch.csv"; [ "$v" = nhwc ] && t="$OUT/torch_nhwc.csv"
    step "compare_$v" python3 scripts/compare_bench.py "$OUT/ours_$v.csv" "$t" --markdown
  done
  step compare_silu_nhwc python3 scripts/compare_bench.py "$OUT/ours_silu_nhwc.csv" "$OUT/torch_nhwc.csv" --markdown
  lib=$(ls .gpu/lib/libgroupnorm.so target/release/libgroupnorm.so 2>/dev/null | head -n 1)
  if [ -f scripts/torch_check.py ] && [ -n "$lib" ]; then
    step torchcheck python3 scripts/torch_check.py "$lib"
  else
    result[torchcheck]="not run: no scripts/torch_check.py or no libgroupnorm.so packed (copy target/release/libgroupnorm.so into .gpu/lib/)"
  fi
  wheel=$(ls .gpu/wheels/groupnorm-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ]; then
    python_cuda() {
      python3 -m pip install -q --no-deps --target /tmp/gn-py "$wheel" &&
        PYTHONPATH=/tmp/gn-py python3 -m pytest python/tests/test_cuda.py -q -rs -p no:cacheprovider
    }
    step python_cuda python_cuda
  else
    result[python_cuda]="not run: no wheel in .gpu/wheels (pip wheel --no-deps -w .gpu/wheels ./python here)"
  fi
else
  result[torch]="not run: PyTorch not importable"
fi

if [ -f "$OUT/ours.csv" ]; then
  step model_vs_measured model_vs_measured
  cat "$OUT/model_vs_measured.log"
else
  result[model_vs_measured]="not run: no $OUT/ours.csv (the bench step failed)"
fi

summary
