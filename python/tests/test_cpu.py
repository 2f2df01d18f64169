"""groupnorm.torch on CPU tensors: parity with F.group_norm (float64) at the crate's tolerances,
the custom op's registrations, modules, torch.compile, torch.export, training."""

import copy
import warnings
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import groupnorm
import groupnorm.torch as gt
from accuracy import (
    assert_dx_close,
    assert_forward_close,
    assert_param_grad_close,
    channels_last,
    is_channels_last,
    reference,
)

DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
# (dims, groups): NCHW images, a one-image SD-like row count, 3-D and 5-D, (N, C)
SHAPES = [
    ((2, 8, 5, 7), 4),
    ((1, 64, 4, 4), 32),
    ((3, 6, 11), 3),
    ((2, 4, 3, 2, 5), 2),
    ((5, 12), 6),
]


def _inputs(dims, dtype, pdtype, affine, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    c = dims[1]
    x = (torch.randn(dims, generator=g, dtype=torch.float64) + offset).to(dtype)
    dy = torch.randn(dims, generator=g, dtype=torch.float64).to(dtype)
    if not affine:
        return x, dy, None, None
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pdtype)
    b = (torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1).to(pdtype)
    return x, dy, w, b


def check_parity(dims, groups, dtype, pdtype, layout, affine, silu, seed, eps=1e-5, device="cpu", offset=0.0, f32_abs=1e-5):
    x, dy, w, b = _inputs(dims, dtype, pdtype, affine, seed, offset)
    y_ref, dx_ref, dw_ref, db_ref, scale = reference(x, groups, w, b, eps, silu, dy)
    if layout == "channels_last":
        x, dy = channels_last(x), channels_last(dy)
    x = x.to(device).requires_grad_()
    dy = dy.to(device)
    if affine:
        w = w.to(device).requires_grad_()
        b = b.to(device).requires_grad_()
    ctx = f"{dims} G={groups} {dtype}/{pdtype} {layout} affine={affine} silu={silu} eps={eps}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback here would be a silent non-test
        y = gt.group_norm(x, groups, w, b, eps=eps, activation="silu" if silu else None)
    assert y.dtype == dtype and y.device == x.device
    if layout == "channels_last" and len(dims) >= 3:
        assert is_channels_last(y), f"{ctx}: channels-last input gave strides {y.stride()}"
    assert_forward_close(y.cpu(), y_ref, f"{ctx}: forward", f32_abs)
    y.backward(dy)
    assert_dx_close(x.grad.cpu(), dx_ref, scale, f"{ctx}: dx")
    if affine:
        assert w.grad.dtype == pdtype
        assert_param_grad_close(w.grad.cpu(), dw_ref, f"{ctx}: dweight")
        assert_param_grad_close(b.grad.cpu(), db_ref, f"{ctx}: dbias")


# every dtype pair with affine parameters; without parameters the parameter dtype is moot
PARITY_DTYPES = [(t, p, True) for t, p in DTYPE_PAIRS] + [
    (t, torch.float32, False) for t in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("dims,groups", SHAPES, ids=[f"{d}g{g}" for d, g in SHAPES])
@pytest.mark.parametrize(
    "dtype,pdtype,affine", PARITY_DTYPES,
    ids=[f"{str(a)[6:]}-{str(b)[6:]}" if f else f"{str(a)[6:]}-plain" for a, b, f in PARITY_DTYPES],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True], ids=["gn", "silu"])
def test_parity(dims, groups, dtype, pdtype, affine, layout, silu):
    seed = zlib.crc32(repr((dims, groups, str(dtype), str(pdtype), layout, affine, silu)).encode())
    check_parity(dims, groups, dtype, pdtype, layout, affine, silu, seed)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True], ids=["gn", "silu"])
def test_offset_rows_f32(layout, silu):
    """Rows of 1e4 + N(0, 1): the crate's offset target (3e-5), which a naive f32 variance misses."""
    check_parity((2, 8, 9, 7), 4, torch.float32, torch.float32, layout, True, silu, 7, offset=1e4, f32_abs=3e-5)


# PyTorch's own sample inputs for group_norm (torch/testing/_internal/common_methods_invocations.py,
# sample_inputs_group_norm): shape, groups, eps; plus an empty batch of images. Their eps = 0 case
# is test_eps_zero_keeps_pytorchs_behaviour: the crate refuses eps = 0, the package falls back.
SAMPLE_CASES = [
    ((1, 6, 3), 2, 0.5),
    ((1, 3), 1, 1e-5),
    ((0, 2), 1, 1e-5),
    ((5, 5, 5), 1, 0.5),
    ((1, 2), 1, 1e-5),
    ((0, 6, 4, 4), 3, 1e-5),
]


@pytest.mark.parametrize("dims,groups,eps", SAMPLE_CASES, ids=[f"{d}g{g}e{e}" for d, g, e in SAMPLE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_pytorch_sample_cases(dims, groups, eps, dtype, affine):
    check_parity(dims, groups, dtype, torch.float32 if dtype == torch.float32 else dtype, "contiguous", affine, False, 11, eps=eps)


def test_eps_zero_keeps_pytorchs_behaviour():
    """The crate refuses eps = 0 (issue 15: eps must be positive in f32); PyTorch takes it, so the
    package hands such calls to F.group_norm, with a warning that says why."""
    x = torch.randn(2, 6, 4, 4)
    gt._warned.clear()
    with pytest.warns(UserWarning, match="eps = 0"):
        y = gt.group_norm(x, 3, eps=0.0)
    torch.testing.assert_close(y, F.group_norm(x, 3, eps=0.0), rtol=0, atol=0)
    assert "0 in float32" in gt.fallback_reason(x, eps=1e-50)
    assert gt.fallback_reason(x, eps=1e-30) is None


def test_negative_eps_is_a_clear_error():
    """PyTorch's samples include eps = -0.5 (a NaN-prone sqrt of a possibly negative value); the
    crate refuses it with a message instead of computing it."""
    with pytest.raises(ValueError, match="eps must be finite and positive"):
        gt.group_norm(torch.randn(2, 6, 3), 2, eps=-0.5)


def test_bad_arguments_raise_with_the_crates_message():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match=r"channels \(6\) must be divisible by groups \(4\)"):
        gt.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        gt.group_norm(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="at least 2 dims"):
        gt.group_norm(torch.randn(6), 3)
    with pytest.raises(ValueError, match="activation"):
        gt.group_norm(x, 3, activation="gelu")


def test_gradcheck_f64_native():
    """float64 CPU tensors run the crate's f64 path (no fallback), so gradcheck checks our backward."""
    assert "f64" in dict(groupnorm._native.DTYPE_CODES)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for act in (None, "silu"):
        assert torch.autograd.gradcheck(lambda *a: gt.group_norm(a[0], 3, a[1], a[2], activation=act), (x, w, b))


def test_mixed_parameter_dtypes_fall_back():
    """Parameters of a third dtype go to PyTorch's op, which answers as it would anyway (here, its
    own error: CPU mixed dtypes need float32 parameters)."""
    gt._warned.clear()
    x = torch.randn(2, 6, 3, dtype=torch.bfloat16)
    w = torch.ones(6, dtype=torch.float16)
    with pytest.raises(RuntimeError) as theirs:
        F.group_norm(x, 3, w)
    with pytest.warns(UserWarning, match="falling back.*float16"):
        with pytest.raises(RuntimeError) as ours:
            gt.group_norm(x, 3, w)
    assert str(ours.value) == str(theirs.value)


def test_other_devices_fall_back():
    gt._warned.clear()
    x = torch.empty(2, 6, 3, device="meta")
    assert gt.fallback_reason(torch.empty(2, 6, 3)) is None
    assert "device type 'meta'" in gt.fallback_reason(x)
    with pytest.warns(UserWarning, match="falling back.*meta"):
        y = gt.group_norm(x, 3, activation="silu")
    assert y.device.type == "meta" and y.shape == x.shape


def test_strided_input_is_made_contiguous():
    base = torch.randn(2, 8, 6, 10)
    x = base[:, :, :, ::2]  # neither contiguous nor channels-last
    y = gt.group_norm(x, 4)
    assert_forward_close(y, F.group_norm(x.double(), 4), "strided")


def test_dy_in_another_layout_than_x():
    x = channels_last(torch.randn(2, 8, 5, 7)).requires_grad_()
    dy = torch.randn(2, 8, 5, 7)  # contiguous
    _, dx_ref, _, _, scale = reference(x, 4, None, None, 1e-5, True, dy)
    gt.group_norm(x, 4, activation="silu").backward(dy)
    assert_dx_close(x.grad, dx_ref, scale, "dy contiguous, x channels-last")


def test_deterministic():
    x = torch.randn(4, 32, 16, 16)
    w, b = torch.rand(32), torch.randn(32)
    a = gt.group_norm(x, 8, w, b)
    assert all(torch.equal(a, gt.group_norm(x, 8, w, b)) for _ in range(3))


def test_nan_row_stays_in_its_row():
    x = torch.randn(2, 4, 8)
    x[0, 0, 3] = float("nan")
    y = gt.group_norm(x, 2)
    assert torch.isnan(y[0, :2]).all() and not torch.isnan(y[0, 2:]).any() and not torch.isnan(y[1]).any()


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    samples = [
        (torch.randn(2, 8, 5, 7, generator=g), torch.rand(8, generator=g), torch.randn(8, generator=g), 4, 1e-5, 0),
        (channels_last(torch.randn(2, 8, 5, 7, generator=g)), torch.rand(8, generator=g), torch.randn(8, generator=g), 2, 1e-6, 1),
        (torch.randn(3, 6, generator=g).half(), None, None, 3, 1e-5, 1),
        (torch.randn(2, 4, 9, generator=g).bfloat16(), torch.rand(4, generator=g), None, 2, 1e-5, 0),
    ]
    for x, w, b, groups, eps, act in samples:
        for req in (False, True):
            args = (
                x.clone().requires_grad_(req),
                None if w is None else w.clone().requires_grad_(req),
                None if b is None else b.clone().requires_grad_(req),
                groups, eps, act,
            )
            torch.library.opcheck(torch.ops.groupnorm.group_norm_fwd.default, args)
        y, mean, rstd = torch.ops.groupnorm.group_norm_fwd(x, w, b, groups, eps, act)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (x.shape[0], groups)
        dy = torch.randn_like(y)
        bargs = (dy, x, mean, rstd, w, b, groups, eps, act, w is not None, b is not None)
        torch.library.opcheck(torch.ops.groupnorm.group_norm_bwd.default, bargs)


def test_saved_statistics_match_native_group_norm():
    x = torch.randn(3, 8, 6, 5)
    _, mean, rstd = torch.ops.groupnorm.group_norm_fwd(x, None, None, 4, 1e-5, 0)
    _, mean_ref, rstd_ref = torch.ops.aten.native_group_norm(x.double(), None, None, 3, 8, 30, 4, 1e-5)
    assert (mean.double() - mean_ref).abs().max() <= 1e-5
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() <= 1e-5


# ----------------------------------------------------------------------------------------------
# modules


def test_module_is_a_drop_in():
    ref = nn.GroupNorm(4, 16, eps=1e-6)
    ours = gt.GroupNorm(4, 16, eps=1e-6)
    assert isinstance(ours, nn.GroupNorm)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys()) == ["weight", "bias"]
    assert repr(ours) == repr(ref)
    plain = gt.GroupNorm(2, 8, affine=False)
    assert plain.weight is None and list(plain.state_dict().keys()) == []
    half = gt.GroupNorm(2, 8, dtype=torch.float16)
    assert half.weight.dtype == torch.float16


def test_state_dict_round_trip():
    torch.manual_seed(0)
    ref = nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = gt.GroupNorm(4, 16)
    ours.load_state_dict(ref.state_dict())
    back = nn.GroupNorm(4, 16)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight) and torch.equal(back.bias, ref.bias)
    silu = gt.GroupNormSiLU(4, 16)
    silu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 6, 6)
    assert_forward_close(ours(x), ref.double()(x.double()), "module after load_state_dict")
    assert_forward_close(silu(x), F.silu(ref(x.double())), "GroupNormSiLU after load_state_dict")


class Block(nn.Module):
    """A U-Net-style residual block: GN+SiLU, conv, GN+SiLU, conv, skip; a down and an up conv."""

    def __init__(self, c=32, norm=nn.GroupNorm, fused=False):
        super().__init__()
        self.fused = fused
        self.n1, self.n2 = norm(8, c), norm(8, c)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.out = nn.Conv2d(c, 4, 1)

    def act(self, x):
        return x if self.fused else F.silu(x)

    def forward(self, x):
        h = self.c1(self.act(self.n1(x)))
        h = self.c2(self.act(self.n2(self.down(h))))
        return self.out(self.up(h) + x)


def _stem(c=32):
    return nn.Conv2d(3, c, 3, padding=1)


def test_replace_group_norm_keeps_outputs():
    torch.manual_seed(1)
    model = nn.Sequential(_stem(), Block(), nn.GroupNorm(1, 4))
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    params = list(model.parameters())
    assert gt.replace_group_norm(model) == 3
    assert gt.replace_group_norm(model) == 0  # already ours
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert sum(isinstance(m, gt.GroupNorm) for m in model.modules()) == 3
    after = model(x)
    # the convolutions after each GroupNorm mix values; compare at the f32 target scaled by
    # the output's size
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


def test_torch_compile_fullgraph_unet_block():
    torch._dynamo.reset()
    torch.manual_seed(2)
    stem = _stem()
    block = Block(norm=gt.GroupNormSiLU, fused=True)
    model = nn.Sequential(stem, block)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    for m, xin in ((model, x), (model_cl, x.to(memory_format=torch.channels_last))):
        eager = m(xin)
        eager.square().mean().backward()
        g_eager = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(xin)
        out.square().mean().backward()
        assert (out - eager).abs().max().item() <= 1e-5 * max(1.0, eager.abs().max().item())
        for a, b in zip(g_eager, (p.grad for p in m.parameters())):
            assert (a - b).abs().max().item() <= 1e-4 * max(1e-3, a.abs().max().item())


def test_torch_compile_counts_one_op_per_norm():
    """The compiled graph holds our op, not a decomposition or a graph break."""
    torch._dynamo.reset()
    block = nn.Sequential(_stem(), Block(norm=gt.GroupNorm))
    explanation = torch._dynamo.explain(block)(torch.randn(1, 3, 8, 8))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert code.count("groupnorm.group_norm_fwd") == 2, code


def test_torch_export():
    torch.manual_seed(3)
    model = nn.Sequential(_stem(8), gt.GroupNormSiLU(4, 8), nn.Conv2d(8, 8, 1), gt.GroupNorm(2, 8))
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("groupnorm.group_norm_fwd" in t for t in targets) == 2, targets
    assert torch.equal(ep.module()(x), model(x))


def _train(norm, steps=20, seed=4):
    torch.manual_seed(seed)
    model = nn.Sequential(_stem(16), norm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1),
                          norm(4, 16), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 12, 12, generator=g)
    target = torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_as_pytorchs_module():
    ours = _train(gt.GroupNorm)
    ref = _train(nn.GroupNorm)
    assert ours[-1] < 0.9 * ours[0], ours
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, ref)


def test_kernels_flag_is_a_bool():
    assert isinstance(groupnorm.kernels_built(), bool)
    assert isinstance(groupnorm.built_archs(), str)
    if not groupnorm.kernels_built() and torch.cuda.is_available():
        # a CUDA tensor would fall back, with a warning that says why
        assert "no CUDA kernels" in gt.fallback_reason(torch.empty(1, 1, device="cuda"))


def test_extension_errors_are_python_exceptions():
    """The extension's own checks and the crate's errors surface as exceptions, never a crash."""
    from groupnorm import _native

    with pytest.raises(ValueError, match="unknown dtype code 9"):
        _native.cpu_forward(0, 0, 0, 0, 0, 0, [0, 4], 2, 1e-5, 9, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown layout code 5"):
        _native.cpu_forward(0, 0, 0, 0, 0, 0, [0, 4], 2, 1e-5, 0, 0, 5, 0)
    with pytest.raises(ValueError, match="parameters must be f32 or bf16"):
        _native.cpu_forward(0, 0, 0, 0, 0, 0, [0, 4], 2, 1e-5, 2, 1, 0, 0)
    with pytest.raises(ValueError, match="null or misaligned"):
        _native.cpu_forward(0, 0, 0, 0, 0, 0, [1, 4], 2, 1e-5, 0, 0, 0, 0)
    if not torch.cuda.is_available():
        # no driver here: a RuntimeError with the crate's message, not a crash
        with pytest.raises(RuntimeError, match="CUDA driver|CUDA kernels|CUDA device"):
            _native.cuda_forward_workspace(0, [2, 4, 3], 2, 1e-5, 0, 0, 0, 0)
