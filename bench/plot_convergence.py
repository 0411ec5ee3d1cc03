"""Curves of a convergence results file: ``python bench/plot_convergence.py [RESULTS.json] [--kind kfac|ief|fop]
[--out PLOT.png]``.

K-FAC files (``bench/convergence_kfac.py``): one row of panels per model: test accuracy against epochs and against
training wall time (log x axes, so that the first epochs stay visible; the model's target accuracies as horizontal
lines), and training loss against epochs (log scale).

iEF files (``bench/convergence_ief.py``): one row: test accuracy against epochs and against training wall time,
training loss against epochs (log scale), and the approximation-quality indicator against epochs (log scale; 1 is
SGD). The indicator is first reduced per seed to the median of its points within each epoch (plotted at the epoch's
middle), then averaged over the seeds.

FOP files (``bench/convergence_fop.py``): one row: test accuracy against epochs and against training wall time (log
x axis), training loss against epochs (log scale), and a heat map of the learned 9x9 preconditioner ``P = M M^T`` of
the first convolution minus the identity it starts from (seed 0 of the FOP run that ends best; the range of the
eigenvalues of ``P`` in the title). FOP lines are dashed, HD lines dotted.

Each optimizer is one line, the mean over its seeds, with the band between the lowest and highest seed. Without a
path it plots the newest ``bench/results/convergence-<kind>_*.json`` (any kind when ``--kind`` is not given).
Needs matplotlib; without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
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


def _indicator_by_epoch(runs: list[dict]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch (x at its middle): the mean / min / max over the seeds of each seed's median indicator in that
    epoch; epochs without a finite point in some seed are left out."""
    per_seed = []
    for r in runs:
        bins: dict[int, list[float]] = {}
        for ep, v in zip(r["indicator"]["epoch"], r["indicator"]["ratio"]):
            if v is not None:
                bins.setdefault(int(ep), []).append(v)
        per_seed.append({k: statistics.median(v) for k, v in bins.items()})
    common = sorted(set.intersection(*(set(m) for m in per_seed))) if per_seed else []
    xs, mean, lo, hi = [], [], [], []
    for k in common:
        vals = [m[k] for m in per_seed]
        xs.append(k + 0.5)
        mean.append(sum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def _plot_ief(result: dict, out: str, plt) -> str:
    entries = result["entries"]
    fig, (ax_ep, ax_t, ax_loss, ax_ind) = plt.subplots(1, 4, figsize=(21, 4.6))
    for i, e in enumerate(entries):
        runs, color = e["runs"], f"C{i}"
        label = f"{e['optimizer']} ({', '.join(f'{k} {v:g}' for k, v in e['hparams'].items())})"
        ep, acc, lo, hi = _stack(runs, "eval_acc")
        ax_ep.plot(ep[1:], acc[1:], color=color, label=label)
        ax_ep.fill_between(ep[1:], lo[1:], hi[1:], color=color, alpha=0.2, linewidth=0)
        secs = _stack(runs, "seconds")[1]
        n = min(len(secs), len(acc))
        ax_t.plot(secs[1:n], acc[1:n], color=color, label=label)
        ax_t.fill_between(secs[1:n], lo[1:n], hi[1:n], color=color, alpha=0.2, linewidth=0)
        ep, loss, lo, hi = _stack(runs, "train_loss")
        ax_loss.plot(ep, loss, color=color, label=label)
        ax_loss.fill_between(ep, lo, hi, color=color, alpha=0.2, linewidth=0)
        ep, ind, lo, hi = _indicator_by_epoch(runs)
        if ep:
            ax_ind.plot(ep, ind, color=color, label=label)
            ax_ind.fill_between(ep, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax_ep.set_xlabel("epoch, log scale")
    ax_ep.set_xscale("log")
    ax_t.set_xlabel("training wall time (s, mean over seeds), log scale")
    ax_t.set_xscale("log")
    finals = [e["summary"]["final_test_acc_mean"] for e in entries if e["summary"]["final_test_acc_mean"] is not None]
    floor = max(0.0, min([0.8, *(f - 0.05 for f in finals)]))
    for ax in (ax_ep, ax_t):
        ax.set_ylabel("test accuracy")
        ax.set_ylim(floor, 1.0)
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean since the previous point)")
    ax_loss.grid(alpha=0.3)
    ax_ind.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax_ind.set_yscale("log")
    ax_ind.set_xlabel("epoch")
    ax_ind.set_ylabel("gamma(update) / gamma(grad)  (lower is better)")
    ax_ind.grid(alpha=0.3, which="both")
    ax_ep.set_title("test accuracy", fontsize=10)
    ax_t.set_title("test accuracy against training time", fontsize=10)
    ax_loss.set_title("training loss", fontsize=10)
    every = result.get("protocol", {}).get("indicator_every")
    ax_ind.set_title(f"update-quality indicator (every {every} steps, per-epoch median)", fontsize=10)
    ax_ep.legend(fontsize=8, loc="lower right")
    dev = result.get("device", {})
    proto = result.get("protocol", {})
    fig.suptitle(
        f"digits, {proto.get('model')}, batch {proto.get('batch_size')}, {proto.get('seeds')} seeds (band: min-max) - "
        f"{dev.get('name')}, {dev.get('torch_threads')} threads ({result.get('date')}, commit "
        f"{str(result.get('git', {}).get('commit'))[:10]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_fop(result: dict, out: str, plt) -> str:
    entries = result["entries"]
    best = result.get("learned_P_best")
    panels = 4 if best else 3
    fig, axes = plt.subplots(
        1, panels, figsize=(5.3 * panels, 4.6), gridspec_kw={"width_ratios": [1.25] * 3 + [1] * (panels - 3)}
    )
    ax_ep, ax_t, ax_loss = axes[:3]
    styles = {"fop": "--", "hd": ":"}
    for i, e in enumerate(entries):
        runs, color = e["runs"], f"C{i}"
        style = styles.get(e["optimizer"].split("-", 1)[0], "-")
        label = f"{e['optimizer']} ({', '.join(f'{k} {v:g}' for k, v in e['hparams'].items())})"
        ep, acc, lo, hi = _stack(runs, "eval_acc")
        ax_ep.plot(ep[1:], acc[1:], color=color, linestyle=style, label=label)
        ax_ep.fill_between(ep[1:], lo[1:], hi[1:], color=color, alpha=0.15, linewidth=0)
        secs = _stack(runs, "seconds")[1]
        n = min(len(secs), len(acc))
        ax_t.plot(secs[1:n], acc[1:n], color=color, linestyle=style, label=label)
        ax_t.fill_between(secs[1:n], lo[1:n], hi[1:n], color=color, alpha=0.15, linewidth=0)
        ep, loss, lo, hi = _stack(runs, "train_loss")
        ax_loss.plot(ep, loss, color=color, linestyle=style, label=label)
        ax_loss.fill_between(ep, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax_ep.set_xlabel("epoch")
    ax_t.set_xlabel("training wall time (s, mean over seeds), log scale")
    ax_t.set_xscale("log")
    finals = [e["summary"]["final_test_acc_mean"] for e in entries if e["summary"]["final_test_acc_mean"] is not None]
    floor = max(0.0, min([0.8, *(f - 0.05 for f in finals)]))
    for ax in (ax_ep, ax_t):
        ax.set_ylabel("test accuracy")
        ax.set_ylim(floor, 1.0)
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch)")
    ax_loss.grid(alpha=0.3, which="both")
    ax_ep.set_title("test accuracy", fontsize=10)
    ax_t.set_title("test accuracy against training time", fontsize=10)
    ax_loss.set_title("training loss", fontsize=10)
    ax_ep.legend(fontsize=8, loc="lower right")
    if best:
        ax_p = axes[3]
        # P - I: the learned part, on a scale of its own (P itself is dominated by the identity it starts from)
        dev = [[v - (i == j) for j, v in enumerate(row)] for i, row in enumerate(best["P"])]
        lim = max(abs(v) for row in dev for v in row) or 1.0
        img = ax_p.imshow(dev, cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(img, ax=ax_p, fraction=0.046, pad=0.04)
        taps = [f"{i},{j}" for i in range(3) for j in range(3)]
        ax_p.set_xticks(range(len(taps)), taps, fontsize=7, rotation=90)
        ax_p.set_yticks(range(len(taps)), taps, fontsize=7)
        ax_p.set_xlabel("kernel tap (row, column)")
        hp = ", ".join(f"{k} {v:g}" for k, v in best["hparams"].items())
        eig = best["P_eigenvalues"]
        ax_p.set_title(
            f"learned P - I (P = M M^T), first conv, eig(P) {min(eig):.3g} - {max(eig):.3g}\n"
            f"{best['optimizer']} ({hp}), seed {best['seed']}",
            fontsize=9,
        )
    dev = result.get("device", {})
    proto = result.get("protocol", {})
    fig.suptitle(
        f"digits, {proto.get('model')}, batch {proto.get('batch_size')}, {proto.get('seeds')} seeds (band: min-max) - "
        f"{dev.get('name')}, {dev.get('torch_threads')} threads ({result.get('date')}, commit "
        f"{str(result.get('git', {}).get('commit'))[:10]})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(result: dict, out: str) -> str | None:
    """Draws ``result`` (the dict ``bench/convergence_kfac.py``, ``bench/convergence_ief.py`` or
    ``bench/convergence_fop.py`` writes) into
    ``out``; returns ``out``, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib)")
        return None

    if result.get("kind") == "convergence-ief":
        return _plot_ief(result, out, plt)
    if result.get("kind") == "convergence-fop":
        return _plot_fop(result, out, plt)
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
    parser.add_argument("results", nargs="?", help="results JSON (default: the newest convergence file of --kind)")
    parser.add_argument("--kind", choices=("kfac", "ief", "fop"), help="which newest file to plot (default: any)")
    parser.add_argument("--out", help="image path (default: the results path with .png)")
    args = parser.parse_args(argv)
    path = args.results
    if path is None:
        kinds = [args.kind] if args.kind else ["kfac", "ief", "fop"]
        pattern = " or ".join(f"convergence-{k}_*.json" for k in kinds)
        files = [f for k in kinds for f in glob.glob(os.path.join(RESULTS, f"convergence-{k}_*.json"))]
        files.sort(key=os.path.getmtime)
        if not files:
            print(f"no {pattern} in {RESULTS}; run bench/convergence_<kind>.py first", file=sys.stderr)
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
