//! One test body, every backend: the CPU fast path, the real kernels in the host emulator
//! (`--features emulate`) and the GPU when one is usable. A backend that cannot run here is
//! skipped with a printed reason (a missing GPU fails under `GROUPNORM_REQUIRE_GPU=1`).
//!
//! Include with `#[path = "common/backend.rs"] mod backend;` beside `mod gpu_support;`.
#![allow(dead_code)]

use groupnorm::gpu::DeviceAffine;
use groupnorm::gpu::{DeviceLimits, Path};
use groupnorm::Affine;
use groupnorm::{Element, Grads, GroupNorm, Result, Stats};

/// Where a test runs its forward and backward passes.
pub enum Backend {
    /// The CPU fast path (the path argument is ignored: it has one).
    Cpu,
    /// The kernels in the host emulator, planned for these device limits.
    #[cfg(feature = "emulate")]
    Emulated(DeviceLimits),
    /// Device 0.
    Gpu(groupnorm::gpu::Gpu),
}

/// A small emulated device: 4 SMs, 8 KiB of shared memory per block, clusters of up to 8, so
/// small shapes take every path (fused, split into chunks and pieces, cluster, NHWC tiles).
pub const SMALL_DEVICE: DeviceLimits = DeviceLimits::new(4, 8 * 1024, 8);

impl Backend {
    /// Every backend this build and machine can run; prints why the others are skipped.
    pub fn all(test: &str) -> Vec<Backend> {
        let mut v = vec![Backend::Cpu];
        #[cfg(feature = "emulate")]
        v.push(Backend::Emulated(SMALL_DEVICE));
        #[cfg(not(feature = "emulate"))]
        eprintln!("{test}: emulated kernels skipped (build with --features emulate)");
        if let Some(gpu) = crate::gpu_support::gpu_or_skip(test) {
            v.push(Backend::Gpu(gpu));
        }
        v
    }

    /// A name for messages.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            #[cfg(feature = "emulate")]
            Backend::Emulated(l) => format!("emulated({l:?})"),
            Backend::Gpu(_) => "gpu".into(),
        }
    }

    /// Whether forcing `path` means anything here (the CPU has one path).
    pub fn has_paths(&self) -> bool {
        !matches!(self, Backend::Cpu)
    }

    /// Forward: `y` and the statistics.
    pub fn forward<T: Element, P: Element>(
        &self,
        gn: &GroupNorm,
        path: Path,
        x: &[T],
        dims: &[usize],
        w: Option<&[P]>,
        b: Option<&[P]>,
    ) -> Result<(Vec<T>, Stats)> {
        match self {
            Backend::Cpu => gn.forward(x, dims, Affine { weight: w, bias: b }),
            #[cfg(feature = "emulate")]
            Backend::Emulated(limits) => {
                let numel: usize = dims.iter().product();
                let rows = dims[0] * gn.groups();
                let mut y = vec![T::from_f64(f64::NAN); numel];
                let mut stats = Stats {
                    mean: vec![f32::NAN; rows],
                    rstd: vec![f32::NAN; rows],
                };
                groupnorm::gpu::emulate::forward_into(
                    gn, path, *limits, x, dims, w, b, &mut y, &mut stats,
                )?;
                Ok((y, stats))
            }
            Backend::Gpu(gpu) => {
                use groupnorm::gpu::{upload, DeviceTensor};
                let mut op = gn.on_gpu(gpu).with_path(path);
                let xd = DeviceTensor::from_host(gpu, x, dims, gn.layout())?;
                let wd = w.map(|w| upload(gpu.stream(), w)).transpose()?;
                let bd = b.map(|b| upload(gpu.stream(), b)).transpose()?;
                let (y, stats) = op.forward(
                    &xd,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                )?;
                Ok((y.to_host(gpu)?, stats.to_host(gpu)?))
            }
        }
    }

    /// Backward of the whole operator (activation included) from saved statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Element, P: Element>(
        &self,
        gn: &GroupNorm,
        path: Path,
        dy: &[T],
        x: &[T],
        dims: &[usize],
        stats: &Stats,
        w: Option<&[P]>,
        b: Option<&[P]>,
        want_dbias: bool,
    ) -> Result<Grads<T, P>> {
        match self {
            Backend::Cpu => gn.backward(
                dy,
                x,
                dims,
                stats,
                Affine { weight: w, bias: b },
                want_dbias,
            ),
            #[cfg(feature = "emulate")]
            Backend::Emulated(limits) => {
                let numel: usize = dims.iter().product();
                let c = dims[1];
                let nan = P::from_f64(f64::NAN);
                let mut dx = vec![T::from_f64(f64::NAN); numel];
                let mut dw = w.map(|_| vec![nan; c]);
                let mut db = want_dbias.then(|| vec![nan; c]);
                groupnorm::gpu::emulate::backward_into(
                    gn,
                    path,
                    *limits,
                    dy,
                    x,
                    dims,
                    stats,
                    w,
                    b,
                    &mut dx,
                    dw.as_deref_mut(),
                    db.as_deref_mut(),
                )?;
                Ok(Grads {
                    dx,
                    dweight: dw,
                    dbias: db,
                })
            }
            Backend::Gpu(gpu) => {
                use groupnorm::gpu::{download, upload, DeviceStats, DeviceTensor};
                let mut op = gn.on_gpu(gpu).with_path(path);
                let xd = DeviceTensor::from_host(gpu, x, dims, gn.layout())?;
                let dyd = DeviceTensor::from_host(gpu, dy, dims, gn.layout())?;
                let sd = DeviceStats::from_host(gpu, stats)?;
                let wd = w.map(|w| upload(gpu.stream(), w)).transpose()?;
                let bd = b.map(|b| upload(gpu.stream(), b)).transpose()?;
                let g = op.backward(
                    &dyd,
                    &xd,
                    &sd,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                    want_dbias,
                )?;
                let down = |s: Option<groupnorm::gpu::CudaSlice<P>>| {
                    s.map(|s| download(gpu.stream(), &s)).transpose()
                };
                Ok(Grads {
                    dx: g.dx.to_host(gpu)?,
                    dweight: down(g.dweight)?,
                    dbias: down(g.dbias)?,
                })
            }
        }
    }
}
