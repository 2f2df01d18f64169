"""PyTorch integration: GroupNorm (and GroupNorm + SiLU) as one custom op with autograd.

- `group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None)`: the
  functional form, `torch.nn.functional.group_norm` semantics, optionally followed by a fused
  SiLU (`activation="silu"`).
- `GroupNorm`: a subclass of `torch.nn.GroupNorm` (same constructor, parameters, `state_dict`
  keys); `GroupNormSiLU`: the same followed by SiLU, fused; `replace_group_norm(model)`: swaps
  every `torch.nn.GroupNorm` of a model in place, returning how many it swapped.

The op is registered with `torch.library.custom_op` as `groupnorm::group_norm_fwd` (returning
`y` and the f32 `mean`/`rstd` of shape `(N, G)`, as `native_group_norm` saves them) and
`groupnorm::group_norm_bwd`, with fake (meta) implementations and an autograd formula, so
autograd, `torch.compile(fullgraph=True)` and `torch.export` see one op.

CUDA tensors run the crate's kernels on `torch.cuda.current_stream(x.device)`, with outputs and
workspace from PyTorch's caching allocator; CPU tensors run the crate's CPU path. Channels-last
tensors run the NHWC path without a copy and give channels-last results; other strided tensors
are made contiguous first. What the crate cannot take (a dtype such as float64, another device,
parameters of a third dtype, a build without CUDA kernels for a CUDA tensor) goes to PyTorch's
own op with a one-time warning: the answer is never wrong, only not ours.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native

__all__ = ["group_norm", "GroupNorm", "GroupNormSiLU", "replace_group_norm", "fallback_reason"]

# dtype codes shared with the extension (src/lib.rs), which lists the dtypes it takes: the CPU path
# takes all four (float64 too); the CUDA kernels take the three below.
_DTYPE_CODES = {name: code for name, code in _native.DTYPE_CODES}
_TORCH_NAMES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
_TORCH_DTYPES = {_TORCH_NAMES[n]: c for n, c in _DTYPE_CODES.items() if n in _TORCH_NAMES}
_CUDA_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16}) & frozenset(_TORCH_DTYPES)
_ACTIVATIONS = {None: 0, "none": 0, "silu": 1}
# read once: a call into the extension inside `group_norm` would be opaque to torch.compile
# (a graph break), a module-level bool is a constant to it
_KERNELS_BUILT = bool(_native.kernels_built())
_NCHW, _NHWC = 0, 1


def _activation_code(activation) -> int:
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}") from None


def _zero_in_f32(eps: float) -> bool:
    """eps >= 0 that float32 holds as 0 (eps = 0 itself, or below half the smallest subnormal)."""
    e = float(eps)
    if not (e >= 0.0) or not math.isfinite(e):
        return False
    try:
        return struct.unpack("f", struct.pack("f", e))[0] == 0.0
    except OverflowError:
        return False


def fallback_reason(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
):
    """Why the crate cannot run this call (a string), or None when it can."""
    if _zero_in_f32(eps):
        # PyTorch takes eps = 0 (its samples do); the crate refuses it (rstd = 1/sqrt(var) is
        # inf on a constant row), so such calls keep PyTorch's behaviour exactly
        return f"eps = {eps} (0 in float32; the crate takes eps > 0)"
    if x.device.type not in ("cpu", "cuda"):
        return f"device type {x.device.type!r} (the crate runs on CPU and CUDA tensors)"
    dtypes = _TORCH_DTYPES if x.device.type == "cpu" else _CUDA_DTYPES
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {x.dtype} on {x.device.type} (the crate takes {names} there)"
    if x.device.type == "cuda" and not _KERNELS_BUILT:
        return "a CUDA tensor, but this build of groupnorm has no CUDA kernels (nvcc was not found when it was built)"
    params = [p for p in (weight, bias) if p is not None]
    for p in params:
        if p.dtype not in (torch.float32, x.dtype):
            return f"parameters of dtype {p.dtype} with {x.dtype} activations (the crate takes float32 or the activation dtype)"
    if len(params) == 2 and weight.dtype != bias.dtype:
        return f"weight ({weight.dtype}) and bias ({bias.dtype}) of different dtypes"
    return None


_warned = set()


def _warn_once(reason: str) -> None:
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    warnings.warn(
        f"groupnorm: falling back to torch.nn.functional.group_norm for {reason}",
        stacklevel=3,
    )


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
) -> Tensor:
    """`F.group_norm(x, num_groups, weight, bias, eps)`, then `F.silu` if `activation="silu"`,
    in one pass of the crate's CPU path or CUDA kernels (see the module's docstring)."""
    act = _activation_code(activation)
    reason = fallback_reason(x, weight, bias, eps)
    if reason is not None:
        _warn_once(reason)
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if act else y
    y, _, _ = torch.ops.groupnorm.group_norm_fwd(x, weight, bias, int(num_groups), float(eps), act)
    return y


# ---------------------------------------------------------------------------------------------
# The custom ops


def _layout(x: Tensor) -> Tuple[Tensor, int]:
    """`x` as the crate reads it: itself when contiguous (NCHW) or channels-last (NHWC), else a
    contiguous copy."""
    if x.is_contiguous():
        return x, _NCHW
    if x.dim() >= 3 and x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return x, _NHWC
    return x.contiguous(), _NCHW


def _in_layout(t: Tensor, layout: int) -> Tensor:
    """`t` contiguous in `layout` (a no-op when it already is)."""
    if layout == _NCHW or t.dim() < 3:
        return t.contiguous()
    nd = t.dim()
    perm = (0, *range(2, nd), 1)
    inverse = (0, nd - 1, *range(1, nd - 1))
    return t.permute(perm).contiguous().permute(inverse)


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int) -> None:
    """What the extension needs to read the buffers safely; the crate checks the rest (groups
    dividing channels, eps, dtypes) and says what is wrong."""
    if x.dim() < 2:
        raise ValueError(
            f"group_norm: input must have at least 2 dims (N, C, *spatial), got shape {tuple(x.shape)}"
        )
    if x.dtype not in _TORCH_DTYPES:
        raise ValueError(f"group_norm: dtype {x.dtype} is not supported by the groupnorm op")
    channels = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != channels:
            raise ValueError(
                f"group_norm: {name} must have shape ({channels},), got {tuple(p.shape)}"
            )
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device}, input on {x.device}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(
            f"group_norm: weight ({weight.dtype}) and bias ({bias.dtype}) must share a dtype"
        )


def _param_dtype(weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    for p in (weight, bias):
        if p is not None:
            return p.dtype
    return torch.float32


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _code(dtype: torch.dtype) -> int:
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"group_norm: dtype {dtype} is not supported by the groupnorm op") from None


def _empty_stats(n: int, g: int, eps: float, like: Tensor) -> Tuple[Tensor, Tensor]:
    """Statistics of rows with no values (spatial size 0): mean 0, rstd 1/sqrt(eps), as the
    crate's CPU path defines them."""
    mean = torch.zeros((n, g), dtype=torch.float32, device=like.device)
    rstd = torch.full((n, g), 1.0 / math.sqrt(eps) if eps > 0 else math.inf,
                      dtype=torch.float32, device=like.device)
    return mean, rstd


@torch.library.custom_op("groupnorm::group_norm_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, num_groups)
    x, layout = _layout(x)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    n = x.shape[0]
    dims = list(x.shape)
    t, p = _code(x.dtype), _code(_param_dtype(weight, bias))
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        _native.cpu_forward(
            x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(), rstd.data_ptr(),
            dims, num_groups, eps, t, p, layout, activation,
        )
        return y, mean, rstd
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if x.numel() == 0:
            # nothing to launch: validate through the size query, then the defined statistics
            _native.cuda_forward_workspace(stream, dims, num_groups, eps, t, p, layout, activation)
            mean, rstd = _empty_stats(n, num_groups, eps, x)
            return y, mean, rstd
        nbytes = _native.cuda_forward_workspace(stream, dims, num_groups, eps, t, p, layout, activation)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        _native.cuda_forward(
            stream, x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(),
            rstd.data_ptr(), _ptr(ws), nbytes, dims, num_groups, eps, t, p, layout, activation,
        )
    return y, mean, rstd


@_fwd.register_fake
def _fwd_fake(x, weight, bias, num_groups, eps, activation):
    _check(x, weight, bias, num_groups)
    x, _ = _layout(x)
    n = x.shape[0]
    y = torch.empty_like(x)
    mean = x.new_empty((n, num_groups), dtype=torch.float32)
    rstd = x.new_empty((n, num_groups), dtype=torch.float32)
    return y, mean, rstd


@torch.library.custom_op("groupnorm::group_norm_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def _bwd(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: int,
    want_dweight: bool,
    want_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, num_groups)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(
            f"group_norm backward: dy {tuple(dy.shape)} {dy.dtype} {dy.device} does not match "
            f"x {tuple(x.shape)} {x.dtype} {x.device}"
        )
    n = x.shape[0]
    for name, s in (("mean", mean), ("rstd", rstd)):
        if s.dtype != torch.float32 or s.numel() != n * num_groups or s.device != x.device:
            raise ValueError(f"group_norm backward: {name} must be float32 of {n} x {num_groups} values on {x.device}")
    if want_dweight and weight is None:
        raise ValueError("group_norm backward: dweight asked for without a weight")
    if want_dbias and weight is None and bias is None:
        raise ValueError("group_norm backward: dbias asked for without parameters")
    x, layout = _layout(x)
    dy = _in_layout(dy, layout)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    c = x.shape[1]
    pdt = _param_dtype(weight, bias)
    dims = list(x.shape)
    t, p = _code(x.dtype), _code(pdt)
    dx = torch.empty_like(x)
    dw = torch.empty(c if want_dweight else 0, dtype=pdt, device=x.device)
    db = torch.empty(c if want_dbias else 0, dtype=pdt, device=x.device)
    dw_ptr = dw.data_ptr() if want_dweight else 0
    db_ptr = db.data_ptr() if want_dbias else 0
    if x.device.type == "cpu":
        _native.cpu_backward(
            dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(weight),
            _ptr(bias), dx.data_ptr(), dw_ptr, db_ptr, dims, num_groups, eps, t, p, layout,
            activation,
        )
        return dx, dw, db
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        nbytes = _native.cuda_backward_workspace(stream, dims, num_groups, eps, t, p, layout, activation)
        if x.numel() == 0:
            # no values: dx is empty, and the parameter gradients are sums over nothing
            dw.zero_()
            db.zero_()
            return dx, dw, db
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        _native.cuda_backward(
            stream, dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(weight),
            _ptr(bias), dx.data_ptr(), dw_ptr, db_ptr, _ptr(ws), nbytes, dims, num_groups, eps,
            t, p, layout, activation,
        )
    return dx, dw, db


@_bwd.register_fake
def _bwd_fake(dy, x, mean, rstd, weight, bias, num_groups, eps, activation, want_dweight, want_dbias):
    _check(x, weight, bias, num_groups)
    x, _ = _layout(x)
    c = x.shape[1]
    pdt = _param_dtype(weight, bias)
    dx = torch.empty_like(x)
    dw = x.new_empty(c if want_dweight else 0, dtype=pdt)
    db = x.new_empty(c if want_dbias else 0, dtype=pdt)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    want_dw = weight is not None and ctx.needs_input_grad[1]
    want_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.groupnorm.group_norm_bwd(
        dy, x, mean, rstd, weight, bias, ctx.num_groups, ctx.eps, ctx.activation, want_dw, want_db
    )
    return (
        dx if ctx.needs_input_grad[0] else None,
        dw if want_dw else None,
        db if want_db else None,
        None,
        None,
        None,
    )


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Modules


class GroupNorm(torch.nn.GroupNorm):
    """`torch.nn.GroupNorm` running the groupnorm op: same constructor, parameters and
    `state_dict` keys (a checkpoint of either loads into the other), and an instance of
    `torch.nn.GroupNorm`."""

    _activation: Optional[str] = None

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self._activation)


class GroupNormSiLU(GroupNorm):
    """`GroupNorm` followed by SiLU (`F.silu`), fused into one pass forward and backward: the
    GroupNorm-then-SiLU of diffusion blocks. Parameters and `state_dict` keys as `GroupNorm`."""

    _activation = "silu"

    def extra_repr(self) -> str:
        return super().extra_repr() + ", activation=silu"


def replace_group_norm(model: torch.nn.Module) -> int:
    """Makes every plain `torch.nn.GroupNorm` in `model` (the model itself included) a
    `groupnorm.torch.GroupNorm`, in place, and returns how many it changed.

    The modules keep their identity, parameters (the same `Parameter` objects, so an optimizer
    built before keeps working), buffers and hooks: only their class changes. Subclasses of
    `torch.nn.GroupNorm` other than this one are left alone, since their forward may differ.
    """
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = GroupNorm
            count += 1
    return count
