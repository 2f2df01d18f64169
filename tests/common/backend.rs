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

/// What the emulator reports a pass ran (launches, path, vector or scalar kernels).
#[cfg(feature = "emulate")]
pub use groupnorm::gpu::emulate::Trace;
/// Without the emulator no backend reports what ran.
#[derive(Clone, Debug)]
#[cfg(not(feature = "emulate"))]
pub struct Trace;

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
        Self::all_on(test, &[SMALL_DEVICE])
    }

    /// Every backend this build and machine can run, the emulator once per device in `limits`
    /// (the planner's thresholds, and so the paths small shapes take, depend on them).
    pub fn all_on(test: &str, limits: &[DeviceLimits]) -> Vec<Backend> {
        let mut v = vec![Backend::Cpu];
        #[cfg(feature = "emulate")]
        v.extend(limits.iter().map(|&l| Backend::Emulated(l)));
        #[cfg(not(feature = "emulate"))]
        let _ = limits;
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

    /// Whether this is the GPU (the only backend that runs the GPU-sized shapes in reasonable
    /// time: the emulator runs the kernels thread by thread, the CPU tests the f64 reference
    /// beside it).
    pub fn is_gpu(&self) -> bool {
        matches!(self, Backend::Gpu(_))
    }

    /// Whether this is the emulator.
    pub fn is_emulated(&self) -> bool {
        !matches!(self, Backend::Cpu | Backend::Gpu(_))
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
            // the allocating API: outputs sized by the dims are allocated on the device, so a
            // huge-but-empty shape is refused there, typed, not allocated on the host
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
            _ => self
                .forward_with(gn, path, x, dims, w, b, false)
                .map(|(y, s, _)| (y, s)),
        }
    }

    /// Forward into outputs poisoned with NaN (so an element a kernel forgets to write fails
    /// the comparison), `misalign`: `x` and `y` start one element past a 16-byte boundary (the
    /// scalar kernels; ignored on the CPU). On the emulator every buffer sits between guard
    /// zones, checked here, and the trace of what ran is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with<T: Element, P: Element>(
        &self,
        gn: &GroupNorm,
        path: Path,
        x: &[T],
        dims: &[usize],
        w: Option<&[P]>,
        b: Option<&[P]>,
        misalign: bool,
    ) -> Result<(Vec<T>, Stats, Option<Trace>)> {
        let nan_stats = |rows: usize| Stats {
            mean: vec![f32::NAN; rows],
            rstd: vec![f32::NAN; rows],
        };
        let off = usize::from(misalign);
        match self {
            Backend::Cpu => gn
                .forward(x, dims, Affine { weight: w, bias: b })
                .map(|(y, s)| (y, s, None)),
            #[cfg(feature = "emulate")]
            Backend::Emulated(limits) => {
                use groupnorm::gpu::emulate::{self, HostBuffer};
                let geo = gn.geometry(dims)?;
                let xb = HostBuffer::new(x, off);
                let mut y = HostBuffer::filled(geo.numel(), T::from_f64(f64::NAN), off);
                let mut stats = nan_stats(geo.rows());
                let t = emulate::forward_into(
                    gn,
                    path,
                    *limits,
                    xb.as_slice(),
                    dims,
                    w,
                    b,
                    y.as_mut_slice(),
                    &mut stats,
                )?;
                assert!(
                    y.guards_intact(),
                    "{dims:?} {path:?}: a kernel wrote outside `y`"
                );
                Ok((y.to_vec(), stats, Some(t)))
            }
            Backend::Gpu(gpu) => {
                use groupnorm::gpu::{upload, DeviceStats};
                let geo = gn.geometry(dims)?;
                let mut op = gn.on_gpu(gpu).with_path(path);
                let layout = gn.layout();
                let xd = gpu_tensor(gpu, x, dims, layout, off)?;
                let nans = vec![T::from_f64(f64::NAN); geo.numel()];
                let mut yd = gpu_tensor(gpu, &nans, dims, layout, off)?;
                let mut stats = DeviceStats::from_host(gpu, &nan_stats(geo.rows()))?;
                let wd = w.map(|w| upload(gpu.stream(), w)).transpose()?;
                let bd = b.map(|b| upload(gpu.stream(), b)).transpose()?;
                op.forward_into(
                    &xd,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                    &mut yd,
                    &mut stats,
                )?;
                Ok((yd.to_host(gpu)?, stats.to_host(gpu)?, None))
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
            // the allocating API, as in `forward`
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
                let c = dims[1];
                let down = |s: Option<groupnorm::gpu::CudaSlice<P>>| {
                    s.map(|s| {
                        download(gpu.stream(), &s).map(|mut v| {
                            v.truncate(c); // the driver refuses empty buffers: C = 0 has one
                            v
                        })
                    })
                    .transpose()
                };
                Ok(Grads {
                    dx: g.dx.to_host(gpu)?,
                    dweight: down(g.dweight)?,
                    dbias: down(g.dbias)?,
                })
            }
            _ => self
                .backward_with(gn, path, dy, x, dims, stats, w, b, want_dbias, false)
                .map(|(g, _)| g),
        }
    }

    /// Backward (activation included) into outputs poisoned with NaN, `misalign` as in
    /// [`Backend::forward_with`]. On the emulator the guard zones are checked, and so is that
    /// `dweight` stays unwritten without a weight; the trace of what ran is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_with<T: Element, P: Element>(
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
        misalign: bool,
    ) -> Result<(Grads<T, P>, Option<Trace>)> {
        let off = usize::from(misalign);
        match self {
            Backend::Cpu => gn
                .backward(
                    dy,
                    x,
                    dims,
                    stats,
                    Affine { weight: w, bias: b },
                    want_dbias,
                )
                .map(|g| (g, None)),
            #[cfg(feature = "emulate")]
            Backend::Emulated(limits) => {
                use groupnorm::gpu::emulate::{self, HostBuffer};
                let geo = gn.geometry(dims)?;
                let c = geo.c;
                let nan = P::from_f64(f64::NAN);
                let xb = HostBuffer::new(x, off);
                let dyb = HostBuffer::new(dy, off);
                let mut dx = HostBuffer::filled(geo.numel(), T::from_f64(f64::NAN), off);
                let mut dw = HostBuffer::filled(c, nan, 0);
                let mut db = HostBuffer::filled(c, nan, 0);
                let t = emulate::backward_into(
                    gn,
                    path,
                    *limits,
                    dyb.as_slice(),
                    xb.as_slice(),
                    dims,
                    stats,
                    w,
                    b,
                    dx.as_mut_slice(),
                    w.is_some().then(|| dw.as_mut_slice()),
                    want_dbias.then(|| db.as_mut_slice()),
                )?;
                for (name, guarded) in [
                    ("dx", dx.guards_intact()),
                    ("dweight", dw.guards_intact()),
                    ("dbias", db.guards_intact()),
                ] {
                    assert!(
                        guarded,
                        "{dims:?} {path:?}: a kernel wrote outside `{name}`"
                    );
                }
                if w.is_none() {
                    assert!(
                        dw.as_slice().iter().all(|v| v.to_f64().is_nan()),
                        "{dims:?} {path:?}: dweight written without a weight"
                    );
                }
                let g = Grads {
                    dx: dx.to_vec(),
                    dweight: w.map(|_| dw.to_vec()),
                    dbias: want_dbias.then(|| db.to_vec()),
                };
                Ok((g, Some(t)))
            }
            Backend::Gpu(gpu) => {
                use groupnorm::gpu::{download, upload, DeviceStats};
                let geo = gn.geometry(dims)?;
                let mut op = gn.on_gpu(gpu).with_path(path);
                let layout = gn.layout();
                let xd = gpu_tensor(gpu, x, dims, layout, off)?;
                let dyd = gpu_tensor(gpu, dy, dims, layout, off)?;
                let nans = vec![T::from_f64(f64::NAN); geo.numel()];
                let mut dxd = gpu_tensor(gpu, &nans, dims, layout, off)?;
                let sd = DeviceStats::from_host(gpu, stats)?;
                let wd = w.map(|w| upload(gpu.stream(), w)).transpose()?;
                let bd = b.map(|b| upload(gpu.stream(), b)).transpose()?;
                let pnan = vec![P::from_f64(f64::NAN); geo.c.max(1)];
                let mut dw = upload(gpu.stream(), &pnan)?;
                let mut db = upload(gpu.stream(), &pnan)?;
                op.backward_into(
                    &dyd,
                    &xd,
                    &sd,
                    DeviceAffine {
                        weight: wd.as_ref(),
                        bias: bd.as_ref(),
                    },
                    &mut dxd,
                    w.is_some().then_some(&mut dw),
                    want_dbias.then_some(&mut db),
                )?;
                let down = |s: &groupnorm::gpu::CudaSlice<P>| -> Result<Vec<P>> {
                    let mut v = download(gpu.stream(), s)?;
                    v.truncate(geo.c);
                    Ok(v)
                };
                let g = Grads {
                    dx: dxd.to_host(gpu)?,
                    dweight: if w.is_some() { Some(down(&dw)?) } else { None },
                    dbias: if want_dbias { Some(down(&db)?) } else { None },
                };
                Ok((g, None))
            }
        }
    }
}

/// A device tensor holding `host`, starting `offset` elements into its buffer (the driver
/// refuses empty allocations, so an empty one gets one element).
fn gpu_tensor<T: Element>(
    gpu: &groupnorm::gpu::Gpu,
    host: &[T],
    dims: &[usize],
    layout: groupnorm::Layout,
    offset: usize,
) -> Result<groupnorm::gpu::DeviceTensor<T>> {
    let mut padded = vec![T::from_f64(f64::NAN); offset];
    padded.extend_from_slice(host);
    if padded.is_empty() {
        padded.push(T::default());
    }
    let buf = groupnorm::gpu::upload(gpu.stream(), &padded)?;
    groupnorm::gpu::DeviceTensor::with_offset(buf, offset, dims, layout)
}
