//! The GPU path: CUDA kernels from `kernels/`, launched through `cudarc` on the caller's stream.
//!
//! - [`runtime`]: driver probe, [`Gpu`] device handle, the embedded kernels loaded once per context;
//! - [`tensor`]: [`DeviceTensor`], [`DeviceStats`], [`DeviceGrads`];
//! - [`ops`]: [`GpuGroupNorm`], the safe forward and backward;
//! - `plan` (which kernels and chunking a shape gets), `params` (the kernels' argument structs)
//!   and `launch` (the one place that launches kernels, and the only `unsafe`).
//!
//! A machine without a driver or a device gets [`Error::NoDriver`](crate::Error::NoDriver) or
//! [`Error::NoDevice`](crate::Error::NoDevice) from [`Gpu::new`], never a panic; a binary built
//! without nvcc gets [`Error::KernelsNotBuilt`](crate::Error::KernelsNotBuilt).

#[cfg(feature = "emulate")]
#[doc(hidden)]
pub mod emulate;
mod kernel_id;
mod launch;
pub mod ops;
mod params;
mod plan;
pub mod raw;
pub mod runtime;
pub mod tensor;

pub use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
pub use ops::GpuGroupNorm;
pub use plan::{DeviceLimits, Path};
pub use runtime::{built_archs, driver_present, entry_points, kernels_built, Gpu};
pub use tensor::{
    download, upload, AsDeviceView, AsDeviceViewMut, DeviceAffine, DeviceGrads, DeviceStats,
    DeviceTensor, DeviceView, DeviceViewMut,
};
