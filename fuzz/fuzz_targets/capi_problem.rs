//! The C ABI's problem validation on arbitrary problems: every call returns a status with a
//! message, never a panic (which the ABI would report as GROUPNORM_STATUS_INTERNAL) and never an
//! abort. Pointers are NULL or point at real memory the size the problem claims for `dims`; the
//! stream is NULL (no GPU is needed: validation comes first).
#![no_main]

// The C ABI crate is a cdylib/staticlib only: its source is compiled in here, by path, as its
// own tests do (capi/tests/c_abi.rs), against the library under the name it uses (`gn`).
#[allow(dead_code)]
#[path = "../../capi/src/lib.rs"]
mod capi;

use capi::*;
use libfuzzer_sys::fuzz_target;
use std::ffi::CStr;

/// Reads little-endian values off the fuzzer's bytes, zero once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    fn f64(&mut self) -> f64 {
        f64::from_le_bytes(self.take())
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
}

/// A small value mostly, sometimes a raw one (negative, huge).
fn small_or_raw(b: &mut Bytes, raw: i64) -> i64 {
    match b.u8() % 4 {
        0 => raw,
        1 => raw & 0xff,
        _ => raw & 0x3f,
    }
}

fn check(function: &str, status: groupnorm_status_t) {
    assert_ne!(
        status,
        GROUPNORM_STATUS_INTERNAL,
        "{function} panicked: {}",
        // SAFETY: groupnorm_last_error returns a valid C string (the ABI's contract).
        unsafe { CStr::from_ptr(groupnorm_last_error()) }.to_string_lossy()
    );
    assert!(
        (0..=8).contains(&status.0),
        "{function}: unknown status {}",
        status.0
    );
    if status != GROUPNORM_STATUS_OK {
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(groupnorm_last_error()) };
        assert!(
            !msg.to_bytes().is_empty(),
            "{function}: a failure without a message"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let len = (b.u8() % 10) as usize;
    let mut dims: Vec<i64> = Vec::with_capacity(len);
    for _ in 0..len {
        let raw = b.i64();
        dims.push(small_or_raw(&mut b, raw));
    }
    // ndims: the real count, or any value not above it (reading past `dims` would break the
    // ABI's contract, not test it), negative ones included
    let ndims_raw = b.i32();
    let ndims = if ndims_raw > len as i32 {
        len as i32
    } else {
        ndims_raw
    };
    let null_dims = b.u8() % 8 == 0;
    let groups_raw = b.i64();
    let problem = groupnorm_problem_t {
        dims: if null_dims {
            std::ptr::null()
        } else {
            dims.as_ptr()
        },
        ndims,
        groups: small_or_raw(&mut b, groups_raw),
        eps: b.f64(),
        layout: groupnorm_layout_t(b.i32() % 3),
        dtype: groupnorm_dtype_t(b.i32() % 4),
        param_dtype: groupnorm_dtype_t(b.i32() % 4),
        path: groupnorm_path_t(b.i32() % 5),
        activation: groupnorm_activation_t(b.i32() % 3),
    };
    let null = std::ptr::null_mut();
    let mut bytes = 0usize;
    // SAFETY: `problem` and `dims` are valid for the calls (ndims never exceeds dims' length);
    // every device pointer is NULL and the stream is NULL, which the ABI validates.
    unsafe {
        check(
            "groupnorm_forward_workspace_size",
            groupnorm_forward_workspace_size(&problem, null, &mut bytes),
        );
        check(
            "groupnorm_backward_workspace_size",
            groupnorm_backward_workspace_size(&problem, null, &mut bytes),
        );
        check(
            "groupnorm_forward",
            groupnorm_forward(
                &problem,
                null,
                null,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                0,
                null,
            ),
        );
        check(
            "groupnorm_backward",
            groupnorm_backward(
                &problem,
                null,
                null,
                null.cast(),
                null.cast(),
                null,
                null,
                null,
                null,
                null,
                0,
                null,
            ),
        );
    }
});
