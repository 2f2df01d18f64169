#!/usr/bin/env bash
# CI check: a crate outside the repository that depends on the library by path (what
# `cargo add groupnorm` gives a user) builds only what it links: no C library. The C ABI is the
# groupnorm-capi crate's; the library is an rlib only, so a dependent's target directory must
# hold no libgroupnorm*.so / .a / .dylib / .dll (nor any other cdylib or staticlib).
#
#   scripts/check-dependent.sh     # NVCC must be set (scripts/install-nvcc.sh); one architecture
#
# The scratch crate and its target directory live in a temporary directory, removed on exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${NVCC:-}" ] || { echo "check-dependent: set NVCC (eval \"\$(scripts/install-nvcc.sh)\")" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/dependent/src"
cat > "$tmp/dependent/Cargo.toml" <<EOF
[package]
name = "groupnorm-dependent-check"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
groupnorm = { path = "$repo" }

# not a member of the groupnorm workspace above it (it is not above it: this is in $tmp)
[workspace]
EOF
cat > "$tmp/dependent/src/main.rs" <<'EOF'
//! Uses the library's CPU and GPU API, so that it is linked into this binary.
fn main() -> Result<(), groupnorm::Error> {
    let gn = groupnorm::GroupNorm::new(2, 4)?;
    let gpu = groupnorm::gpu::Gpu::new(0).map(|_| "a device").unwrap_or("no usable device");
    println!("{} groups; {gpu}", gn.groups());
    Ok(())
}
EOF

# the workspace's lock file, so that CI builds the versions it tested (cargo adds the scratch
# crate and drops what it does not use; a dependent with no lock file would resolve afresh)
cp "$repo/Cargo.lock" "$tmp/dependent/Cargo.lock"

echo "check-dependent: building $tmp/dependent (groupnorm by path, GROUPNORM_CUDA_ARCHS=90)" >&2
(cd "$tmp/dependent" && GROUPNORM_CUDA_ARCHS=90 CARGO_TARGET_DIR="$tmp/target" cargo build --quiet)
"$tmp/target/debug/groupnorm-dependent-check"

# A C library of groupnorm would be (deps/)libgroupnorm[-HASH].so/.a/.dylib or groupnorm.dll; and
# no other staticlib or cdylib either: the only .so files allowed are proc-macros (deps/, loaded
# by rustc), the only .a files those that build scripts make (build/*/out).
bad=$(find "$tmp/target" -type f \( -name '*groupnorm*.so' -o -name '*groupnorm*.a' \
  -o -name '*groupnorm*.dylib' -o -name '*groupnorm*.dll' \
  -o \( -name '*.a' -not -path '*/build/*' \) \
  -o \( -name '*.so' -not -path '*/deps/*' -not -path '*/build/*' \) \))
if [ -n "$bad" ]; then
  echo "check-dependent: the dependent's build made C libraries:" >&2
  echo "$bad" >&2
  exit 1
fi
rlibs=$(find "$tmp/target" -name 'libgroupnorm-*.rlib' | wc -l)
[ "$rlibs" -ge 1 ] || { echo "check-dependent: no libgroupnorm rlib: did the build use the library?" >&2; exit 1; }
echo "check-dependent: passed ($rlibs groupnorm rlib, no .so/.a; target $(du -sh "$tmp/target" | cut -f1))" >&2
