#!/usr/bin/env python3
"""Time torch.nn.functional.group_norm the way `groupnorm bench` times the crate.

Same shape sets, same timing (on CUDA three ways: `time_ms`, per-call time of back-to-back
calls between one event pair, median of 5 batches; `graph_ms`, the same calls captured in a
CUDA graph and replayed; `latency_ms`, one call between its own events; inputs rotated through
more than twice the L2), same minimum-traffic accounting (forward 2 tensor passes,
backward 3), same copy-bandwidth reference measured in the same process, and the same CSV columns,
so `scripts/compare_bench.py ours.csv torch.csv` can put them side by side.

    python3 scripts/bench_torch.py --shapes sd --dtype f16,f32 --csv torch.csv

Implementations timed, three columns: `torch` (F.group_norm), `torch-compile` (torch.compile of
it) and `groupnorm-py` (this repository's Python package, `pip install ./python`; skipped with a
note when it is not installed), each also as `...-gn-silu` (GroupNorm then SiLU: F.group_norm
then F.silu, compiled together for torch-compile, fused in one op for ours). A table of the three
side by side goes to stderr. `--device cpu` (the default without a GPU) times CPU tensors with
wall-clock medians instead of CUDA events. Mixed precision: PyTorch's CUDA group_norm wants the weight
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
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: CUDA when PyTorch sees a GPU, else the CPU")
    ap.add_argument("--impls", default="torch,compile,groupnorm",
                    help="which of torch (F.group_norm), compile (torch.compile of it) and "
                         "groupnorm (the groupnorm Python package) to time")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads(N) (give ours the same: RAYON_NUM_THREADS=N)")
    args = ap.parse_args()

    import time

    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.impls.split(","))
    if wanted - {"torch", "compile", "groupnorm"}:
        sys.exit(f"bench_torch: unknown impls {sorted(wanted - {'torch', 'compile', 'groupnorm'})}")
    gt = None
    if "groupnorm" in wanted:
        try:
            import groupnorm.torch as gt
        except ImportError as e:
            print(f"bench_torch: the groupnorm package is not installed ({e}): "
                  "`pip install ./python` adds its column", file=sys.stderr)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_torch: no CUDA device visible to PyTorch")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name(dev)
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    else:
        import platform
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"
        l2 = 32 << 20  # a last-level cache size to rotate inputs past
    if gt is not None and cuda and gt.fallback_reason(torch.empty(1, 1, device=dev)) is not None:
        print(f"bench_torch: groupnorm column skipped: {gt.fallback_reason(torch.empty(1, 1, device=dev))}",
              file=sys.stderr)
        gt = None
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

    BATCHES = 5

    def timed(fn, n_warm, n_runs, copies=1, graph=True):
        """(back-to-back ms per call, single-call latency ms, CUDA-graph ms per call or None),
        as `groupnorm bench` times the crate (cli/src/bench.rs `time_gpu`)."""
        for i in range(n_warm):
            fn(i % copies)
        single = []
        for i in range(n_runs):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i % copies)
                end.record()
                end.synchronize()
                single.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(i % copies)
                single.append((time.perf_counter() - t0) * 1e3)
        latency = statistics.median(single)
        if not cuda:
            return latency, latency, None
        calls = max(n_runs, copies)
        batches = []
        for _ in range(BATCHES):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fn(i % copies)
            end.record()
            end.synchronize()
            batches.append(start.elapsed_time(end) / calls)
        graph_ms = None
        if not graph:
            return statistics.median(batches), latency, None
        try:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(0)  # capture wants the allocator warmed on the capturing stream
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                for i in range(calls):
                    fn(i % copies)
            g.replay()
            replays = []
            for _ in range(BATCHES):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                replays.append(start.elapsed_time(end) / calls)
            graph_ms = statistics.median(replays)
            del g
        except Exception as e:  # noqa: BLE001 - a capture PyTorch refuses is reported, not fatal
            print(f"bench_torch: graph_ms not measured: {type(e).__name__}: {e}", file=sys.stderr)
        return statistics.median(batches), latency, graph_ms

    # copy bandwidth: bytes read plus written, buffers far beyond the last-level cache
    src = torch.empty((512 if cuda else 256) << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda i: dst.copy_(src), 3, 20)[1]
    copy_gbps = 2 * src.numel() / copy_ms / 1e6
    print(f"bench_torch: {name}, torch {torch.__version__}, copy {copy_gbps:.0f} GB/s",
          file=sys.stderr)
    del src, dst

    def torch_gn(groups, silu):
        if silu:
            return lambda x, w, b: F.silu(F.group_norm(x, groups, w, b, 1e-5))
        return lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5)

    def ours_gn(groups, silu):
        act = "silu" if silu else None
        return lambda x, w, b: gt.group_norm(x, groups, w, b, 1e-5, activation=act)

    rows = []
    for dims, groups in parse_shapes(args.shapes):
        for d in chosen:
            dt = dtypes[d]
            numel = 1
            for v in dims:
                numel *= v
            nbytes = numel * torch.tensor([], dtype=dt).element_size()
            # the crate's rotation (cli/src/bench.rs `gpu_copies`): a round over the copies moves
            # more than twice the L2 (outputs are PyTorch's own allocations and do not rotate)
            if cuda:
                copies = 1 if nbytes >= l2 else max(2, min(2048, -(-l2 // nbytes) + 1))
            else:  # the CPU bench's rotation (cli/src/bench.rs `cpu_copies`)
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
            # PyTorch's CUDA op wants parameters of the input's dtype (see the header); ours
            # takes the same, so all columns get the same arguments
            w = torch.randn(c, device=dev, dtype=dt) * 0.1 + 1
            b = torch.randn(c, device=dev, dtype=dt) * 0.1
            sfx = "" if args.layout == "nchw" else " nhwc"
            impls = []
            for silu in ([False] if args.no_silu else [False, True]):
                tag = "-gn-silu" if silu else ""
                if "torch" in wanted:
                    impls.append(("torch" + tag + sfx, torch_gn(groups, silu)))
                if "compile" in wanted:
                    impls.append(("torch-compile" + tag + sfx,
                                  torch.compile(torch_gn(groups, silu), dynamic=False)))
                if gt is not None:
                    impls.append(("groupnorm-py" + tag + sfx, ours_gn(groups, silu)))
            for impl, f in impls:
                for p in passes:
                    if p == "fwd":
                        with torch.no_grad():
                            ms, lat, gms = timed(lambda k: f(xs[k], w, b), args.warmup,
                                                 args.runs, copies)
                    else:
                        leaves = []
                        outs = []
                        for k in range(copies):
                            x = xs[k].detach().requires_grad_(True)
                            ww = w.detach().requires_grad_(True)
                            bb = b.detach().requires_grad_(True)
                            outs.append(f(x, ww, bb))
                            leaves.append((x, ww, bb))

                        def bwd(k):
                            torch.autograd.grad(outs[k], leaves[k], dys[k], retain_graph=True)

                        # no graph: autograd runs each backward op on its forward op's
                        # stream, outside the capturing stream (graph_ms stays empty)
                        ms, lat, gms = timed(bwd, args.warmup, args.runs, copies, graph=False)
                        del outs, leaves
                    gbps = (2 if p == "fwd" else 3) * nbytes / ms / 1e6
                    rows.append({
                        "impl": impl, "device": name.replace(",", " "),
                        "shape": label(dims, groups), "dtype": f"{d}/{d}", "pass": p,
                        "path": impl.split(" ")[0], "time_ms": f"{ms:.6f}", "gbps": f"{gbps:.2f}",
                        "pct_copy": f"{100 * gbps / copy_gbps:.2f}", "copy_gbps": f"{copy_gbps:.2f}",
                        "latency_ms": f"{lat:.6f}",
                        "graph_ms": "" if gms is None else f"{gms:.6f}",
                    })
            del xs, dys
            if cuda:
                torch.cuda.empty_cache()

    summary(rows)
    cols = ["impl", "device", "shape", "dtype", "pass", "path", "time_ms", "gbps", "pct_copy",
            "copy_gbps", "latency_ms", "graph_ms"]
    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    wr = csv.DictWriter(out, fieldnames=cols)
    wr.writeheader()
    wr.writerows(rows)
    if args.csv:
        out.close()


def summary(rows):
    """The three columns side by side on stderr: F.group_norm, torch.compile of it, ours."""
    cells = {}
    for r in rows:
        impl = r["impl"]
        silu = "-gn-silu" in impl
        kind = impl.split(" ")[0].replace("-gn-silu", "")
        key = (r["shape"], r["dtype"], r["pass"], "gn+silu" if silu else "gn",
               "nhwc" if impl.endswith(" nhwc") else "nchw")
        cells.setdefault(key, {})[kind] = float(r["time_ms"])
    if not cells:
        return
    cols = ["torch", "torch-compile", "groupnorm-py"]
    print(f"{'shape':<22} {'dtype':<9} {'pass':<4} {'op':<7} {'layout':<6} "
          + " ".join(f"{c + ' ms':>16}" for c in cols) + f" {'vs torch':>9} {'vs compile':>10}",
          file=sys.stderr)
    for key, t in cells.items():
        ours = t.get("groupnorm-py")
        vs = [f"{t[c] / ours:.2f}x" if ours and c in t else "-" for c in ("torch", "torch-compile")]
        print(f"{key[0]:<22} {key[1]:<9} {key[2]:<4} {key[3]:<7} {key[4]:<6} "
              + " ".join(f"{t[c]:>16.4f}" if c in t else f"{'-':>16}" for c in cols)
              + f" {vs[0]:>9} {vs[1]:>10}", file=sys.stderr)


if __name__ == "__main__":
    main()
