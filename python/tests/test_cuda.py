"""groupnorm.torch on CUDA tensors: the crate's kernels through gpu::raw on PyTorch's current
stream. Every test skips, with the reason printed, when torch sees no GPU or this build carries
no kernels; set GROUPNORM_REQUIRE_GPU=1 to make that a failure instead (the GPU visit does)."""

import os
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import groupnorm
import groupnorm.torch as gt
from accuracy import assert_forward_close, channels_last, is_channels_last
from test_cpu import DTYPE_PAIRS, Block, _stem, check_parity


def _why_not():
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    if not groupnorm.kernels_built():
        return "this build of groupnorm has no CUDA kernels (nvcc was not found when it was built)"
    return None


REASON = _why_not()
if REASON:
    print(f"\ntest_cuda.py: every test skips: {REASON}")
    if os.environ.get("GROUPNORM_REQUIRE_GPU") == "1":
        raise RuntimeError(f"GROUPNORM_REQUIRE_GPU=1 but {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# rows that fill the GPU (fused path), few long rows (cluster on sm_90+, split elsewhere), odd
# sizes (misaligned vector tails), 3-D and (N, C)
CUDA_SHAPES = [
    ((2, 320, 32, 32), 32),
    ((1, 128, 96, 96), 32),
    ((3, 60, 7, 9), 6),
    ((4, 64, 33), 8),
    ((16, 256), 8),
]


@pytest.mark.parametrize("dims,groups", CUDA_SHAPES, ids=[f"{d}g{g}" for d, g in CUDA_SHAPES])
@pytest.mark.parametrize("dtype,pdtype", DTYPE_PAIRS, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPE_PAIRS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [False, True], ids=["gn", "silu"])
def test_parity_cuda(dims, groups, dtype, pdtype, layout, silu):
    seed = zlib.crc32(repr((dims, groups, str(dtype), str(pdtype), layout, silu)).encode())
    check_parity(dims, groups, dtype, pdtype, layout, True, silu, seed, device="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_cuda_plain_and_offset(layout):
    check_parity((2, 64, 16, 16), 32, torch.float32, torch.float32, layout, False, False, 21, device="cuda")
    check_parity((2, 64, 16, 16), 8, torch.float32, torch.float32, layout, True, True, 22,
                 device="cuda", offset=1e4, f32_abs=3e-5)


def test_empty_batch_cuda():
    for dims in ((0, 6, 4, 4), (0, 6)):
        check_parity(dims, 3, torch.float32, torch.float32, "contiguous", True, False, 23, device="cuda")


def test_side_stream_gives_the_same_bits():
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=torch.float16)
    w = torch.rand(320, device="cuda") + 0.5
    b = torch.randn(320, device="cuda")
    y0 = gt.group_norm(x, 32, w, b, activation="silu")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y1 = gt.group_norm(x, 32, w, b, activation="silu")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(y0, y1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_gives_the_same_bits_on_that_device():
    x = torch.randn(2, 64, 16, 16)
    ys = []
    for dev in ("cuda:0", "cuda:1"):
        y = gt.group_norm(x.to(dev), 8, activation="silu")
        assert y.device == torch.device(dev)
        ys.append(y.cpu())
    assert torch.equal(ys[0], ys[1])


def test_module_channels_last_half():
    torch.manual_seed(0)
    ref = nn.GroupNorm(32, 320).cuda().half()
    ours = gt.GroupNorm(32, 320).cuda().half()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_forward_close(y.cpu(), ref.double()(x.double()).cpu(), "f16 module, channels-last")


def test_cuda_graph_capture_and_replay():
    """Forward and backward captured in a CUDA graph (nothing in the op allocates outside the
    caching allocator or synchronizes), replayed on new inputs, equal to eager."""
    torch.manual_seed(1)
    m = gt.GroupNormSiLU(32, 320).cuda()
    static_x = torch.randn(2, 320, 16, 16, device="cuda", requires_grad=True)
    static_dy = torch.randn(2, 320, 16, 16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (opens the device, loads the kernels) outside capture
        for _ in range(2):
            m(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    m.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = m(static_x)
        static_y.backward(static_dy)
    for seed in (2, 3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            static_x.copy_(torch.randn(static_x.shape, device="cuda", generator=gen))
            static_dy.copy_(torch.randn(static_dy.shape, device="cuda", generator=gen))
        g.replay()
        torch.cuda.synchronize()
        x = static_x.detach().clone().requires_grad_()
        m2 = gt.GroupNormSiLU(32, 320).cuda()
        m2.load_state_dict(m.state_dict())
        y = m2(x)
        y.backward(static_dy)
        assert torch.equal(static_y, y)
        assert torch.equal(static_x.grad, x.grad)
        assert torch.equal(m.weight.grad, m2.weight.grad)


def test_torch_compile_fullgraph_cuda():
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = nn.Sequential(_stem(), Block(norm=gt.GroupNormSiLU, fused=True)).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert (compiled - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())


def test_float64_cuda_falls_back():
    gt._warned.clear()
    x = torch.randn(2, 6, 5, device="cuda", dtype=torch.float64)
    with pytest.warns(UserWarning, match="falling back"):
        y = gt.group_norm(x, 3)
    assert torch.equal(y, F.group_norm(x, 3))


def test_outputs_follow_the_input_layout():
    x = channels_last(torch.randn(2, 32, 8, 8, device="cuda")).requires_grad_()
    y = gt.group_norm(x, 8)
    assert is_channels_last(y) and not y.is_contiguous()
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape
