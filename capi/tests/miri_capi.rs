//! The C ABI's argument checking under Miri (`cargo +nightly miri test -p groupnorm-capi --test
//! miri_capi`): raw pointers read unaligned, NULLs, bad enums, the thread-local last error, so the
//! `unsafe` they use is checked by Miri, not trusted. Nothing here reaches the CUDA driver (Miri
//! cannot call foreign code): every call is refused before a device is looked for. Also runs as
//! an ordinary test.
//!
//! Miri flags: `MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks"`
//! (see tests/miri_subset.rs at the workspace root).

// As in c_abi.rs: this crate's source compiled in as the module `capi` (the crate has no rlib).
extern crate gn as groupnorm;
#[path = "../src/lib.rs"]
#[allow(dead_code)]
mod capi;

use capi::*;
use std::ffi::{c_void, CStr};

fn problem(dims: &[i64]) -> groupnorm_problem_t {
    groupnorm_problem_t {
        dims: dims.as_ptr(),
        ndims: dims.len() as i32,
        groups: 2,
        eps: 1e-5,
        layout: GROUPNORM_LAYOUT_NCHW,
        dtype: GROUPNORM_DTYPE_F32,
        param_dtype: GROUPNORM_DTYPE_F32,
        path: GROUPNORM_PATH_AUTO,
        activation: GROUPNORM_ACTIVATION_NONE,
    }
}

fn last_error() -> String {
    // SAFETY: the ABI returns a valid, NUL-terminated string owned by the library.
    unsafe { CStr::from_ptr(groupnorm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Each bad problem is refused with INVALID_ARGUMENT and a message naming the field, before any
/// device is looked for.
#[test]
fn c_abi_refuses_bad_arguments() {
    let dims = [2i64, 4, 3];
    let good = problem(&dims);
    let negative = [2i64, -4, 3];
    // dims read unaligned: an i64 array one byte off its alignment
    // (u64 storage, so that one byte in is certainly misaligned for i64)
    let mut storage = [0u64; 4];
    let mut bytes_of = [0u8; 32];
    for (i, d) in [2i64, -1, 3].iter().enumerate() {
        bytes_of[1 + 8 * i..1 + 8 * (i + 1)].copy_from_slice(&d.to_ne_bytes());
    }
    for (i, w) in storage.iter_mut().enumerate() {
        *w = u64::from_ne_bytes(bytes_of[8 * i..8 * (i + 1)].try_into().unwrap());
    }
    let misaligned: *const i64 = storage.as_ptr().cast::<u8>().wrapping_add(1).cast();
    let cases: Vec<(groupnorm_problem_t, &str)> = vec![
        (groupnorm_problem_t { ndims: 1, ..good }, "ndims"),
        (groupnorm_problem_t { ndims: -7, ..good }, "ndims"),
        (
            groupnorm_problem_t {
                dims: std::ptr::null(),
                ..good
            },
            "dims is NULL",
        ),
        (problem(&negative), "dims[1]"),
        (
            groupnorm_problem_t {
                dims: misaligned,
                ..good
            },
            "dims[1]",
        ),
        (groupnorm_problem_t { groups: -2, ..good }, "groups"),
        (groupnorm_problem_t { groups: 3, ..good }, "divide"),
        (
            groupnorm_problem_t {
                layout: groupnorm_layout_t(9),
                ..good
            },
            "layout",
        ),
        (
            groupnorm_problem_t {
                dtype: groupnorm_dtype_t(-1),
                ..good
            },
            "dtype",
        ),
        (
            groupnorm_problem_t {
                path: groupnorm_path_t(4),
                ..good
            },
            "path",
        ),
        (
            groupnorm_problem_t {
                activation: groupnorm_activation_t(2),
                ..good
            },
            "activation",
        ),
        (
            groupnorm_problem_t {
                eps: f64::NAN,
                ..good
            },
            "eps",
        ),
    ];
    let null = std::ptr::null_mut::<c_void>();
    for (p, needle) in &cases {
        let mut bytes = usize::MAX;
        // SAFETY: `p` is a readable problem whose dims (when not NULL) hold ndims values (or fewer
        // are read: validation stops at the first bad one); `bytes` is writable.
        let s = unsafe { groupnorm_forward_workspace_size(p, null, &mut bytes) };
        assert_eq!(
            s,
            GROUPNORM_STATUS_INVALID_ARGUMENT,
            "{needle}: {}",
            last_error()
        );
        assert_eq!(bytes, 0, "{needle}: bytes not reset");
        assert!(last_error().contains(needle), "{needle}: {}", last_error());
        // SAFETY: as above; every pointer is NULL, which the ABI refuses or never reads.
        let s = unsafe {
            groupnorm_forward(
                p,
                null,
                null,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                0,
                null,
            )
        };
        assert_eq!(
            s,
            GROUPNORM_STATUS_INVALID_ARGUMENT,
            "{needle}: {}",
            last_error()
        );
    }
    // NULL problem and NULL out-pointer
    let mut bytes = 0usize;
    // SAFETY: NULLs are refused before they are read.
    let s = unsafe { groupnorm_backward_workspace_size(std::ptr::null(), null, &mut bytes) };
    assert_eq!(s, GROUPNORM_STATUS_INVALID_ARGUMENT);
    assert!(last_error().contains("problem is NULL"), "{}", last_error());
    // SAFETY: as above.
    let s = unsafe { groupnorm_forward_workspace_size(&good, null, std::ptr::null_mut()) };
    assert_eq!(s, GROUPNORM_STATUS_INVALID_ARGUMENT);
    // static strings
    // SAFETY: static NUL-terminated strings.
    let v = unsafe { CStr::from_ptr(groupnorm_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    for s in 0..12 {
        // SAFETY: as above; never NULL, for any value.
        let t = unsafe { CStr::from_ptr(groupnorm_status_string(groupnorm_status_t(s))) };
        assert!(!t.to_bytes().is_empty());
    }
}
