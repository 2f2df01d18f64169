#!/usr/bin/env bash
# CI check: every kernel compiles with the pinned CUDA 12.4 nvcc (the oldest the crate supports,
# build.rs's MIN_NVCC), for every architecture that nvcc can target, with no register spill; and
# build.rs's own handling of a real 12.x nvcc (version check, architecture filtering through
# `nvcc --list-gpu-arch`, the error for an architecture it cannot target).
#
#   scripts/check-cuda12.sh        # exits non-zero on a compile error, a spill or a wrong list
#
# The compiler is CUDA 12.4.1's nvcc (Debian trixie's nvidia-cuda-toolkit with the matching PyPI
# headers, installed once into ~/.cache/groupnorm by `scripts/install-nvcc.sh 12.4`). It runs
# the whole nvcc pipeline (host pass with the machine's gcc, cicc, ptxas, fatbinary) the way a
# user's CUDA 12.4 toolkit would, through build.rs: `cargo check -p groupnorm --lib --features
# bench` (the benchmark-only baseline kernels too) with the default architecture list. The
# cudarc bindings follow that nvcc too (it is first on PATH), so the Rust side is checked
# against CUDA 12.4's driver API.
#
# Target directory: $GROUPNORM_CUDA12_TARGET, else target/cuda12 (not the main one: a change
# of NVCC reruns build.rs, which would rebuild the 13.0 kernels there afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/install-nvcc.sh 12.4)"
nvcc=$NVCC
target=${GROUPNORM_CUDA12_TARGET:-target/cuda12}
# what nvcc 12.4 can target of the default list (build.rs: sm_100 and sm_120 need 12.8)
expect_archs="75 80 86 89 90"

run_check() { # [VAR=value ...]
  # the architecture variables and any other nvcc are cleared: build.rs must find this one
  env -u GROUPNORM_CUDA_ARCHS -u CUDA_COMPUTE_CAP -u CUDA_HOME -u CUDA_PATH -u NVCC_CCBIN \
    -u GROUPNORM_REQUIRE_NVCC -u CUDARC_CUDA_VERSION \
    NVCC="$nvcc" PATH="$(dirname "$nvcc"):$PATH" CARGO_TARGET_DIR="$target" "$@" \
    cargo check -p groupnorm --lib --features bench --message-format short
}

echo "check-cuda12: cargo check with nvcc 12.4, default architectures, benchmark kernels too" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! run_check > "$log" 2>&1; then
  cat "$log"
  echo "check-cuda12: the build with nvcc 12.4 failed (above)" >&2
  exit 1
fi
cat "$log"
want="groupnorm GPU kernels (nvcc 12.4): SASS for $(printf 'sm_%s,' $expect_archs | sed 's/,$//'), PTX for compute_90"
grep -qF "$want" "$log" || { echo "check-cuda12: expected build.rs to report: $want" >&2; exit 1; }

# cudarc's bindings followed the nvcc on PATH (its `cuda-version-from-build-system`, which this
# crate leaves to the graph): CUDA 12.4's driver API
grep -qs 'feature="cuda-12040"' "$target"/debug/build/cudarc-*/output ||
  { echo "check-cuda12: cudarc did not select the CUDA 12.4 bindings (cuda-12040)" >&2; exit 1; }

# Independent of build.rs's own spill check: read ptxas's report for the build above.
out=$(ls -td "$target"/debug/build/groupnorm-*/out 2>/dev/null | while read -r d; do
  [ -f "$d/ptxas-report.txt" ] && { echo "$d"; break; }; done)
[ -n "$out" ] || { echo "check-cuda12: no ptxas-report.txt under $target/debug/build" >&2; exit 1; }
report=$out/ptxas-report.txt
entries=$(grep -o "Compiling entry function '[^']*' for 'sm_[0-9]*'" "$report" | sort -u)
kernels=$(echo "$entries" | sed "s/.*function '\([^']*\)'.*/\1/" | sort -u)
nkernels=$(echo "$kernels" | grep -c .)
for a in $expect_archs; do
  n=$(echo "$entries" | grep -c "for 'sm_$a'" || true)
  [ "$n" = "$nkernels" ] || { echo "check-cuda12: $n of $nkernels kernels compiled for sm_$a" >&2; exit 1; }
done
spills=$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$report" || true)
[ -z "$spills" ] || { echo "check-cuda12: register spills:" >&2; echo "$spills" >&2; exit 1; }
# and the fatbins hold exactly that SASS, plus PTX for the newest
for fb in "$out"/*.fatbin; do
  elf=$("$CUOBJDUMP" --list-elf "$fb" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
  [ "$elf" = "$(printf 'sm_%s ' $expect_archs)" ] ||
    { echo "check-cuda12: $(basename "$fb") has SASS for $elf" >&2; exit 1; }
  "$CUOBJDUMP" --list-ptx "$fb" | grep -q 'sm_90' ||
    { echo "check-cuda12: $(basename "$fb") has no compute_90 PTX" >&2; exit 1; }
done
echo "check-cuda12: cudarc bindings cuda-12040; $nkernels kernels x sm_${expect_archs// /,sm_} compiled by nvcc 12.4, no spills; $(ls "$out"/*.fatbin | wc -l) fatbins checked with cuobjdump" >&2

# build.rs refuses, with a reason, an architecture that this nvcc cannot target
if run_check GROUPNORM_CUDA_ARCHS=90,100 > "$log" 2>&1; then
  echo "check-cuda12: GROUPNORM_CUDA_ARCHS=90,100 built with nvcc 12.4 (expected a refusal)" >&2
  exit 1
fi
grep -q "asks for sm_100, which .* cannot target" "$log" ||
  { cat "$log"; echo "check-cuda12: expected build.rs's 'cannot target' message" >&2; exit 1; }
echo "check-cuda12: GROUPNORM_CUDA_ARCHS=90,100 is refused by nvcc 12.4's build, as it should be" >&2
echo "check-cuda12: passed" >&2
