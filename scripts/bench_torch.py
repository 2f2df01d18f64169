#!/usr/bin/env python3
"""Time torch.nn.functional.group_norm the way `groupnorm bench` times the crate.

Same shape sets, same timing (CUDA events around each call, median of --runs after --warmup,
inputs rotated when they fit in L2), same minimum-traffic accounting (forward 2 tensor passes,
backward 3), same copy-bandwidth reference measured in the same process, and the same CSV columns,
so `scripts/compare_bench.py ours.csv torch.csv` can put them side by side.

    python3 scripts/bench_torch.py --shapes sd --dtype f16,f32 --csv torch.csv

Implementations timed: `torch` (F.group_norm) and `torch-gn-silu` (F.group_norm then F.silu, the
pair a fused GroupNorm+SiLU replaces). Mixed precision: PyTorch's CUDA group_norm wants the weight
in the input's dtype (autocast runs it in f32 instead), so f16/bf16 activations are timed with
parameters of the same dtype, and the dtype column says so (`f16/f16`).
"""
import argparse
import csv
import statistics
import sys

# The shape sets of src/bin/groupnorm/shapes.rs; tests check that the two lists agree.
# BEGIN SD SHAPES
SD_PER_IMAGE = [
    (320, 64), (640, 32), (1280, 16), (1280, 8), (2560, 8), (1920, 16), (960, 32), (640, 64),
    (512, 64), (512, 128), (256, 256), (128, 512),
]
# END SD SHAPES
SMALL = [((1, 32, 8, 8), 32), ((4, 64, 16, 16), 32), ((2, 128, 32, 32), 32), ((3, 60, 7, 9), 6),
         ((16, 256), 8)]
LARGE = [((1, 128, 512, 512), 32), ((1, 256, 256, 256), 32), ((8, 512, 128, 128), 32),
         ((1, 64, 1024, 1024), 32), ((4, 32, 1 << 20), 1)]


def sd():
    return [((n, c, s, s), 32) for n in (1, 2, 8) for (c, s) in SD_PER_IMAGE]


def parse_shapes(spec):
    named = {"sd": sd, "small": lambda: SMALL, "large": lambda: LARGE,
             "all": lambda: SMALL + sd() + LARGE}
    out = []
    for one in spec.split(","):
        if one in named:
            out += named[one]()
            continue
        dims, _, groups = one.partition(":")
        out.append((tuple(int(d) for d in dims.split("x")), int(groups or 32)))
    return out


def label(dims, groups):
    return "x".join(str(d) for d in dims) + f":{groups}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="sd")
    ap.add_argument("--dtype", default="f16,f32")
    ap.add_argument("--pass", dest="passes", default="both", choices=["fwd", "bwd", "both"])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-silu", action="store_true", help="skip the GroupNorm+SiLU pair")
    ap.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"],
                    help="nhwc: channels-last inputs (a permuted (N, *spatial, C) tensor)")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("bench_torch: no CUDA device visible to PyTorch")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    chosen = []
    for d in args.dtype.split(","):
        if d == "all":
            chosen += ["f32", "f16", "bf16"]
        elif d in dtypes:
            chosen.append(d)
        else:
            sys.exit(f"bench_torch: unknown dtype {d}")
    passes = ["fwd", "bwd"] if args.passes == "both" else [args.passes]

    def timed(fn, n_warm, n_runs):
        for i in range(n_warm):
            fn(i)
        times = []
        for i in range(n_runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    # copy bandwidth: bytes read plus written, 512 MiB buffers, far beyond L2
    src = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda i: dst.copy_(src), 3, 20)
    copy_gbps = 2 * src.numel() / copy_ms / 1e6
    print(f"bench_torch: {name}, torch {torch.__version__}, copy {copy_gbps:.0f} GB/s",
          file=sys.stderr)
    del src, dst

    rows = []
    for dims, groups in parse_shapes(args.shapes):
        for d in chosen:
            dt = dtypes[d]
            numel = 1
            for v in dims:
                numel *= v
            nbytes = numel * torch.tensor([], dtype=dt).element_size()
            copies = max(2, min(16, -(-3 * l2 // (2 * nbytes)))) if 2 * nbytes < 3 * l2 else 1
            print(f"bench_torch: {label(dims, groups)} {d} ...", file=sys.stderr)
            def make():
                if args.layout == "nchw":
                    return torch.randn(dims, device=dev, dtype=dt)
                # channels-last: (N, *spatial, C) in memory, viewed with logical dims (N, C, *)
                t = torch.randn([dims[0], *dims[2:], dims[1]], device=dev, dtype=dt)
                return t.permute(0, len(dims) - 1, *range(1, len(dims) - 1))

            try:
                xs = [make() for _ in range(copies)]
                dys = [make() for _ in range(copies)]
            except torch.cuda.OutOfMemoryError:
                print(f"bench_torch: {label(dims, groups)} skipped: out of memory", file=sys.stderr)
                continue
            c = dims[1]
            w = torch.randn(c, device=dev, dtype=dt) * 0.1 + 1
            b = torch.randn(c, device=dev, dtype=dt) * 0.1
            sfx = "" if args.layout == "nchw" else " nhwc"
            impls = [("torch" + sfx, lambda x: F.group_norm(x, groups, w, b, 1e-5))]
            if not args.no_silu:
                impls.append(("torch-gn-silu" + sfx,
                              lambda x: F.silu(F.group_norm(x, groups, w, b, 1e-5))))
            for impl, f in impls:
                for p in passes:
                    if p == "fwd":
                        with torch.no_grad():
                            ms = timed(lambda i: f(xs[i % copies]), args.warmup, args.runs)
                    else:
                        leaves = []
                        outs = []
                        for k in range(copies):
                            x = xs[k].detach().requires_grad_(True)
                            ww = w.detach().requires_grad_(True)
                            bb = b.detach().requires_grad_(True)
                            fn = (lambda x, ww=ww, bb=bb: F.group_norm(x, groups, ww, bb, 1e-5)) \
                                if impl.startswith("torch ") or impl == "torch" else \
                                (lambda x, ww=ww, bb=bb: F.silu(F.group_norm(x, groups, ww, bb, 1e-5)))
                            outs.append(fn(x))
                            leaves.append((x, ww, bb))

                        def bwd(i):
                            k = i % copies
                            torch.autograd.grad(outs[k], leaves[k], dys[k], retain_graph=True)

                        ms = timed(bwd, args.warmup, args.runs)
                        del outs, leaves
                    gbps = (2 if p == "fwd" else 3) * nbytes / ms / 1e6
                    rows.append({
                        "impl": impl, "device": name.replace(",", " "),
                        "shape": label(dims, groups), "dtype": f"{d}/{d}", "pass": p,
                        "path": "torch", "time_ms": f"{ms:.6f}", "gbps": f"{gbps:.2f}",
                        "pct_copy": f"{100 * gbps / copy_gbps:.2f}", "copy_gbps": f"{copy_gbps:.2f}",
                    })
            del xs, dys
            torch.cuda.empty_cache()

    cols = ["impl", "device", "shape", "dtype", "pass", "path", "time_ms", "gbps", "pct_copy",
            "copy_gbps"]
    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    wr = csv.DictWriter(out, fieldnames=cols)
    wr.writeheader()
    wr.writerows(rows)
    if args.csv:
        out.close()


if __name__ == "__main__":
    main()
