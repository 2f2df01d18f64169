#!/usr/bin/env bash
# Installs a pinned CUDA compiler (nvcc) into a cache directory, for machines without the CUDA
# toolkit: CUDA 13.0 from PyPI, or CUDA 12.4 from Debian's and PyPI's packages (CI builds the
# kernels with both, see .ci/run and scripts/check-cuda12.sh). Idempotent: a second run with the
# same pins does nothing.
#
#   eval "$(scripts/install-nvcc.sh)"       # sets NVCC for this shell; then cargo build
#   eval "$(scripts/install-nvcc.sh 13.0)"  # the same: the version argument, default 13.0
#   eval "$(scripts/install-nvcc.sh 12.4)"  # CUDA 12.4.1's nvcc: kernels for 12.x drivers too
#
# 13.0: five PyPI wheels (below). PyPI has no CUDA 12 nvcc: the nvidia-cuda-nvcc-cu12 wheels
# (12.0-12.9) carry ptxas, libNVVM and the crt headers but not the nvcc driver, cudafe++ or cicc.
# 12.4: so the compiler comes from Debian 13 (trixie)'s non-free `nvidia-cuda-toolkit`
# 12.4.131~12.4.1-2 (NVIDIA's CUDA 12.4.1 binaries: nvcc, cudafe++, cicc, ptxas, fatbinary) and
# `libcu++-dev` 2.3.2 (the <nv/target> headers cuda_fp16.h needs; CUDA 12.4 ships CCCL 2.3.2),
# fetched with `apt-get download` through a private APT directory (the machine's own APT
# configuration and packages are untouched; nothing is installed with dpkg) and unpacked with
# `dpkg-deb -x`; the CUDA runtime and crt headers, which Debian ships only in its 930 MB
# `nvidia-cuda-dev`, come from the matching 12.4.1 PyPI wheels. All of it is checked against the
# SHA-256 sums below and laid out as a toolkit with its own nvcc.profile. Needs apt-get and
# dpkg-deb (Debian or Ubuntu), and a host gcc that nvcc 12.4 accepts (gcc <= 13; set NVCC_CCBIN
# otherwise). The Debian mirror is the one this machine's APT sources name (its trixie suite), or
# GROUPNORM_DEBIAN_MIRROR.
#
# Progress goes to stderr; stdout carries only `export` lines: NVCC, and CUOBJDUMP (the SASS
# tools of the kernel report, see below).
# GROUPNORM_NVCC_PREFIX overrides the install directory.
#
# All five 13.0 packages are pinned and installed with --no-deps: left to pip, nvidia-cuda-nvcc
# pulls the newest nvidia-cuda-runtime (headers of a newer CUDA than the compiler) and an unpinned
# nvidia-nvvm drifts to a PTX version that a CUDA 13.0 driver cannot load.
set -euo pipefail

python=${PYTHON:-python3}

need_pip() {
  command -v "$python" >/dev/null || { echo "install-nvcc: $python not found; install Python 3 with pip" >&2; exit 1; }
  "$python" -m pip --version >/dev/null 2>&1 || { echo "install-nvcc: pip is missing for $python (apt-get install python3-pip)" >&2; exit 1; }
}

# CUDA 12.4.1: Debian trixie's nvcc and its tools, PyPI's headers (see the top of this file).
install_cuda124() {
  local debs=(
    "nvidia-cuda-toolkit=12.4.131~12.4.1-2 cd5fe85aee38d108b315f408a688641478f2402622a10c677478eb7a6c4e5319"
    "libcu++-dev=2.3.2-2 30e911c1909265591b5ea793df0e49e56bed631238b68b3e75c97590c4985686"
  )
  local wheels=(
    "nvidia-cuda-nvcc-cu12==12.4.131 --hash=sha256:e4c9a35435c3b0e36c6397c5696334c9ea6650e524736cbd1c5d345ea099bb04"
    "nvidia-cuda-runtime-cu12==12.4.127 --hash=sha256:64403288fa2136ee8e467cdc9c9427e0434110899d07c779f25b5c068934faa5"
  )
  local prefix=${GROUPNORM_NVCC_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/groupnorm/nvcc-12.4.131}
  local stamp=$prefix/.groupnorm-pins pins="${debs[*]} ${wheels[*]}"
  if [ -x "$prefix/bin/nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
    echo "install-nvcc: already installed in $prefix" >&2
  else
    need_pip
    for tool in apt-get dpkg-deb sha256sum; do
      command -v "$tool" >/dev/null || { echo "install-nvcc: 12.4 needs $tool (Debian's packages)" >&2; exit 1; }
    done
    local mirror=${GROUPNORM_DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
      # the Debian archive this machine already uses (deb822 `URIs:` or one-line `deb` sources)
      mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' |
        tr ' ' '\n' | grep -E '/debian/?$' | head -n 1 || true)
      [ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) { print $i; exit } }' || true)
      [ -n "$mirror" ] || { echo "install-nvcc: no Debian archive in this machine's APT sources; set GROUPNORM_DEBIAN_MIRROR" >&2; exit 1; }
    fi
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || { echo "install-nvcc: $keyring missing (apt-get install debian-archive-keyring)" >&2; exit 1; }
    echo "install-nvcc: CUDA 12.4.1 from Debian trixie ($mirror) and PyPI into $prefix" >&2
    local tmp=$prefix.tmp.$$
    rm -rf "$tmp"
    local apt=$tmp/apt
    mkdir -p "$apt/etc/preferences.d" "$apt/etc/sources.list.d" \
      "$apt/lists/partial" "$apt/cache/archives/partial" "$tmp/debs" "$tmp/root" "$tmp/wheels"
    : > "$apt/status"
    echo "deb [signed-by=$keyring] $mirror trixie main non-free" > "$apt/etc/sources.list"
    # this machine's APT settings (proxies, ...) from /etc/apt/apt.conf.d, its own everything else
    cat > "$apt/apt.conf" <<EOF
Dir::State "$apt";
Dir::State::lists "$apt/lists";
Dir::State::status "$apt/status";
Dir::Cache "$apt/cache";
Dir::Etc "$apt/etc";
Dir::Etc::sourcelist "$apt/etc/sources.list";
Dir::Etc::sourceparts "$apt/etc/sources.list.d";
Dir::Etc::parts "/etc/apt/apt.conf.d";
Dir::Etc::preferencesparts "$apt/etc/preferences.d";
APT::Architecture "amd64";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
EOF
    APT_CONFIG=$apt/apt.conf apt-get -q update >&2
    local entry name sum
    for entry in "${debs[@]}"; do
      name=${entry%% *}
      (cd "$tmp/debs" && APT_CONFIG=$apt/apt.conf apt-get -q download "$name" >&2)
    done
    for entry in "${debs[@]}"; do
      name=${entry%%=*}
      sum=${entry##* }
      local deb
      deb=$(ls "$tmp/debs/${name}"_*.deb)
      echo "$sum  $deb" | sha256sum -c --quiet - >&2 ||
        { echo "install-nvcc: $deb does not match its pinned SHA-256" >&2; exit 1; }
      dpkg-deb -x "$deb" "$tmp/root"
    done
    printf '%s\n' "${wheels[@]}" > "$tmp/requirements.txt"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
      --require-hashes --target "$tmp/wheels" -r "$tmp/requirements.txt" >&2
    # the toolkit layout nvcc expects beside itself: bin/ (nvcc, nvcc.profile, cudafe++, ptxas,
    # fatbinary, ...), nvvm/bin/cicc, nvvm/libdevice, include/
    local t=$tmp/toolkit r=$tmp/root/usr
    mkdir -p "$t/bin" "$t/nvvm/bin" "$t/nvvm/libdevice" "$t/include"
    cp -a "$r/lib/nvidia-cuda-toolkit/bin/nvcc" "$r/lib/nvidia-cuda-toolkit/bin/crt" "$t/bin/"
    local b
    for b in cudafe++ ptxas fatbinary nvlink bin2c nvprune cuobjdump nvdisasm cu++filt; do
      cp -a "$r/bin/$b" "$t/bin/"
    done
    cp -a "$r/lib/nvidia-cuda-toolkit/bin/cicc" "$t/nvvm/bin/"
    cp -a "$r/lib/nvidia-cuda-toolkit/libdevice/libdevice.10.bc" "$t/nvvm/libdevice/"
    cp -a "$tmp/wheels/nvidia/cuda_runtime/include/." "$tmp/wheels/nvidia/cuda_nvcc/include/." \
      "$r/include/." "$t/include/"
    rm -f "$t/include/__init__.py"
    # Debian's /etc/nvcc.profile names /usr/lib/nvidia-cuda-toolkit; this one is relative to nvcc
    cat > "$t/bin/nvcc.profile" <<'EOF'
TOP                = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
PATH              += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES          += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES         =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS      +=
PTXAS_FLAGS       +=
EOF
    "$t/bin/nvcc" --version | grep -q 'release 12.4, V12.4.131' ||
      { echo "install-nvcc: $t/bin/nvcc is not nvcc 12.4.131" >&2; exit 1; }
    printf '%s' "$pins" > "$t/.groupnorm-pins"
    rm -rf "$prefix"
    mkdir -p "$(dirname "$prefix")"
    mv "$t" "$prefix"
    rm -rf "$tmp"
  fi
  "$prefix/bin/nvcc" --version | tail -n 2 >&2
  echo "export NVCC=$prefix/bin/nvcc"
  # CUDA 12.4's own SASS tools (nvdisasm beside cuobjdump), for 12.4's cubins
  echo "export CUOBJDUMP=$prefix/bin/cuobjdump"
}

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
  12.4)
    install_cuda124
    exit 0
    ;;
  12.*)
    echo "install-nvcc: no CUDA $version nvcc here (this script installs 12.4 and 13.0; PyPI's nvidia-cuda-nvcc-cu12 ships ptxas and libNVVM, not nvcc); install the CUDA $version toolkit and set NVCC" >&2
    exit 2
    ;;
  *)
    echo "install-nvcc: unknown version '$version' (known: 13.0, 12.4)" >&2
    exit 2
    ;;
esac
prefix=${GROUPNORM_NVCC_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/groupnorm/nvcc-$tag}
nvcc=$prefix/nvidia/cu13/bin/nvcc
stamp=$prefix/.groupnorm-pins

if [ -x "$nvcc" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
  echo "install-nvcc: already installed in $prefix" >&2
else
  need_pip
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

# The SASS tools for the kernel report (tools/kernel-report): cuobjdump, and the nvdisasm it runs.
# PyPI has no CUDA 13.0 build of either (`pip download --no-deps nvidia-cuda-cuobjdump==13.0.88`
# and `nvidia-cuda-nvdisasm==13.0.88` find nothing; the earliest are 13.2.51), so they are pinned
# to 13.2.51, which disassembles the cubins of nvcc 13.0 (a newer disassembler reads older
# cubins, not the reverse). They go to a prefix of their own so that adding them leaves an
# installed nvcc (which other builds may be using) untouched. GROUPNORM_NO_SASS_TOOLS=1 skips them.
sass_pins=(
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)
if [ "${GROUPNORM_NO_SASS_TOOLS:-0}" != 1 ]; then
  sass_prefix=$prefix-sass-tools
  cuobjdump=$sass_prefix/nvidia/cu13/bin/cuobjdump
  sass_stamp=$sass_prefix/.groupnorm-pins
  if [ -x "$cuobjdump" ] && [ -f "$sass_stamp" ] && [ "$(cat "$sass_stamp")" = "${sass_pins[*]}" ]; then
    echo "install-nvcc: SASS tools already installed in $sass_prefix" >&2
  else
    echo "install-nvcc: installing ${sass_pins[*]} into $sass_prefix" >&2
    tmp=$sass_prefix.tmp.$$
    rm -rf "$tmp"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
      --target "$tmp" "${sass_pins[@]}" >&2
    [ -x "$tmp/nvidia/cu13/bin/cuobjdump" ] && [ -x "$tmp/nvidia/cu13/bin/nvdisasm" ] ||
      { echo "install-nvcc: cuobjdump or nvdisasm missing after install in $tmp" >&2; exit 1; }
    printf '%s' "${sass_pins[*]}" > "$tmp/.groupnorm-pins"
    rm -rf "$sass_prefix"
    mv "$tmp" "$sass_prefix"
  fi
  # cuobjdump finds nvdisasm beside it through PATH (tools/kernel-report sets that up)
  echo "export CUOBJDUMP=$cuobjdump"
fi
