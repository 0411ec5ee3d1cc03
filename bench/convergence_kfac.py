"""Convergence of K-FAC against SGD and Adam on scikit-learn's digits: ``python bench/convergence_kfac.py [--quick]``.

Data: ``sklearn.datasets.load_digits`` (1797 images of 8x8 pixels, 10 classes, shipped inside scikit-learn), one
fixed stratified split into 75 % train and 25 % test, each pixel standardised with the training set's mean and
standard deviation. The learning rate (for K-FAC with its damping) is tuned on a validation split carved
(stratified, 20 %) from the training set: each candidate of a small log grid trains on the rest for the tuning
budget, and the one with the highest validation accuracy over its last epoch wins (ties: lower validation loss; a
run whose loss is not finite, or that K-FAC stops as non-finite, scores nothing). The winner then trains on the whole training set with several seeds (initialisation and shuffling), batch size 64,
the last partial batch dropped, and the test set is evaluated a few times per epoch.

Models: an MLP 64-256-256-10 with ReLU, and a small CNN (Conv2d 1->16 3x3 padding 1, ReLU, Conv2d 16->32 3x3
stride 2, ReLU, Linear 288->10). Optimizers: SGD (momentum 0.9), Adam, and ``pycurv.optim.KFAC`` (eigenbasis and
inverse modes; default decay, update intervals and KL-clip, listed in the results) rewriting the gradients that
SGD with momentum 0.9 then applies, at the same learning rate. Under the KL-clip the length of a K-FAC step is set by
the clip and the damping more than by the learning rate, so K-FAC's grid spans both; the others tune the learning
rate alone.

Wall time is the training loop alone (forward, backward, preconditioner, optimizer step; CUDA synchronised before
each evaluation), not the evaluation. "Epochs / seconds to X %" is the first evaluation point whose test accuracy
reaches X (fractional epochs), averaged over the seeds that reach it. Nothing here is asserted: it reports what it
measures. Writes ``bench/results/convergence-kfac_<device-slug>_<YYYY-MM-DD>.json`` (``-quick`` added to the slug
with ``--quick``) and a PNG beside it (``bench/plot_convergence.py``), prints a table, and prints the results path
as its last line.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings

# Only compiled kernels are measured: the Triton interpreter is chosen when triton is first imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from run import git_info, slug  # noqa: E402

import pycurv  # noqa: E402

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "kfac-eigen", "kfac-inverse")
# Test accuracies whose first crossing is reported; the first is the headline target.
TARGETS = {"mlp": (0.95, 0.97), "cnn": (0.95, 0.97)}
BATCH_SIZE = 64
MOMENTUM = 0.9
# Fixed K-FAC settings (the defaults of pycurv.optim.KFAC); damping is tuned with the learning rate.
KFAC_SETTINGS = {
    "factor_decay": 0.95,
    "factor_update_steps": 1,
    "inv_update_steps": 10,
    "kl_clip": 1e-3,
    "loss_reduction": "mean",
}
# Tuning grids (every combination is tried). K-FAC's damping is tuned with its learning rate: under the KL-clip the
# step length is set by the clip and the damping more than by the learning rate.
GRIDS = {
    "sgd": {"lr": (0.003, 0.01, 0.03, 0.1, 0.3)},
    "adam": {"lr": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)},
    "kfac-eigen": {"lr": (0.03, 0.1, 0.3, 1.0), "damping": (1e-3, 1e-2, 1e-1, 1.0, 10.0)},
    "kfac-inverse": {"lr": (0.03, 0.1, 0.3, 1.0), "damping": (1e-3, 1e-2, 1e-1, 1.0, 10.0)},
}
QUICK_GRIDS = {
    "sgd": {"lr": (0.01, 0.03, 0.1)},
    "adam": {"lr": (3e-4, 1e-3, 3e-3)},
    "kfac-eigen": {"lr": (0.03, 0.1), "damping": (1e-1, 1.0)},
    "kfac-inverse": {"lr": (0.03, 0.1), "damping": (1e-1, 1.0)},
}
SPLIT_SEED = 0
VAL_SEED = 1


def load_data(device: torch.device) -> dict:
    """The fixed split: ``{"train", "test", "tune_train", "val"}``, each ``(x (n, 64) float32, y (n,) int64)``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit(f"scikit-learn is needed for the digits data ({exc}); pip install scikit-learn") from None

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SPLIT_SEED)
    x_tt, x_va, y_tt, y_va = train_test_split(x_tr, y_tr, test_size=0.2, stratify=y_tr, random_state=VAL_SEED)

    def standardise(fit, *arrays):
        mean, std = fit.mean(0), fit.std(0)
        std[std == 0] = 1.0  # pixels that are blank in every training image stay 0
        return [(a - mean) / std for a in arrays]

    def tensors(xs, ys):
        return (
            torch.as_tensor(xs, dtype=torch.float32, device=device),
            torch.as_tensor(ys, dtype=torch.int64, device=device),
        )

    train, test = standardise(x_tr, x_tr, x_te)
    tune_train, val = standardise(x_tt, x_tt, x_va)
    return {
        "train": tensors(train, y_tr),
        "test": tensors(test, y_te),
        "tune_train": tensors(tune_train, y_tt),
        "val": tensors(val, y_va),
    }


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 10),
        )
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def configs(grid: dict) -> list[dict]:
    """Every combination of a grid ``{name: values}``, as ``{name: value}`` dicts."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def hp_text(hp: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def make_optimizer(name: str, model: nn.Module, hp: dict):
    """``(optimizer, preconditioner or None)`` for the hyper-parameters ``hp`` (``lr``, and ``damping`` for
    K-FAC)."""
    lr = hp["lr"]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM), None
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    if name in ("kfac-eigen", "kfac-inverse"):
        from pycurv.optim import KFAC

        pre = KFAC(model, lr=lr, damping=hp["damping"], method=name.split("-", 1)[1], **KFAC_SETTINGS)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM), pre
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole set in one batch."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def record_point(run: dict, losses: list, elapsed: float, n_batches: int, model, eval_set) -> bool:
    """Closes one evaluation point of ``run`` (see :func:`train`): the mean of the training ``losses`` since the
    previous point (emptied), the evaluation loss and accuracy, the fractional epoch and ``elapsed`` training
    seconds. Returns False, with the run marked diverged, when the mean training loss is not finite."""
    mean_loss = torch.stack(losses).mean().item()
    run["steps"] += len(losses)
    losses.clear()
    if not math.isfinite(mean_loss):
        run["diverged"] = True
        run["train_seconds"] = elapsed
        return False
    eval_loss, eval_acc = evaluate(model, *eval_set)
    run["epoch"].append(run["steps"] / n_batches)
    run["train_loss"].append(mean_loss)
    run["eval_loss"].append(eval_loss)
    run["eval_acc"].append(eval_acc)
    run["seconds"].append(elapsed)
    return True


def train(model_name, opt_name, hp, seed, epochs, train_set, eval_set, device, evals_per_epoch) -> dict:
    """One run, evaluated ``evals_per_epoch`` times per epoch (and once before training). Per evaluation point:
    ``epoch`` (fractional: steps / steps per epoch), mean training loss since the previous point, evaluation loss
    and accuracy, cumulative training seconds. Stops early, marked ``diverged``, when a training loss is not
    finite."""
    torch.manual_seed(seed)
    model = make_model(model_name).to(device)
    opt, pre = make_optimizer(opt_name, model, hp)
    x, y = train_set
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_batches = x.shape[0] // BATCH_SIZE
    marks = {round(n_batches * k / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}
    eval_loss, eval_acc = evaluate(model, *eval_set)
    run = {
        "epoch": [0.0],
        "train_loss": [None],
        "eval_loss": [eval_loss],
        "eval_acc": [eval_acc],
        "seconds": [0.0],
        "steps": 0,
        "diverged": False,
    }
    elapsed = 0.0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(device)
        losses = []
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_batches):
            idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if pre is not None:
                try:
                    pre.step()
                except FloatingPointError as exc:
                    # KFAC refuses non-finite statistics / steps: the run has diverged.
                    run["diverged"], run["error"] = True, str(exc)[:300]
                    run["train_seconds"] = elapsed + time.perf_counter() - t0
                    return run
            opt.step()
            losses.append(loss.detach())
            if i + 1 not in marks:
                continue
            sync(device)
            elapsed += time.perf_counter() - t0
            if not record_point(run, losses, elapsed, n_batches, model, eval_set):
                return run
            sync(device)
            t0 = time.perf_counter()
    run["train_seconds"] = elapsed
    return run


def warm_up(model_name: str, opt_name: str, data: dict, device: torch.device) -> None:
    """A few untimed steps, so that lazy imports and first-call setup (kernel registration, allocator growth) are
    not charged to the first measured run."""
    torch.manual_seed(0)
    model = make_model(model_name).to(device)
    opt, pre = make_optimizer(opt_name, model, configs(GRIDS[opt_name])[0])
    x, y = data["tune_train"]
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(
            model(x[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]), y[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
        ).backward()
        if pre is not None:
            pre.step()
        opt.step()
    evaluate(model, *data["val"])
    sync(device)


def select_best(label: str, candidates, run_fn, evals_per_epoch: int, log) -> tuple[dict, list[dict]]:
    """Trains every hyper-parameter dict of ``candidates`` with ``run_fn(hp)`` (a run on the tuning split, as
    :func:`train` returns it) and returns the best one and every candidate's outcome. A candidate's score is its
    validation accuracy averaged over the evaluation points of its last epoch (one point is noisy: a validation image
    is 0.37 %); ties go to the lower validation loss, averaged the same way; diverged runs score nothing."""
    trials = []
    for hp in candidates:
        run = run_fn(hp)
        last = slice(-evals_per_epoch, None)
        ok = not run["diverged"] and all(math.isfinite(v) for v in run["eval_loss"][last])
        trials.append(
            {
                "hparams": hp,
                "val_acc": statistics.fmean(run["eval_acc"][last]) if ok else None,
                "val_loss": statistics.fmean(run["eval_loss"][last]) if ok else None,
                "diverged": not ok,
                "error": run.get("error"),
                "train_seconds": run["train_seconds"],
            }
        )
        t = trials[-1]
        log(
            f"  tune {label} {hp_text(hp):26s} "
            + (f"val acc {t['val_acc']:.4f} loss {t['val_loss']:.4f}" if ok else "diverged")
            + f" ({run['train_seconds']:.1f} s)"
        )
    scored = [t for t in trials if not t["diverged"]]
    if not scored:
        return trials[0]["hparams"], trials
    best = max(scored, key=lambda t: (t["val_acc"], -t["val_loss"]))
    return best["hparams"], trials


def tune(model_name, opt_name, grid, epochs, data, device, evals_per_epoch, log) -> tuple[dict, list[dict]]:
    """Best hyper-parameters of ``grid`` on the validation split, and every candidate's outcome (:func:`select_best`)."""
    return select_best(
        f"{model_name:3s} {opt_name:12s}",
        configs(grid),
        lambda hp: train(model_name, opt_name, hp, 0, epochs, data["tune_train"], data["val"], device, evals_per_epoch),
        evals_per_epoch,
        log,
    )


def pct(v) -> str:
    """A fraction as a percentage with two decimals, "-" for None."""
    return "-" if v is None else f"{100 * v:.2f}"


def acc_text(s: dict) -> str:
    """``mean ± std`` of a summary's final test accuracy, in percent."""
    if s["final_test_acc_mean"] is None:
        return "-"
    return f"{pct(s['final_test_acc_mean'])} ± {pct(s['final_test_acc_std'])}"


def add_run_args(parser, kind: str, quick_epochs: int, quick_tune: int, evals_per_epoch: int, per: str = "optimizer"):
    """The options every convergence script takes: run lengths, evaluation points, device, threads, output."""
    parser.add_argument("--epochs", type=int, help=f"epochs of each final run (default 25, quick {quick_epochs})")
    parser.add_argument("--tune-epochs", type=int, help=f"epochs of each tuning run (default 10, quick {quick_tune})")
    parser.add_argument("--seeds", type=int, help=f"final runs per {per} (default 3, quick 2)")
    parser.add_argument(
        "--evals-per-epoch", type=int, default=evals_per_epoch,
        help=f"evaluation points per epoch (default {evals_per_epoch})",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help=f"results file (default bench/results/convergence-{kind}_<slug>_<date>.json)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")


def results_path(kind: str, out: str | None, dev: dict, device: torch.device, quick: bool, started) -> str:
    """``out``, or bench/results/convergence-<kind>_<device slug>[-quick]_<date>.json."""
    if out:
        return out
    name = slug(dev["name"]) if device.type == "cuda" else f"cpu-{slug(dev['cpu_model'])}-{dev['torch_threads']}t"
    if quick:
        name += "-quick"
    return os.path.join(BENCH, "results", f"convergence-{kind}_{name}_{started:%Y-%m-%d}.json")


def result_header(kind: str, script: str, started, runtime: float, argv, dev: dict, quick: bool, data: dict) -> dict:
    """The fields every convergence results file starts with: what ran, where, on which data split."""
    return {
        "schema": 1,
        "kind": kind,
        "date": f"{started:%Y-%m-%d}",
        "started": started.isoformat(timespec="seconds"),
        "runtime_s": round(runtime, 1),
        "command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]),
        "device": dev,
        "versions": versions(),
        "git": git_info(),
        "quick": quick,
        "data": {
            "name": "sklearn.datasets.load_digits (8x8, 10 classes)",
            "sizes": {k: v[0].shape[0] for k, v in data.items()},
            "split": f"stratified 75/25 train/test (random_state={SPLIT_SEED}); validation = stratified 20 % of "
            f"train (random_state={VAL_SEED}); pixels standardised with the fitting set's mean and std",
        },
    }


def count_warnings(caught) -> list[dict]:
    """Warnings grouped by category and text with the numbers blanked: ``{"category", "count", "first"}``."""
    groups: dict[tuple, dict] = {}
    for w in caught:
        text = str(w.message)
        key = (w.category.__name__, re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text))
        grp = groups.setdefault(key, {"category": key[0], "count": 0, "first": text[:500]})
        grp["count"] += 1
    return list(groups.values())


def save_and_report(result: dict, out: str, table: str, no_plot: bool, notes=(), label=lambda e: e["optimizer"]):
    """Writes ``result`` to ``out`` (JSON) and prints the device line, ``table``, the ``notes`` lines, the warnings
    of every entry (named by ``label``), the plot's path (unless ``no_plot``) and, last, ``out``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    dev = result["device"]
    print()
    print(
        f"device: {dev['name']} ({dev['torch_threads']} torch threads); {result['runtime_s']:.0f} s in all; 1-minute "
        f"load average {dev['load_average_at_start'][0]:.1f} at the start, {dev['load_average_at_end'][0]:.1f} at "
        "the end"
    )
    print(table)
    for line in notes:
        print(line)
    for e in result["entries"]:
        for w in e["warnings"]:
            print(f"warning ({label(e)}, {w['count']}x): {w['category']}: {w['first'][:200]}")
    if not no_plot:
        from plot_convergence import plot

        png = plot(result, os.path.splitext(out)[0] + ".png")
        if png:
            print(png)
    print(out)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(model_name: str, runs: list[dict]) -> dict:
    finals = [r["eval_acc"][-1] for r in runs if not r["diverged"]]
    acc_mean, acc_std = _mean_std(finals)
    steps = sum(r["steps"] for r in runs)
    to_target = []
    for target in TARGETS[model_name]:
        hits = []
        for r in runs:
            k = next((k for k, acc in enumerate(r["eval_acc"]) if k > 0 and acc >= target), None)
            if k is not None:
                hits.append((r["epoch"][k], r["seconds"][k]))
        ep_mean, ep_std = _mean_std([e for e, _ in hits])
        s_mean, s_std = _mean_std([s for _, s in hits])
        to_target.append(
            {
                "target_acc": target,
                "seeds_reaching": len(hits),
                "epochs_mean": ep_mean,
                "epochs_std": ep_std,
                "seconds_mean": s_mean,
                "seconds_std": s_std,
            }
        )
    return {
        "final_test_acc_mean": acc_mean,
        "final_test_acc_std": acc_std,
        "best_test_acc_mean": statistics.fmean(max(r["eval_acc"]) for r in runs),
        "seeds": len(runs),
        "seeds_diverged": sum(r["diverged"] for r in runs),
        "to_target": to_target,
        "ms_per_step": 1e3 * sum(r["train_seconds"] for r in runs) / steps if steps else None,
    }


def _fmt_pm(mean, std, scale=1.0, digits=1) -> str:
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(entries: list[dict]) -> str:
    targets = [t["target_acc"] for t in entries[0]["summary"]["to_target"]] if entries else []
    head = ["model", "optimizer", "tuned", "test acc % (final)"]
    for t in targets:
        head += [f"seeds >= {100 * t:g}%", f"epochs to {100 * t:g}%", f"s to {100 * t:g}%"]
    head.append("ms/step")
    body = []
    for e in entries:
        s = e["summary"]
        row = [
            e["model"],
            e["optimizer"],
            hp_text(e["hparams"]),
            _fmt_pm(s["final_test_acc_mean"], s["final_test_acc_std"], 100, 2),
        ]
        for t in s["to_target"]:
            reached = f"{t['seeds_reaching']}/{s['seeds']}"
            if s["seeds_diverged"]:
                reached += f" ({s['seeds_diverged']} diverged)"
            row.append(reached)
            if t["seeds_reaching"]:
                row += [
                    _fmt_pm(t["epochs_mean"], t["epochs_std"], 1, 2),
                    _fmt_pm(t["seconds_mean"], t["seconds_std"], 1, 2),
                ]
            else:
                row += ["not reached", "not reached"]
        row.append("-" if s["ms_per_step"] is None else f"{s['ms_per_step']:.2f}")
        body.append(row)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)])


def device_info(device: torch.device) -> dict:
    from conftest import cpu_model

    return {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def versions() -> dict:
    from importlib import metadata

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        from pycurv._build_config import BUILD_CONFIG
    except ImportError:
        BUILD_CONFIG = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": dist("triton"),
        "scikit_learn": dist("scikit-learn"),
        "pycurv": pycurv.__version__,
        "pycurv_build": BUILD_CONFIG,
        "pycurv_extension_error": pycurv._extension.LOAD_ERROR,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, fewer epochs, 2 seeds, no kfac-inverse")
    parser.add_argument("--models", nargs="+", choices=MODELS, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help=f"default: {' '.join(OPTIMIZERS)}")
    add_run_args(parser, "kfac", 8, 4, 4, per="(model, optimizer)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = args.models or list(MODELS)
    optimizers = args.optimizers or [o for o in OPTIMIZERS if not (args.quick and o == "kfac-inverse")]
    epochs = args.epochs or (8 if args.quick else 25)
    tune_epochs = args.tune_epochs or (4 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    grids = QUICK_GRIDS if args.quick else GRIDS

    started = datetime.datetime.now()
    data = load_data(device)
    dev = device_info(device)
    out = results_path("kfac", args.out, dev, device, args.quick, started)

    def log(msg):
        print(msg, flush=True)

    entries = []
    t_start = time.perf_counter()
    for model_name in models:
        for opt_name in optimizers:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warm_up(model_name, opt_name, data, device)
                hp, trials = tune(
                    model_name, opt_name, grids[opt_name], tune_epochs, data, device, args.evals_per_epoch, log
                )
                runs = [
                    train(
                        model_name,
                        opt_name,
                        hp,
                        seed,
                        epochs,
                        data["train"],
                        data["test"],
                        device,
                        args.evals_per_epoch,
                    )
                    for seed in range(seeds)
                ]
                entry = {"model": model_name, "optimizer": opt_name, "hparams": hp, "tuning": trials, "runs": runs}
                entry["summary"] = summarise(model_name, runs)
                s, t = entry["summary"], entry["summary"]["to_target"][0]
                log(
                    f"{model_name:3s} {opt_name:12s} {hp_text(hp)}: test acc "
                    f"{_fmt_pm(s['final_test_acc_mean'], s['final_test_acc_std'], 100, 2)} %, "
                    f"{100 * t['target_acc']:g} % reached by {t['seeds_reaching']}/{s['seeds']} seeds, "
                    f"{s['ms_per_step']:.2f} ms/step"
                )
            entry["warnings"] = count_warnings(caught)
            entries.append(entry)
    runtime = time.perf_counter() - t_start
    dev["load_average_at_end"] = list(os.getloadavg())

    result = {
        **result_header(
            "convergence-kfac", "bench/convergence_kfac.py", started, runtime, argv, dev, args.quick, data
        ),
        "protocol": {
            "batch_size": BATCH_SIZE,
            "drop_last": True,
            "epochs": epochs,
            "tune_epochs": tune_epochs,
            "seeds": seeds,
            "evals_per_epoch": args.evals_per_epoch,
            "tuning": "each combination of the grid trains on train minus validation with seed 0 for tune_epochs; the highest "
            "validation accuracy averaged over the last epoch's evaluation points wins (ties: lower validation loss, "
            "averaged the same way); non-finite runs score nothing",
            "grids": {o: {k: list(v) for k, v in grids[o].items()} for o in optimizers},
            "sgd_momentum": MOMENTUM,
            "kfac": dict(KFAC_SETTINGS, base_optimizer=f"SGD(momentum={MOMENTUM}) at the same lr", damping="tuned"),
            "targets": TARGETS,
            "timing": "training loop only (forward, backward, preconditioner, optimizer step), CUDA synchronised "
            "before each evaluation; evaluation excluded; runs[i].seconds[k] = cumulative training seconds at "
            "evaluation point k, runs[i].epoch[k] = steps done / steps per epoch",
            "to_target": "first evaluation point whose test accuracy >= target (epochs fractional, evals_per_epoch "
            "points per epoch); mean ± sample std over the seeds that reach it",
        },
        "entries": entries,
    }
    save_and_report(result, out, format_table(entries), args.no_plot, label=lambda e: f"{e['model']} {e['optimizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
