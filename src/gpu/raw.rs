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
            .with_eps(self.eps)?
            .with_layout(self.layout);
        if self.dtype == DType::F64 || self.param_dtype == DType::F64 {
            return Err(Error::DtypeNotOnGpu { dtype: DType::F64 });
        }
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
    /// `ticket_words` `u32` words, zero-filled, or 0: see [`BackwardPtrs::with_tickets`].
    pub tickets: CUdeviceptr,
    /// Length of `tickets` in `u32` words.
    pub ticket_words: usize,
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

    /// The same pointers with `words` `u32` ticket words at `tickets`, which save a kernel
    /// launch: with them, the one-launch backward paths (fused and cluster) reduce `dweight`
    /// and `dbias` over `N > 1` samples inside that launch (the last block of each channel's N
    /// does it, counted by an integer ticket: the bits are the same as without). Without
    /// tickets a second, serial launch does it.
    ///
    /// The contract: the words are zero-filled before their first use (e.g. `cuMemsetD32` once,
    /// when allocated); every backward call leaves them zero again when its work completes, so
    /// they are reused as they are; calls that use the same words run one after another (one
    /// stream, or ordered by events), never at the same time. `words` must be at least
    /// [`backward_ticket_words`] for the problem ([`Error::LengthMismatch`] otherwise). Words
    /// that are not zero on entry give wrong parameter gradients: do not share them with
    /// anything else.
    #[must_use]
    pub fn with_tickets(mut self, tickets: CUdeviceptr, words: usize) -> Self {
        self.tickets = tickets;
        self.ticket_words = words;
        self
    }
}

const F32: usize = std::mem::size_of::<f32>();

/// Workspace bytes a forward pass of `problem` needs on `gpu` (assuming 16-byte aligned
/// activations; misaligned ones need no more). Zero for most shapes.
pub fn forward_workspace_bytes(gpu: &Gpu, problem: &Problem) -> Result<usize> {
    floats_to_bytes(
        workspace_floats(gpu.limits(), problem, Pass::Forward)?,
        problem,
    )
}

/// Bytes of `floats` f32 values, or [`Error::TooLarge`].
fn floats_to_bytes(floats: usize, problem: &Problem) -> Result<usize> {
    floats
        .checked_mul(F32)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| Error::TooLarge {
            dims: problem.dims.to_vec(),
            why: "the workspace size in bytes overflows isize".into(),
        })
}

/// Workspace bytes a backward pass of `problem` needs on `gpu` (for the fused kernels and the
/// baseline alike).
pub fn backward_workspace_bytes(gpu: &Gpu, problem: &Problem) -> Result<usize> {
    floats_to_bytes(
        workspace_floats(gpu.limits(), problem, Pass::Backward)?,
        problem,
    )
}

/// `u32` ticket words ([`BackwardPtrs::with_tickets`]) a backward pass of `problem` uses on
/// `gpu`: 0 where its path needs none (one sample, or the split path), so that a caller may
/// skip them. The same for every alignment of the buffers.
pub fn backward_ticket_words(gpu: &Gpu, problem: &Problem) -> Result<usize> {
    ticket_words(gpu.limits(), problem)
}

/// [`backward_ticket_words`] on a device of `dev` (the split fallback of a refused cluster
/// needs none).
pub(crate) fn ticket_words(dev: DeviceLimits, problem: &Problem) -> Result<usize> {
    let (geo, plan) = plan_of(dev, problem, Pass::Backward)?;
    Ok(plan.ticket_words(geo.n))
}

/// f32 workspace values a pass of `problem` needs on a device of `dev`.
///
/// Where the planner chose a thread-block cluster ([`Path::Auto`]), this is also enough for the
/// split path the launch falls back to when the driver refuses the cluster for resources (MPS
/// limits, MIG), so a workspace sized by this query serves either. A forced [`Path::Cluster`]
/// does not fall back: the refusal is its error.
pub(crate) fn workspace_floats(dev: DeviceLimits, problem: &Problem, pass: Pass) -> Result<usize> {
    let (geo, plan) = plan_of(dev, problem, pass)?;
    workspace_floats_of(dev, problem, pass, &geo, &plan)
}

/// The backward's workspace bytes and ticket words for `problem` on `gpu`, as
/// [`backward_workspace_bytes`] and [`backward_ticket_words`] give them, from one plan.
pub(crate) fn backward_needs(gpu: &Gpu, problem: &Problem) -> Result<(usize, usize)> {
    let dev = gpu.limits();
    let (geo, plan) = plan_of(dev, problem, Pass::Backward)?;
    let floats = workspace_floats_of(dev, problem, Pass::Backward, &geo, &plan)?;
    Ok((floats_to_bytes(floats, problem)?, plan.ticket_words(geo.n)))
}

/// [`workspace_floats`] with the pass's plan on `dev` already made.
fn workspace_floats_of(
    dev: DeviceLimits,
    problem: &Problem,
    pass: Pass,
    geo: &Geometry,
    plan: &Plan,
) -> Result<usize> {
    let mut floats = pass_floats(geo, plan, pass, problem)?;
    // (a forced cluster path never falls back: it fails instead)
    if plan.cluster > 1 && problem.path == Path::Auto {
        let no_clusters = DeviceLimits {
            max_cluster: 0,
            ..dev
        };
        let (geo, split) = plan_of(no_clusters, problem, pass)?;
        floats = floats.max(pass_floats(&geo, &split, pass, problem)?);
    }
    Ok(floats)
}

/// The workspace of one plan (the backward also covers the baseline).
fn pass_floats(geo: &Geometry, plan: &Plan, pass: Pass, problem: &Problem) -> Result<usize> {
    Ok(match pass {
        Pass::Forward => plan.workspace_floats,
        Pass::Backward => backward_floats(geo, plan, false, problem)?
            .max(backward_floats(geo, plan, true, problem)?),
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
fn backward_floats(
    geo: &Geometry,
    plan: &Plan,
    baseline: bool,
    problem: &Problem,
) -> Result<usize> {
    if !baseline {
        return Ok(plan.workspace_floats);
    }
    geo.n
        .checked_mul(geo.c)
        .and_then(|nc| nc.checked_add(geo.rows()))
        .and_then(|v| v.checked_mul(2))
        .filter(|&f| crate::config::fits_bytes(f, F32))
        .ok_or_else(|| Error::TooLarge {
            dims: problem.dims.to_vec(),
            why: "the baseline's workspace size in bytes overflows isize".into(),
        })
}

/// The baseline (PyTorch's unfused structure, for `groupnorm bench`) exists for NCHW without an
/// activation only.
fn check_baseline(geo: &Geometry, problem: &Problem) -> Result<()> {
    if (geo.layout == Layout::Nhwc && geo.s > 1) || problem.activation != Activation::None {
        return Err(Error::BaselineUnavailable {
            why: "they model PyTorch's NCHW GroupNorm alone: no NHWC tensors, no activation".into(),
        });
    }
    Ok(())
}

fn check_workspace(needed_floats: usize, ptr: CUdeviceptr, bytes: usize) -> Result<()> {
    // Checked: a wrapped product would accept a workspace far smaller than the kernels index.
    let Some(needed) = needed_floats.checked_mul(F32) else {
        return Err(Error::TooLarge {
            dims: Vec::new(),
            why: format!("a workspace of {needed_floats} f32 values overflows usize bytes"),
        });
    };
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

/// A device byte range `[ptr, ptr + bytes)` an argument covers, by name.
type Span = (&'static str, CUdeviceptr, usize);

/// Whether two spans share a byte (empty or null spans share none).
fn overlap(a: Span, b: Span) -> bool {
    a.1 != 0
        && b.1 != 0
        && a.2 > 0
        && b.2 > 0
        && a.1 < b.1.saturating_add(b.2 as u64)
        && b.1 < a.1.saturating_add(a.2 as u64)
}

/// Refuses any output that overlaps an input or another output, except those `allowed` says a
/// path honours (the forward's fused path with `y == x` exactly).
fn check_aliasing(
    outputs: &[Span],
    inputs: &[Span],
    allowed: impl Fn(Span, Span) -> bool,
    path: &str,
) -> Result<()> {
    for (i, &o) in outputs.iter().enumerate() {
        for &other in inputs.iter().chain(&outputs[i + 1..]) {
            if overlap(o, other) && !allowed(o, other) {
                return Err(Error::Aliased {
                    output: o.0,
                    input: other.0,
                    why: format!(
                        "{path} reads its inputs after other blocks have written their outputs, \
                         so an output sharing memory with an input or with another output would \
                         give wrong results (only the forward pass's fused path, one block per \
                         row with the row on chip, accepts `y` equal to `x`)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a pointer not aligned to its element size (the kernels' scalar path needs that much;
/// 16-byte alignment only selects the vector path).
fn check_align(name: &'static str, ptr: CUdeviceptr, elem_bytes: usize) -> Result<()> {
    if ptr % elem_bytes as u64 != 0 {
        return Err(Error::Misaligned {
            name,
            ptr,
            align: elem_bytes,
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
///   f32; `workspace` to `workspace_bytes` bytes; all are device memory of `gpu`'s context;
/// - outputs (and the workspace) do not overlap inputs or each other, except `y == x` exactly
///   where the plan is the fused path; this is checked from the pointers and the sizes the
///   problem implies, and refused with [`Error::Aliased`] (for `y == x` on the split and
///   cluster paths too, which read `x` after other blocks have written `y`); pointers not
///   aligned to their element size are refused with [`Error::Misaligned`];
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
    let (t, p) = (problem.dtype.size(), problem.param_dtype.size());
    for (name, ptr, size) in [
        ("x", ptrs.x, t),
        ("y", ptrs.y, t),
        ("weight", ptrs.weight, p),
        ("bias", ptrs.bias, p),
        ("mean", ptrs.mean, F32),
        ("rstd", ptrs.rstd, F32),
    ] {
        check_align(name, ptr, size)?;
    }
    let aligned = ptrs.x % 16 == 0 && ptrs.y % 16 == 0;
    let plan = problem.plan(dev, &geo, Pass::Forward, aligned)?;
    if baseline {
        check_baseline(&geo, problem)?;
    }
    let floats = if baseline { 0 } else { plan.workspace_floats };
    check_workspace(floats, workspace, workspace_bytes)?;
    // sizes fit isize (validated by the geometry and the workspace check)
    let (act_bytes, stat_bytes, param_bytes) = (geo.numel() * t, geo.rows() * F32, geo.c * p);
    let in_place_ok = plan.fused && !baseline;
    check_aliasing(
        &[
            ("y", ptrs.y, act_bytes),
            ("mean", ptrs.mean, stat_bytes),
            ("rstd", ptrs.rstd, stat_bytes),
            ("workspace", workspace, floats * F32),
        ],
        &[
            ("x", ptrs.x, act_bytes),
            ("weight", ptrs.weight, param_bytes),
            ("bias", ptrs.bias, param_bytes),
        ],
        |o, i| in_place_ok && o.0 == "y" && i.0 == "x" && o.1 == i.1,
        if plan.fused {
            "the forward pass"
        } else {
            "the forward pass's split and cluster paths"
        },
    )?;
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
    let (t, p) = (problem.dtype, problem.param_dtype);
    with_cluster_fallback(
        gpu.limits(),
        || gpu.refuse_clusters(),
        |dev| prepare_forward(dev, problem, ptrs, workspace, workspace_bytes, baseline),
        |(plan, _)| plan.cluster > 1 && problem.path == Path::Auto,
        |(plan, params)| {
            // SAFETY: every pointer in `params` comes from the caller under this function's
            // contract (sizes checked against the problem where the values allow), and the plan
            // was made for this geometry, alignment and device.
            unsafe {
                if baseline {
                    launch::forward_baseline(gpu, stream, t, p, params)
                } else {
                    launch::forward(gpu, stream, plan, t, p, params)
                }
            }
        },
    )
}

/// Whether a launch error is the driver refusing a thread-block cluster kernel for resources
/// (the cluster the device reported at start-up need not be available under MPS limits, MIG or
/// other work on the device).
pub(crate) fn is_cluster_refusal(e: &Error) -> bool {
    use cudarc::driver::sys::CUresult as R;
    match e {
        Error::Driver { context, source } => {
            context.contains("_cluster_")
                && matches!(
                    source.0,
                    R::CUDA_ERROR_INVALID_CLUSTER_SIZE
                        | R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
                        | R::CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION
                )
        }
        _ => false,
    }
}

/// Prepares a launch for `dev` and runs it; where the plan was a cluster and the driver refuses
/// it for resources, calls `refuse` (which remembers that for the context, so later plans skip
/// clusters) and prepares and runs the split path instead. The cluster kernel is the first of
/// its sequence, so nothing was enqueued by the refused attempt.
pub(crate) fn with_cluster_fallback<P>(
    dev: DeviceLimits,
    refuse: impl FnOnce(),
    prepare: impl Fn(DeviceLimits) -> Result<P>,
    is_cluster: impl Fn(&P) -> bool,
    mut launch: impl FnMut(&P) -> Result<()>,
) -> Result<()> {
    let prepared = prepare(dev)?;
    match launch(&prepared) {
        Err(e) if is_cluster(&prepared) && is_cluster_refusal(&e) => {
            refuse();
            let split = prepare(DeviceLimits {
                max_cluster: 0,
                ..dev
            })?;
            launch(&split)
        }
        done => done,
    }
}

/// Enqueues a backward pass on `stream`.
///
/// # Safety
///
/// - `dy`, `x` and `dx` point to `N * C * S` elements of `problem.dtype`; `mean`/`rstd` to the
///   `N * G` f32 statistics of the forward pass of this `x`; `weight`, `dweight`, `dbias` to `C`
///   elements of `problem.param_dtype` or are 0; `workspace` to `workspace_bytes` bytes; all are
///   device memory of `gpu`'s context;
/// - outputs (and the workspace) do not overlap inputs or each other: every backward path reads
///   `x` and `dy` after other blocks have written `dx`, so any overlap is refused with
///   [`Error::Aliased`] (checked from the pointers and the sizes the problem implies), and
///   pointers not aligned to their element size with [`Error::Misaligned`];
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
        return Err(Error::WeightNeeded);
    }
    let (t, p) = (problem.dtype.size(), problem.param_dtype.size());
    let bias = if problem.activation == Activation::None {
        0
    } else {
        ptrs.bias
    };
    for (name, ptr, size) in [
        ("dy", ptrs.dy, t),
        ("x", ptrs.x, t),
        ("dx", ptrs.dx, t),
        ("mean", ptrs.mean, F32),
        ("rstd", ptrs.rstd, F32),
        ("weight", ptrs.weight, p),
        ("bias", bias, p),
        ("dweight", ptrs.dweight, p),
        ("dbias", ptrs.dbias, p),
    ] {
        check_align(name, ptr, size)?;
    }
    let aligned = ptrs.x % 16 == 0 && ptrs.dy % 16 == 0 && ptrs.dx % 16 == 0;
    let plan = problem.plan(dev, &geo, Pass::Backward, aligned)?;
    if baseline {
        check_baseline(&geo, problem)?;
    }
    let floats = backward_floats(&geo, &plan, baseline, problem)?;
    check_workspace(floats, workspace, workspace_bytes)?;
    let words = if baseline || ptrs.tickets == 0 {
        0
    } else {
        plan.ticket_words(geo.n)
    };
    if words > 0 && ptrs.ticket_words < words {
        return Err(Error::LengthMismatch {
            name: "tickets",
            expected: words,
            got: ptrs.ticket_words,
            what: "u32 words, zero-filled, from backward_ticket_words".into(),
        });
    }
    let tickets = if words > 0 { ptrs.tickets } else { 0 };
    check_align("tickets", tickets, 4)?;
    let (act_bytes, stat_bytes, param_bytes) = (geo.numel() * t, geo.rows() * F32, geo.c * p);
    check_aliasing(
        &[
            ("dx", ptrs.dx, act_bytes),
            ("dweight", ptrs.dweight, param_bytes),
            ("dbias", ptrs.dbias, param_bytes),
            ("workspace", workspace, floats * F32),
            ("tickets", tickets, words * 4),
        ],
        &[
            ("dy", ptrs.dy, act_bytes),
            ("x", ptrs.x, act_bytes),
            ("mean", ptrs.mean, stat_bytes),
            ("rstd", ptrs.rstd, stat_bytes),
            ("weight", ptrs.weight, param_bytes),
            ("bias", bias, param_bytes),
        ],
        |_, _| false,
        "the backward pass (every path)",
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
        bias,
        tickets,
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
    let (t, p) = (problem.dtype, problem.param_dtype);
    with_cluster_fallback(
        gpu.limits(),
        || gpu.refuse_clusters(),
        |dev| prepare_backward(dev, problem, ptrs, workspace, workspace_bytes, baseline),
        |(plan, _, _)| plan.cluster > 1 && problem.path == Path::Auto,
        |(plan, params, channels)| {
            // SAFETY: as in `run_forward`.
            unsafe {
                if baseline {
                    launch::backward_baseline(gpu, stream, t, p, *channels, params)
                } else {
                    launch::backward(gpu, stream, plan, t, p, *channels, params)
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;
    use cudarc::driver::DriverError;
    use std::cell::Cell;

    const H100: DeviceLimits = DeviceLimits {
        sms: 132,
        smem_per_block: 227 * 1024,
        max_cluster: 16,
    };
    const SMALL: DeviceLimits = DeviceLimits {
        sms: 4,
        smem_per_block: 8 * 1024,
        max_cluster: 0,
    };

    /// Host-side addresses that are never dereferenced: `prepare_*` only validates and plans.
    fn fwd_ptrs(x: u64, y: u64) -> ForwardPtrs {
        ForwardPtrs {
            x,
            y,
            weight: 0x9000_0000,
            bias: 0xA000_0000,
            mean: 0xB000_0000,
            rstd: 0xC000_0000,
        }
    }

    fn bwd_ptrs() -> BackwardPtrs {
        BackwardPtrs {
            dy: 0x1000_0000,
            x: 0x2000_0000,
            mean: 0x3000_0000,
            rstd: 0x4000_0000,
            weight: 0x5000_0000,
            dx: 0x6000_0000,
            dweight: 0x7000_0000,
            dbias: 0x8000_0000,
            bias: 0,
            tickets: 0,
            ticket_words: 0,
        }
    }

    const WS: u64 = 0xD000_0000;

    fn ws_bytes(dev: DeviceLimits, problem: &Problem, pass: Pass) -> usize {
        workspace_floats(dev, problem, pass).unwrap() * F32
    }

    /// `[2^30, 1431655765, 0]`, G = 1: `3 * N * C` wraps u64; the query and the check refuse it
    /// instead of reporting a few GiB.
    #[test]
    fn backward_workspace_of_huge_empty_tensors_is_refused() {
        let dims = [1usize << 30, 1_431_655_765, 0];
        for dtype in [DType::F32, DType::F16] {
            let problem = Problem::new(&dims, 1, dtype, DType::F32);
            for pass in [Pass::Forward, Pass::Backward] {
                let e = workspace_floats(H100, &problem, pass).unwrap_err();
                assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
            }
        }
        // a wrapped workspace product in the check itself
        let e = check_workspace(usize::MAX / 2, WS, 8 << 30).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
        let e = check_workspace(1 << 61, WS, 8 << 30).unwrap_err();
        assert!(matches!(e, Error::LengthMismatch { .. }), "{e:?}");
    }

    #[test]
    fn in_place_forward_only_on_the_fused_path() {
        let dims = [2usize, 8, 16];
        for (path, ok) in [
            (Path::Fused, true),
            (Path::Split, false),
            (Path::Auto, true),
        ] {
            let mut problem = Problem::new(&dims, 4, DType::F32, DType::F32);
            problem.path = path;
            let ws = ws_bytes(SMALL, &problem, Pass::Forward);
            let r = prepare_forward(SMALL, &problem, &fwd_ptrs(0x1000, 0x1000), WS, ws, false);
            match (ok, r) {
                (true, Ok((plan, _))) => assert!(plan.fused, "{path:?}"),
                (false, Err(Error::Aliased { output, input, .. })) => {
                    assert_eq!((output, input), ("y", "x"))
                }
                (_, r) => panic!("{path:?}: {r:?}"),
            }
        }
        // the cluster path refuses it too
        let dims = [1usize, 320, 64, 64];
        let problem = Problem::new(&dims, 32, DType::F16, DType::F32);
        let ws = ws_bytes(H100, &problem, Pass::Forward);
        let (plan, _) = prepare_forward(
            H100,
            &problem,
            &fwd_ptrs(0x10_0000, 0x80_0000),
            WS,
            ws,
            false,
        )
        .unwrap();
        assert!(plan.cluster > 1, "{plan:?}");
        let e = prepare_forward(
            H100,
            &problem,
            &fwd_ptrs(0x10_0000, 0x10_0000),
            WS,
            ws,
            false,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Aliased { .. }), "{e:?}");
    }

    #[test]
    fn partial_overlaps_are_refused_on_every_path() {
        let dims = [2usize, 8, 16]; // 256 f32 = 1024 bytes
        for path in [Path::Fused, Path::Split] {
            let mut problem = Problem::new(&dims, 4, DType::F32, DType::F32);
            problem.path = path;
            let ws = ws_bytes(SMALL, &problem, Pass::Forward);
            // y starts inside x
            let e = prepare_forward(SMALL, &problem, &fwd_ptrs(0x1000, 0x1010), WS, ws, false)
                .unwrap_err();
            assert!(matches!(e, Error::Aliased { output: "y", .. }), "{e:?}");
            // y ends one byte into x: still an overlap; one byte further is none
            let r = prepare_forward(
                SMALL,
                &problem,
                &fwd_ptrs(0x2000, 0x2000 - 1020),
                WS,
                ws,
                false,
            );
            assert!(matches!(r, Err(Error::Aliased { .. })), "{r:?}");
            prepare_forward(
                SMALL,
                &problem,
                &fwd_ptrs(0x2000, 0x2000 - 1024),
                WS,
                ws,
                false,
            )
            .unwrap();
            // rstd over mean, mean over the weight
            let mut p = fwd_ptrs(0x1000, 0x4000);
            p.rstd = p.mean + 4;
            let e = prepare_forward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Aliased {
                        output: "mean",
                        input: "rstd",
                        ..
                    }
                ),
                "{e:?}"
            );
            let mut p = fwd_ptrs(0x1000, 0x4000);
            p.mean = p.weight;
            let e = prepare_forward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Aliased {
                        output: "mean",
                        input: "weight",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        // backward: every overlap, dx == dy included, on every path
        for path in [Path::Fused, Path::Split] {
            let mut problem = Problem::new(&dims, 4, DType::F32, DType::F32);
            problem.path = path;
            let ws = ws_bytes(SMALL, &problem, Pass::Backward);
            prepare_backward(SMALL, &problem, &bwd_ptrs(), WS, ws, false).unwrap();
            for (i, (out, input)) in [
                ("dx", "dy"),
                ("dx", "x"),
                ("dweight", "weight"),
                ("dbias", "dweight"),
            ]
            .into_iter()
            .enumerate()
            {
                let mut p = bwd_ptrs();
                match i {
                    0 => p.dx = p.dy,
                    1 => p.dx = p.x + 64,
                    2 => p.dweight = p.weight,
                    _ => p.dbias = p.dweight,
                }
                let e = prepare_backward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
                match e {
                    Error::Aliased {
                        output, input: inp, ..
                    } => {
                        let pair = [output, inp];
                        assert!(pair.contains(&out) && pair.contains(&input), "{e:?}")
                    }
                    e => panic!("{path:?} {out}/{input}: {e:?}"),
                }
            }
            // the workspace over an input
            let e = prepare_backward(SMALL, &problem, &bwd_ptrs(), bwd_ptrs().x, ws, false);
            if ws > 0 {
                assert!(
                    matches!(
                        e,
                        Err(Error::Aliased {
                            output: "workspace",
                            ..
                        })
                    ),
                    "{e:?}"
                );
            }
        }
    }

    /// Tickets reach the kernels only where they replace the `bwd_params` launch (fused or
    /// cluster, N > 1), and are checked like every other buffer: long enough, aligned, apart.
    #[test]
    fn tickets_are_checked_and_used_only_where_they_save_a_launch() {
        const TK: u64 = 0xE000_0000;
        let dims = [2usize, 8, 16];
        let mut problem = Problem::new(&dims, 4, DType::F32, DType::F32);
        problem.path = Path::Fused;
        let ws = ws_bytes(SMALL, &problem, Pass::Backward);
        let words = ticket_words(SMALL, &problem).unwrap();
        assert_eq!(words, 4, "one word per block of a sample: G fused rows");
        let with = |tk: u64, words: usize| bwd_ptrs().with_tickets(tk, words);
        let (plan, params, _) =
            prepare_backward(SMALL, &problem, &with(TK, words), WS, ws, false).unwrap();
        assert_eq!(params.tickets, TK);
        assert!(plan.param_grads_in_row_kernel(params.batch, params.rows, params.tickets));
        let (plan, params, _) =
            prepare_backward(SMALL, &problem, &bwd_ptrs(), WS, ws, false).unwrap();
        assert!(!plan.param_grads_in_row_kernel(params.batch, params.rows, params.tickets));
        let e = prepare_backward(SMALL, &problem, &with(TK, words - 1), WS, ws, false);
        assert!(
            matches!(
                e,
                Err(Error::LengthMismatch {
                    name: "tickets",
                    expected: 4,
                    got: 3,
                    ..
                })
            ),
            "{e:?}"
        );
        let e = prepare_backward(SMALL, &problem, &with(TK + 2, words), WS, ws, false);
        assert!(
            matches!(
                e,
                Err(Error::Misaligned {
                    name: "tickets",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = prepare_backward(SMALL, &problem, &with(WS + 4, words), WS, ws, false);
        assert!(
            matches!(
                e,
                Err(Error::Aliased {
                    output: "workspace",
                    input: "tickets",
                    ..
                })
            ),
            "{e:?}"
        );
        // the baseline, the split path and one sample need none: given ones are not used
        let (_, params, _) =
            prepare_backward(SMALL, &problem, &with(TK, words), WS, ws * 4, true).unwrap();
        assert_eq!(params.tickets, 0);
        problem.path = Path::Split;
        assert_eq!(ticket_words(SMALL, &problem).unwrap(), 0);
        let ws = ws_bytes(SMALL, &problem, Pass::Backward);
        let (_, params, _) =
            prepare_backward(SMALL, &problem, &with(TK, 1), WS, ws, false).unwrap();
        assert_eq!(params.tickets, 0);
        let one = [1usize, 8, 16];
        let problem = Problem::new(&one, 4, DType::F32, DType::F32).with_path(Path::Fused);
        assert_eq!(ticket_words(SMALL, &problem).unwrap(), 0);
    }

    #[test]
    fn pointers_must_be_aligned_to_their_elements() {
        let dims = [2usize, 8, 16];
        let problem = Problem::new(&dims, 4, DType::F32, DType::F32);
        let ws = ws_bytes(SMALL, &problem, Pass::Forward);
        for which in 0..6 {
            let mut p = fwd_ptrs(0x1000, 0x4000);
            let slot = [
                &mut p.x,
                &mut p.y,
                &mut p.weight,
                &mut p.bias,
                &mut p.mean,
                &mut p.rstd,
            ];
            *slot.into_iter().nth(which).unwrap() += 2;
            let e = prepare_forward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
            assert!(
                matches!(e, Error::Misaligned { align: 4, .. }),
                "{which}: {e:?}"
            );
        }
        // f16 activations with f32 parameters: 2-byte x is fine, 2-byte weight is not
        let problem = Problem::new(&dims, 4, DType::F16, DType::F32);
        let ws = ws_bytes(SMALL, &problem, Pass::Forward);
        let p = fwd_ptrs(0x1002, 0x4002);
        let (plan, _) = prepare_forward(SMALL, &problem, &p, WS, ws, false).unwrap();
        assert!(!plan.vec, "{plan:?}");
        let mut p = fwd_ptrs(0x1002, 0x4002);
        p.weight += 2;
        let e = prepare_forward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
        assert!(
            matches!(e, Error::Misaligned { name: "weight", .. }),
            "{e:?}"
        );
        let mut p = bwd_ptrs();
        p.rstd += 1;
        let ws = ws_bytes(SMALL, &problem, Pass::Backward);
        let e = prepare_backward(SMALL, &problem, &p, WS, ws, false).unwrap_err();
        assert!(matches!(e, Error::Misaligned { name: "rstd", .. }), "{e:?}");
    }

    fn refusal(code: CUresult, kernel: &str) -> Error {
        Error::driver(format!("launching `{kernel}`"), DriverError(code))
    }

    /// An injected cluster refusal: the launch is prepared again without clusters, the refusal
    /// is remembered, and the split plan runs with the workspace the query sized.
    #[test]
    fn a_refused_cluster_launch_falls_back_to_the_split_path() {
        let dims = [1usize, 320, 64, 64];
        let problem = Problem::new(&dims, 32, DType::F16, DType::F32);
        for pass in [Pass::Forward, Pass::Backward] {
            let ws = ws_bytes(H100, &problem, pass);
            let refused = Cell::new(false);
            let mut launched = Vec::new();
            let r = with_cluster_fallback(
                H100,
                || refused.set(true),
                |dev| match pass {
                    Pass::Forward => prepare_forward(
                        dev,
                        &problem,
                        &fwd_ptrs(0x10_0000, 0x80_0000),
                        WS,
                        ws,
                        false,
                    )
                    .map(|(plan, _)| plan),
                    Pass::Backward => {
                        let mut p = bwd_ptrs();
                        (p.dy, p.x, p.dx) = (0x1000_0000, 0x2000_0000, 0x6000_0000);
                        prepare_backward(dev, &problem, &p, WS, ws, false).map(|(plan, ..)| plan)
                    }
                },
                |plan| plan.cluster > 1,
                |plan| {
                    launched.push(*plan);
                    if plan.cluster > 1 {
                        Err(refusal(
                            CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE,
                            "groupnorm_cluster_fwd_f16_f32_vec",
                        ))
                    } else {
                        Ok(())
                    }
                },
            );
            r.unwrap();
            assert!(refused.get(), "{pass:?}");
            assert_eq!(launched.len(), 2, "{pass:?}");
            assert!(
                launched[0].cluster > 1 && launched[1].cluster == 1,
                "{launched:?}"
            );
            assert!(!launched[1].fused, "{launched:?}");
        }
    }

    #[test]
    fn other_launch_errors_are_not_retried() {
        for (code, kernel) in [
            (
                CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                "groupnorm_cluster_fwd_f32_f32_vec",
            ),
            (
                CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                "groupnorm_bwd_params_f32",
            ),
        ] {
            let refused = Cell::new(false);
            let mut calls = 0;
            let r = with_cluster_fallback(
                H100,
                || refused.set(true),
                Ok,
                |_| true,
                |_| {
                    calls += 1;
                    Err(refusal(code, kernel))
                },
            );
            assert!(matches!(r, Err(Error::Driver { .. })), "{r:?}");
            assert_eq!((calls, refused.get()), (1, false), "{code:?} {kernel}");
        }
        // and a non-cluster plan is never retried
        let mut calls = 0;
        let r = with_cluster_fallback(
            H100,
            || {},
            Ok,
            |_| false,
            |_| {
                calls += 1;
                Err(refusal(
                    CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE,
                    "groupnorm_cluster_fwd_f32_f32_vec",
                ))
            },
        );
        assert!(r.is_err() && calls == 1);
    }
}

#[cfg(test)]
mod f64_tests {
    use super::*;

    /// The kernels exist for f32, f16 and bf16: f64 is refused with a typed error before any
    /// plan, for activations and parameters alike.
    #[test]
    fn the_gpu_path_refuses_f64() {
        let dev = DeviceLimits {
            sms: 4,
            smem_per_block: 8 * 1024,
            max_cluster: 0,
        };
        let dims = [2usize, 8, 16];
        for (t, p) in [
            (DType::F64, DType::F64),
            (DType::F64, DType::F32),
            (DType::F32, DType::F64),
        ] {
            let problem = Problem::new(&dims, 4, t, p);
            for pass in [Pass::Forward, Pass::Backward] {
                let e = workspace_floats(dev, &problem, pass).unwrap_err();
                assert!(
                    matches!(&e, Error::DtypeNotOnGpu { dtype: DType::F64 }),
                    "{t}/{p}: {e:?}"
                );
            }
        }
    }
}
