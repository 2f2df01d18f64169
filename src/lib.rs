//! # groupnorm
//!
//! Group Normalization (Wu & He, 2018) with the semantics of PyTorch's
//! `torch.nn.functional.group_norm`, forward and backward, for activations in f32, f16 and bf16
//! and parameters in f32 or the activation dtype.
//!
//! The crate is laid out as separate rooms:
//!
//! - [`accuracy`]: the accuracy targets every path is held to, and their error measures;
//! - [`config`]: the validated configuration ([`GroupNorm`]) and the geometry of one call;
//! - [`dtype`]: the element types;
//! - [`error`]: the one error type;
//! - [`cpu`]: the CPU path, with an f64 [`cpu::reference`] that is the ground truth for every
//!   other path, and the fast parallel path behind [`GroupNorm::forward`] and
//!   [`GroupNorm::backward`];
//! - [`gpu`]: the CUDA runtime (driver probe, device handle, embedded kernels).
//!
//! The operation, its accuracy targets and the kernel design are described in
//! [`docs/design.md`](https://docs.rs/crate/groupnorm/latest/source/docs/design.md), which ships
//! with the crate.
//!
//! # On the CPU
//!
//! ```
//! use groupnorm::{Affine, GroupNorm};
//! // (N=3, C=4), two groups of two channels, no affine parameters
//! let x = [5.0f32, 4., 7., 2., 1., 6., 2., 3., 4., 8., 1., 9.];
//! let gn = GroupNorm::new(2, 4)?;
//! let (y, stats) = gn.forward(&x, &[3, 4], Affine::none())?;
//! assert!((y[0] - 1.0).abs() < 1e-4 && (y[1] + 1.0).abs() < 1e-4);
//! assert_eq!(stats.mean.len(), 3 * 2);
//! # Ok::<(), groupnorm::Error>(())
//! ```
//!
//! # On the GPU
//!
//! ```no_run
//! use groupnorm::gpu::{upload, CudaSlice, DeviceAffine, DeviceTensor, Gpu};
//! use groupnorm::{f16, GroupNorm, Layout};
//!
//! // f16 activations, f32 weight: (N, C, H, W) = (2, 320, 64, 64), 32 groups
//! let gpu = Gpu::new(0)?; // Error::NoDriver / NoDevice / KernelsNotBuilt, never a panic
//! let mut op = GroupNorm::new(32, 320)?.on_gpu(&gpu);
//! let host = vec![f16::from_f32(0.5); 2 * 320 * 64 * 64];
//! let x = DeviceTensor::from_host(&gpu, &host, &[2, 320, 64, 64], Layout::Nchw)?;
//! let w: CudaSlice<f32> = upload(gpu.stream(), &vec![1.0f32; 320])?;
//! let (y, stats) = op.forward(&x, DeviceAffine::new().weight(&w))?;
//! let y_host: Vec<f16> = y.to_host(&gpu)?;
//! # Ok::<(), groupnorm::Error>(())
//! ```
//!
//! Other frameworks call [`gpu::raw`] with their own device pointers and stream; C and other
//! languages use the C ABI of the `groupnorm-capi` crate (`libgroupnorm.so`, `groupnorm.h`).
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! | --- | --- | --- |
//! | `cuda` | yes | the GPU kernels, compiled by nvcc 12.4+ at build time (a missing or older nvcc stops the build with what to do); without it the crate is CPU-only and the GPU API returns [`Error::KernelsNotBuilt`] |
//! | `bench` | no | the unfused baseline kernels `groupnorm bench` compares against |
//! | `candle` | no | the `candle` module: a candle op with a real backward, and a drop-in `GroupNorm` module (CPU tensors) |
//! | `candle-cuda` | no | the same for CUDA tensors, through this crate's kernels |
//! | `emulate` | no | runs the CUDA kernels on the CPU (for tests) |
//!
//! Build-time environment: `NVCC`, `GROUPNORM_CUDA_ARCHS` or `CUDA_COMPUTE_CAP` (architectures),
//! `NVCC_CCBIN`; see the README. [`cudarc`] is re-exported: its types appear in the GPU API.

#![warn(missing_docs)]

pub mod accuracy;
// (documented by its own `//!` lines: an outer doc here would make rustdoc resolve the module's
// links from the crate root, where `group_norm` and `nn` do not exist)
#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod gpu;

pub use config::{Activation, Affine, Geometry, Grads, GroupNorm, Layout, Stats, DEFAULT_EPS};
/// The CUDA driver bindings this crate's GPU API is written against ([`gpu::CudaStream`],
/// [`gpu::CudaSlice`], driver errors): use them through this re-export so the versions agree.
pub use cudarc;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};

/// The README's examples, compiled (and the CPU one run) as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
