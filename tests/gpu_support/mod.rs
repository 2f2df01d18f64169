//! GPU test support: a device or a printed reason to skip.
//!
//! GPU tests run beside the CPU ones. Without a usable device they print why and pass, unless
//! `GROUPNORM_REQUIRE_GPU=1`, which turns a missing device into a failure (the GPU machine's
//! runner sets it, so a suite that silently skipped there cannot look green).
#![allow(dead_code)]

use groupnorm::gpu::{CudaSlice, Gpu};
use groupnorm::Element;

/// Whether a missing GPU must fail the test.
pub fn gpu_required() -> bool {
    std::env::var("GROUPNORM_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Device 0, or `None` after printing why the calling test is skipped.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(gpu) => Some(gpu),
        Err(e) if gpu_required() => {
            panic!("{test}: GROUPNORM_REQUIRE_GPU=1 but no usable GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipping {test}: no usable GPU ({e})");
            None
        }
    }
}

/// Uploads a host slice.
pub fn up<T: Element>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    groupnorm::gpu::upload(gpu.stream(), v).expect("upload")
}

/// Downloads a device buffer.
pub fn down<T: Element>(gpu: &Gpu, v: &CudaSlice<T>) -> Vec<T> {
    groupnorm::gpu::download(gpu.stream(), v).expect("download")
}

/// `len` NaNs of type `T`: outputs are poisoned with these before a launch, so an element the
/// kernel forgets to write fails the comparison.
pub fn nans<T: Element>(len: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); len]
}
