"""iEF, EF and SF against SGD and Adam on scikit-learn's digits, with the approximation-quality indicator:
``python bench/convergence_ief.py [--quick]``.

In the spirit of the MLP experiment of Wu et al. 2024 (arXiv 2406.06420; MATH.md section 3), at a size two CPU
cores train in a few minutes. Data and model are those of ``bench/convergence_kfac.py``: ``load_digits`` (8x8
images, 10 classes), one fixed stratified 75/25 train/test split, pixels standardised with the training set's
statistics, a validation split (stratified 20 % of train) for tuning; the MLP 64-256-256-10 with ReLU; batch size 64,
the last partial batch dropped; cross-entropy with ``reduction="mean"``.

Optimizers: plain SGD and Adam; ``pycurv.optim.EF``, ``SF`` and ``IEF`` rewriting ``p.grad``, each followed by
``torch.optim.SGD`` without momentum or weight decay (the paper's setting). Hyper-parameters are tuned on a small
grid against the validation split (learning rate; with the damping for EF and SF; for iEF the learning rate over
the paper's range under a mean loss, the damping over its "essentially none" range 1e-12 to 1e-7): each candidate
trains on train minus validation with seed 0, and the highest validation accuracy averaged over the last epoch's
evaluation points wins (ties: lower validation loss; a run whose loss is not finite, or whose preconditioner fails,
scores nothing). The winner then trains on the whole training set with several seeds (initialisation, shuffling,
SF's label sampling), the test set evaluated after every epoch.

The indicator: every few steps of the final runs, the update the optimizer actually applied, ``Delta theta =
theta_before - theta_after`` (for EF / SF / iEF under plain SGD this is ``lr`` times the preconditioned ``p.grad``;
for Adam its normalised step; for SGD the gradient, so SGD's indicator is 1 by construction), is scored on the
current batch by ``pycurv.metrics.update_quality(model, F.cross_entropy, batch, Delta theta)``: ``gamma(Delta
theta) / gamma(grad L)`` with exact Fisher (GGN) products, below 1 closer to the natural gradient than SGD. It is
evaluated on a hook-free copy of the model at ``theta_before``, outside the timed loop.

Wall time is the training loop alone (forward, backward, preconditioner, optimizer step; CUDA synchronised at every
pause), not the evaluation or the indicator. Each run is deterministic for its seed on a fixed thread count. Nothing
is asserted: it reports what it measures. Writes ``bench/results/convergence-ief_<device-slug>_<YYYY-MM-DD>.json``
(``-quick`` added to the slug with ``--quick``) and a PNG beside it (``bench/plot_convergence.py``), prints a table,
and prints the results path as its last line.
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
    make_model,
    pct,
    record_point,
    result_header,
    results_path,
    save_and_report,
    select_best,
    sync,
)

import pycurv  # noqa: E402
from pycurv.metrics import update_quality  # noqa: E402

MODEL = "mlp"
OPTIMIZERS = ("sgd", "adam", "ef", "ef-small", "sf", "ief")
PRECONDITIONERS = {"ef": "EF", "ef-small": "EF", "sf": "SF", "ief": "IEF"}
BATCH_SIZE = 64
# Tuning grids (every combination is tried). Under a mean loss EF moves every sample's loss by about lr * N and SF
# moves the directions its N sampled gradients do not span by lr / damping, so both tune the two together; iEF's
# learning rates span the paper's 50-100 and its damping the paper's "essentially none". A large damping turns EF
# into scaled SGD, which the tuning of "ef" is free to pick; "ef-small" holds it at the paper's value instead.
GRIDS = {
    "sgd": {"lr": (0.01, 0.03, 0.1, 0.3)},
    "adam": {"lr": (3e-4, 1e-3, 3e-3, 1e-2)},
    "ef": {"lr": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "damping": (1e-7, 1e-5, 1e-3, 1e-1)},
    "ef-small": {"lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "damping": (1e-7,)},
    "sf": {"lr": (1e-4, 1e-3, 1e-2, 1e-1), "damping": (1e-3, 1e-2, 1e-1)},
    "ief": {"lr": (10.0, 25.0, 50.0, 100.0, 200.0), "damping": (1e-12, 1e-7)},
}
QUICK_GRIDS = {
    "sgd": {"lr": (0.03, 0.1)},
    "adam": {"lr": (1e-3, 3e-3)},
    "ef": {"lr": (1e-3, 3e-3), "damping": (1e-5,)},
    "ef-small": {"lr": (1e-3,), "damping": (1e-7,)},
    "sf": {"lr": (1e-3, 1e-2), "damping": (1e-2,)},
    "ief": {"lr": (25.0, 50.0), "damping": (1e-12,)},
}


def make_optimizer(name: str, model: nn.Module, hp: dict, seed: int):
    """``(optimizer, preconditioner or None)`` for the hyper-parameters ``hp`` (``lr``; ``damping`` for EF, SF, iEF).
    SF samples its labels from a generator seeded with ``seed``."""
    lr = hp["lr"]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr), None
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    if name in PRECONDITIONERS:
        cls = getattr(pycurv.optim, PRECONDITIONERS[name])
        kwargs = {}
        if name == "sf":
            device = next(model.parameters()).device
            kwargs["generator"] = torch.Generator(device=device).manual_seed(10_000 + seed)
        pre = cls(model, damping=hp["damping"], loss_reduction="mean", **kwargs)
        return torch.optim.SGD(model.parameters(), lr=lr), pre
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _failed_step(exc: Exception, loss: torch.Tensor) -> bool:
    """Whether ``exc`` from a preconditioner step means that the run diverged (non-finite statistics, a Gram that
    is not positive semi-definite, anything on a non-finite loss), not a defect."""
    if isinstance(exc, FloatingPointError) or not math.isfinite(loss.item()):
        return True
    return isinstance(exc, ValueError) and str(exc).startswith("ief_coefficients")


def train(opt_name, hp, seed, epochs, train_set, eval_set, device, evals_per_epoch, indicator_every=0) -> dict:
    """One run, evaluated ``evals_per_epoch`` times per epoch (and once before training). Per evaluation point:
    ``epoch`` (fractional: steps / steps per epoch), mean training loss since the previous point, evaluation loss
    and accuracy, cumulative training seconds. With ``indicator_every > 0``, every that many steps the indicator of
    the applied update on the current batch (``indicator``: ``step``, ``epoch``, ``ratio``, ``gamma_update``,
    ``gamma_grad``; None where it is not finite: an update orthogonal to the gradient, or non-finite values). Stops
    early, marked ``diverged``, when a training loss is not finite or the preconditioner fails."""
    torch.manual_seed(seed)
    model = make_model(MODEL).to(device)
    opt, pre = make_optimizer(opt_name, model, hp, seed)
    probe = make_model(MODEL).to(device) if indicator_every > 0 else None
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
        "indicator": {"step": [], "epoch": [], "ratio": [], "gamma_update": [], "gamma_grad": []},
    }
    ind = run["indicator"]
    retain = opt_name == "sf"
    elapsed, step = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(device)
        losses = []
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_batches):
            idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward(retain_graph=retain)
            if pre is not None:
                try:
                    pre.step(yb)
                except (FloatingPointError, ValueError, RuntimeError) as exc:
                    if not _failed_step(exc, loss):
                        raise
                    run["diverged"], run["error"] = True, str(exc)[:300]
                    run["train_seconds"] = elapsed + time.perf_counter() - t0
                    return run
            score = indicator_every > 0 and step % indicator_every == 0
            if score:
                sync(device)
                elapsed += time.perf_counter() - t0
                probe.load_state_dict(model.state_dict())
                sync(device)
                t0 = time.perf_counter()
            opt.step()
            step += 1
            losses.append(loss.detach())
            if score:
                sync(device)
                elapsed += time.perf_counter() - t0
                with torch.no_grad():
                    after = dict(model.named_parameters())
                    update = {n: p - after[n] for n, p in probe.named_parameters()}
                try:
                    ratio, parts = update_quality(probe, F.cross_entropy, (xb, yb), update, return_parts=True)
                except FloatingPointError:
                    ratio, parts = None, {}
                ind["step"].append(step - 1)
                ind["epoch"].append((step - 1) / n_batches)
                for key, v in (("ratio", ratio), *((k, parts.get(k)) for k in ("gamma_update", "gamma_grad"))):
                    ind[key].append(v if v is not None and math.isfinite(v) else None)
                sync(device)
                t0 = time.perf_counter()
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


def warm_up(opt_name: str, hp: dict, data: dict, device: torch.device) -> None:
    """A few untimed steps (and one indicator), so that lazy imports and first-call setup are not charged to the
    first measured run."""
    train(opt_name, hp, 0, 1, data["tune_train"], data["val"], device, 1, indicator_every=8)


def tune(opt_name, grid, epochs, data, device, evals_per_epoch, log) -> tuple[dict, list[dict]]:
    """Best hyper-parameters of ``grid`` on the validation split, and every candidate's outcome (the rule of
    ``bench/convergence_kfac.py``, :func:`select_best`)."""
    return select_best(
        f"{opt_name:8s}",
        configs(grid),
        lambda hp: train(opt_name, hp, 0, epochs, data["tune_train"], data["val"], device, evals_per_epoch),
        evals_per_epoch,
        log,
    )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(runs: list[dict]) -> dict:
    finals = [r["eval_acc"][-1] for r in runs if not r["diverged"]]
    ratios = [v for r in runs for v in r["indicator"]["ratio"] if v is not None]
    steps = sum(r["steps"] for r in runs)
    return {
        "final_test_acc_mean": statistics.fmean(finals) if finals else None,
        "final_test_acc_std": (statistics.stdev(finals) if len(finals) > 1 else 0.0) if finals else None,
        "final_test_acc_min": min(finals) if finals else None,
        "final_test_acc_max": max(finals) if finals else None,
        "best_test_acc_mean": statistics.fmean(max(r["eval_acc"]) for r in runs),
        "seeds": len(runs),
        "seeds_diverged": sum(r["diverged"] for r in runs),
        "indicator_points": len(ratios),
        "indicator_median": _quantile(ratios, 0.5),
        "indicator_q25": _quantile(ratios, 0.25),
        "indicator_q75": _quantile(ratios, 0.75),
        "ms_per_step": 1e3 * sum(r["train_seconds"] for r in runs) / steps if steps else None,
    }


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def format_table(entries: list[dict]) -> str:
    head = [
        "optimizer",
        "tuned",
        "test acc % (final, mean ± std)",
        "min - max",
        "seeds",
        "indicator median",
        "indicator q25 - q75",
        "ms/step",
    ]
    body = []
    for e in entries:
        s = e["summary"]
        acc = acc_text(s)
        seeds = f"{s['seeds']}" + (f" ({s['seeds_diverged']} diverged)" if s["seeds_diverged"] else "")
        body.append(
            [
                e["optimizer"],
                hp_text(e["hparams"]),
                acc,
                f"{pct(s['final_test_acc_min'])} - {pct(s['final_test_acc_max'])}",
                seeds,
                _g(s["indicator_median"]),
                f"{_g(s['indicator_q25'])} - {_g(s['indicator_q75'])}",
                "-" if s["ms_per_step"] is None else f"{s['ms_per_step']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, fewer epochs, 2 seeds (about a minute)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, help=f"default: {' '.join(OPTIMIZERS)}")
    add_run_args(parser, "ief", 4, 2, 1)
    parser.add_argument(
        "--indicator-every", type=int, help="steps between two indicator points in the final runs (default 5, quick 10)"
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    optimizers = args.optimizers or list(OPTIMIZERS)
    epochs = args.epochs or (4 if args.quick else 25)
    tune_epochs = args.tune_epochs or (2 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    every = args.indicator_every or (10 if args.quick else 5)
    grids = QUICK_GRIDS if args.quick else GRIDS
    if every < 1 or args.evals_per_epoch < 1:
        parser.error("--indicator-every and --evals-per-epoch must be >= 1")

    started = datetime.datetime.now()
    data = load_data(device)
    dev = device_info(device)
    out = results_path("ief", args.out, dev, device, args.quick, started)

    def log(msg):
        print(msg, flush=True)

    entries = []
    t_start = time.perf_counter()
    for opt_name in optimizers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warm_up(opt_name, configs(grids[opt_name])[0], data, device)
            hp, trials = tune(opt_name, grids[opt_name], tune_epochs, data, device, args.evals_per_epoch, log)
            runs = [
                train(opt_name, hp, seed, epochs, data["train"], data["test"], device, args.evals_per_epoch, every)
                for seed in range(seeds)
            ]
            entry = {"model": MODEL, "optimizer": opt_name, "hparams": hp, "tuning": trials, "runs": runs}
            entry["summary"] = s = summarise(runs)
            log(
                f"{opt_name:5s} {hp_text(hp)}: test acc "
                + acc_text(s)
                + f" %, indicator median {_g(s['indicator_median'])}, "
                + ("-" if s["ms_per_step"] is None else f"{s['ms_per_step']:.2f}")
                + " ms/step"
            )
        entry["warnings"] = count_warnings(caught)
        entries.append(entry)
    runtime = time.perf_counter() - t_start
    dev["load_average_at_end"] = list(os.getloadavg())

    result = {
        **result_header(
            "convergence-ief", "bench/convergence_ief.py", started, runtime, argv, dev, args.quick, data
        ),
        "protocol": {
            "model": "MLP 64-256-256-10, ReLU",
            "loss": "F.cross_entropy, reduction='mean'",
            "batch_size": BATCH_SIZE,
            "drop_last": True,
            "epochs": epochs,
            "tune_epochs": tune_epochs,
            "seeds": seeds,
            "evals_per_epoch": args.evals_per_epoch,
            "indicator_every": every,
            "optimizers": {
                "sgd": "torch.optim.SGD, no momentum",
                "adam": "torch.optim.Adam (default betas, eps)",
                "ef": "pycurv.optim.EF(damping, loss_reduction='mean') + torch.optim.SGD(lr), no momentum",
                "ef-small": "as ef with the damping held at the paper's 'essentially none' (1e-7); only lr tuned",
                "sf": "pycurv.optim.SF(damping, loss_reduction='mean', seeded generator) + torch.optim.SGD(lr), "
                "no momentum",
                "ief": "pycurv.optim.IEF(damping, loss_reduction='mean') + torch.optim.SGD(lr), no momentum",
            },
            "tuning": "each combination of the grid trains on train minus validation with seed 0 for tune_epochs; "
            "the highest validation accuracy averaged over the last epoch's evaluation points wins (ties: lower "
            "validation loss, averaged the same way); non-finite runs and failed preconditioner steps score nothing",
            "grids": {o: {k: list(v) for k, v in grids[o].items()} for o in optimizers},
            "indicator": "every indicator_every steps of the final runs (steps 0, k, 2k, ...): pycurv.metrics."
            "update_quality(model at theta_before, F.cross_entropy, current batch, theta_before - theta_after), "
            "i.e. gamma(update) / gamma(grad L) with exact GGN products; SGD's is 1 by construction",
            "timing": "training loop only (forward, backward, preconditioner, optimizer step), CUDA synchronised "
            "at every pause; evaluation and indicator excluded; runs[i].seconds[k] = cumulative training seconds at "
            "evaluation point k, runs[i].epoch[k] = steps done / steps per epoch",
        },
        "entries": entries,
    }
    save_and_report(result, out, format_table(entries), args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
