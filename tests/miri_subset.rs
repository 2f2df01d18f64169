//! A subset small enough for Miri (`cargo +nightly miri test --test miri_subset`): the CPU path
//! (its chunking, rayon and the 16-bit conversions) on tiny problems against the f64 reference,
//! and the C ABI's argument checking (raw pointers read unaligned, NULLs, bad enums, the
//! thread-local last error), so the `unsafe` they use is checked by Miri, not trusted. Nothing
//! here reaches the CUDA driver (Miri cannot call foreign code): every C ABI call is refused
//! before a device is looked for. Also runs as an ordinary test.
//!
//! Miri flags: `MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks"`:
//! crossbeam-epoch (under rayon) breaks Stacked Borrows in its own code, and rayon's global
//! pool never joins its threads.

mod common;

use common::*;
use groupnorm::capi::*;
use groupnorm::cpu::reference;
use groupnorm::{bf16, f16, Activation, Element, GroupNorm, Layout};
use std::ffi::{c_void, CStr};

fn cpu_case<T: Element, P: Element>(dims: &[usize], groups: usize, layout: Layout, silu: bool) {
    let act = if silu {
        Activation::Silu
    } else {
        Activation::None
    };
    let gn = GroupNorm::new(groups, dims[1])
        .unwrap()
        .layout(layout)
        .activation(act);
    let numel: usize = dims.iter().product();
    let c = dims[1];
    let mut r = rng(7 + numel as u64);
    let x: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let dy: Vec<T> = normal_vec(&mut r, numel, 0.0, 1.0);
    let w: Vec<P> = uniform_vec(&mut r, c, 0.5, 1.5);
    let b: Vec<P> = normal_vec(&mut r, c, 0.0, 0.5);
    for (wh, bh) in [
        (None, None),
        (Some(&w[..]), None),
        (None, Some(&b[..])),
        (Some(&w[..]), Some(&b[..])),
    ] {
        let ctx = format!(
            "{dims:?} {layout:?} silu={silu} w={} b={}",
            wh.is_some(),
            bh.is_some()
        );
        let refd = reference::forward(&gn, &x, dims, wh, bh).unwrap();
        let (y, stats) = gn.forward(&x, dims, wh, bh).unwrap();
        assert_forward_close(&y, &refd.y, F32_FORWARD_ABS, &ctx);
        assert_stats_close(&stats, &refd, F32_FORWARD_ABS, &ctx);
        let g = gn
            .backward_activated(&dy, &x, dims, &stats, wh, bh, true)
            .unwrap();
        let rg = reference::backward_activated(&gn, &dy, &x, dims, wh, bh).unwrap();
        assert_eq!(g.dx.len(), numel, "{ctx}");
        assert_param_grad_close(&g.dbias.unwrap(), &rg.dbias, "dbias", &ctx);
        if wh.is_some() {
            assert_param_grad_close(&g.dweight.unwrap(), &rg.dweight, "dweight", &ctx);
        }
    }
}

#[test]
fn cpu_path_on_tiny_problems() {
    for layout in LAYOUTS {
        for silu in [false, true] {
            cpu_case::<f32, f32>(&[2, 4, 3], 2, layout, silu);
            cpu_case::<f16, f32>(&[1, 6, 5], 3, layout, silu);
            cpu_case::<bf16, bf16>(&[2, 2, 2, 2], 1, layout, silu);
        }
    }
    // empty tensors
    let gn = GroupNorm::new(2, 4).unwrap();
    let (y, stats) = gn.forward::<f32, f32>(&[], &[0, 4, 3], None, None).unwrap();
    assert!(y.is_empty() && stats.mean.is_empty());
    let (y, stats) = gn.forward::<f32, f32>(&[], &[2, 4, 0], None, None).unwrap();
    assert!(y.is_empty() && stats.mean.len() == 4);
}

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
