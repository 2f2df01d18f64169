#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc) from PyPI into a cache directory, for machines
# without the CUDA toolkit. Idempotent: a second run with the same pins does nothing.
#
#   eval "$(scripts/install-nvcc.sh)"      # sets NVCC for this shell; then cargo build
#   eval "$(scripts/install-nvcc.sh 13.0)"  # the same: the version argument, default 13.0
#
# Versions: 13.0 only. PyPI has no CUDA 12 nvcc: the nvidia-cuda-nvcc-cu12 wheels (12.0-12.9)
# carry ptxas and libNVVM but not the nvcc driver or its front end, so `12.x` is refused with
# that reason (a CUDA 12 build needs the toolkit from NVIDIA or a distribution).
#
# Progress goes to stderr; stdout carries only the `export NVCC=...` line.
# GROUPNORM_NVCC_PREFIX overrides the install directory.
#
# All five packages are pinned and installed with --no-deps: left to pip, nvidia-cuda-nvcc pulls the
# newest nvidia-cuda-runtime (headers of a newer CUDA than the compiler) and an unpinned
# nvidia-nvvm drifts to a PTX version that a CUDA 13.0 driver cannot load.
set -euo pipefail

version=${1:-13.0}
case "$version" in
  13.0)
    pins=(
      nvidia-cuda-nvcc==13.0.88
      nvidia-cuda-crt==13.0.88
      nvidia-nvvm==13.0.88
      nvidia-cuda-cccl==13.0.85
      nvidia-cuda-runtime==13.0.88
    )
    tag=13.0.88
    ;;
  12.*)
    echo "install-nvcc: no CUDA $version nvcc on PyPI (nvidia-cuda-nvcc-cu12 ships ptxas and libNVVM, not nvcc); install the CUDA $version toolkit and set NVCC" >&2
    exit 2
    ;;
  *)
    echo "install-nvcc: unknown version '$version' (known: 13.0)" >&2
    exit 2
    ;;
esac
prefix=${GROUPNORM_NVCC_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/groupnorm/nvcc-$tag}
nvcc=$prefix/nvidia/cu13/bin/nvcc
stamp=$prefix/.groupnorm-pins

python=${PYTHON:-python3}
if [ -x "$nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
  echo "install-nvcc: already installed in $prefix" >&2
else
  command -v "$python" >/dev/null || { echo "install-nvcc: $python not found; install Python 3 with pip" >&2; exit 1; }
  "$python" -m pip --version >/dev/null 2>&1 || { echo "install-nvcc: pip is missing for $python (apt-get install python3-pip)" >&2; exit 1; }
  echo "install-nvcc: installing ${pins[*]} into $prefix" >&2
  tmp=$prefix.tmp.$$
  rm -rf "$tmp"
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --target "$tmp" "${pins[@]}" >&2
  [ -x "$tmp/nvidia/cu13/bin/nvcc" ] || { echo "install-nvcc: nvcc missing after install in $tmp" >&2; exit 1; }
  printf '%s' "${pins[*]}" > "$tmp/.groupnorm-pins"
  rm -rf "$prefix"
  mkdir -p "$(dirname "$prefix")"
  mv "$tmp" "$prefix"
fi
"$nvcc" --version | tail -n 2 >&2
echo "export NVCC=$nvcc"
