"""Speedup bars from a results file: ``python bench/plot.py [RESULTS.json] [--out PLOT.png]``.

One column of panels per op; the top row is the speedup of each pycurv backend (and of the compiled baseline) over
baseline (b), the bottom row over baseline (a), one group of bars per shape and dtype, log scale, 1x marked.
Without a path it plots the newest micro-benchmark file in bench/results/ (convergence files have their own
plot, bench/plot_convergence.py). Needs matplotlib; without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OP_ORDER = ("per_sample_gram", "per_sample_grad_sqnorms", "ef_diag")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="results JSON (default: newest in bench/results/)")
    parser.add_argument("--out", help="image path (default: the results path with .png)")
    args = parser.parse_args(argv)

    path = args.results
    if path is None:
        files = sorted(
            (f for f in glob.glob(os.path.join(RESULTS, "*.json")) if not os.path.basename(f).startswith("convergence")),
            key=os.path.getmtime,
        )
        if not files:
            print(f"no results file in {RESULTS}; run bench/run.py first", file=sys.stderr)
            return 1
        path = files[-1]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib)")
        return 0

    with open(path) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if r["impl"] in ("pycurv", "baseline+compile")]
    ops = [op for op in OP_ORDER if any(r["op"] == op for r in rows)]
    if not ops:
        print(f"{path} has no pycurv rows to plot", file=sys.stderr)
        return 1
    series = sorted({(r["impl"], r["name"]) for r in rows})

    fig, axes = plt.subplots(2, len(ops), figsize=(6 * len(ops), 8), squeeze=False)
    for col, op in enumerate(ops):
        cases = []
        for r in rows:
            c = (r["N"], r["T"], r["d_in"], r["d_out"], r["dtype"])
            if r["op"] == op and c not in cases:
                cases.append(c)
        width = 0.8 / len(series)
        for row, (key, label) in enumerate((("speedup_vs_b", "over (b)"), ("speedup_vs_a", "over (a) torch.func"))):
            ax = axes[row][col]
            for i, (impl, name) in enumerate(series):
                vals = []
                for c in cases:
                    hit = [
                        r
                        for r in rows
                        if r["op"] == op
                        and r["impl"] == impl
                        and r["name"] == name
                        and (r["N"], r["T"], r["d_in"], r["d_out"], r["dtype"]) == c
                    ]
                    vals.append(hit[0][key] if hit and hit[0][key] else 0.0)
                xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cases))]
                tag = f"pycurv:{name}" if impl == "pycurv" else f"(b) {name}"
                ax.bar(xs, vals, width, label=tag)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{n}x{t}x{di}x{do}\n{dt}" for n, t, di, do, dt in cases], fontsize=7, rotation=45)
            ax.set_title(f"{op}: speedup {label}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    dev = res.get("device", {})
    fig.suptitle(f"{dev.get('name')} ({res.get('date')}, commit {str(res.get('git', {}).get('commit'))[:10]})")
    fig.tight_layout()
    out = args.out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
