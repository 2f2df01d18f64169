//! Rust mirrors of `kernels/params.h`, passed by value as the kernels' one argument.
//!
//! The C header asserts the same sizes and offsets as the `const` blocks below, so a field added
//! on one side and not the other fails to compile on that side.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::DeviceRepr;
use std::mem::{offset_of, size_of};

/// How one group row is cut into chunks (one thread block each). See `GnChunking` in params.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunking {
    /// Chunks per row, `K`.
    pub chunks: u32,
    /// Whole channels per chunk when `pieces == 1` (else 1).
    pub cpb: u32,
    /// Spatial pieces per channel, `P >= 1`.
    pub pieces: u32,
    /// Spatial values per piece when `pieces > 1` (else `S`).
    pub piece_len: u32,
}

/// Forward launch parameters (`GnFwdParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FwdParams {
    pub x: CUdeviceptr,
    pub y: CUdeviceptr,
    pub weight: CUdeviceptr,
    pub bias: CUdeviceptr,
    pub mean: CUdeviceptr,
    pub rstd: CUdeviceptr,
    pub partials: CUdeviceptr,
    pub rows: u64,
    pub groups: u32,
    pub d: u32,
    pub s: u32,
    pub eps: f32,
    pub chunking: Chunking,
    pub activation: u32,
    pub reserved: u32,
}

/// Backward launch parameters (`GnBwdParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BwdParams {
    pub dy: CUdeviceptr,
    pub x: CUdeviceptr,
    pub mean: CUdeviceptr,
    pub rstd: CUdeviceptr,
    pub weight: CUdeviceptr,
    pub dx: CUdeviceptr,
    pub dweight: CUdeviceptr,
    pub dbias: CUdeviceptr,
    pub partials: CUdeviceptr,
    pub rows: u64,
    pub batch: u32,
    pub groups: u32,
    pub d: u32,
    pub s: u32,
    pub inv_row_len: f32,
    pub chunking: Chunking,
    pub activation: u32,
    pub bias: CUdeviceptr,
    /// Zeroed `u32` words (`Plan::ticket_words`) that let the fused and cluster kernels reduce
    /// dweight and dbias over N > 1 samples themselves, or 0 (then `bwd_params` runs after them).
    pub tickets: CUdeviceptr,
}

/// `GN_ACT_NONE`, `GN_ACT_SILU` of params.h.
pub(crate) fn activation_code(act: crate::Activation) -> u32 {
    match act {
        crate::Activation::None => 0,
        crate::Activation::Silu => 1,
    }
}

// SAFETY: plain-old-data #[repr(C)] structs of integers and floats whose layout matches the C
// structs of kernels/params.h (asserted below and there); the kernels take them by value.
unsafe impl DeviceRepr for FwdParams {}
// SAFETY: as for FwdParams.
unsafe impl DeviceRepr for BwdParams {}

const _: () = {
    assert!(size_of::<CUdeviceptr>() == 8);
    assert!(size_of::<Chunking>() == 16);
    assert!(size_of::<FwdParams>() == 104);
    assert!(offset_of!(FwdParams, activation) == 96);
    assert!(offset_of!(FwdParams, rows) == 56);
    assert!(offset_of!(FwdParams, eps) == 76);
    assert!(offset_of!(FwdParams, chunking) == 80);
    assert!(size_of::<BwdParams>() == 136);
    assert!(offset_of!(BwdParams, activation) == 116);
    assert!(offset_of!(BwdParams, bias) == 120);
    assert!(offset_of!(BwdParams, tickets) == 128);
    assert!(offset_of!(BwdParams, rows) == 72);
    assert!(offset_of!(BwdParams, chunking) == 100);
};
