#!/usr/bin/env python3
"""The C ABI of libgroupnorm called from PyTorch, checked against torch.nn.functional.group_norm.

This script stays, unchanged in purpose: it checks the C ABI (include/groupnorm.h) itself, as a
C or C++ framework would call it. PyTorch users should use the Python package instead
(`pip install ./python`, `import groupnorm.torch`: autograd, modules, torch.compile, CPU and CUDA
tensors), whose own tests are python/tests.

    python3 scripts/torch_check.py [LIB] [--quick] [--dtype f32,f16,bf16]

LIB is the shared library (default: the first of .gpu/lib/libgroupnorm.so,
target/release/libgroupnorm.so, target/release/deps/libgroupnorm.so, under the repository root
or the working directory). Needs PyTorch with CUDA, a GPU, and a library built with nvcc.

Each case loads the library with ctypes and calls groupnorm_forward / groupnorm_backward on CUDA
tensors (`data_ptr()`), on PyTorch's current stream (`torch.cuda.current_stream().cuda_stream`,
0 for the legacy default stream, or a side stream for some cases), with a workspace allocated as
a uint8 tensor of the size the library asks for. Outputs are filled with NaN first, so an element
the library forgets to write fails.

The reference is PyTorch itself, computed in float64 on the same GPU: the very inputs handed to
the library, upcast exactly to float64, through F.group_norm (forward; statistics from
torch.native_group_norm, whose (N, G) mean/rstd the library's layout must match) and autograd
(dx, dweight, dbias). PyTorch's own float32 answer has an error of its own, so it is not the
yardstick; it is printed beside ours for context ("torch" columns), judged by the same measure.

Tolerances, docs/design.md "Accuracy targets" (src/accuracy.rs states the same):
  forward, f32 y:      |y - y_ref| <= 1e-5 (unit-scale data); <= 3e-5 for x = 1e4 + N(0, 1)
  forward, f16/bf16 y: |y - y_ref| <= ulp_T(y_ref) + 1e-6 (the f32 result rounded once)
  statistics (f32):    |mean - mean_ref| * rstd_ref <= tol + ulp_f32(mean_ref) / 2 * rstd_ref,
                       |rstd / rstd_ref - 1| <= tol, tol the f32 forward tolerance above
  backward dx:         ||dx - dx_ref|| / ||rstd * w * dy|| <= 1e-5 (f32); for f16/bf16
                       <= max(2e-3, (||round_T(dx_ref) - dx_ref|| / ||rstd*w*dy||) + 2e-5)
  dweight, dbias:      ||g - g_ref|| / ||g_ref|| <= 1e-4 (f32 parameters), epsilon(P) for
                       f16/bf16 parameters (9.8e-4, 7.8e-3: the f32 sum rounded once)

Prints one PASS/FAIL/SKIP line per case with the measured errors, and a summary; exits 1 if any
case failed, 2 if the check could not run at all (no torch, no GPU, no library, no kernels).
NHWC cases use channels_last tensors; while the library answers GROUPNORM_STATUS_UNSUPPORTED
for them they are reported as "skipped: NHWC not supported yet" and do not fail the run.
"""
import argparse
import ctypes
import math
import os
import sys
import zlib

# ---------------------------------------------------------------------------------------------
# The C ABI (include/groupnorm.h)
# ---------------------------------------------------------------------------------------------

STATUS = ["OK", "INVALID_ARGUMENT", "UNSUPPORTED", "NO_DRIVER", "NO_DEVICE", "KERNELS_NOT_BUILT",
          "OUT_OF_MEMORY", "CUDA_ERROR", "INTERNAL"]
OK, UNSUPPORTED, KERNELS_NOT_BUILT = 0, 2, 5
DTYPE = {"f32": 0, "f16": 1, "bf16": 2}
LAYOUT = {"nchw": 0, "nhwc": 1}
PATH_AUTO = 0
ACTIVATION_NONE = 0


class Problem(ctypes.Structure):
    """groupnorm_problem_t"""
    _fields_ = [
        ("dims", ctypes.POINTER(ctypes.c_int64)),
        ("ndims", ctypes.c_int32),
        ("groups", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("layout", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("param_dtype", ctypes.c_int32),
        ("path", ctypes.c_int32),
        ("activation", ctypes.c_int32),
    ]


class GroupNormError(RuntimeError):
    def __init__(self, function, status, message):
        self.status = status
        name = STATUS[status] if 0 <= status < len(STATUS) else str(status)
        # the library's message starts with the function's name already
        super().__init__(f"GROUPNORM_STATUS_{name}: {message or function}")


class Lib:
    """ctypes bindings of the seven functions of include/groupnorm.h."""

    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        vp, sz, st = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32
        pp = ctypes.POINTER(Problem)
        sig = {
            "groupnorm_version": ([], ctypes.c_char_p),
            "groupnorm_status_string": ([st], ctypes.c_char_p),
            "groupnorm_last_error": ([], ctypes.c_char_p),
            "groupnorm_forward_workspace_size": ([pp, vp, ctypes.POINTER(sz)], st),
            "groupnorm_backward_workspace_size": ([pp, vp, ctypes.POINTER(sz)], st),
            # problem, x, y, weight, bias, mean, rstd, workspace, workspace_bytes, stream
            "groupnorm_forward": ([pp, vp, vp, vp, vp, vp, vp, vp, sz, vp], st),
            # problem, dy, x, mean, rstd, weight, dx, dweight, dbias, workspace, bytes, stream
            "groupnorm_backward": ([pp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp], st),
        }
        for name, (args, res) in sig.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        self.lib = lib
        assert ctypes.sizeof(Problem) == 48, "groupnorm_problem_t is 48 bytes on LP64"

    def version(self):
        return self.lib.groupnorm_version().decode()

    def _check(self, function, status):
        if status != OK:
            raise GroupNormError(function, status, self.lib.groupnorm_last_error().decode())

    def workspace_size(self, backward, problem, stream):
        bytes_ = ctypes.c_size_t(0)
        name = f"groupnorm_{'backward' if backward else 'forward'}_workspace_size"
        status = getattr(self.lib, name)(ctypes.byref(problem), stream, ctypes.byref(bytes_))
        self._check(name, status)
        return bytes_.value

    def forward(self, problem, x, y, weight, bias, mean, rstd, ws, stream):
        self._check("groupnorm_forward", self.lib.groupnorm_forward(
            ctypes.byref(problem), ptr(x), ptr(y), ptr(weight), ptr(bias), ptr(mean), ptr(rstd),
            ptr(ws), ws.numel(), stream))

    def backward(self, problem, dy, x, mean, rstd, weight, dx, dweight, dbias, ws, stream):
        self._check("groupnorm_backward", self.lib.groupnorm_backward(
            ctypes.byref(problem), ptr(dy), ptr(x), ptr(mean), ptr(rstd), ptr(weight), ptr(dx),
            ptr(dweight), ptr(dbias), ptr(ws), ws.numel(), stream))


def ptr(t):
    """Device address of a tensor (None, i.e. NULL, for an absent one)."""
    return None if t is None else t.data_ptr()


def find_library(arg):
    if arg:
        return arg
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = [".gpu/lib/libgroupnorm.so", "target/release/libgroupnorm.so",
             "target/release/deps/libgroupnorm.so"]
    for base in (root, os.getcwd()):
        for n in names:
            p = os.path.join(base, n)
            if os.path.isfile(p):
                return p
    return None


# ---------------------------------------------------------------------------------------------
# Error measures (src/accuracy.rs)
# ---------------------------------------------------------------------------------------------

F32_FORWARD_ABS = 1e-5
F32_FORWARD_OFFSET_ABS = 3e-5
LOW_PRECISION_FORWARD_SLACK = 1e-6
DX_REL_L2_F32 = 1e-5
DX_REL_L2_LOW_PRECISION = 2e-3
PARAM_GRAD_REL_L2_F32 = 1e-4
EPSILON = {"f32": 2.0 ** -23, "f16": 2.0 ** -10, "bf16": 2.0 ** -7}
# (mantissa bits, smallest normal exponent)
ULP_FORMAT = {"f32": (23, -126), "f16": (10, -14), "bf16": (7, -126)}


def ulp(torch, ref, dt):
    """Spacing of dtype `dt` at |ref| (float64 tensor), the subnormal spacing as a floor."""
    mant, min_exp = ULP_FORMAT[dt]
    a = ref.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    e = torch.where((a > 0) & torch.isfinite(a), e, torch.full_like(a, float(min_exp)))
    return torch.pow(2.0, e.clamp(min=min_exp) - mant)


def forward_ratio(torch, got, ref, dt, f32_abs):
    """Largest |got - ref| / tolerance (NaN mismatches count as infinite), and max |got - ref|."""
    g = got.double()
    err = (g - ref).abs()
    both_nan = torch.isnan(g) & torch.isnan(ref)
    err = torch.where(both_nan, torch.zeros_like(err), err)
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    if dt == "f32":
        tol = torch.full_like(ref, f32_abs)
    else:
        tol = ulp(torch, ref, dt) + LOW_PRECISION_FORWARD_SLACK
    return (err / tol).max().item(), err.max().item()


def stats_ratio(torch, mean, rstd, mean_ref, rstd_ref, tol):
    """Largest error of the statistics over its tolerance (as tests/common assert_stats_close)."""
    m, r = mean.double().flatten(), rstd.double().flatten()
    mr, rr = mean_ref.double().flatten(), rstd_ref.double().flatten()
    mean_tol = tol + ulp(torch, mr, "f32") / 2 * rr
    a = ((m - mr).abs() * rr) / mean_tol
    b = (r / rr - 1).abs() / tol
    worst = torch.cat([a, b])
    worst = torch.where(torch.isnan(worst), torch.full_like(worst, math.inf), worst)
    return worst.max().item()


def l2(t):
    return torch_mod.linalg.vector_norm(t.double().flatten()).item()


def dx_measure(torch, got, ref, scale, dt):
    """(||got - ref|| / scale, bound / scale), as accuracy::dx_error."""
    err = l2(got.double() - ref)
    if dt == "f32":
        bound = DX_REL_L2_F32 * scale
    else:
        e_opt = l2(ref.to(got.dtype).double() - ref)
        bound = max(DX_REL_L2_LOW_PRECISION * scale, e_opt + 2 * DX_REL_L2_F32 * scale)
    if not math.isfinite(err):
        err = math.inf
    return (err / scale, bound / scale) if scale > 0 else (err, bound)


def param_measure(got, ref, pdt):
    norm = l2(ref)
    err = l2(got.double() - ref)
    if not math.isfinite(err):
        err = math.inf
    bound = PARAM_GRAD_REL_L2_F32 if pdt == "f32" else EPSILON[pdt]
    return (err / norm if norm > 0 else err), bound


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

torch_mod = None
TORCH_DTYPE = {}


def run_case(lib, dims, groups, dt, pdt, layout, affine=True, x_mean=0.0, side_stream=False):
    """Runs one case; returns (status, line) with status in PASS, FAIL, SKIP."""
    torch = torch_mod
    import torch.nn.functional as F
    f32_abs = F32_FORWARD_OFFSET_ABS if abs(x_mean) >= 1e3 else F32_FORWARD_ABS
    name = f"{dt}/{pdt} {layout} {tuple(dims)} G={groups}"
    if not affine:
        name += " no-affine"
    if x_mean:
        name += f" x=1e{round(math.log10(x_mean))}+N(0,1)"
    if side_stream:
        name += " side-stream"
    if layout == "nhwc" and len(dims) != 4:
        return "SKIP", f"SKIP  {name}: channels_last needs 4-D"
    dev = torch.device("cuda")
    T, P = TORCH_DTYPE[dt], TORCH_DTYPE[pdt]
    n, c = dims[0], dims[1]
    s = 1
    for d in dims[2:]:
        s *= d
    gen = torch.Generator(device=dev)
    seed = repr((tuple(dims), groups, dt, pdt, layout, affine, x_mean)).encode()
    gen.manual_seed(zlib.crc32(seed))  # reproducible, unlike hash() of strings
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def make(shape, dtype, mean=0.0, std=1.0, lo=None, hi=None):
        if lo is not None:
            v = torch.rand(shape, generator=gen, device=dev, dtype=torch.float64) * (hi - lo) + lo
        else:
            v = torch.randn(shape, generator=gen, device=dev, dtype=torch.float64) * std + mean
        return v.to(dtype)

    x = make(dims, T, mean=x_mean).contiguous(memory_format=fmt)
    dy = make(dims, T).contiguous(memory_format=fmt)
    w = make((c,), P, lo=0.5, hi=1.5) if affine else None
    b = make((c,), P, std=0.5) if affine else None

    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    dims_c = (ctypes.c_int64 * len(dims))(*dims)
    problem = Problem(ctypes.cast(dims_c, ctypes.POINTER(ctypes.c_int64)), len(dims), groups, 1e-5,
                      LAYOUT[layout], DTYPE[dt], DTYPE[pdt], PATH_AUTO, ACTIVATION_NONE)
    # the side stream must see the inputs, written on the current stream
    stream.wait_stream(torch.cuda.current_stream())

    with torch.cuda.stream(stream):
        handle = stream.cuda_stream  # an int: 0 is the legacy default stream
        try:
            fwd_bytes = lib.workspace_size(False, problem, handle)
            bwd_bytes = lib.workspace_size(True, problem, handle)
            ws = torch.empty(max(fwd_bytes, bwd_bytes, 1), dtype=torch.uint8, device=dev)
            nan = float("nan")
            y = torch.full_like(x, nan)              # like x: channels_last stays channels_last
            mean = torch.full((n, groups), nan, dtype=torch.float32, device=dev)
            rstd = torch.full((n, groups), nan, dtype=torch.float32, device=dev)
            dx = torch.full_like(x, nan)
            dw = torch.full((c,), nan, dtype=P, device=dev) if affine else None
            db = torch.full((c,), nan, dtype=P, device=dev)
            assert y.stride() == x.stride() and dx.stride() == x.stride(), "output layout"
            lib.forward(problem, x, y, w, b, mean, rstd, ws, handle)
            lib.backward(problem, dy, x, mean, rstd, w, dx, dw, db, ws, handle)
        except GroupNormError as e:
            if e.status == UNSUPPORTED and layout == "nhwc":
                return "SKIP", f"SKIP  {name}: skipped: NHWC not supported yet ({e})"
            raise
    stream.synchronize()

    # float64 reference on the same inputs (NCHW: the maths does not depend on the layout, and
    # every comparison below is element by element in logical order)
    x64 = x.double().contiguous().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if affine else None
    b64 = b.double().requires_grad_(True) if affine else None
    y64 = F.group_norm(x64, groups, w64, b64, 1e-5)
    y64.backward(dy.double())
    with torch.no_grad():
        try:
            _, mean64, rstd64 = torch.native_group_norm(
                x.double().contiguous(), None, None, n, c, s, groups, 1e-5)
        except (AttributeError, RuntimeError):
            rows = x.double().contiguous().reshape(n, groups, -1)
            mean64 = rows.mean(dim=2)
            rstd64 = torch.rsqrt(rows.var(dim=2, unbiased=False) + 1e-5)
        mean64, rstd64 = mean64.reshape(n, groups), rstd64.reshape(n, groups)
        y_ref = y64.detach()
        dx_ref = x64.grad
        dw_ref = w64.grad if affine else None  # no weight: dweight is not asked for
        # dbias[c] = sum over n and the spatial dims of dy (asked for with or without affine)
        db_ref = b64.grad if affine else dy.double().sum(dim=[0] + list(range(2, len(dims))))
        per_channel = rstd64.repeat_interleave(c // groups, dim=1)      # (N, C)
        k = per_channel * (w.double() if affine else 1.0)
        k = k.reshape((n, c) + (1,) * (len(dims) - 2))
        scale = l2(k * dy.double())

        y_ratio, y_max = forward_ratio(torch, y, y_ref, dt, f32_abs)
        st_ratio = stats_ratio(torch, mean, rstd, mean64, rstd64, f32_abs)
        dx_err, dx_bound = dx_measure(torch, dx, dx_ref, scale, dt)
        db_err, p_bound = param_measure(db, db_ref, pdt)
        dw_err = param_measure(dw, dw_ref, pdt)[0] if affine else 0.0

        # PyTorch's own answer in the activation dtype, by the same measures (context only)
        try:
            xt = x.detach().clone().requires_grad_(True)
            wt = w.detach().clone().requires_grad_(True) if affine else None
            bt = b.detach().clone().requires_grad_(True) if affine else None
            with torch.enable_grad():
                yt = F.group_norm(xt, groups, wt, bt, 1e-5)
                yt.backward(dy)
            torch_y = forward_ratio(torch, yt.detach(), y_ref, dt, f32_abs)[1]
            torch_dx = dx_measure(torch, xt.grad, dx_ref, scale, dt)[0]
            torch_info = f" | torch y {torch_y:.1e} dx {torch_dx:.1e}"
        except RuntimeError as e:  # e.g. mixed parameter dtypes
            torch_info = f" | torch: n/a ({str(e).splitlines()[0][:60]})"

    ok = (y_ratio <= 1.0 and st_ratio <= 1.0 and dx_err <= dx_bound and db_err <= p_bound
          and dw_err <= p_bound)
    line = (f"{'PASS' if ok else 'FAIL'}  {name}: y max|err| {y_max:.1e} ({y_ratio:.2f} of tol), "
            f"stats {st_ratio:.2f} of tol, dx {dx_err:.1e} (<= {dx_bound:.1e}), "
            f"dweight {dw_err:.1e} dbias {db_err:.1e} (<= {p_bound:.1e}), "
            f"workspace {fwd_bytes}/{bwd_bytes} B{torch_info}")
    return ("PASS" if ok else "FAIL"), line


def cases(quick, dtypes):
    shapes = [
        ((3, 4), 2),                    # docs/design.md's worked example, 2-D (N, C)
        ((2, 6, 7, 5), 3),              # odd sizes: scalar tails
        ((4, 64, 16, 16), 32),
        ((2, 320, 64, 64), 32),         # Stable Diffusion UNet, 64x64 latent
        ((1, 1280, 8, 8), 32),          # SD, few rows
    ]
    if not quick:
        shapes += [((1, 128, 256, 256), 32),   # SD VAE decoder: long rows (split path)
                   ((8, 512, 32, 32), 32)]
    pairs = [("f32", "f32"), ("f16", "f16"), ("f16", "f32"), ("bf16", "bf16"), ("bf16", "f32")]
    pairs = [p for p in pairs if p[0] in dtypes]
    out = []
    for dims, g in shapes:
        for dt, pdt in pairs:
            out.append(dict(dims=dims, groups=g, dt=dt, pdt=pdt, layout="nchw"))
    for dt, pdt in pairs:
        small = dict(dims=(2, 64, 16, 16), groups=32, dt=dt, pdt=pdt, layout="nchw")
        out.append(dict(small, affine=False))
        out.append(dict(small, side_stream=True))
        out.append(dict(small, dims=(2, 320, 32, 32), layout="nhwc"))
    if "f32" in dtypes:
        # rows offset by 1e4: the per-row pivot keeps f32 within 3e-5
        out.append(dict(dims=(2, 64, 16, 16), groups=8, dt="f32", pdt="f32", layout="nchw",
                        x_mean=1e4))
    return out


def main():
    global torch_mod
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib", nargs="?", help="path to libgroupnorm.so")
    ap.add_argument("--quick", action="store_true", help="skip the largest shapes")
    ap.add_argument("--dtype", default="f32,f16,bf16", help="activation dtypes (comma-separated)")
    args = ap.parse_args()
    dtypes = [d for d in args.dtype.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPE]
    if unknown:
        ap.error(f"unknown dtype(s) {unknown}")

    try:
        import torch
    except ImportError:
        print("cannot run: PyTorch is not importable")
        return 2
    if not torch.cuda.is_available():
        print("cannot run: torch.cuda.is_available() is False")
        return 2
    torch_mod = torch
    TORCH_DTYPE.update({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16})

    path = find_library(args.lib)
    if path is None or not os.path.isfile(path):
        print(f"cannot run: no libgroupnorm.so (given: {args.lib}); build with "
              "`cargo build --release` (with NVCC set) or pass its path")
        return 2
    lib = Lib(path)
    print(f"library {path}, version {lib.version()}; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    torch.zeros(1, device="cuda")  # make the primary context current on this thread

    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for case in cases(args.quick, dtypes):
        try:
            status, line = run_case(lib, **case)
        except GroupNormError as e:
            if e.status == KERNELS_NOT_BUILT:  # nothing else can pass
                print(f"cannot run: {e}")
                return 2
            status, line = "FAIL", f"FAIL  {case}: {e}"
        except Exception as e:  # noqa: BLE001 - report the case and go on with the others
            status, line = "FAIL", f"FAIL  {case}: {type(e).__name__}: {e}"
        print(line, flush=True)
        counts[status] += 1
    print(f"torch_check: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
