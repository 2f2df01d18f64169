#!/usr/bin/env python3
"""Put `groupnorm bench --csv` and `scripts/bench_torch.py --csv` results side by side.

    python3 scripts/compare_bench.py ours.csv torch.csv [--svg plot.svg] [--markdown]
    python3 scripts/compare_bench.py ours-nchw.csv,ours-nhwc.csv torch-nchw.csv,torch-nhwc.csv \
        --candle candle.csv --markdown        # the CPU side-by-side (BENCHMARKS.md)

Each of `ours` and `torch` may be a comma-separated list of CSV files (one per layout).
Rows are matched on (shape, activation dtype, pass, layout); where ours has two rows for one
activation dtype (parameters f32 and of the activation's dtype), the one whose parameter dtype
is the activation's is kept, as PyTorch's rows have. `--candle` adds candle_nn::GroupNorm's times
(benches/candle.rs with GROUPNORM_CANDLE_CSV set) and the ratios to them. Prints, per row: our time, the unfused
baseline's, PyTorch's, our % of copy bandwidth, and the speedups (plus torch.compile's time and
the Python package's when bench_torch.py timed them); then geometric means over the
rows, over f16 and f32 separately, and over N = 1 shapes. `--svg` draws % of copy bandwidth per
shape (ours, baseline, PyTorch) as a plain SVG file (no plotting library needed).
Standard library only.
"""
import argparse
import csv
import math
import sys


def load(paths):
    rows = []
    for path in paths.split(","):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def layout(row):
    return "nhwc" if row["impl"].endswith(" nhwc") else "nchw"


def key(row):
    return (row["shape"], row["dtype"].split("/")[0], row["pass"], layout(row))


def same_param_dtype(row):
    a, _, p = row["dtype"].partition("/")
    return a == p


def geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("torch", nargs="?")
    ap.add_argument("--svg")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--candle", help="candle_nn::GroupNorm times (benches/candle.rs CSV)")
    args = ap.parse_args()

    # each variant of ours is compared with what it replaces in PyTorch (one variant per CSV)
    pair = {"groupnorm": "torch", "groupnorm-cpu": "torch", "groupnorm nhwc": "torch nhwc",
            "groupnorm-cpu nhwc": "torch nhwc",
            "groupnorm+silu": "torch-gn-silu", "groupnorm+silu nhwc": "torch-gn-silu nhwc"}
    ours, base, torch, torch_all = {}, {}, {}, {}
    for r in load(args.ours):
        if r["impl"] in pair:
            if key(r) in ours and same_param_dtype(ours[key(r)]) and not same_param_dtype(r):
                continue
            ours[key(r)] = r
        elif r["impl"] == "baseline":
            base[key(r)] = r
    if args.torch:
        for r in load(args.torch):
            torch_all[(r["impl"], key(r))] = r
    for k, r in ours.items():
        if (pair[r["impl"]], k) in torch_all:
            torch[k] = torch_all[(pair[r["impl"]], k)]
    # bench_torch.py's other two columns, when it ran them: torch.compile of the same PyTorch
    # code, and this repository's Python package (the crate through PyTorch's op machinery)
    extra = {}
    for col, name in (("compile ms", "torch-compile"), ("py pkg ms", "groupnorm-py")):
        found = {k: torch_all[(pair[r["impl"]].replace("torch", name, 1), k)] for k, r in ours.items()
                 if (pair[r["impl"]].replace("torch", name, 1), k) in torch_all}
        if found:
            extra[col] = found
    if not ours:
        sys.exit("compare_bench: no `groupnorm` rows in " + args.ours)

    candle = {}
    if args.candle:
        for r in load(args.candle):
            candle[key(r)] = r
    if candle:
        extra["candle ms"] = candle
    head = ["shape", "dtype", "layout", "pass", "path", "ours ms", "% copy", "baseline ms",
            "torch ms", "vs baseline", "vs torch"] + list(extra) + (["vs candle"] if candle else [])
    speed_candle = []
    lines = []
    speed_base, speed_torch, pct = {}, {}, {}
    for k, r in ours.items():
        t = float(r["time_ms"])
        b = float(base[k]["time_ms"]) if k in base else None
        p = float(torch[k]["time_ms"]) if k in torch else None
        group = (k[1], k[2] + " " + k[3])
        pct.setdefault(group, []).append(float(r["pct_copy"]))
        if b:
            speed_base.setdefault(group, []).append(b / t)
        if p:
            speed_torch.setdefault(group, []).append(p / t)
            if k[0].startswith("1x"):
                speed_torch.setdefault(("N=1", k[2]), []).append(p / t)
        cn = float(candle[k]["time_ms"]) if k in candle else None
        if cn:
            speed_candle.append(cn / t)
        lines.append([k[0], r["dtype"], k[3], k[2], r["path"], f"{t:.4f}",
                      f"{float(r['pct_copy']):.1f}",
                      f"{b:.4f}" if b else "-", f"{p:.4f}" if p else "-",
                      f"{b / t:.2f}x" if b else "-", f"{p / t:.2f}x" if p else "-"]
                     + [f"{float(e[k]['time_ms']):.4f}" if k in e else "-" for e in extra.values()]
                     + ([f"{cn / t:.2f}x" if cn else "-"] if candle else []))

    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for l in lines:
            print("  ".join(c.ljust(w) for c, w in zip(l, widths)))
    print()
    for group in sorted(pct):
        msg = f"geomean {group[0]} {group[1]}: {geomean(pct[group]):.1f}% of copy bandwidth"
        if group in speed_base:
            msg += f", {geomean(speed_base[group]):.2f}x the baseline"
        if group in speed_torch:
            msg += f", {geomean(speed_torch[group]):.2f}x PyTorch"
        print(msg)
    every = [v for g, vs in speed_torch.items() if g[0] != "N=1" for v in vs]
    if every:
        print(f"geomean over all {len(every)} matched rows: {geomean(every):.2f}x PyTorch "
              f"(worst {min(every):.2f}x, best {max(every):.2f}x)")
    if speed_candle:
        print(f"geomean over {len(speed_candle)} rows with candle_nn: {geomean(speed_candle):.2f}x "
              f"candle_nn (worst {min(speed_candle):.2f}x)")
    for p in ("fwd", "bwd"):
        if ("N=1", p) in speed_torch:
            print(f"geomean N = 1 shapes {p}: {geomean(speed_torch[('N=1', p)]):.2f}x PyTorch")

    if args.svg:
        write_svg(args.svg, ours, base, torch)
        print(f"wrote {args.svg}")


def write_svg(path, ours, base, torch):
    keys = sorted(ours, key=lambda k: (k[2], k[1], k[0]))
    series = [(n, d, c) for n, d, c in (("ours", ours, "#1f77b4"), ("baseline", base, "#ff7f0e"),
                                         ("PyTorch", torch, "#2ca02c")) if d]
    values = [float(d[k]["pct_copy"]) for _, d, _ in series for k in keys if k in d]
    ymax = max(100.0, 25.0 * math.ceil(max(values) / 25.0)) if values else 100.0
    bar, gap, left, top, height = 7, 10, 60, 40, 300
    group = len(series) * bar + gap
    width = left + len(keys) * group + 140
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 190}" '
           f'font-family="sans-serif" font-size="10">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="20" font-size="13">% of measured copy bandwidth per shape '
           f'(higher is better; 100% = the copy floor)</text>']
    for pctl in range(0, int(ymax) + 1, 25):
        y = top + height - pctl / ymax * height
        out.append(f'<line x1="{left}" x2="{left + len(keys) * group}" y1="{y}" y2="{y}" '
                   f'stroke="{"#888" if pctl == 100 else "#ddd"}"/>')
        out.append(f'<text x="{left - 5}" y="{y + 3}" text-anchor="end">{pctl}%</text>')
    for i, k in enumerate(keys):
        x0 = left + i * group
        for j, (_, data, color) in enumerate(series):
            if k in data:
                h = float(data[k]["pct_copy"]) / ymax * height
                out.append(f'<rect x="{x0 + j * bar}" y="{top + height - h}" width="{bar - 1}" '
                           f'height="{h}" fill="{color}"/>')
        lx, ly = x0 + bar, top + height + 8
        out.append(f'<text x="{lx}" y="{ly}" transform="rotate(60 {lx} {ly})">'
                   f'{k[0]} {k[1]} {k[2]}</text>')
    for j, (name, _, color) in enumerate(series):
        out.append(f'<rect x="{left + j * 90}" y="{top + height + 172}" width="10" height="10" '
                   f'fill="{color}"/><text x="{left + j * 90 + 14}" y="{top + height + 181}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
