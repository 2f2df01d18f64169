"""The crate's accuracy targets (src/accuracy.rs, docs/design.md), restated for the Python tests.

Every result is measured against PyTorch's own op run in float64 on the same (already rounded)
inputs, with the crate's tolerances: never looser.
"""

import math

import torch
import torch.nn.functional as F

F32_FORWARD_ABS = 1e-5
LOW_PRECISION_FORWARD_SLACK = 1e-6
DX_REL_L2_F32 = 1e-5
DX_REL_L2_LOW_PRECISION = 2e-3
PARAM_GRAD_REL_L2_F32 = 1e-4

_EPSILON = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
_ULP = {torch.float32: (23, -126), torch.float16: (10, -14), torch.bfloat16: (7, -126)}


def ulp(dtype, ref):
    """`DType::ulp`: the spacing of `dtype` at |ref| (float64 tensor), subnormal spacing as floor."""
    mant, min_exp = _ULP[dtype]
    a = ref.abs()
    finite = (a > 0) & torch.isfinite(a)
    e = torch.where(finite, torch.floor(torch.log2(torch.where(finite, a, torch.ones_like(a)))), torch.full_like(a, min_exp))
    e = e.clamp(min=min_exp)
    return torch.pow(2.0, e - mant)


def assert_forward_close(got, ref, what, f32_abs=F32_FORWARD_ABS):
    """Per element: f32 within `f32_abs`; f16/bf16 within one ulp of the reference + 1e-6.
    A NaN reference must be matched by a NaN."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    g = got.detach().double()
    nan_ref, nan_got = torch.isnan(ref), torch.isnan(g)
    assert torch.equal(nan_ref, nan_got), f"{what}: NaN pattern differs"
    if got.dtype == torch.float32:
        tol = torch.full_like(ref, f32_abs)
    else:
        tol = ulp(got.dtype, ref) + LOW_PRECISION_FORWARD_SLACK
    err = torch.where(nan_ref, torch.zeros_like(ref), (g - ref).abs())
    ratio = err / tol
    if ratio.numel():
        worst = ratio.max().item()
        assert worst <= 1.0, f"{what}: worst error {err.max().item():.3e}, {worst:.2f}x its tolerance"


def dx_bound(dtype, ref, scale):
    if dtype == torch.float32:
        return DX_REL_L2_F32 * scale
    e_opt = (ref.to(dtype).double() - ref).norm().item()
    return max(DX_REL_L2_LOW_PRECISION * scale, e_opt + 2 * DX_REL_L2_F32 * scale)


def assert_dx_close(got, ref, scale, what):
    """`‖dx - dx_ref‖ <= bound(‖rstd·w·dz‖)`, the crate's dx measure."""
    err = (got.detach().double() - ref).norm().item()
    bound = dx_bound(got.dtype, ref, scale)
    assert err <= bound, f"{what}: ‖dx - ref‖ = {err:.3e} > {bound:.3e} (scale {scale:.3e})"


def assert_param_grad_close(got, ref, what):
    bound = PARAM_GRAD_REL_L2_F32 if got.dtype == torch.float32 else _EPSILON[got.dtype]
    norm = ref.norm().item()
    err = (got.detach().double() - ref).norm().item()
    rel = err / norm if norm > 0 else err
    assert rel <= bound, f"{what}: relative L2 error {rel:.3e} > {bound:.3e}"


def reference(x, num_groups, weight, bias, eps, silu, dy):
    """F.group_norm (then F.silu) in float64 on the given values: y, dx, dweight, dbias, and the
    scale ‖rstd·w·dz‖ the dx error is measured against."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    z = F.group_norm(x64, num_groups, w64, b64, eps)
    z.retain_grad()
    y = F.silu(z) if silu else z
    y.backward(dy.double())
    n, c = x.shape[0], x.shape[1]
    row = (c // num_groups) * math.prod(x.shape[2:])
    xr = x.detach().double().reshape(n, num_groups, row)
    if row:
        var = (xr - xr.mean(dim=2, keepdim=True)).square().mean(dim=2)
    else:
        var = torch.zeros(n, num_groups, dtype=torch.float64)
    rstd = 1.0 / torch.sqrt(var + eps)
    k = rstd.repeat_interleave(c // num_groups, dim=1)  # (N, C)
    if w64 is not None:
        k = k * w64.detach()
    k = k.reshape(n, c, *([1] * (x.dim() - 2)))
    scale = (k * z.grad).norm().item()
    return (
        y.detach(),
        x64.grad,
        None if w64 is None else _grad(w64),
        None if b64 is None else _grad(b64),
        scale,
    )


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def channels_last(t):
    """`t` (N, C, *spatial) laid out channels-last, whatever its number of spatial dims."""
    nd = t.dim()
    if nd < 3:
        return t
    return t.permute(0, *range(2, nd), 1).contiguous().permute(0, nd - 1, *range(1, nd - 1))


def is_channels_last(t):
    nd = t.dim()
    return nd >= 3 and t.permute(0, *range(2, nd), 1).is_contiguous()

