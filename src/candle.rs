//! [candle](https://github.com/huggingface/candle) integration (feature `candle`): Group
//! Normalization as a candle op with a real backward pass, and a drop-in replacement for
//! `candle_nn::GroupNorm`.
//!
//! - [`group_norm`]: the functional op, `torch.nn.functional.group_norm` on candle tensors, with
//!   optional per-channel weight and bias;
//! - [`nn::GroupNorm`] and [`nn::group_norm`]: the module and its `VarBuilder` constructor, with
//!   the signatures, parameter names (`weight`, `bias`) and initial values of
//!   `candle_nn::GroupNorm` and `candle_nn::group_norm`, so that swapping the import is enough.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use groupnorm::candle::nn::group_norm; // instead of candle_nn::group_norm
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
//! let gn = group_norm(2, 4, 1e-5, vb.pp("norm"))?;
//! let x = Tensor::new(&[[5f32, 4., 7., 2.], [1., 6., 2., 3.], [4., 8., 1., 9.]], &Device::Cpu)?;
//! let y = gn.forward(&x)?; // (N = 3, C = 4): each pair of channels normalizes to ±1
//! assert!((y.to_vec2::<f32>()?[0][0] - 1.0).abs() < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! # What runs where
//!
//! - CPU tensors go through the crate's CPU path ([`GroupNorm::forward`] and
//!   [`GroupNorm::backward`]): parallel, deterministic, f32 accumulation.
//! - CUDA tensors (feature `candle-cuda`) go through the crate's CUDA kernels
//!   ([`gpu::raw`](crate::gpu::raw)), launched on candle's own stream, with every buffer (outputs,
//!   statistics, workspace) allocated through candle's device. Without that feature a CUDA tensor
//!   gets candle's "no cuda implementation for groupnorm" error; Metal tensors get the
//!   corresponding Metal error.
//!
//! # Dtypes
//!
//! Activations in f32, f16 or bf16; weight and bias in the activation dtype or in f32 (mixed
//! precision), both of the same dtype. Statistics and accumulation are f32 whatever the dtype;
//! a low-precision output is the f32 result rounded once. Any other dtype is an error naming it.
//!
//! # Layouts
//!
//! Inputs may be views: a contiguous tensor with a start offset (e.g. from `narrow` on the batch
//! dim) is read in place, without a copy. A non-contiguous input (transposed, broadcast, strided)
//! is first made contiguous with candle's own `contiguous()`, which is differentiable, so
//! gradients still reach the original tensor. The logical dims are always `(N, C, *spatial)`.
//!
//! # Backward
//!
//! The forward pass records a candle custom op (`CustomOp1/2/3`, by how many of weight and bias
//! are given; applied with `apply_op*`, so autograd sees it) whose `bwd` returns `dx`, `dweight`
//! and `dbias` from one fused backward pass ([`GroupNorm::backward`] on the CPU, the backward
//! kernels on CUDA). The per-group statistics (`mean`, `rstd`, `N * G` f32 values each) that the
//! forward pass computes anyway are kept inside the recorded op, the way PyTorch's
//! `native_group_norm` saves them for its backward, so the backward pass makes no extra pass
//! over `x` to recompute them (on the GPU that is a quarter of its memory traffic). The op lives
//! as long as the graph that holds the output, and so do those `8 * N * G` bytes. The recorded
//! statistics belong to the value `x` had in the forward pass: overwriting a `Var` in place
//! (`Var::set`) between the forward and the backward pass gives gradients that mix the two
//! values (candle's own ops share the hazard: the graph holds tensors, not copies).
//!
//! The gradients themselves are not differentiable again (no second-order derivatives through
//! this op).

use crate::{Affine, DType, Element, Error, GroupNorm, Stats};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType as CDType, Device, Layout, Result, Shape,
    Storage, Tensor, WithDType,
};
use std::sync::{Mutex, MutexGuard};

/// The op's name in candle's errors.
const NAME: &str = "groupnorm";

/// Turns a crate error into a candle error carrying its message.
fn wrap(e: Error) -> candle_core::Error {
    msg(e)
}

/// A candle error with a message.
fn msg(m: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("{NAME}: {m}"))
}

/// Group Normalization of `x` (`(N, C, *spatial)`, any number of spatial dims, none included)
/// over `groups` groups of channels, with optional per-channel `weight` and `bias` (shape `(C,)`):
/// `torch.nn.functional.group_norm(x, groups, weight, bias, eps)` on candle tensors.
///
/// Differentiable in `x`, `weight` and `bias` (see the [module docs](self) for how the backward
/// pass works). Activations in f32, f16 or bf16, or f64 on the CPU (computed in f64, as
/// `candle_nn` computes f64); parameters in the activation dtype or f32.
///
/// Errors (candle errors, never panics): fewer than two dims, `groups` zero or not dividing `C`,
/// `eps` negative or not finite, an unsupported dtype (named in the message), a parameter not of
/// shape `(C,)`, of another dtype than f32 or the activation dtype, or of another dtype than the
/// other parameter, tensors on different devices.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // x = 1..32 as (1, 2, 4, 4), two groups: (1 - 8.5) / sqrt(21.25 + 1e-5)
/// let x = Tensor::arange(1f32, 33., &Device::Cpu)?.reshape((1, 2, 4, 4))?;
/// let y = groupnorm::candle::group_norm(&x, None, None, 2, 1e-5)?;
/// let first = y.flatten_all()?.to_vec1::<f32>()?[0];
/// assert!((first + 1.62698).abs() < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn group_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        return Err(wrap(Error::TooFewDims {
            got: dims.len(),
            dims: dims.to_vec(),
        }));
    }
    let channels = dims[1];
    let gn = GroupNorm::new(groups, channels)
        .and_then(|gn| gn.with_eps(eps))
        .map_err(wrap)?;
    gn.geometry(dims).map_err(wrap)?;
    let t = activation_dtype(x.dtype())?;
    let param_dtype = match (weight, bias) {
        (Some(w), Some(b)) if w.dtype() != b.dtype() => {
            return Err(msg(format!(
                "weight has dtype {:?} but bias has dtype {:?}: they must be the same",
                w.dtype(),
                b.dtype()
            )))
        }
        (Some(p), _) | (None, Some(p)) => Some(p.dtype()),
        (None, None) => None,
    };
    if let Some(p) = param_dtype {
        param_dtype_for(t, p)?;
    }
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            if p.dims() != [channels] {
                return Err(msg(format!(
                    "`{name}` has shape {:?}, but x {:?} has {channels} channels: expected ({channels},)",
                    p.dims(),
                    dims
                )));
            }
            if !p.device().same_device(x.device()) {
                return Err(msg(format!(
                    "`{name}` is on {:?} but x is on {:?}",
                    p.device().location(),
                    x.device().location()
                )));
            }
        }
    }
    let x = x.contiguous()?;
    let weight = weight.map(Tensor::contiguous).transpose()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let op = GroupNormOp {
        gn,
        has_weight: weight.is_some(),
        has_bias: bias.is_some(),
        saved: Mutex::new(None),
    };
    match (weight, bias) {
        (Some(w), Some(b)) => x.apply_op3(&w, &b, op),
        (Some(p), None) | (None, Some(p)) => x.apply_op2(&p, op),
        (None, None) => x.apply_op1(op),
    }
}

/// The crate's dtype for a candle activation dtype, or an error naming the dtype.
fn activation_dtype(d: CDType) -> Result<DType> {
    match d {
        CDType::F32 => Ok(DType::F32),
        CDType::F16 => Ok(DType::F16),
        CDType::BF16 => Ok(DType::BF16),
        CDType::F64 => Ok(DType::F64),
        other => Err(msg(format!(
            "x has dtype {other:?}, but activations must be f32, f16, bf16 or f64 (f64 on the \
             CPU only)"
        ))),
    }
}

/// The crate's dtype for parameters of candle dtype `p` beside activations of dtype `t`.
fn param_dtype_for(t: DType, p: CDType) -> Result<DType> {
    match (t, p) {
        (_, CDType::F32) => Ok(DType::F32),
        (DType::F16, CDType::F16) => Ok(DType::F16),
        (DType::BF16, CDType::BF16) => Ok(DType::BF16),
        (DType::F64, CDType::F64) => Ok(DType::F64),
        (t, p) => Err(msg(format!(
            "the parameters have dtype {p:?}, but activations are {t}: parameters must be f32 or \
             {t}"
        ))),
    }
}

/// Calls `$f::<T, P>($args)` for the activation and parameter dtypes `$t`, `$p` (crate dtypes,
/// already checked to be one of the seven valid pairs).
macro_rules! dispatch {
    ($t:expr, $p:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match ($t, $p) {
            (DType::F32, _) => $f::<f32, f32>($($arg),*),
            (DType::F16, DType::F16) => $f::<$crate::f16, $crate::f16>($($arg),*),
            (DType::F16, _) => $f::<$crate::f16, f32>($($arg),*),
            (DType::BF16, DType::BF16) => $f::<$crate::bf16, $crate::bf16>($($arg),*),
            (DType::BF16, _) => $f::<$crate::bf16, f32>($($arg),*),
            (DType::F64, DType::F64) => $f::<f64, f64>($($arg),*),
            (DType::F64, _) => $f::<f64, f32>($($arg),*),
        }
    };
}

/// The statistics a forward pass recorded for its backward pass.
enum Saved {
    Cpu(Stats),
    #[cfg(feature = "candle-cuda")]
    Cuda(cuda::DeviceSaved),
}

/// The recorded op: configuration, which parameters follow `x` among the op's arguments, and the
/// statistics of its one forward pass.
struct GroupNormOp {
    gn: GroupNorm,
    has_weight: bool,
    has_bias: bool,
    saved: Mutex<Option<Saved>>,
}

/// A (storage, layout) argument of the op.
type Arg<'a, S> = (&'a S, &'a Layout);

/// The gradients the backward pass returns: `dx`, then `dweight` and `dbias` when the forward
/// pass had a weight and a bias.
type TensorGrads = (Tensor, Option<Tensor>, Option<Tensor>);

impl GroupNormOp {
    fn saved(&self) -> MutexGuard<'_, Option<Saved>> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, s: Saved) {
        *self.saved() = Some(s);
    }

    /// Splits the op's arguments after `x` into (weight, bias).
    fn params<A>(&self, rest: [Option<A>; 2]) -> (Option<A>, Option<A>) {
        let [first, second] = rest;
        match (self.has_weight, self.has_bias) {
            (true, true) => (first, second),
            (true, false) => (first, None),
            (false, true) => (None, first),
            (false, false) => (None, None),
        }
    }

    /// Dtypes of the call: activations and parameters (the activation dtype when there are none).
    fn dtypes(&self, x: CDType, p: Option<CDType>) -> Result<(DType, DType)> {
        let t = activation_dtype(x)?;
        let p = match p {
            Some(p) => param_dtype_for(t, p)?,
            None => t,
        };
        Ok((t, p))
    }

    fn cpu_forward(
        &self,
        x: Arg<CpuStorage>,
        w: Option<Arg<CpuStorage>>,
        b: Option<Arg<CpuStorage>>,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let p = w.or(b).map(|(s, _)| s.dtype());
        let (t, p) = self.dtypes(x.0.dtype(), p)?;
        dispatch!(t, p, cpu_forward(self, x, w, b))
    }

    /// The backward pass for every device, from the op's tensors.
    fn backward(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<TensorGrads> {
        if grad.dims() != x.dims() || grad.dtype() != x.dtype() {
            return Err(msg(format!(
                "the output gradient is {:?} {:?}, but the output is {:?} {:?}",
                grad.dtype(),
                grad.dims(),
                x.dtype(),
                x.dims()
            )));
        }
        // the gradient of a reduction arrives broadcast (stride 0): make it a plain buffer
        let dy = grad.contiguous()?;
        let p = weight.or(bias).map(Tensor::dtype);
        let (t, p) = self.dtypes(x.dtype(), p)?;
        let saved = self.saved();
        match (x.device(), saved.as_ref()) {
            (Device::Cpu, Some(Saved::Cpu(stats))) => {
                dispatch!(
                    t,
                    p,
                    cpu_backward(self, x, weight, bias.is_some(), &dy, stats)
                )
            }
            #[cfg(feature = "candle-cuda")]
            (Device::Cuda(_), Some(Saved::Cuda(stats))) => {
                use cuda::backward as cuda_backward;
                dispatch!(
                    t,
                    p,
                    cuda_backward(self, x, weight, bias.is_some(), &dy, stats)
                )
            }
            (device, _) => Err(msg(format!(
                "no statistics recorded for a backward pass on {:?} (the forward pass did not \
                 run there)",
                device.location()
            ))),
        }
    }
}

/// A contiguous argument's values (offsets into its storage honoured), or an error.
fn host<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        msg(format!(
            "`{name}` is not contiguous (strides {:?}); call .contiguous() first",
            l.stride()
        ))
    })?;
    data.get(start..end).ok_or_else(|| {
        msg(format!(
            "`{name}`'s layout ({start}..{end}) lies outside its storage of {} values",
            data.len()
        ))
    })
}

fn cpu_forward<T, P>(
    op: &GroupNormOp,
    x: Arg<CpuStorage>,
    w: Option<Arg<CpuStorage>>,
    b: Option<Arg<CpuStorage>>,
) -> Result<(CpuStorage, Shape)>
where
    T: Element + WithDType,
    P: Element + WithDType,
{
    let xs = host::<T>(x.0, x.1, "x")?;
    let ws = w.map(|(s, l)| host::<P>(s, l, "weight")).transpose()?;
    let bs = b.map(|(s, l)| host::<P>(s, l, "bias")).transpose()?;
    let affine = Affine {
        weight: ws,
        bias: bs,
    };
    let (y, stats) = op.gn.forward(xs, x.1.dims(), affine).map_err(wrap)?;
    op.save(Saved::Cpu(stats));
    Ok((T::to_cpu_storage_owned(y), x.1.shape().clone()))
}

fn cpu_backward<T, P>(
    op: &GroupNormOp,
    x: &Tensor,
    weight: Option<&Tensor>,
    want_dbias: bool,
    dy: &Tensor,
    stats: &Stats,
) -> Result<TensorGrads>
where
    T: Element + WithDType,
    P: Element + WithDType,
{
    fn cpu<'a>(s: &'a Storage, name: &str) -> Result<&'a CpuStorage> {
        match s {
            Storage::Cpu(s) => Ok(s),
            _ => Err(msg(format!("`{name}` is not on the CPU like x"))),
        }
    }
    let (xg, xl) = x.storage_and_layout();
    let (dyg, dyl) = dy.storage_and_layout();
    let wg = weight.map(Tensor::storage_and_layout);
    let xs = host::<T>(cpu(&xg, "x")?, xl, "x")?;
    let dys = host::<T>(
        cpu(&dyg, "the output gradient")?,
        dyl,
        "the output gradient",
    )?;
    let ws = match &wg {
        Some((g, l)) => Some(host::<P>(cpu(g, "weight")?, l, "weight")?),
        None => None,
    };
    let grads = op
        .gn
        .backward(
            dys,
            xs,
            x.dims(),
            stats,
            Affine {
                weight: ws,
                bias: None,
            },
            want_dbias,
        )
        .map_err(wrap)?;
    let c = op.gn.channels();
    let dx = Tensor::from_vec(grads.dx, x.shape(), &Device::Cpu)?;
    let dweight = grads
        .dweight
        .map(|v| Tensor::from_vec(v, c, &Device::Cpu))
        .transpose()?;
    let dbias = grads
        .dbias
        .map(|v| Tensor::from_vec(v, c, &Device::Cpu))
        .transpose()?;
    Ok((dx, dweight, dbias))
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s, l), None, None)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward_any(self, (s, l), None, None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (dx, _, _) = self.backward(x, None, None, grad)?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, b) = self.params([Some((s2, l2)), None]);
        self.cpu_forward((s1, l1), w, b)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, b) = self.params([Some((s2, l2)), None]);
        cuda::forward_any(self, (s1, l1), w, b)
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (w, b) = self.params([Some(p), None]);
        let (dx, dw, db) = self.backward(x, w, b, grad)?;
        Ok((Some(dx), dw.or(db)))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward((s1, l1), Some((s2, l2)), Some((s3, l3)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward_any(self, (s1, l1), Some((s2, l2)), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, Some(w), Some(b), grad)?;
        Ok((Some(dx), dw, db))
    }
}

/// Wraps a finished gradient buffer as a tensor that records no op (not differentiable again).
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
fn leaf(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The CUDA side: the crate's kernels on candle's stream, every buffer from candle's device.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::{leaf, msg, wrap, Arg, GroupNormOp, Saved, TensorGrads};
    use crate::gpu::raw::{self, BackwardPtrs, ForwardPtrs, Problem};
    use crate::gpu::{Gpu, Path};
    use crate::{DType, Element, Layout as GnLayout};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{Layout, Result, Shape, Storage, Tensor, WithDType};
    use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
    use std::sync::Arc;

    /// Statistics of a forward pass, on the device.
    pub(super) struct DeviceSaved {
        mean: CudaSlice<f32>,
        rstd: CudaSlice<f32>,
    }

    /// The crate's device handle for candle's stream: candle's context made current on this
    /// thread (candle's default stream is the per-thread stream, a special handle that resolves
    /// in the current context), then the device found from the stream and opened once.
    fn gpu_for(stream: &Arc<CudaStream>) -> Result<Gpu> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| wrap(crate::Error::driver("making candle's context current", e)))?;
        // SAFETY: the handle belongs to a live cudarc stream that `stream` keeps alive for the
        // duration of the call, in the context just made current.
        unsafe { Gpu::for_stream(stream.cu_stream()) }.map_err(wrap)
    }

    /// A device buffer of at least one element (the driver refuses empty allocations), not
    /// initialized: for outputs the kernels write in full.
    ///
    /// # Safety
    ///
    /// The caller writes every element it reads later.
    unsafe fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { dev.alloc::<T>(len.max(1)) }
    }

    /// An f32 workspace of `bytes` bytes, not initialized (a memset per call saved), or `None`
    /// when the problem needs none.
    fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<f32>>> {
        (bytes > 0)
            // SAFETY: the kernels write every workspace value before they read it: the raw
            // layer promises its callers nothing about the workspace's contents, and the host
            // emulator runs every path on NaN-poisoned workspaces (src/gpu/emulate.rs).
            .then(|| unsafe { alloc_out::<f32>(dev, bytes.div_ceil(4)) })
            .transpose()
    }

    /// The elements a contiguous argument covers in its storage.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        name: &str,
    ) -> Result<CudaView<'a, T>> {
        let slice = s.as_cuda_slice::<T>()?;
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            msg(format!(
                "`{name}` is not contiguous (strides {:?}); call .contiguous() first",
                l.stride()
            ))
        })?;
        slice.try_slice(start..end).ok_or_else(|| {
            msg(format!(
                "`{name}`'s layout ({start}..{end}) lies outside its storage of {} values",
                slice.len()
            ))
        })
    }

    fn problem<'a>(op: &GroupNormOp, dims: &'a [usize], t: DType, p: DType) -> Problem<'a> {
        Problem {
            dims,
            groups: op.gn.groups(),
            eps: op.gn.eps(),
            layout: GnLayout::Nchw,
            dtype: t,
            param_dtype: p,
            path: Path::Auto,
            activation: crate::Activation::None,
        }
    }

    pub(super) fn forward_any(
        op: &GroupNormOp,
        x: Arg<CudaStorage>,
        w: Option<Arg<CudaStorage>>,
        b: Option<Arg<CudaStorage>>,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let p = w.or(b).map(|(s, _)| s.dtype());
        let (t, p) = op.dtypes(x.0.dtype(), p)?;
        dispatch!(t, p, forward(op, x, w, b))
    }

    fn forward<T, P>(
        op: &GroupNormOp,
        x: Arg<CudaStorage>,
        w: Option<Arg<CudaStorage>>,
        b: Option<Arg<CudaStorage>>,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: Element + WithDType + CudaDType,
        P: Element + WithDType + CudaDType,
    {
        let dev = x.0.device.clone();
        let stream = dev.cuda_stream();
        let gpu = gpu_for(&stream)?;
        let dims = x.1.dims();
        let geo = op.gn.geometry(dims).map_err(wrap)?;
        let problem = problem(op, dims, <T as Element>::DTYPE, <P as Element>::DTYPE);
        let xv = view::<T>(x.0, x.1, "x")?;
        let wv = w.map(|(s, l)| view::<P>(s, l, "weight")).transpose()?;
        let bv = b.map(|(s, l)| view::<P>(s, l, "bias")).transpose()?;
        // SAFETY: the forward kernels write every element of y (N * C * S values) before
        // anything reads it; the extra element of an empty tensor is never read.
        let mut y = unsafe { alloc_out::<T>(&dev, geo.numel()) }?;
        // Not zeroed: a memset is a launch each, which a small problem pays for as much as for
        // its kernels.
        // SAFETY: every path writes every statistics row (N * G values), empty rows included,
        // which the parity suite checks into NaN-filled statistics (tests/kernels.rs).
        let mut mean = unsafe { alloc_out::<f32>(&dev, geo.rows()) }?;
        // SAFETY: as for `mean`.
        let mut rstd = unsafe { alloc_out::<f32>(&dev, geo.rows()) }?;
        let ws_bytes = raw::forward_workspace_bytes(&gpu, &problem).map_err(wrap)?;
        let mut ws = workspace(&dev, ws_bytes)?;
        {
            let (xp, _gx) = xv.device_ptr(&stream);
            let (wp, _gw) = wv.as_ref().map(|v| v.device_ptr(&stream)).unzip();
            let (bp, _gb) = bv.as_ref().map(|v| v.device_ptr(&stream)).unzip();
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let (mp, _gm) = mean.device_ptr_mut(&stream);
            let (rp, _gr) = rstd.device_ptr_mut(&stream);
            let (wsp, _gws) = ws.as_mut().map(|s| s.device_ptr_mut(&stream)).unzip();
            let ptrs = ForwardPtrs {
                x: xp,
                y: yp,
                weight: wp.unwrap_or(0),
                bias: bp.unwrap_or(0),
                mean: mp,
                rstd: rp,
            };
            // SAFETY: x, weight and bias are views of exactly the elements their layouts cover
            // (N * C * S activations of T, C parameters of P: shapes checked when the op was
            // built, dtypes by the dispatch); y, mean, rstd and the workspace were just allocated
            // with the sizes the problem needs, so they overlap nothing. All are memory of
            // candle's context, the one `gpu` was opened for, and `stream` is candle's stream in
            // it. cudarc's guards (`_g*`) live until after the launch is enqueued, so candle's
            // later uses of these buffers are ordered after it; the buffers themselves outlive
            // the kernels because cudarc frees memory in stream order.
            unsafe {
                raw::forward(
                    &gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    wsp.unwrap_or(0),
                    ws_bytes,
                )
            }
            .map_err(wrap)?;
        }
        op.save(Saved::Cuda(DeviceSaved { mean, rstd }));
        Ok((CudaStorage::wrap_cuda_slice(y, dev), x.1.shape().clone()))
    }

    pub(super) fn backward<T, P>(
        op: &GroupNormOp,
        x: &Tensor,
        weight: Option<&Tensor>,
        want_dbias: bool,
        dy: &Tensor,
        saved: &DeviceSaved,
    ) -> Result<TensorGrads>
    where
        T: Element + WithDType + CudaDType,
        P: Element + WithDType + CudaDType,
    {
        fn cuda<'a>(s: &'a Storage, name: &str) -> Result<&'a CudaStorage> {
            match s {
                Storage::Cuda(s) => Ok(s),
                _ => Err(msg(format!("`{name}` is not on the CUDA device like x"))),
            }
        }
        let (xg, xl) = x.storage_and_layout();
        let (dyg, dyl) = dy.storage_and_layout();
        let wg = weight.map(Tensor::storage_and_layout);
        let xs = cuda(&xg, "x")?;
        let dev = xs.device.clone();
        let stream = dev.cuda_stream();
        let gpu = gpu_for(&stream)?;
        let dims = x.dims();
        let geo = op.gn.geometry(dims).map_err(wrap)?;
        let problem = problem(op, dims, <T as Element>::DTYPE, <P as Element>::DTYPE);
        let xv = view::<T>(xs, xl, "x")?;
        let dyv = view::<T>(
            cuda(&dyg, "the output gradient")?,
            dyl,
            "the output gradient",
        )?;
        let wv = match &wg {
            Some((g, l)) => Some(view::<P>(cuda(g, "weight")?, l, "weight")?),
            None => None,
        };
        let c = geo.c;
        // SAFETY: the backward kernels write every element of dx before anything reads it.
        let mut dx = unsafe { alloc_out::<T>(&dev, geo.numel()) }?;
        // zeroed: with N = 0 the sums over the batch are empty and nothing is launched
        let mut dweight = wv.as_ref().map(|_| dev.alloc_zeros::<P>(c)).transpose()?;
        let mut dbias = want_dbias.then(|| dev.alloc_zeros::<P>(c)).transpose()?;
        let ws_bytes = raw::backward_workspace_bytes(&gpu, &problem).map_err(wrap)?;
        let mut ws = workspace(&dev, ws_bytes)?;
        {
            let (xp, _gx) = xv.device_ptr(&stream);
            let (dyp, _gdy) = dyv.device_ptr(&stream);
            let (wp, _gw) = wv.as_ref().map(|v| v.device_ptr(&stream)).unzip();
            let (mp, _gm) = saved.mean.device_ptr(&stream);
            let (rp, _gr) = saved.rstd.device_ptr(&stream);
            let (dxp, _gdx) = dx.device_ptr_mut(&stream);
            let (dwp, _gdw) = dweight.as_mut().map(|s| s.device_ptr_mut(&stream)).unzip();
            let (dbp, _gdb) = dbias.as_mut().map(|s| s.device_ptr_mut(&stream)).unzip();
            let (wsp, _gws) = ws.as_mut().map(|s| s.device_ptr_mut(&stream)).unzip();
            let ptrs = BackwardPtrs {
                dy: dyp,
                x: xp,
                mean: mp,
                rstd: rp,
                weight: wp.unwrap_or(0),
                dx: dxp,
                dweight: dwp.unwrap_or(0),
                dbias: dbp.unwrap_or(0),
                bias: 0, // no activation through this interface yet
                // no tickets: the op keeps no device state between calls, so bwd_params runs
                tickets: 0,
                ticket_words: 0,
            };
            // SAFETY: dy and x are views of N * C * S activations of T (the shapes of the
            // recorded op's input and output, checked equal), weight of C parameters of P; mean
            // and rstd are the N * G statistics this op's forward pass wrote for this x; dx,
            // dweight, dbias and the workspace were just allocated with the sizes the problem
            // needs. All are memory of candle's context, launched on candle's stream, with
            // cudarc's guards held until the launch is enqueued (see `forward`).
            unsafe {
                raw::backward(
                    &gpu,
                    stream.cu_stream(),
                    &problem,
                    &ptrs,
                    wsp.unwrap_or(0),
                    ws_bytes,
                )
            }
            .map_err(wrap)?;
        }
        let wrap_slice = |s, len: usize| leaf(Storage::Cuda(s), len);
        let dx = leaf(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(dx, dev.clone())),
            x.shape().clone(),
        );
        let dweight = dweight.map(|s| wrap_slice(CudaStorage::wrap_cuda_slice(s, dev.clone()), c));
        let dbias = dbias.map(|s| wrap_slice(CudaStorage::wrap_cuda_slice(s, dev.clone()), c));
        Ok((dx, dweight, dbias))
    }
}

/// A drop-in replacement for `candle_nn`'s `GroupNorm` module: the same constructors, parameter
/// names and initial values, computed by [`group_norm`] (with a real backward
/// pass, and CUDA kernels under the `candle-cuda` feature).
///
/// Swap `use candle_nn::{group_norm, GroupNorm};` for
/// `use groupnorm::candle::nn::{group_norm, GroupNorm};`. What differs, all of it a superset:
///
/// - inputs of rank 2, `(N, C)`, are accepted (`candle_nn` asks for rank 3 or more);
/// - weight and bias may be f32 beside f16/bf16 activations (mixed precision);
/// - f16/bf16 outputs are the f32 result rounded once (`candle_nn` rounds the normalized value,
///   then the product with the weight, then the sum with the bias).
pub mod nn {
    use candle_core::{Module, Result, Tensor};

    /// Group Normalization over `(N, C, *)` tensors with a per-channel weight and bias, as
    /// `candle_nn::GroupNorm`.
    #[derive(Clone, Debug)]
    pub struct GroupNorm {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        num_channels: usize,
        num_groups: usize,
    }

    impl GroupNorm {
        /// A module from its parameters (each of shape `(num_channels,)`), as
        /// `candle_nn::GroupNorm::new`. Errors if `num_groups` is zero or does not divide
        /// `num_channels`, if `eps` is not finite and positive in f32, or if the weight or the
        /// bias is not of shape `(num_channels,)`, or they differ in dtype or device (checked
        /// here, where `candle_nn` fails only in `forward`).
        pub fn new(
            weight: Tensor,
            bias: Tensor,
            num_channels: usize,
            num_groups: usize,
            eps: f64,
        ) -> Result<Self> {
            crate::GroupNorm::new(num_groups, num_channels)
                .and_then(|gn| gn.with_eps(eps))
                .map_err(super::wrap)?;
            // checked here, not at the first `forward`: a checkpoint of the wrong width fails
            // where it is loaded
            for (name, p) in [("weight", &weight), ("bias", &bias)] {
                if p.dims() != [num_channels] {
                    return Err(super::msg(format!(
                        "{name} has shape {:?}, but a GroupNorm of {num_channels} channels \
                         needs ({num_channels},)",
                        p.dims()
                    )));
                }
            }
            if weight.dtype() != bias.dtype() {
                return Err(super::msg(format!(
                    "weight has dtype {:?} but bias has dtype {:?}: they must be the same",
                    weight.dtype(),
                    bias.dtype()
                )));
            }
            if !weight.device().same_device(bias.device()) {
                return Err(super::msg(
                    "weight and bias are on different devices: put them on the same one",
                ));
            }
            Ok(Self {
                weight,
                bias,
                eps,
                num_channels,
                num_groups,
            })
        }

        /// The per-channel weight.
        pub fn weight(&self) -> &Tensor {
            &self.weight
        }

        /// The per-channel bias.
        pub fn bias(&self) -> &Tensor {
            &self.bias
        }

        /// Number of channels `C`.
        pub fn num_channels(&self) -> usize {
            self.num_channels
        }

        /// Number of groups `G`.
        pub fn num_groups(&self) -> usize {
            self.num_groups
        }

        /// The eps added to the variance.
        pub fn eps(&self) -> f64 {
            self.eps
        }
    }

    impl Module for GroupNorm {
        /// Normalizes `x` of shape `(N, C, *)`; errors when `C` is not the module's channel count.
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            let dims = x.dims();
            if dims.len() >= 2 && dims[1] != self.num_channels {
                return Err(super::msg(format!(
                    "input {dims:?} has {} channels, but this GroupNorm was built for {}",
                    dims[1], self.num_channels
                )));
            }
            super::group_norm(
                x,
                Some(&self.weight),
                Some(&self.bias),
                self.num_groups,
                self.eps,
            )
        }
    }

    /// A [`GroupNorm`] whose `weight` (initialized to 1) and `bias` (initialized to 0) come from
    /// `vb`, as `candle_nn::group_norm`: the same names, shapes and initial values, so both load
    /// the same checkpoints and share the same `VarMap` entries.
    pub fn group_norm(
        num_groups: usize,
        num_channels: usize,
        eps: f64,
        vb: candle_nn::VarBuilder,
    ) -> Result<GroupNorm> {
        let weight = vb.get_with_hints(num_channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(num_channels, "bias", candle_nn::Init::Const(0.))?;
        GroupNorm::new(weight, bias, num_channels, num_groups, eps)
    }
}
