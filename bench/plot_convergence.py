"""Curves of a convergence results file: ``python bench/plot_convergence.py [RESULTS.json] [--out PLOT.png]``.

One row of panels per model: test accuracy against epochs and against training wall time (log x axes, so that the
first epochs stay visible; the model's target accuracies as horizontal lines), and training loss against epochs (log
scale). Each optimizer is one line, the mean over its seeds, with the band between the lowest and highest seed.
Without a path it plots the newest ``bench/results/convergence-kfac_*.json``. Needs matplotlib; without it, says so
and exits 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _stack(runs: list[dict], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """The evaluation points every seed reached (as epochs), with the mean / min / max of ``key`` over the seeds
    (None entries skipped)."""
    length = min(len(r[key]) for r in runs)
    epochs, mean, lo, hi = [], [], [], []
    for k in range(length):
        vals = [r[key][k] for r in runs if r[key][k] is not None]
        if not vals:
            continue
        epochs.append(runs[0]["epoch"][k])
        mean.append(sum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return epochs, mean, lo, hi


def plot(result: dict, out: str) -> str | None:
    """Draws ``result`` (the dict ``bench/convergence_kfac.py`` writes) into ``out``; returns ``out``, or None
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib)")
        return None

    entries = result["entries"]
    models = list(dict.fromkeys(e["model"] for e in entries))
    optimizers = list(dict.fromkeys(e["optimizer"] for e in entries))
    colors = {o: f"C{i}" for i, o in enumerate(optimizers)}
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        ax_ep, ax_t, ax_loss = axes[row]
        for e in (e for e in entries if e["model"] == model):
            runs, color = e["runs"], colors[e["optimizer"]]
            label = f"{e['optimizer']} ({', '.join(f'{k} {v:g}' for k, v in e['hparams'].items())})"
            ep, acc, lo, hi = _stack(runs, "eval_acc")
            ax_ep.plot(ep, acc, color=color, label=label)
            ax_ep.fill_between(ep, lo, hi, color=color, alpha=0.2, linewidth=0)
            secs = _stack(runs, "seconds")[1]
            n = min(len(secs), len(acc))
            ax_t.plot(secs[:n], acc[:n], color=color, label=label)
            ax_t.fill_between(secs[:n], lo[:n], hi[:n], color=color, alpha=0.2, linewidth=0)
            ep, loss, lo, hi = _stack(runs, "train_loss")
            ax_loss.plot(ep, loss, color=color, label=label)
            ax_loss.fill_between(ep, lo, hi, color=color, alpha=0.2, linewidth=0)
        targets = [t["target_acc"] for t in next(e for e in entries if e["model"] == model)["summary"]["to_target"]]
        for ax, xlabel in ((ax_ep, "epoch"), (ax_t, "training wall time (s, mean over seeds)")):
            for i, t in enumerate(targets):
                ax.axhline(t, color="black", linestyle="--" if i == 0 else ":", linewidth=0.8)
            ax.set_ylim(max(0.0, min(targets) - 0.15), 1.0)
            ax.set_xscale("log")
            ax.set_xlabel(f"{xlabel}, log scale")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("training loss (epoch mean)")
        ax_loss.grid(alpha=0.3)
        marks = ", ".join(f"{100 * t:g} %" for t in targets)
        ax_ep.set_title(f"{model}: test accuracy (targets {marks})", fontsize=10)
        ax_t.set_title(f"{model}: test accuracy against training time", fontsize=10)
        ax_loss.set_title(f"{model}: training loss", fontsize=10)
        ax_ep.legend(fontsize=8, loc="lower right")
    dev = result.get("device", {})
    seeds = result.get("protocol", {}).get("seeds")
    fig.suptitle(
        f"digits, batch {result.get('protocol', {}).get('batch_size')}, {seeds} seeds (band: min-max) - "
        f"{dev.get('name')}, {dev.get('torch_threads')} threads ({result.get('date')}, commit "
        f"{str(result.get('git', {}).get('commit'))[:10]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="results JSON (default: newest convergence-kfac_*.json)")
    parser.add_argument("--out", help="image path (default: the results path with .png)")
    args = parser.parse_args(argv)
    path = args.results
    if path is None:
        files = sorted(glob.glob(os.path.join(RESULTS, "convergence-kfac_*.json")), key=os.path.getmtime)
        if not files:
            print(f"no convergence-kfac_*.json in {RESULTS}; run bench/convergence_kfac.py first", file=sys.stderr)
            return 1
        path = files[-1]
    with open(path) as f:
        result = json.load(f)
    out = plot(result, args.out or os.path.splitext(path)[0] + ".png")
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
