"""FOP and HD against SGD with momentum and Adam on scikit-learn's digits: ``python bench/convergence_fop.py
[--quick]``.

First-order preconditioning (Moskovitz et al. 2019, arXiv 1910.08461) and hypergradient descent (Baydin et al.
2018), MATH.md section 4, on a small CNN at a size two CPU cores train in a few minutes. Data as in
``bench/convergence_kfac.py``: ``load_digits`` (8x8 images, 10 classes), one fixed stratified 75/25 train/test
split, pixels standardised with the training set's statistics, a validation split (stratified 20 % of train) for
tuning; batch size 64, the last partial batch dropped; cross-entropy with ``reduction="mean"``.

Model: Conv2d 1->16 3x3 padding 1, ReLU, Conv2d 16->32 3x3 padding 1, ReLU, MaxPool 2x2, Linear 512->10. FOP
learns a 9x9 factor on the spatial taps of each convolution (shared by its channel pairs) and a 512x512 factor on
the input side of the linear layer; biases go to the base optimizer unchanged.

Optimizers: ``sgd`` (``torch.optim.SGD``, momentum 0.9) and ``adam`` (``torch.optim.Adam``), each alone; ``fop-sgd``
and ``fop-adam``, :class:`pycurv.optim.FOP` around the same base (``on_blowup="raise"``: a factor that blows up ends
the run as diverged); ``hd-sgd`` and ``hd-adam``, :class:`pycurv.optim.HD` (its own SGD with momentum 0.9, its own
Adam). The bases' learning rates are tuned on a small log grid; FOP's and HD's ``hyper_lr`` on a small log grid
with the learning rate (for HD the initial one) fixed to the tuned learning rate of their base. Tuning follows
``bench/convergence_kfac.py``: each candidate trains on train minus validation with seed 0, the highest validation
accuracy over the last epoch's evaluation points wins (ties: lower validation loss; a run whose loss is not finite,
or whose factors blow up, scores nothing). The winners then train on the whole training set with several seeds
(initialisation and shuffling), every optimizer for the same number of epochs, the test set evaluated after every
epoch.

For seed 0 of each FOP run the learned preconditioner of the first convolution, ``P = M M^T`` (9x9, the taps in
row-major order of the 3x3 kernel), is stored with its eigenvalues, and for every preconditioned weight how far
``P`` moved from the identity. HD runs record their learning rate at every evaluation point.

Wall time is the training loop alone (forward, backward, optimizer step; CUDA synchronised at every pause), not the
evaluation. Each run is deterministic for its seed on a fixed thread count. Nothing is asserted: it reports what it
measures. Writes ``bench/results/convergence-fop_<device-slug>_<YYYY-MM-DD>.json`` (``-quick`` added to the slug
with ``--quick``) and a PNG beside it (``bench/plot_convergence.py``), prints a table, and prints the results path as
its last line.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
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

from convergence_kfac import (  # noqa: E402
    acc_text,
    add_run_args,
    configs,
    count_warnings,
    device_info,
    evaluate,
    hp_text,
    load_data,
    pct,
    record_point,
    result_header,
    results_path,
    save_and_report,
    select_best,
    sync,
)

import pycurv  # noqa: E402

MODEL = "cnn"
MODEL_TEXT = "Conv2d 1->16 3x3 pad 1, ReLU, Conv2d 16->32 3x3 pad 1, ReLU, MaxPool 2x2, Linear 512->10"
OPTIMIZERS = ("sgd", "adam", "fop-sgd", "fop-adam", "hd-sgd", "hd-adam")
# The base whose tuned learning rate FOP and HD run with.
BASE_OF = {"fop-sgd": "sgd", "fop-adam": "adam", "hd-sgd": "sgd", "hd-adam": "adam"}
BATCH_SIZE = 64
MOMENTUM = 0.9
# The first convolution: its learned 9x9 preconditioner is stored and drawn.
FIRST_CONV = "1.weight"
# Tuning grids (every value is tried). FOP's and HD's hyper_lr with the base's tuned lr; HD's grids hold the
# paper's defaults (1e-3 for SGD, 1e-7 for Adam). FOP's step on M scales with lr * hyper_lr, so Adam's smaller
# learning rates need a larger hyper_lr; beyond the top of each FOP grid the factors blow up on this model.
GRIDS = {
    "sgd": {"lr": (0.003, 0.01, 0.03, 0.1, 0.3)},
    "adam": {"lr": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)},
    "fop-sgd": {"hyper_lr": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)},
    "fop-adam": {"hyper_lr": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)},
    "hd-sgd": {"hyper_lr": (1e-4, 1e-3, 1e-2, 1e-1)},
    "hd-adam": {"hyper_lr": (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)},
}
QUICK_GRIDS = {
    "sgd": {"lr": (0.03, 0.1)},
    "adam": {"lr": (1e-3, 3e-3)},
    "fop-sgd": {"hyper_lr": (0.1, 1.0)},
    "fop-adam": {"hyper_lr": (3.0, 30.0)},
    "hd-sgd": {"hyper_lr": (1e-3, 1e-2)},
    "hd-adam": {"hyper_lr": (1e-7, 1e-5)},
}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def make_optimizer(name: str, model: nn.Module, hp: dict) -> torch.optim.Optimizer:
    """The optimizer for the hyper-parameters ``hp`` (``lr``; ``hyper_lr`` for FOP and HD)."""
    params = list(model.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(params, lr=hp["lr"])
    if name == "fop-sgd":
        return pycurv.optim.FOP(params, base=torch.optim.SGD, lr=hp["lr"], hyper_lr=hp["hyper_lr"], momentum=MOMENTUM)
    if name == "fop-adam":
        return pycurv.optim.FOP(params, base=torch.optim.Adam, lr=hp["lr"], hyper_lr=hp["hyper_lr"])
    if name == "hd-sgd":
        return pycurv.optim.HD(params, base="sgd", lr=hp["lr"], hyper_lr=hp["hyper_lr"], momentum=MOMENTUM)
    if name == "hd-adam":
        return pycurv.optim.HD(params, base="adam", lr=hp["lr"], hyper_lr=hp["hyper_lr"])
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def learned_preconditioners(model: nn.Module, opt) -> dict:
    """What a FOP run learned: the first convolution's ``P = M M^T`` and ``M`` (lists of rows) with the eigenvalues
    of ``P``, and for every preconditioned weight ``k`` and ``||P - I||_F / ||I||_F``."""
    pre = opt.preconditioners(model.named_parameters())
    out = {"layers": {}}
    for name, e in pre.items():
        p = e["P"].double().cpu()
        k = p.shape[0]
        dev = (p - torch.eye(k, dtype=p.dtype)).norm() / math.sqrt(k)
        out["layers"][name] = {"k": k, "rel_dev_from_identity": dev.item()}
    if FIRST_CONV in pre:
        p = pre[FIRST_CONV]["P"].double().cpu()
        out["first_conv"] = {
            "name": FIRST_CONV,
            "P": p.tolist(),
            "M": pre[FIRST_CONV]["M"].double().cpu().tolist(),
            "P_eigenvalues": torch.linalg.eigvalsh(p).tolist(),
        }
    return out


def train(opt_name, hp, seed, epochs, train_set, eval_set, device, evals_per_epoch, keep_preconditioner=False) -> dict:
    """One run, evaluated ``evals_per_epoch`` times per epoch (and once before training). Per evaluation point:
    ``epoch`` (fractional: steps / steps per epoch), mean training loss since the previous point, evaluation loss
    and accuracy, cumulative training seconds (HD: also its learning rate, ``lr``). Stops early, marked
    ``diverged``, when a training loss is not finite or FOP reports a blown-up factor. With ``keep_preconditioner``
    a FOP run stores what it learned (:func:`learned_preconditioners`) under ``preconditioner``."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    opt = make_optimizer(opt_name, model, hp)
    is_hd = opt_name.startswith("hd-")
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
    if is_hd:
        run["lr"] = [opt.param_groups[0]["lr"]]
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
            try:
                opt.step()
            except FloatingPointError as exc:
                # FOP refuses a factor that blew up (or a non-finite gradient): the run has diverged.
                run["diverged"], run["error"] = True, str(exc)[:300]
                run["train_seconds"] = elapsed + time.perf_counter() - t0
                return run
            losses.append(loss.detach())
            if i + 1 not in marks:
                continue
            sync(device)
            elapsed += time.perf_counter() - t0
            if not record_point(run, losses, elapsed, n_batches, model, eval_set):
                return run
            if is_hd:
                run["lr"].append(opt.param_groups[0]["lr"])
            sync(device)
            t0 = time.perf_counter()
    run["train_seconds"] = elapsed
    if keep_preconditioner and opt_name.startswith("fop-"):
        run["preconditioner"] = learned_preconditioners(model, opt)
    return run


def warm_up(opt_name: str, hp: dict, data: dict, device: torch.device) -> None:
    """One untimed epoch, so that lazy imports and first-call setup are not charged to the first measured run."""
    train(opt_name, hp, 0, 1, data["tune_train"], data["val"], device, 1)


def tune(opt_name, grid, fixed, epochs, data, device, evals_per_epoch, log) -> tuple[dict, list[dict]]:
    """Best hyper-parameters of ``grid`` (each combined with ``fixed``) on the validation split, and every
    candidate's outcome (the rule of ``bench/convergence_kfac.py``, :func:`select_best`)."""
    return select_best(
        f"{opt_name:8s}",
        [dict(fixed, **point) for point in configs(grid)],
        lambda hp: train(opt_name, hp, 0, epochs, data["tune_train"], data["val"], device, evals_per_epoch),
        evals_per_epoch,
        log,
    )


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r["diverged"]]
    acc = _stats([r["eval_acc"][-1] for r in ok])
    loss = _stats([r["train_loss"][-1] for r in ok])
    test_loss = _stats([r["eval_loss"][-1] for r in ok])
    steps = sum(r["steps"] for r in runs)
    out = {
        "final_test_acc_mean": acc["mean"],
        "final_test_acc_std": acc["std"],
        "final_test_acc_min": acc["min"],
        "final_test_acc_max": acc["max"],
        "final_train_loss_mean": loss["mean"],
        "final_train_loss_min": loss["min"],
        "final_train_loss_max": loss["max"],
        "final_test_loss_mean": test_loss["mean"],
        "best_test_acc_mean": statistics.fmean(max(r["eval_acc"]) for r in runs),
        "seeds": len(runs),
        "seeds_diverged": len(runs) - len(ok),
        "ms_per_step": 1e3 * sum(r["train_seconds"] for r in runs) / steps if steps else None,
    }
    if runs and "lr" in runs[0]:
        out["final_lr"] = [r["lr"][-1] for r in runs]
    return out


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def format_table(entries: list[dict]) -> str:
    head = [
        "optimizer",
        "tuned",
        "test acc % (final, mean ± std)",
        "min - max",
        "train loss (final, mean)",
        "min - max",
        "seeds",
        "ms/step",
    ]
    body = []
    for e in entries:
        s = e["summary"]
        seeds = f"{s['seeds']}" + (f" ({s['seeds_diverged']} diverged)" if s["seeds_diverged"] else "")
        body.append(
            [
                e["optimizer"],
                hp_text(e["hparams"]),
                acc_text(s),
                f"{pct(s['final_test_acc_min'])} - {pct(s['final_test_acc_max'])}",
                _g(s["final_train_loss_mean"]),
                f"{_g(s['final_train_loss_min'])} - {_g(s['final_train_loss_max'])}",
                seeds,
                "-" if s["ms_per_step"] is None else f"{s['ms_per_step']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)])


def best_fop(entries: list[dict]) -> dict | None:
    """The FOP entry whose seed-0 run ends with the highest test accuracy (ties: lower final training loss), with
    what that run learned: ``{"optimizer", "hparams", "final_test_acc", **first_conv}``; None without a FOP run that
    finished."""
    cands = []
    for e in entries:
        r = e["runs"][0] if e["runs"] else None
        if not (e["optimizer"].startswith("fop-") and r and not r["diverged"]):
            continue
        if "first_conv" in r.get("preconditioner", {}):
            cands.append((r["eval_acc"][-1], -r["train_loss"][-1], e, r))
    if not cands:
        return None
    acc, _, e, r = max(cands, key=lambda c: (c[0], c[1]))
    pre = r["preconditioner"]
    return {
        "optimizer": e["optimizer"],
        "hparams": e["hparams"],
        "seed": 0,
        "final_test_acc": acc,
        "rel_dev_from_identity": pre["layers"][FIRST_CONV]["rel_dev_from_identity"],
        **pre["first_conv"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-point grids, 4 epochs, 2 seeds (under a minute)")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        help=f"default: {' '.join(OPTIMIZERS)} (FOP and HD tune their base's lr first, with or without its final runs)",
    )
    add_run_args(parser, "fop", 4, 2, 1)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    optimizers = args.optimizers or list(OPTIMIZERS)
    epochs = args.epochs or (4 if args.quick else 25)
    tune_epochs = args.tune_epochs or (2 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    grids = QUICK_GRIDS if args.quick else GRIDS
    if args.evals_per_epoch < 1:
        parser.error("--evals-per-epoch must be >= 1")

    started = datetime.datetime.now()
    data = load_data(device)
    dev = device_info(device)
    out = results_path("fop", args.out, dev, device, args.quick, started)

    def log(msg):
        print(msg, flush=True)

    # the bases first: FOP and HD run with their base's tuned learning rate
    bases = [o for o in ("sgd", "adam") if o in optimizers or any(BASE_OF.get(p) == o for p in optimizers)]
    order = bases + [o for o in optimizers if o not in bases]
    tuned: dict[str, dict] = {}
    base_tuning: dict[str, list] = {}
    entries = []
    t_start = time.perf_counter()
    for opt_name in order:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fixed = {} if opt_name not in BASE_OF else {"lr": tuned[BASE_OF[opt_name]]["lr"]}
            warm_up(opt_name, dict(fixed, **configs(grids[opt_name])[0]), data, device)
            hp, trials = tune(opt_name, grids[opt_name], fixed, tune_epochs, data, device, args.evals_per_epoch, log)
            tuned[opt_name] = hp
            if opt_name not in optimizers:  # a base tuned only for FOP / HD
                base_tuning[opt_name] = trials
                continue
            runs = [
                train(
                    opt_name,
                    hp,
                    seed,
                    epochs,
                    data["train"],
                    data["test"],
                    device,
                    args.evals_per_epoch,
                    keep_preconditioner=seed == 0,
                )
                for seed in range(seeds)
            ]
            entry = {"model": MODEL, "optimizer": opt_name, "hparams": hp, "tuning": trials, "runs": runs}
            entry["summary"] = s = summarise(runs)
            log(
                f"{opt_name:8s} {hp_text(hp)}: test acc {acc_text(s)} %, final train loss "
                f"{_g(s['final_train_loss_mean'])}, "
                + ("-" if s["ms_per_step"] is None else f"{s['ms_per_step']:.2f}")
                + " ms/step"
            )
        entry["warnings"] = count_warnings(caught)
        entries.append(entry)
    entries.sort(key=lambda e: OPTIMIZERS.index(e["optimizer"]))
    runtime = time.perf_counter() - t_start
    dev["load_average_at_end"] = list(os.getloadavg())

    result = {
        **result_header(
            "convergence-fop", "bench/convergence_fop.py", started, runtime, argv, dev, args.quick, data
        ),
        "protocol": {
            "model": MODEL_TEXT,
            "loss": "F.cross_entropy, reduction='mean'",
            "batch_size": BATCH_SIZE,
            "drop_last": True,
            "epochs": epochs,
            "tune_epochs": tune_epochs,
            "seeds": seeds,
            "evals_per_epoch": args.evals_per_epoch,
            "optimizers": {
                "sgd": f"torch.optim.SGD, momentum {MOMENTUM}",
                "adam": "torch.optim.Adam (default betas, eps)",
                "fop-sgd": f"pycurv.optim.FOP(base=torch.optim.SGD, momentum={MOMENTUM}), lr = sgd's tuned lr, "
                "defaults otherwise (max_norm 1e3, on_blowup='raise')",
                "fop-adam": "pycurv.optim.FOP(base=torch.optim.Adam), lr = adam's tuned lr, defaults otherwise",
                "hd-sgd": f"pycurv.optim.HD(base='sgd', momentum={MOMENTUM}), initial lr = sgd's tuned lr",
                "hd-adam": "pycurv.optim.HD(base='adam'), initial lr = adam's tuned lr",
            },
            "tuning": "sgd and adam tune lr; FOP and HD tune hyper_lr with lr fixed to their base's tuned lr. Each "
            "grid point trains on train minus validation with seed 0 for tune_epochs; the highest validation "
            "accuracy averaged over the last epoch's evaluation points wins (ties: lower validation loss, averaged "
            "the same way); non-finite runs and blown-up FOP factors score nothing",
            "grids": {o: {k: list(v) for k, v in grids[o].items()} for o in order},
            "preconditioner": "seed 0 of each FOP optimizer: the first convolution's P = M M^T (9x9, taps in "
            "row-major 3x3 order), M and the eigenvalues of P after the last step; per preconditioned weight k and "
            "||P - I||_F / sqrt(k)",
            "timing": "training loop only (forward, backward, optimizer step), CUDA synchronised at every pause; "
            "evaluation excluded; runs[i].seconds[k] = cumulative training seconds at evaluation point k, "
            "runs[i].epoch[k] = steps done / steps per epoch",
        },
        "base_tuning": base_tuning,
        "entries": entries,
        "learned_P_best": best_fop(entries),
    }
    best = result["learned_P_best"]
    notes = []
    if best is not None:
        eig = best["P_eigenvalues"]
        notes.append(
            f"learned P of the first convolution ({best['optimizer']}, seed 0): eigenvalues {min(eig):.3g} - "
            f"{max(eig):.3g}, ||P - I||_F / 3 = {best['rel_dev_from_identity']:.3g}"
        )
    save_and_report(result, out, format_table(entries), args.no_plot, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
