//! The raw layer: forward and backward on device pointers the caller owns, on a stream the caller
//! borrows to us, with a workspace the caller provides. The safe API ([`GpuGroupNorm`]) is built
//! on it, and so are the C ABI and framework integrations.
//!
//! Nothing here allocates, synchronizes, records events or frees anything: a call validates the
//! problem (dims, groups, eps, dtypes, layout, workspace size), plans the launch and enqueues the
//! kernels on `stream`. It can therefore be captured in a CUDA graph.
//!
//! ```no_run
//! use groupnorm::gpu::raw::{self, ForwardPtrs, Problem};
//! use groupnorm::gpu::Gpu;
//! use groupnorm::{DType, Layout};
//! # let (x, y, mean, rstd, workspace, stream) = (0u64, 0u64, 0u64, 0u64, 0u64, std::ptr::null_mut());
//! let gpu = Gpu::new(0)?;
//! let problem = Problem::new(&[2, 320, 64, 64], 32, DType::F16, DType::F32);
//! let bytes = raw::forward_workspace_bytes(&gpu, &problem)?;
//! // ... allocate `bytes` of device memory as `workspace` (or more), then:
//! let ptrs = ForwardPtrs::new(x, y, mean, rstd); // .with_affine(weight, bias) for affine
//! // SAFETY: x, y hold 2*320*64*64 f16 values, mean/rstd 2*32 f32 values, all in gpu's context;
//! // workspace holds `bytes` bytes; all stay valid until the stream's work completes.
//! unsafe { raw::forward(&gpu, stream, &problem, &ptrs, workspace, bytes)? };
//! # Ok::<(), groupnorm::Error>(())
//! ```
//!
//! [`GpuGroupNorm`]: super::GpuGroupNorm

use super::launch;
use super::params::{activation_code, BwdParams, FwdParams};
use super::plan::{self, DeviceLimits, Pass, Path, Plan, Shape};
use super::runtime::Gpu;
use crate::{Activation, DType, Error, Geometry, GroupNorm, Layout, Result};
pub use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// One GroupNorm problem: everything but the pointers.
///
/// Made with [`Problem::new`] and the `with_*` methods (fields may be added in minor releases, so
/// it cannot be written as a struct literal outside this crate; its fields stay readable and
/// assignable).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Problem<'a> {
    /// Logical dims `(N, C, *spatial)`.
    pub dims: &'a [usize],
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Memory layout of the activations.
    pub layout: Layout,
    /// Activation dtype (x, y, dy, dx).
    pub dtype: DType,
    /// Parameter dtype (weight, bias, dweight, dbias): f32 or `dtype`.
    pub param_dtype: DType,
    /// Which kernel path to take.
    pub path: Path,
    /// The activation fused after the affine transform: the forward writes `act(z)`, the
    /// backward takes the gradient of `act(z)` (and reads [`BackwardPtrs::bias`] to recompute
    /// `z`).
    pub activation: Activation,
}

impl<'a> Problem<'a> {
    /// NCHW, eps 1e-5, the planner's choice of path.
    pub fn new(dims: &'a [usize], groups: usize, dtype: DType, param_dtype: DType) -> Self {
        Problem {
            dims,
            groups,
            eps: crate::DEFAULT_EPS,
            layout: Layout::Nchw,
            dtype,
            param_dtype,
            path: Path::Auto,
            activation: Activation::None,
        }
    }

    /// The same problem with `eps` added to the variance (validated when the problem is used).
    #[must_use]
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// The same problem with activations in `layout`.
    #[must_use]
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The same problem with the kernel path forced to `path`.
    #[must_use]
    pub fn with_path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }

    /// The same problem with `activation` fused after the affine transform.
    #[must_use]
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Validates the problem into its geometry.
    fn geometry(&self) -> Result<Geometry> {
        let channels = self.dims.get(1).copied().unwrap_or(0);
        if self.dims.len() < 2 {
            return Err(Error::TooFewDims {
                got: self.dims.len(),
                dims: self.dims.to_vec(),
            });
        }
        let gn = GroupNorm::new(self.groups, channels)?
            .eps(self.eps)?
            .layout(self.layout);
        if self.param_dtype != self.dtype && self.param_dtype != DType::F32 {
            return Err(Error::DtypeMismatch {
                name: "weight",
                activation: self.dtype,
                param: self.param_dtype,
            });
        }
        gn.geometry(self.dims)
    }

    fn plan(&self, dev: DeviceLimits, geo: &Geometry, pass: Pass, aligned: bool) -> Result<Plan> {
        let shape = Shape {
            n: geo.n,
            c: geo.c,
            g: geo.g,
            d: geo.d,
            s: geo.s,
            elem_bytes: self.dtype.size(),
            nhwc: geo.layout == Layout::Nhwc,
            silu: self.activation != Activation::None,
        };
        plan::plan(shape, pass, self.path, dev, aligned, &geo.dims)
    }
}

/// Device pointers of a forward pass. `weight` and `bias` are 0 when absent.
///
/// Made with [`ForwardPtrs::new`] and [`ForwardPtrs::with_affine`] (or `default()` and field
/// assignments): `#[non_exhaustive]`, so no struct literal outside this crate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardPtrs {
    /// Input, `N * C * S` activations.
    pub x: CUdeviceptr,
    /// Output, `N * C * S` activations.
    pub y: CUdeviceptr,
    /// `C` parameters, or 0.
    pub weight: CUdeviceptr,
    /// `C` parameters, or 0.
    pub bias: CUdeviceptr,
    /// `N * G` f32, written.
    pub mean: CUdeviceptr,
    /// `N * G` f32, written.
    pub rstd: CUdeviceptr,
}

/// Device pointers of a backward pass. `weight`, `dweight`, `dbias` are 0 when absent (`dweight`
/// needs `weight`).
///
/// Made with [`BackwardPtrs::new`] and the `with_*` methods (or `default()` and field
/// assignments): `#[non_exhaustive]`, so no struct literal outside this crate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackwardPtrs {
    /// Gradient of the output, `N * C * S` activations.
    pub dy: CUdeviceptr,
    /// Input of the forward pass.
    pub x: CUdeviceptr,
    /// `N * G` f32 saved by the forward pass.
    pub mean: CUdeviceptr,
    /// `N * G` f32 saved by the forward pass.
    pub rstd: CUdeviceptr,
    /// `C` parameters, or 0.
    pub weight: CUdeviceptr,
    /// Gradient of the input, `N * C * S` activations, written.
    pub dx: CUdeviceptr,
    /// `C` parameters, written, or 0.
    pub dweight: CUdeviceptr,
    /// `C` parameters, written, or 0.
    pub dbias: CUdeviceptr,
    /// `C` parameters: the forward pass's bias, or 0 if it had none. Read only when the
    /// problem has an activation (to recompute its input); ignored otherwise.
    pub bias: CUdeviceptr,
}

impl ForwardPtrs {
    /// The pointers of a forward pass without affine parameters: input `x`, output `y`, and the
    /// statistics `mean` and `rstd` it writes.
    pub fn new(x: CUdeviceptr, y: CUdeviceptr, mean: CUdeviceptr, rstd: CUdeviceptr) -> Self {
        ForwardPtrs {
            x,
            y,
            mean,
            rstd,
            ..Self::default()
        }
    }

    /// The same pointers with the affine parameters `weight` and `bias` (0 for an absent one).
    #[must_use]
    pub fn with_affine(mut self, weight: CUdeviceptr, bias: CUdeviceptr) -> Self {
        self.weight = weight;
        self.bias = bias;
        self
    }
}

impl BackwardPtrs {
    /// The pointers of a backward pass without affine parameters: the gradient `dy`, the forward
    /// input `x` and its statistics `mean` and `rstd`, and the input gradient `dx` it writes.
    pub fn new(
        dy: CUdeviceptr,
        x: CUdeviceptr,
        mean: CUdeviceptr,
        rstd: CUdeviceptr,
        dx: CUdeviceptr,
    ) -> Self {
        BackwardPtrs {
            dy,
            x,
            mean,
            rstd,
            dx,
            ..Self::default()
        }
    }

    /// The same pointers with the forward pass's `weight` and `bias` (0 for an absent one; the
    /// bias is read only with an activation).
    #[must_use]
    pub fn with_affine(mut self, weight: CUdeviceptr, bias: CUdeviceptr) -> Self {
        self.weight = weight;
        self.bias = bias;
        self
    }

    /// The same pointers with the parameter gradients `dweight` and `dbias` to write (0 for one
    /// not wanted).
    #[must_use]
    pub fn with_param_grads(mut self, dweight: CUdeviceptr, dbias: CUdeviceptr) -> Self {
        self.dweight = dweight;
        self.dbias = dbias;
        self
    }
}

const F32: usize = std::mem::size_of::<f32>();

/// Workspace bytes a forward pass of `problem` needs on `gpu` (assuming 16-byte aligned
/// activations; misaligned ones need no more). Zero for most shapes.
pub fn forward_workspace_bytes(gpu: &Gpu, problem: &Problem) -> Result<usize> {
    Ok(workspace_floats(gpu.limits(), problem, Pass::Forward)? * F32)
}

/// Workspace bytes a backward pass of `problem` needs on `gpu` (for the fused kernels and the
/// baseline alike).
pub fn backward_workspace_bytes(gpu: &Gpu, problem: &Problem) -> Result<usize> {
    Ok(workspace_floats(gpu.limits(), problem, Pass::Backward)? * F32)
}

/// f32 workspace values a pass of `problem` needs on a device of `dev`.
pub(crate) fn workspace_floats(dev: DeviceLimits, problem: &Problem, pass: Pass) -> Result<usize> {
    let (geo, plan) = plan_of(dev, problem, pass)?;
    Ok(match pass {
        Pass::Forward => plan.workspace_floats,
        Pass::Backward => {
            backward_floats(&geo, &plan, false).max(backward_floats(&geo, &plan, true))
        }
    })
}

/// The validated geometry of `problem` and its plan on a device of `dev`, for 16-byte aligned
/// buffers (what the size queries and reports describe).
pub(crate) fn plan_of(
    dev: DeviceLimits,
    problem: &Problem,
    pass: Pass,
) -> Result<(Geometry, Plan)> {
    let geo = problem.geometry()?;
    let plan = problem.plan(dev, &geo, pass, true)?;
    Ok((geo, plan))
}

/// The baseline keeps (sum dy x, sum dy) per (n, c) and two coefficients per row.
fn backward_floats(geo: &Geometry, plan: &Plan, baseline: bool) -> usize {
    if baseline {
        2 * geo.n * geo.c + 2 * geo.rows()
    } else {
        plan.workspace_floats
    }
}

/// The baseline (PyTorch's unfused structure, for `groupnorm bench`) exists for NCHW without an
/// activation only.
fn check_baseline(geo: &Geometry, problem: &Problem) -> Result<()> {
    if (geo.layout == Layout::Nhwc && geo.s > 1) || problem.activation != Activation::None {
        return Err(Error::Unsupported {
            what: "the unfused baseline kernels for NHWC tensors or with an activation (they \
                   model PyTorch's NCHW GroupNorm alone)"
                .into(),
        });
    }
    Ok(())
}

fn check_workspace(needed_floats: usize, ptr: CUdeviceptr, bytes: usize) -> Result<()> {
    let needed = needed_floats * F32;
    if needed > 0 && (ptr == 0 || bytes < needed || ptr % F32 as u64 != 0) {
        return Err(Error::LengthMismatch {
            name: "workspace",
            expected: needed,
            got: if ptr == 0 { 0 } else { bytes },
            what: "bytes, 4-byte aligned, from forward_workspace_bytes/backward_workspace_bytes"
                .into(),
        });
    }
    Ok(())
}

fn check_required(name: &'static str, ptr: CUdeviceptr, count: usize) -> Result<()> {
    if ptr == 0 && count > 0 {
        return Err(Error::LengthMismatch {
            name,
            expected: count,
            got: 0,
            what: "elements: a null pointer was passed".into(),
        });
    }
    Ok(())
}

/// Enqueues a forward pass on `stream`.
///
/// # Safety
///
/// - `x` and `y` point to `N * C * S` elements of `problem.dtype` in the layout of `problem`;
///   `weight`/`bias` to `C` elements of `problem.param_dtype` or are 0; `mean`/`rstd` to `N * G`
///   f32; `workspace` to `workspace_bytes` bytes; all are device memory of `gpu`'s context, and
///   outputs do not overlap inputs or each other;
/// - `stream` is a valid stream of `gpu`'s context (null for the legacy default stream);
/// - all of them stay valid until the enqueued work has completed.
pub unsafe fn forward(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &ForwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
) -> Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        run_forward(
            gpu,
            stream,
            problem,
            ptrs,
            workspace,
            workspace_bytes,
            false,
        )
    }
}

/// [`forward`] through the unfused baseline `groupnorm bench` compares against.
///
/// # Safety
///
/// As [`forward`].
pub unsafe fn forward_baseline(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &ForwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
) -> Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_forward(gpu, stream, problem, ptrs, workspace, workspace_bytes, true) }
}

/// Validates a forward problem and its pointers, plans it for `dev` and fills the kernels'
/// parameters: everything but the launch, shared by the GPU path and the host emulator.
pub(crate) fn prepare_forward(
    dev: DeviceLimits,
    problem: &Problem,
    ptrs: &ForwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    baseline: bool,
) -> Result<(Plan, FwdParams)> {
    let geo = problem.geometry()?;
    check_required("x", ptrs.x, geo.numel())?;
    check_required("y", ptrs.y, geo.numel())?;
    check_required("mean", ptrs.mean, geo.rows())?;
    check_required("rstd", ptrs.rstd, geo.rows())?;
    let aligned = ptrs.x % 16 == 0 && ptrs.y % 16 == 0;
    let plan = problem.plan(dev, &geo, Pass::Forward, aligned)?;
    if baseline {
        check_baseline(&geo, problem)?;
    }
    let floats = if baseline { 0 } else { plan.workspace_floats };
    check_workspace(floats, workspace, workspace_bytes)?;
    let params = FwdParams {
        x: ptrs.x,
        y: ptrs.y,
        weight: ptrs.weight,
        bias: ptrs.bias,
        mean: ptrs.mean,
        rstd: ptrs.rstd,
        partials: workspace,
        rows: geo.rows() as u64,
        groups: geo.g as u32,
        d: geo.d as u32,
        s: geo.s as u32,
        eps: problem.eps as f32,
        chunking: plan.chunking,
        activation: activation_code(problem.activation),
        reserved: 0,
    };
    Ok((plan, params))
}

/// # Safety
///
/// As [`forward`].
unsafe fn run_forward(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &ForwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    baseline: bool,
) -> Result<()> {
    let (plan, params) = prepare_forward(
        gpu.limits(),
        problem,
        ptrs,
        workspace,
        workspace_bytes,
        baseline,
    )?;
    let (t, p) = (problem.dtype, problem.param_dtype);
    // SAFETY: every pointer in `params` comes from the caller under this function's contract
    // (sizes checked against the problem where the values allow), and the plan was made for this
    // geometry, alignment and device.
    unsafe {
        if baseline {
            launch::forward_baseline(gpu, stream, t, p, &params)
        } else {
            launch::forward(gpu, stream, &plan, t, p, &params)
        }
    }
}

/// Enqueues a backward pass on `stream`.
///
/// # Safety
///
/// - `dy`, `x` and `dx` point to `N * C * S` elements of `problem.dtype`; `mean`/`rstd` to the
///   `N * G` f32 statistics of the forward pass of this `x`; `weight`, `dweight`, `dbias` to `C`
///   elements of `problem.param_dtype` or are 0; `workspace` to `workspace_bytes` bytes; all are
///   device memory of `gpu`'s context, and outputs do not overlap inputs or each other;
/// - `stream` is a valid stream of `gpu`'s context;
/// - all of them stay valid until the enqueued work has completed.
pub unsafe fn backward(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &BackwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
) -> Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        run_backward(
            gpu,
            stream,
            problem,
            ptrs,
            workspace,
            workspace_bytes,
            false,
        )
    }
}

/// [`backward`] through the unfused baseline.
///
/// # Safety
///
/// As [`backward`].
pub unsafe fn backward_baseline(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &BackwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
) -> Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_backward(gpu, stream, problem, ptrs, workspace, workspace_bytes, true) }
}

/// Validates a backward problem and its pointers, plans it for `dev` and fills the kernels'
/// parameters (as [`prepare_forward`]).
pub(crate) fn prepare_backward(
    dev: DeviceLimits,
    problem: &Problem,
    ptrs: &BackwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    baseline: bool,
) -> Result<(Plan, BwdParams, usize)> {
    let geo = problem.geometry()?;
    for (name, p) in [("dy", ptrs.dy), ("x", ptrs.x), ("dx", ptrs.dx)] {
        check_required(name, p, geo.numel())?;
    }
    check_required("mean", ptrs.mean, geo.rows())?;
    check_required("rstd", ptrs.rstd, geo.rows())?;
    if ptrs.dweight != 0 && ptrs.weight == 0 {
        return Err(Error::Unsupported {
            what: "dweight without a weight: pass the weight the forward pass used".into(),
        });
    }
    let aligned = ptrs.x % 16 == 0 && ptrs.dy % 16 == 0 && ptrs.dx % 16 == 0;
    let plan = problem.plan(dev, &geo, Pass::Backward, aligned)?;
    if baseline {
        check_baseline(&geo, problem)?;
    }
    check_workspace(
        backward_floats(&geo, &plan, baseline),
        workspace,
        workspace_bytes,
    )?;
    let row_len = geo.row_len();
    let params = BwdParams {
        dy: ptrs.dy,
        x: ptrs.x,
        mean: ptrs.mean,
        rstd: ptrs.rstd,
        weight: ptrs.weight,
        dx: ptrs.dx,
        dweight: ptrs.dweight,
        dbias: ptrs.dbias,
        partials: workspace,
        rows: geo.rows() as u64,
        batch: geo.n as u32,
        groups: geo.g as u32,
        d: geo.d as u32,
        s: geo.s as u32,
        inv_row_len: if row_len > 0 {
            (1.0 / row_len as f64) as f32
        } else {
            0.0
        },
        chunking: plan.chunking,
        activation: activation_code(problem.activation),
        bias: if problem.activation == Activation::None {
            0
        } else {
            ptrs.bias
        },
    };
    Ok((plan, params, geo.c))
}

/// # Safety
///
/// As [`backward`].
unsafe fn run_backward(
    gpu: &Gpu,
    stream: CUstream,
    problem: &Problem,
    ptrs: &BackwardPtrs,
    workspace: CUdeviceptr,
    workspace_bytes: usize,
    baseline: bool,
) -> Result<()> {
    let (plan, params, channels) = prepare_backward(
        gpu.limits(),
        problem,
        ptrs,
        workspace,
        workspace_bytes,
        baseline,
    )?;
    let (t, p) = (problem.dtype, problem.param_dtype);
    // SAFETY: as in `run_forward`.
    unsafe {
        if baseline {
            launch::backward_baseline(gpu, stream, t, p, channels, &params)
        } else {
            launch::backward(gpu, stream, &plan, t, p, channels, &params)
        }
    }
}
