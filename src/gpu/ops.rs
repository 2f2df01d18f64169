//! Safe forward and backward on device tensors: validation, planning, then one call into the
//! launch layer. Nothing here synchronizes the host; the only allocations are the outputs of the
//! allocating variants and the plan-owned workspace, which grows on the first call for a larger
//! shape and is reused after (so a warmed-up call can be captured in a CUDA graph).

use super::plan::{Pass, Path};
use super::raw::{self, BackwardPtrs, ForwardPtrs, Problem};
use super::runtime::Gpu;
use super::tensor::{
    zeros, AsDeviceView, AsDeviceViewMut, DeviceAffine, DeviceGrads, DeviceStats, DeviceTensor,
    DeviceView, DeviceViewMut,
};
use crate::config::check_len;
use crate::dtype::check_param_dtype;
use crate::{Element, Error, Geometry, GroupNorm, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

/// A [`GroupNorm`] bound to a [`Gpu`], owning the workspace its launches need.
///
/// One per stream: two threads that each own one can run concurrently.
///
/// ```no_run
/// use groupnorm::{gpu::{DeviceAffine, DeviceTensor, Gpu}, GroupNorm, Layout};
/// let gpu = Gpu::new(0)?;
/// let gn = GroupNorm::new(32, 320)?;
/// let mut op = gn.on_gpu(&gpu);
/// let host = vec![0.5f32; 2 * 320 * 64];
/// let x = DeviceTensor::from_host(&gpu, &host, &[2, 320, 64], Layout::Nchw)?;
/// let (y, stats) = op.forward(&x, DeviceAffine::none())?;
/// let y_host = y.to_host(&gpu)?;
/// # Ok::<(), groupnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct GpuGroupNorm {
    gn: GroupNorm,
    gpu: Gpu,
    path: Path,
    workspace: Option<CudaSlice<f32>>,
    /// The backward's ticket words (`raw::BackwardPtrs::with_tickets`): zero-filled when
    /// allocated, and every backward call leaves them zero.
    tickets: Option<CudaSlice<u32>>,
}

impl GroupNorm {
    /// Binds this configuration to a device (and to the device handle's stream).
    pub fn on_gpu(&self, gpu: &Gpu) -> GpuGroupNorm {
        GpuGroupNorm {
            gn: *self,
            gpu: gpu.clone(),
            path: Path::Auto,
            workspace: None,
            tickets: None,
        }
    }
}

fn ptr<T>(p: CUdeviceptr, offset: usize) -> CUdeviceptr {
    p + (offset * std::mem::size_of::<T>()) as u64
}

fn same_context<T>(gpu: &Gpu, name: &'static str, s: &CudaSlice<T>) -> Result<()> {
    if s.context().cu_ctx() == gpu.context().cu_ctx() {
        Ok(())
    } else {
        Err(Error::ForeignContext {
            what: format!("`{name}`"),
            why: "allocate it on the stream of this GpuGroupNorm's Gpu",
        })
    }
}

fn check_tensor<T: Element>(
    gpu: &Gpu,
    geo: &Geometry,
    name: &'static str,
    t: &DeviceView<'_, T>,
) -> Result<()> {
    if t.dims() != geo.dims.as_slice() {
        return Err(Error::ShapeMismatch {
            name,
            expected: geo.dims.clone(),
            got: t.dims().to_vec(),
        });
    }
    if t.layout() != geo.layout {
        return Err(Error::LayoutMismatch {
            name,
            expected: geo.layout,
            got: t.layout(),
        });
    }
    // the buffer may have been swapped through `buffer_mut` since the tensor was built
    let needed = t.offset() + t.numel();
    if t.buffer().len() < needed {
        return Err(Error::LengthMismatch {
            name,
            expected: needed,
            got: t.buffer().len(),
            what: format!(
                "offset {} plus the product of dims {:?}",
                t.offset(),
                t.dims()
            ),
        });
    }
    same_context(gpu, name, t.buffer())
}

fn check_param<T: Element, P: Element>(
    gpu: &Gpu,
    name: &'static str,
    p: Option<&CudaSlice<P>>,
    channels: usize,
) -> Result<()> {
    if let Some(p) = p {
        check_param_dtype::<T, P>(name)?;
        check_len(name, p.len(), channels, "one value per channel")?;
        same_context(gpu, name, p)?;
    }
    Ok(())
}

/// Statistics must describe `N * G` rows, in buffers long enough and of this context.
fn check_stats(gpu: &Gpu, geo: &Geometry, stats: &DeviceStats) -> Result<()> {
    check_len("stats", stats.rows, geo.rows(), "N * G rows")?;
    for (name, s) in [("mean", &stats.mean), ("rstd", &stats.rstd)] {
        same_context(gpu, name, s)?;
        if s.len() < geo.rows() {
            check_len(name, s.len(), geo.rows(), "N * G rows")?;
        }
    }
    Ok(())
}

impl GpuGroupNorm {
    /// The configuration.
    pub fn config(&self) -> &GroupNorm {
        &self.gn
    }

    /// The device handle (and stream) launches go to.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Forces a kernel path (the default, [`Path::Auto`], lets the planner choose per shape).
    /// Forcing [`Path::Fused`] makes rows that do not fit on chip an error.
    pub fn with_path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }

    /// Validated geometry of `x`, refusing what the GPU path does not do yet.
    /// Validated geometry of `x` (what the raw layer cannot check: dims against the buffer, the
    /// layout, the context); the raw layer refuses what the GPU path does not do yet.
    fn geometry<T: Element>(&self, x: &DeviceView<'_, T>) -> Result<Geometry> {
        let geo = self.gn.geometry(x.dims())?;
        check_tensor(&self.gpu, &geo, "x", x)?;
        Ok(geo)
    }

    /// The raw layer's description of a call with geometry `geo`.
    fn problem<'a, T: Element, P: Element>(&self, geo: &'a Geometry) -> Problem<'a> {
        Problem {
            dims: &geo.dims,
            groups: geo.g,
            eps: self.gn.eps(),
            layout: geo.layout,
            dtype: T::DTYPE,
            param_dtype: P::DTYPE,
            path: self.path,
            activation: self.gn.activation(),
        }
    }

    /// Describes the kernel path this op takes for activations of type `T` with `dims` (assuming
    /// 16-byte aligned buffers), e.g. `fused` or `split x10 (1 ch/chunk)`, for reports.
    pub fn describe_path<T: Element>(&self, dims: &[usize], backward: bool) -> Result<String> {
        let geo = self.gn.geometry(dims)?;
        let pass = if backward {
            Pass::Backward
        } else {
            Pass::Forward
        };
        let (_, p) = raw::plan_of(self.gpu.limits(), &self.problem::<T, T>(&geo), pass)?;
        let ch = p.chunking;
        let path = if p.cluster > 1 { "cluster" } else { "split" };
        Ok(match (p.nhwc, p.fused, ch.pieces) {
            (true, true, _) => format!("nhwc fused ({} groups/tile)", ch.cpb),
            (true, false, _) => format!("nhwc {path} x{} ({} groups/tile)", ch.chunks, ch.cpb),
            (false, true, _) => "fused".to_string(),
            (false, false, 1) => format!("{path} x{} ({} ch/chunk)", ch.chunks, ch.cpb),
            (false, false, pieces) => format!("{path} x{} ({pieces} pieces/ch)", ch.chunks),
        })
    }

    /// Makes the workspace at least `floats` f32 values long: grown (never shrunk) as needed.
    fn reserve_workspace(&mut self, floats: usize) -> Result<()> {
        if floats > 0 && self.workspace.as_ref().is_none_or(|w| w.len() < floats) {
            self.workspace = None; // free the old one before asking for the larger one
            self.workspace = Some(zeros(self.gpu.stream(), floats)?);
        }
        Ok(())
    }

    /// Makes the ticket words at least `words` long (zero-filled when allocated; the kernels
    /// leave them zero after every call, so a grown set starts zero too).
    fn reserve_tickets(&mut self, words: usize) -> Result<()> {
        if words > 0 && self.tickets.as_ref().is_none_or(|t| t.len() < words) {
            self.tickets = None;
            self.tickets = Some(zeros(self.gpu.stream(), words)?);
        }
        Ok(())
    }

    /// Forward pass into new buffers: returns `y` (same dims and layout as `x`) and the saved
    /// statistics. `affine` names the weight and bias (see [`DeviceAffine`]).
    pub fn forward<X, P>(
        &mut self,
        x: &X,
        affine: DeviceAffine<'_, P>,
    ) -> Result<(DeviceTensor<X::Elem>, DeviceStats)>
    where
        X: AsDeviceView + ?Sized,
        P: Element,
    {
        let x = x.device_view();
        let geo = self.geometry(&x)?;
        let mut y = DeviceTensor::zeros(&self.gpu, x.dims(), x.layout())?;
        let mut stats = DeviceStats::zeros(&self.gpu, geo.rows())?;
        self.forward_into(&x, affine, &mut y, &mut stats)?;
        Ok((y, stats))
    }

    /// Forward pass into caller-owned buffers (no allocation beyond the workspace's first growth).
    pub fn forward_into<X, Y, P>(
        &mut self,
        x: &X,
        affine: DeviceAffine<'_, P>,
        y: &mut Y,
        stats: &mut DeviceStats,
    ) -> Result<()>
    where
        X: AsDeviceView + ?Sized,
        Y: AsDeviceViewMut<Elem = X::Elem> + ?Sized,
        P: Element,
    {
        let (x, mut y) = (x.device_view(), y.device_view_mut());
        self.run_forward(&x, affine, &mut y, stats, false)
    }

    /// The same forward pass through the unfused baseline `groupnorm bench` compares against:
    /// a statistics kernel, then a separate normalize kernel, as PyTorch structures it.
    pub fn forward_baseline_into<X, Y, P>(
        &mut self,
        x: &X,
        affine: DeviceAffine<'_, P>,
        y: &mut Y,
        stats: &mut DeviceStats,
    ) -> Result<()>
    where
        X: AsDeviceView + ?Sized,
        Y: AsDeviceViewMut<Elem = X::Elem> + ?Sized,
        P: Element,
    {
        let (x, mut y) = (x.device_view(), y.device_view_mut());
        self.run_forward(&x, affine, &mut y, stats, true)
    }

    fn run_forward<T: Element, P: Element>(
        &mut self,
        x: &DeviceView<'_, T>,
        affine: DeviceAffine<'_, P>,
        y: &mut DeviceViewMut<'_, T>,
        stats: &mut DeviceStats,
        baseline: bool,
    ) -> Result<()> {
        let DeviceAffine { weight, bias } = affine;
        let geo = self.geometry(x)?;
        check_tensor(&self.gpu, &geo, "y", &y.as_view())?;
        check_param_dtype::<T, P>("weight")?;
        check_param::<T, P>(&self.gpu, "weight", weight, geo.c)?;
        check_param::<T, P>(&self.gpu, "bias", bias, geo.c)?;
        check_stats(&self.gpu, &geo, stats)?;
        let problem = self.problem::<T, P>(&geo);
        let ws_bytes = raw::forward_workspace_bytes(&self.gpu, &problem)?;
        self.reserve_workspace(ws_bytes / 4)?;
        let ws_len = self.workspace.as_ref().map_or(0, |w| w.len() * 4);
        let stream = self.gpu.stream().clone();
        let (xp, _gx) = x.buffer().device_ptr(&stream);
        let y_offset = y.offset();
        let (yp, _gy) = y.buffer_mut().device_ptr_mut(&stream);
        let (wp, _gw) = weight.map(|w| w.device_ptr(&stream)).unzip();
        let (bp, _gb) = bias.map(|b| b.device_ptr(&stream)).unzip();
        let (mp, _gm) = stats.mean.device_ptr_mut(&stream);
        let (rp, _gr) = stats.rstd.device_ptr_mut(&stream);
        let (ws, _gws) = self
            .workspace
            .as_mut()
            .map(|w| w.device_ptr_mut(&stream))
            .unzip();
        let ptrs = ForwardPtrs {
            x: ptr::<T>(xp, x.offset()),
            y: ptr::<T>(yp, y_offset),
            weight: wp.unwrap_or(0),
            bias: bp.unwrap_or(0),
            mean: mp,
            rstd: rp,
        };
        // SAFETY: every pointer comes from a cudarc buffer of this Gpu's context (checked above),
        // long enough for the dims (checked above: tensors, parameters, statistics; workspace
        // reserved for this problem), borrowed with cudarc's guards until after the launch so
        // cudarc orders later uses after it; y and the statistics are borrowed mutably, so they
        // overlap nothing else.
        unsafe {
            if baseline {
                raw::forward_baseline(
                    &self.gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    ws.unwrap_or(0),
                    ws_len,
                )
            } else {
                raw::forward(
                    &self.gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    ws.unwrap_or(0),
                    ws_len,
                )
            }
        }
    }

    /// Backward pass into new buffers, activation included: `dy` is the gradient of
    /// `act(xhat * w + b)`, `affine` the forward pass's (its bias is read only to recompute an
    /// activation's input). `dweight` is computed when `affine` has a weight, `dbias` when
    /// `want_dbias`. As [`GroupNorm::backward`] on the CPU.
    pub fn backward<D, X, P>(
        &mut self,
        dy: &D,
        x: &X,
        stats: &DeviceStats,
        affine: DeviceAffine<'_, P>,
        want_dbias: bool,
    ) -> Result<DeviceGrads<X::Elem, P>>
    where
        D: AsDeviceView<Elem = X::Elem> + ?Sized,
        X: AsDeviceView + ?Sized,
        P: Element,
    {
        let x = x.device_view();
        let geo = self.geometry(&x)?;
        let mut dx = DeviceTensor::zeros(&self.gpu, x.dims(), x.layout())?;
        let mut dweight = match affine.weight {
            Some(_) => Some(zeros::<P>(self.gpu.stream(), geo.c)?),
            None => None,
        };
        let mut dbias = match want_dbias {
            true => Some(zeros::<P>(self.gpu.stream(), geo.c)?),
            false => None,
        };
        self.backward_into(
            dy,
            &x,
            stats,
            affine,
            &mut dx,
            dweight.as_mut(),
            dbias.as_mut(),
        )?;
        Ok(DeviceGrads { dx, dweight, dbias })
    }

    /// [`GpuGroupNorm::backward`] into caller-owned buffers. `dweight` may only be asked for
    /// when `affine` has a weight.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<D, X, DX, P>(
        &mut self,
        dy: &D,
        x: &X,
        stats: &DeviceStats,
        affine: DeviceAffine<'_, P>,
        dx: &mut DX,
        dweight: Option<&mut CudaSlice<P>>,
        dbias: Option<&mut CudaSlice<P>>,
    ) -> Result<()>
    where
        D: AsDeviceView<Elem = X::Elem> + ?Sized,
        X: AsDeviceView + ?Sized,
        DX: AsDeviceViewMut<Elem = X::Elem> + ?Sized,
        P: Element,
    {
        let (dy, x, mut dx) = (dy.device_view(), x.device_view(), dx.device_view_mut());
        self.run_backward(&dy, &x, stats, affine, &mut dx, dweight, dbias, false)
    }

    /// The same backward pass through the unfused baseline (PyTorch's structure: per-(n, c) sums,
    /// per-row coefficients, an elementwise dx kernel, then dweight/dbias). No activation.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_baseline_into<D, X, DX, P>(
        &mut self,
        dy: &D,
        x: &X,
        stats: &DeviceStats,
        affine: DeviceAffine<'_, P>,
        dx: &mut DX,
        dweight: Option<&mut CudaSlice<P>>,
        dbias: Option<&mut CudaSlice<P>>,
    ) -> Result<()>
    where
        D: AsDeviceView<Elem = X::Elem> + ?Sized,
        X: AsDeviceView + ?Sized,
        DX: AsDeviceViewMut<Elem = X::Elem> + ?Sized,
        P: Element,
    {
        let (dy, x, mut dx) = (dy.device_view(), x.device_view(), dx.device_view_mut());
        self.run_backward(&dy, &x, stats, affine, &mut dx, dweight, dbias, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_backward<T: Element, P: Element>(
        &mut self,
        dy: &DeviceView<'_, T>,
        x: &DeviceView<'_, T>,
        stats: &DeviceStats,
        affine: DeviceAffine<'_, P>,
        dx: &mut DeviceViewMut<'_, T>,
        dweight: Option<&mut CudaSlice<P>>,
        dbias: Option<&mut CudaSlice<P>>,
        baseline: bool,
    ) -> Result<()> {
        let DeviceAffine { weight, bias } = affine;
        let geo = self.geometry(x)?;
        check_tensor(&self.gpu, &geo, "dy", dy)?;
        check_tensor(&self.gpu, &geo, "dx", &dx.as_view())?;
        check_param_dtype::<T, P>("weight")?;
        check_param::<T, P>(&self.gpu, "weight", weight, geo.c)?;
        check_param::<T, P>(&self.gpu, "bias", bias, geo.c)?;
        check_param::<T, P>(&self.gpu, "dweight", dweight.as_deref(), geo.c)?;
        check_param::<T, P>(&self.gpu, "dbias", dbias.as_deref(), geo.c)?;
        if dweight.is_some() && weight.is_none() {
            return Err(Error::WeightNeeded);
        }
        check_stats(&self.gpu, &geo, stats)?;
        let problem = self.problem::<T, P>(&geo);
        // one plan for both sizes (the launch plans once more, with the buffers' alignment)
        let (ws_bytes, words) = raw::backward_needs(&self.gpu, &problem)?;
        self.reserve_workspace(ws_bytes / 4)?;
        let ws_len = self.workspace.as_ref().map_or(0, |w| w.len() * 4);
        if !baseline {
            self.reserve_tickets(words)?;
        }
        let ticket_words = self.tickets.as_ref().map_or(0, |t| t.len());
        let stream = self.gpu.stream().clone();
        let (dyp, _gdy) = dy.buffer().device_ptr(&stream);
        let (xp, _gx) = x.buffer().device_ptr(&stream);
        let dx_offset = dx.offset();
        let (dxp, _gdx) = dx.buffer_mut().device_ptr_mut(&stream);
        let (wp, _gw) = weight.map(|w| w.device_ptr(&stream)).unzip();
        let (bp, _gb) = bias.map(|b| b.device_ptr(&stream)).unzip();
        let (dwp, _gdw) = dweight.map(|w| w.device_ptr_mut(&stream)).unzip();
        let (dbp, _gdb) = dbias.map(|b| b.device_ptr_mut(&stream)).unzip();
        let (mp, _gm) = stats.mean.device_ptr(&stream);
        let (rp, _gr) = stats.rstd.device_ptr(&stream);
        let (ws, _gws) = self
            .workspace
            .as_mut()
            .map(|w| w.device_ptr_mut(&stream))
            .unzip();
        let (tk, _gtk) = self
            .tickets
            .as_mut()
            .map(|t| t.device_ptr_mut(&stream))
            .unzip();
        let ptrs = BackwardPtrs {
            dy: ptr::<T>(dyp, dy.offset()),
            x: ptr::<T>(xp, x.offset()),
            mean: mp,
            rstd: rp,
            weight: wp.unwrap_or(0),
            dx: ptr::<T>(dxp, dx_offset),
            dweight: dwp.unwrap_or(0),
            dbias: dbp.unwrap_or(0),
            bias: bp.unwrap_or(0),
            tickets: tk.unwrap_or(0),
            ticket_words,
        };
        // SAFETY: as in `run_forward`: buffers of this context, lengths checked, guards held
        // until after the launch, outputs borrowed mutably; the tickets are zero (allocated so,
        // left so by every call) and used by this object's calls only, on its one stream.
        unsafe {
            if baseline {
                raw::backward_baseline(
                    &self.gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    ws.unwrap_or(0),
                    ws_len,
                )
            } else {
                raw::backward(
                    &self.gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    ws.unwrap_or(0),
                    ws_len,
                )
            }
        }
    }
}
