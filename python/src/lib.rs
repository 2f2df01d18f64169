//! `groupnorm._native`: the Python extension behind `groupnorm.torch`.
//!
//! Every function takes plain integers (data pointers, a CUDA stream handle, dims, dtype,
//! layout and activation codes) so that the Python side can pass any framework's tensors without
//! this crate linking that framework. CPU pointers go through the crate's CPU path
//! ([`GroupNorm::forward_into`], [`GroupNorm::backward`]) on slices built from them;
//! CUDA pointers through [`groupnorm::gpu::raw`] on the caller's stream, with a workspace the
//! caller allocates from the size queries. Errors become Python exceptions carrying the crate's
//! message: `ValueError` for bad arguments, `RuntimeError` for everything else (no driver, no
//! kernels, a driver error). The GIL is released while the work runs.
//!
//! Codes (shared with `groupnorm/torch.py`): dtype 0 = f32, 1 = f16, 2 = bf16; layout 0 = NCHW,
//! 1 = NHWC (channels-last); activation 0 = none, 1 = SiLU.

use groupnorm::gpu::raw::{self, BackwardPtrs, ForwardPtrs, Problem};
use groupnorm::gpu::Gpu;
use groupnorm::Affine;
use groupnorm::{bf16, f16, Activation, DType, Element, Error, GroupNorm, Layout, Stats};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// The crate's error as a Python exception with its message.
fn to_py(e: Error) -> PyErr {
    // the message, then its causes (a driver error is the source, not part of the message)
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    match e {
        Error::ZeroGroups
        | Error::ZeroChannels
        | Error::GroupsDoNotDivideChannels { .. }
        | Error::InvalidEps { .. }
        | Error::TooFewDims { .. }
        | Error::ChannelMismatch { .. }
        | Error::TooLarge { .. }
        | Error::LengthMismatch { .. }
        | Error::ShapeMismatch { .. }
        | Error::DtypeMismatch { .. }
        | Error::LayoutMismatch { .. }
        | Error::BiasNeeded { .. }
        | Error::WeightNeeded
        | Error::InvalidStats { .. } => PyValueError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

fn bad(what: String) -> PyErr {
    PyValueError::new_err(what)
}

/// The dtype of a code. A new dtype of the crate (f64 on the CPU) is one line here and one
/// in `groupnorm/torch.py`'s table.
fn dtype_of(code: u8) -> PyResult<DType> {
    match code {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        3 => Ok(DType::F64),
        c => Err(bad(format!(
            "unknown dtype code {c} (0 = f32, 1 = f16, 2 = bf16, 3 = f64)"
        ))),
    }
}

fn layout_of(code: u8) -> PyResult<Layout> {
    match code {
        0 => Ok(Layout::Nchw),
        1 => Ok(Layout::Nhwc),
        c => Err(bad(format!("unknown layout code {c} (0 = NCHW, 1 = NHWC)"))),
    }
}

fn activation_of(code: u8) -> PyResult<Activation> {
    match code {
        0 => Ok(Activation::None),
        1 => Ok(Activation::Silu),
        c => Err(bad(format!(
            "unknown activation code {c} (0 = none, 1 = silu)"
        ))),
    }
}

/// The configuration of one call, validated by the crate.
fn config(
    groups: usize,
    channels: usize,
    eps: f64,
    layout: u8,
    activation: u8,
) -> PyResult<GroupNorm> {
    Ok(GroupNorm::new(groups, channels)
        .map_err(to_py)?
        .with_eps(eps)
        .map_err(to_py)?
        .with_layout(layout_of(layout)?)
        .with_activation(activation_of(activation)?))
}

fn channels(dims: &[usize]) -> PyResult<usize> {
    dims.get(1).copied().ok_or_else(|| {
        to_py(Error::TooFewDims {
            got: dims.len(),
            dims: dims.to_vec(),
        })
    })
}

fn numel(dims: &[usize]) -> PyResult<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dims {dims:?}: the element count overflows")))
}

/// A host slice over `len` values at `ptr`; empty (and never built from the pointer) when
/// `len` is 0, since empty tensors may have a null data pointer.
///
/// # Safety
///
/// When `len > 0`, `ptr` points to `len` initialized, aligned values of `T` that stay valid and
/// are not written by anyone else for `'a`.
unsafe fn host<'a, T>(ptr: usize, len: usize) -> PyResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr == 0 || ptr % std::mem::align_of::<T>() != 0 {
        return Err(bad(format!(
            "host pointer {ptr:#x} is null or misaligned for {len} elements"
        )));
    }
    // SAFETY: non-null, aligned, and the caller vouches for `len` valid values for 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
}

/// As [`host`], writable.
///
/// # Safety
///
/// As [`host`], and nothing else reads or writes the values for `'a`.
unsafe fn host_mut<'a, T>(ptr: usize, len: usize) -> PyResult<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr == 0 || ptr % std::mem::align_of::<T>() != 0 {
        return Err(bad(format!(
            "host pointer {ptr:#x} is null or misaligned for {len} elements"
        )));
    }
    // SAFETY: non-null, aligned, and the caller vouches for `len` exclusively owned values.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) })
}

/// An optional parameter: `None` for pointer 0.
///
/// # Safety
///
/// As [`host`] when `ptr != 0`.
unsafe fn param<'a, P>(ptr: usize, len: usize) -> PyResult<Option<&'a [P]>> {
    if ptr == 0 {
        Ok(None)
    } else {
        // SAFETY: forwarded from the caller's contract.
        unsafe { host(ptr, len) }.map(Some)
    }
}

/// Host pointers of one CPU forward call.
struct CpuForward {
    x: usize,
    y: usize,
    weight: usize,
    bias: usize,
    mean: usize,
    rstd: usize,
}

/// # Safety
///
/// The pointers hold what the dims and dtypes say (see [`cpu_forward`]).
unsafe fn cpu_forward_typed<T: Element, P: Element>(
    gn: &GroupNorm,
    dims: &[usize],
    p: &CpuForward,
) -> PyResult<()> {
    let (n, c, rows) = (numel(dims)?, channels(dims)?, dims[0] * gn.groups());
    // SAFETY: the caller of `cpu_forward` vouches for these buffers (sizes from the dims, which
    // the crate validates again against every slice length).
    let (x, y, w, b) = unsafe {
        (
            host::<T>(p.x, n)?,
            host_mut::<T>(p.y, n)?,
            param::<P>(p.weight, c)?,
            param::<P>(p.bias, c)?,
        )
    };
    let mut stats = Stats {
        mean: vec![0.0; rows],
        rstd: vec![0.0; rows],
    };
    gn.forward_into(x, dims, Affine { weight: w, bias: b }, y, &mut stats)
        .map_err(to_py)?;
    // SAFETY: mean and rstd hold N * G f32 each (the caller's contract).
    let (mean, rstd) = unsafe {
        (
            host_mut::<f32>(p.mean, rows)?,
            host_mut::<f32>(p.rstd, rows)?,
        )
    };
    mean.copy_from_slice(&stats.mean);
    rstd.copy_from_slice(&stats.rstd);
    Ok(())
}

/// Calls `$f::<T, P>($args)` for the dtype pair `($t, $p)`: activations f32/f16/bf16, parameters
/// f32 or the activation dtype; f64 with f64 parameters (the CPU path only).
macro_rules! dispatch {
    ($t:expr, $p:expr, $f:ident($($a:expr),*)) => {
        match ($t, $p) {
            (DType::F32, DType::F32) => $f::<f32, f32>($($a),*),
            (DType::F16, DType::F32) => $f::<f16, f32>($($a),*),
            (DType::F16, DType::F16) => $f::<f16, f16>($($a),*),
            (DType::BF16, DType::F32) => $f::<bf16, f32>($($a),*),
            (DType::BF16, DType::BF16) => $f::<bf16, bf16>($($a),*),
            (DType::F64, DType::F64) => $f::<f64, f64>($($a),*),
            (t, p) => Err(to_py(Error::DtypeMismatch { name: "weight", activation: t, param: p })),
        }
    };
}

/// CPU forward: writes `y` (same dims and layout as `x`) and the f32 `mean`/`rstd` (`N * G`
/// each). Pointers are host addresses; `weight`/`bias` are 0 when absent.
///
/// The caller guarantees that every pointer holds what the dims, dtypes and layout say, stays
/// valid during the call, and that outputs overlap nothing.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (x, y, weight, bias, mean, rstd, dims, groups, eps, dtype, param_dtype, layout, activation))]
fn cpu_forward(
    py: Python<'_>,
    x: usize,
    y: usize,
    weight: usize,
    bias: usize,
    mean: usize,
    rstd: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<()> {
    let gn = config(groups, channels(&dims)?, eps, layout, activation)?;
    let (t, p) = (dtype_of(dtype)?, dtype_of(param_dtype)?);
    let ptrs = CpuForward {
        x,
        y,
        weight,
        bias,
        mean,
        rstd,
    };
    py.detach(|| {
        // SAFETY: the Python caller (groupnorm.torch) passes the data pointers of live tensors
        // of these dims and dtypes, contiguous in `layout`, that it holds across this call.
        unsafe { dispatch!(t, p, cpu_forward_typed(&gn, &dims, &ptrs)) }
    })
}

/// Host pointers of one CPU backward call.
struct CpuBackward {
    dy: usize,
    x: usize,
    mean: usize,
    rstd: usize,
    weight: usize,
    bias: usize,
    dx: usize,
    dweight: usize,
    dbias: usize,
}

/// # Safety
///
/// The pointers hold what the dims and dtypes say (see [`cpu_backward`]).
unsafe fn cpu_backward_typed<T: Element, P: Element>(
    gn: &GroupNorm,
    dims: &[usize],
    p: &CpuBackward,
) -> PyResult<()> {
    let (n, c, rows) = (numel(dims)?, channels(dims)?, dims[0] * gn.groups());
    // SAFETY: the caller of `cpu_backward` vouches for these buffers.
    let (dy, x, mean, rstd, w, b) = unsafe {
        (
            host::<T>(p.dy, n)?,
            host::<T>(p.x, n)?,
            host::<f32>(p.mean, rows)?,
            host::<f32>(p.rstd, rows)?,
            param::<P>(p.weight, c)?,
            param::<P>(p.bias, c)?,
        )
    };
    if p.dweight != 0 && w.is_none() {
        return Err(bad("dweight asked for without a weight".into()));
    }
    let stats = Stats {
        mean: mean.to_vec(),
        rstd: rstd.to_vec(),
    };
    let grads = gn
        .backward(
            dy,
            x,
            dims,
            &stats,
            Affine { weight: w, bias: b },
            p.dbias != 0,
        )
        .map_err(to_py)?;
    // SAFETY: dx holds N * C * S values of T, dweight/dbias C values of P when non-zero.
    unsafe {
        host_mut::<T>(p.dx, n)?.copy_from_slice(&grads.dx);
        if let (true, Some(dw)) = (p.dweight != 0, &grads.dweight) {
            host_mut::<P>(p.dweight, c)?.copy_from_slice(dw);
        }
        if let (true, Some(db)) = (p.dbias != 0, &grads.dbias) {
            host_mut::<P>(p.dbias, c)?.copy_from_slice(db);
        }
    }
    Ok(())
}

/// CPU backward of the whole operator (activation included): writes `dx` and, when their
/// pointers are non-zero, `dweight` (needs `weight`) and `dbias`. `bias` is the forward pass's
/// (read only with an activation). Same contract as [`cpu_forward`].
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dy, x, mean, rstd, weight, bias, dx, dweight, dbias, dims, groups, eps, dtype, param_dtype, layout, activation))]
fn cpu_backward(
    py: Python<'_>,
    dy: usize,
    x: usize,
    mean: usize,
    rstd: usize,
    weight: usize,
    bias: usize,
    dx: usize,
    dweight: usize,
    dbias: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<()> {
    let gn = config(groups, channels(&dims)?, eps, layout, activation)?;
    let (t, p) = (dtype_of(dtype)?, dtype_of(param_dtype)?);
    let ptrs = CpuBackward {
        dy,
        x,
        mean,
        rstd,
        weight,
        bias,
        dx,
        dweight,
        dbias,
    };
    py.detach(|| {
        // SAFETY: as in `cpu_forward`.
        unsafe { dispatch!(t, p, cpu_backward_typed(&gn, &dims, &ptrs)) }
    })
}

/// A raw-layer problem from the integer codes.
fn problem<'a>(
    dims: &'a [usize],
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<Problem<'a>> {
    let mut p = Problem::new(dims, groups, dtype_of(dtype)?, dtype_of(param_dtype)?);
    p.eps = eps;
    p.layout = layout_of(layout)?;
    p.activation = activation_of(activation)?;
    Ok(p)
}

/// The device that owns `stream` (a `cudaStream_t` as an integer; 0 is the legacy default stream
/// of the current context).
fn gpu_of(stream: usize) -> PyResult<Gpu> {
    // SAFETY: the caller passes `torch.cuda.current_stream(device).cuda_stream`, a live stream
    // handle (or 0 with that device's context current).
    unsafe { Gpu::for_stream(stream as raw::CUstream) }.map_err(to_py)
}

/// Workspace bytes of a CUDA forward pass on the device owning `stream`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_forward_workspace(
    stream: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<usize> {
    let pr = problem(&dims, groups, eps, dtype, param_dtype, layout, activation)?;
    raw::forward_workspace_bytes(&gpu_of(stream)?, &pr).map_err(to_py)
}

/// Workspace bytes of a CUDA backward pass on the device owning `stream`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_backward_workspace(
    stream: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<usize> {
    let pr = problem(&dims, groups, eps, dtype, param_dtype, layout, activation)?;
    raw::backward_workspace_bytes(&gpu_of(stream)?, &pr).map_err(to_py)
}

/// Enqueues a CUDA forward pass on `stream` (nothing allocated, nothing synchronized).
/// Pointers are device addresses in the stream's device; `weight`/`bias` 0 when absent.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (stream, x, y, weight, bias, mean, rstd, workspace, workspace_bytes, dims, groups, eps, dtype, param_dtype, layout, activation))]
fn cuda_forward(
    stream: usize,
    x: u64,
    y: u64,
    weight: u64,
    bias: u64,
    mean: u64,
    rstd: u64,
    workspace: u64,
    workspace_bytes: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<()> {
    let pr = problem(&dims, groups, eps, dtype, param_dtype, layout, activation)?;
    let gpu = gpu_of(stream)?;
    let ptrs = ForwardPtrs::new(x, y, mean, rstd).with_affine(weight, bias);
    // SAFETY: groupnorm.torch passes the data pointers of live CUDA tensors of the stream's
    // device, of these dims, dtypes and layout, allocated on this stream by the caching
    // allocator (so they stay valid for the stream's work), and a workspace of the queried size.
    unsafe {
        raw::forward(
            &gpu,
            stream as raw::CUstream,
            &pr,
            &ptrs,
            workspace,
            workspace_bytes,
        )
    }
    .map_err(to_py)
}

/// Enqueues a CUDA backward pass on `stream`. `dweight`/`dbias` 0 when not wanted; `bias` is the
/// forward pass's, read only with an activation.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (stream, dy, x, mean, rstd, weight, bias, dx, dweight, dbias, workspace, workspace_bytes, dims, groups, eps, dtype, param_dtype, layout, activation))]
fn cuda_backward(
    stream: usize,
    dy: u64,
    x: u64,
    mean: u64,
    rstd: u64,
    weight: u64,
    bias: u64,
    dx: u64,
    dweight: u64,
    dbias: u64,
    workspace: u64,
    workspace_bytes: usize,
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    dtype: u8,
    param_dtype: u8,
    layout: u8,
    activation: u8,
) -> PyResult<()> {
    let pr = problem(&dims, groups, eps, dtype, param_dtype, layout, activation)?;
    let gpu = gpu_of(stream)?;
    let ptrs = BackwardPtrs::new(dy, x, mean, rstd, dx)
        .with_affine(weight, bias)
        .with_param_grads(dweight, dbias);
    // SAFETY: as in `cuda_forward`.
    unsafe {
        raw::backward(
            &gpu,
            stream as raw::CUstream,
            &pr,
            &ptrs,
            workspace,
            workspace_bytes,
        )
    }
    .map_err(to_py)
}

/// Whether this build carries the CUDA kernels (nvcc was found when it was compiled).
#[pyfunction]
fn kernels_built() -> bool {
    groupnorm::gpu::kernels_built()
}

/// The GPU architectures the embedded kernels were compiled for (empty without kernels).
#[pyfunction]
fn built_archs() -> &'static str {
    groupnorm::gpu::built_archs()
}

/// The extension module `groupnorm._native`.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_forward_workspace, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_backward_workspace, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_backward, m)?)?;
    m.add_function(wrap_pyfunction!(kernels_built, m)?)?;
    m.add_function(wrap_pyfunction!(built_archs, m)?)?;
    m.add(
        "DTYPE_CODES",
        vec![("f32", 0u8), ("f16", 1), ("bf16", 2), ("f64", 3)],
    )?;
    Ok(())
}
