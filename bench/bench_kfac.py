"""Micro-benchmarks of the K-FAC op family, and a whole K-FAC step against an Adam step.

Every measurement runs on the same inputs, in the same process, as its pure-PyTorch baselines:

- ``kfac_factor_update``: ``pycurv.ops.kfac_factor_update`` (each backend) against the plain running average
  ``factor.mul_(decay).add_(xb^T xb / R, alpha=1 - decay)`` built two ways: ``cat_ones`` (concatenate the ones
  column, one matmul) and ``colsum`` (``x^T x`` and the column sums assembled around it); both symmetrise.
- ``damped_inverse``: ``pycurv.ops.damped_inverse`` on a ``(B, d, d)`` stack (each method x backend) against
  (a) a Python loop over the layers of ``torch.linalg.cholesky`` + ``torch.cholesky_inverse``, and the other plain
  candidates for (b): a loop of ``torch.linalg.inv``, and one batched ``torch.linalg`` call of either kind.
- ``kron_precondition`` / ``kron_precondition_eigen``: the fused ops against two (four) matmuls per layer, in a
  Python loop over the layers or as batched ``bmm``.
- ``kfac_step``: ``pycurv.optim.KFAC`` in front of SGD against an Adam step (a plain SGD step for scale) on a small
  ResNet-style CNN and a transformer MLP stack; forward, backward and step in every one, ten steps per timed call so
  that one inverse update (``inv_update_steps=10``) is amortised over them.

Run through ``bench/run.py``; ``pytest`` alone does not collect this file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    DEVICE,
    GPU,
    QUICK,
    _SyncEveryRound,
    grid_key,
    peak_extra_memory,
    sync,
    time_call,
    timed_backends,
)
from torch import nn

import pycurv
from pycurv import reference

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
COMPILE = GPU and os.environ.get("PYCURV_BENCH_COMPILE", "1") != "0"
DECAY = 0.95
STEPS_PER_CALL = 10
INVERSE_METHODS = ("cholesky", "eigh", "newton_schulz")

# factor update: (B, R, d_x) with a bias column, B = 1 being one (d, d) factor
FACTOR_SHAPES = {
    "gpu": [(1, 2048, 256), (1, 4096, 512), (1, 16384, 1024), (8, 4096, 256)],
    "cpu": [(1, 2048, 256), (1, 4096, 512), (8, 2048, 256)],
    "quick": [(1, 1024, 256), (8, 512, 128)],
}
# damped inverse: (B, d)
INVERSE_SHAPES = {
    "gpu": [(b, d) for b in (32, 64) for d in (64, 128, 256, 512)],
    "cpu": [(b, d) for b in (32, 64) for d in (64, 128, 256)],
    "quick": [(32, 64)],
}
# preconditioning: (B, d_out, d_in); B = 1 is one layer (2-d inputs), B = 8 eight same-shape layers
KRON_SHAPES = {
    "gpu": [(b, do, di) for (do, di) in ((1024, 1024), (4096, 1024)) for b in (1, 8)],
    "cpu": [(b, do, di) for (do, di) in ((512, 512), (1024, 256)) for b in (1, 8)],
    "quick": [(1, 256, 256), (8, 128, 128)],
}
# whole step: model name -> constructor arguments
STEP_MODELS = {
    "gpu": {"resnet_cnn": dict(n=64, hw=32, width=32), "mlp_stack": dict(n=16, t=128, d=512, hidden=2048, blocks=4)},
    "cpu": {"resnet_cnn": dict(n=32, hw=16, width=16), "mlp_stack": dict(n=4, t=32, d=256, hidden=1024, blocks=2)},
    "quick": {"resnet_cnn": dict(n=8, hw=8, width=8), "mlp_stack": dict(n=2, t=16, d=128, hidden=512, blocks=2)},
}



def _dtypes(first_shape: bool) -> list[torch.dtype]:
    """float32 everywhere; bfloat16 on every GPU shape and on the first CPU shape."""
    return [torch.float32, torch.bfloat16] if (GPU or first_shape) else [torch.float32]



def _inverse_backends(method: str) -> list[str]:
    """The "torch" backend of a method that a compiled backend implements here is one batched torch.linalg call,
    which the batched baselines already time: it is left out."""
    have = timed_backends("damped_inverse", method)
    return have if have == ["torch"] else [b for b in have if b != "torch"]


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    impl: str  # "pycurv:<backend>[:<method>]", "a:<name>", "b:<name>", "b+compile"

    @property
    def shape_id(self) -> str:
        if self.op == "kfac_step":
            return self.shape[0]
        if self.op == "kfac_factor_update":
            b, r, d_x = self.shape
            return f"B{b}xR{r}xd{d_x}+1"
        if self.op == "damped_inverse":
            return f"B{self.shape[0]}xd{self.shape[1]}"
        return "B{}x{}x{}".format(*self.shape)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape_id}-{DTYPE_NAMES[self.dtype]}-{self.impl}"


def _cases() -> list[Case]:
    key = grid_key()
    cases = []
    for i, shape in enumerate(FACTOR_SHAPES[key]):
        for dtype in _dtypes(i == 0):
            impls = [f"pycurv:{b}" for b in timed_backends("kfac_factor_update")] + ["b:cat_ones", "b:colsum"]
            impls += ["b+compile"] if COMPILE else []
            cases += [Case("kfac_factor_update", shape, dtype, impl) for impl in impls]
    for shape in INVERSE_SHAPES[key]:
        impls = [f"pycurv:{b}:{m}" for m in INVERSE_METHODS for b in _inverse_backends(m)]
        impls += ["a:loop_cholesky", "b:loop_inv", "b:batched_cholesky", "b:batched_inv"]
        cases += [Case("damped_inverse", shape, torch.float32, impl) for impl in impls]
    for op in ("kron_precondition", "kron_precondition_eigen"):
        for shape in KRON_SHAPES[key]:
            impls = [f"pycurv:{b}" for b in timed_backends(op)] + ["b:matmul_loop"]
            impls += ["b:bmm"] if shape[0] > 1 else []
            impls += ["b+compile"] if COMPILE else []
            cases += [Case(op, shape, torch.float32, impl) for impl in impls]
    for name in STEP_MODELS[key]:
        impls = ["pycurv:kfac-eigen+sgd", "pycurv:kfac-inverse+sgd", "b:adam", "b:sgd"]
        cases += [Case("kfac_step", (name,), torch.float32, impl) for impl in impls]
    return cases


CASES = {c.id: c for c in _cases()}


# ---------------------------------------------------------------------------------------------------------------
# inputs, shared by every implementation of one case (op, shape, dtype)


class _Inputs:
    key: tuple | None = None
    data: dict = {}
    ref: torch.Tensor | None = None


def _gen() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


def _spd_stack(b: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """SPD matrices like K-FAC factors: a Gram of d random rows (eigenvalues in [0, 4]) plus 0.01 I, so the
    condition number stays below about 400. Drawn on the CPU, multiplied on the device."""
    x = torch.randn(b, d, d, generator=gen).to(DEVICE)
    return x @ x.mT / d + 1e-2 * torch.eye(d, device=DEVICE)


def _inputs(case: Case) -> dict:
    key = (case.op, case.shape, case.dtype)
    if _Inputs.key == key:
        return _Inputs.data
    _Inputs.key, _Inputs.data, _Inputs.ref = None, {}, None
    gen = _gen()
    if case.op == "kfac_factor_update":
        b, r, d_x = case.shape
        x = torch.randn(b, r, d_x, generator=gen).to(device=DEVICE, dtype=case.dtype)
        factor = reference.kfac_factor(x.float(), True).to(DEVICE)  # (B, d, d): a steady running average
        data = {"x": x if b > 1 else x[0], "factor": factor if b > 1 else factor[0]}
    elif case.op == "damped_inverse":
        b, d = case.shape
        m = _spd_stack(b, d, gen)
        damping = 1e-3 * m.diagonal(dim1=1, dim2=2).mean(1).double()
        data = {"m": m, "damping": damping}
    elif case.op in ("kron_precondition", "kron_precondition_eigen"):
        b, d_out, d_in = case.shape
        grad = torch.randn(b, d_out, d_in, generator=gen).to(DEVICE)
        g, a = _spd_stack(b, d_out, gen), _spd_stack(b, d_in, gen)
        if case.op == "kron_precondition":
            mats = {"g_inv": torch.linalg.inv(g), "a_inv": torch.linalg.inv(a)}
        else:
            d_g, q_g = torch.linalg.eigh(g)
            d_a, q_a = torch.linalg.eigh(a)
            mats = {"q_g": q_g, "q_a": q_a, "d_g": d_g, "d_a": d_a, "damping": 1e-3}
        unbatch = b == 1
        data = {"grad": grad[0] if unbatch else grad}
        data.update({k: (v[0] if unbatch and isinstance(v, torch.Tensor) else v) for k, v in mats.items()})
    else:
        data = {}
    _Inputs.key, _Inputs.data = key, data
    return data


def _reference(case: Case, data: dict) -> torch.Tensor | None:
    """The pycurv.reference result of the case's inputs (computed once per case), or None (whole steps)."""
    if _Inputs.ref is None:
        if case.op == "kfac_factor_update":
            f = data["factor"].clone()
            x = data["x"]
            reference.kfac_factor_update(f if f.dim() == 3 else f[None], x if x.dim() == 3 else x[None], DECAY, True)
            _Inputs.ref = f
        elif case.op == "damped_inverse":
            _Inputs.ref = reference.damped_inverse(data["m"], data["damping"], "cholesky")[0]
        elif case.op == "kron_precondition":
            _Inputs.ref = reference.kron_precondition(data["grad"], data["g_inv"], data["a_inv"])
        elif case.op == "kron_precondition_eigen":
            d = data
            _Inputs.ref = reference.kron_precondition_eigen(d["grad"], d["q_g"], d["q_a"], d["d_g"], d["d_a"], 1e-3)
    return _Inputs.ref


def _rel_err(x: torch.Tensor, ref: torch.Tensor | None) -> float | None:
    if ref is None:
        return None
    x64, r64 = x.detach().double(), ref.detach().double()
    if x64.shape != r64.shape or not torch.isfinite(x64).all():
        return float("inf")
    den = r64.norm().item()
    return (x64 - r64).norm().item() / den if den > 0 else (x64 - r64).norm().item()


# ---------------------------------------------------------------------------------------------------------------
# plain-PyTorch formulations


def _sym(f: torch.Tensor) -> torch.Tensor:
    return (f + f.mT) * 0.5


def factor_cat_ones(factor: torch.Tensor, x: torch.Tensor, decay: float) -> torch.Tensor:
    """``xb = [x, 1]``, one matmul in x's dtype, then float32: scale, symmetrise, running average."""
    xb = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)
    new = (xb.mT @ xb).float() / x.shape[-2]
    return factor.mul_(decay).add_(_sym(new), alpha=1 - decay)


def factor_colsum(factor: torch.Tensor, x: torch.Tensor, decay: float) -> torch.Tensor:
    """``x^T x`` and the column sums (the ones column's products) assembled into the factor, then as above."""
    r, d_x = x.shape[-2], x.shape[-1]
    xx = (x.mT @ x).float()
    s = x.sum(-2, dtype=torch.float32)
    new = torch.empty_like(factor)
    new[..., :d_x, :d_x] = xx
    new[..., :d_x, d_x] = s
    new[..., d_x, :d_x] = s
    new[..., d_x, d_x] = r
    return factor.mul_(decay).add_(_sym(new), alpha=(1 - decay) / r)


def _damped(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    return m + damping.to(m.dtype).reshape(-1, 1, 1) * torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def inverse_loop_cholesky(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    lam = damping.tolist()
    return torch.stack([torch.cholesky_inverse(torch.linalg.cholesky(m[i] + lam[i] * eye)) for i in range(len(lam))])


def inverse_loop_inv(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    lam = damping.tolist()
    return torch.stack([torch.linalg.inv(m[i] + lam[i] * eye) for i in range(len(lam))])


def inverse_batched_cholesky(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """``L^{-T} L^{-1}`` by one batched triangular solve: on the CPU, batched ``torch.cholesky_inverse`` is an order
    of magnitude slower than this (and than a loop of it), which would flatter every other row."""
    low = torch.linalg.cholesky(_damped(m, damping))
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(low)
    low_inv = torch.linalg.solve_triangular(low, eye, upper=False)
    return low_inv.mT @ low_inv


def inverse_batched_inv(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(_damped(m, damping))


def kron_matmul_loop(grad, g_inv, a_inv):
    if grad.dim() == 2:
        return g_inv @ grad @ a_inv
    return torch.stack([g_inv[i] @ grad[i] @ a_inv[i] for i in range(grad.shape[0])])


def kron_bmm(grad, g_inv, a_inv):
    return torch.bmm(torch.bmm(g_inv, grad), a_inv)


def _eigen_one(grad, q_g, q_a, d_g, d_a, damping):
    v = q_g.mT @ grad @ q_a
    v = v / (d_g.unsqueeze(-1) * d_a.unsqueeze(-2) + damping)
    return q_g @ v @ q_a.mT


def eigen_matmul_loop(grad, q_g, q_a, d_g, d_a, damping):
    if grad.dim() == 2:
        return _eigen_one(grad, q_g, q_a, d_g, d_a, damping)
    return torch.stack([_eigen_one(grad[i], q_g[i], q_a[i], d_g[i], d_a[i], damping) for i in range(grad.shape[0])])


def eigen_bmm(grad, q_g, q_a, d_g, d_a, damping):
    return _eigen_one(grad, q_g, q_a, d_g, d_a, damping)  # @ broadcasts over the batch as bmm


BASELINES = {
    ("kfac_factor_update", "cat_ones"): lambda d: (lambda: factor_cat_ones(d["factor"], d["x"], DECAY)),
    ("kfac_factor_update", "colsum"): lambda d: (lambda: factor_colsum(d["factor"], d["x"], DECAY)),
    ("damped_inverse", "loop_cholesky"): lambda d: (lambda: inverse_loop_cholesky(d["m"], d["damping"])),
    ("damped_inverse", "loop_inv"): lambda d: (lambda: inverse_loop_inv(d["m"], d["damping"])),
    ("damped_inverse", "batched_cholesky"): lambda d: (lambda: inverse_batched_cholesky(d["m"], d["damping"])),
    ("damped_inverse", "batched_inv"): lambda d: (lambda: inverse_batched_inv(d["m"], d["damping"])),
    ("kron_precondition", "matmul_loop"): lambda d: (lambda: kron_matmul_loop(d["grad"], d["g_inv"], d["a_inv"])),
    ("kron_precondition", "bmm"): lambda d: (lambda: kron_bmm(d["grad"], d["g_inv"], d["a_inv"])),
    ("kron_precondition_eigen", "matmul_loop"): lambda d: (
        lambda: eigen_matmul_loop(d["grad"], d["q_g"], d["q_a"], d["d_g"], d["d_a"], d["damping"])
    ),
    ("kron_precondition_eigen", "bmm"): lambda d: (
        lambda: eigen_bmm(d["grad"], d["q_g"], d["q_a"], d["d_g"], d["d_a"], d["damping"])
    ),
}
# the plain function each op's b+compile compiles, with the inputs it takes
COMPILED = {
    "kfac_factor_update": (factor_colsum, lambda d: (d["factor"], d["x"], DECAY), "colsum"),
    "kron_precondition": (kron_matmul_loop, lambda d: (d["grad"], d["g_inv"], d["a_inv"]), "matmul_loop"),
    "kron_precondition_eigen": (
        eigen_matmul_loop,
        lambda d: (d["grad"], d["q_g"], d["q_a"], d["d_g"], d["d_a"], d["damping"]),
        "matmul_loop",
    ),
}


def _pycurv_call(case: Case, d: dict, backend: str, method: str | None):
    o = pycurv.ops
    if case.op == "kfac_factor_update":
        return lambda: o.kfac_factor_update(d["factor"], d["x"], DECAY, True, backend=backend)
    if case.op == "damped_inverse":
        return lambda: o.damped_inverse(d["m"], d["damping"], method, backend=backend)
    if case.op == "kron_precondition":
        return lambda: o.kron_precondition(d["grad"], d["g_inv"], d["a_inv"], backend=backend)
    return lambda: o.kron_precondition_eigen(
        d["grad"], d["q_g"], d["q_a"], d["d_g"], d["d_a"], d["damping"], backend=backend
    )


# ---------------------------------------------------------------------------------------------------------------
# flop counts (2 per multiply-add; the same count on every row of one case, so TFLOP/s is an effective rate)


def flop_count(case: Case, step_flops: int | None = None) -> tuple[int, str]:
    if case.op == "kfac_factor_update":
        b, r, d_x = case.shape
        d = d_x + 1
        return b * r * d * (d + 1), "B*R*d*(d+1) (d = d_x + 1, one triangle of the symmetric Gram)"
    if case.op == "damped_inverse":
        b, d = case.shape
        return b * d**3, "B*d^3 (Cholesky d^3/3 + triangular inverse d^3/3 + product d^3/3)"
    if case.op in ("kron_precondition", "kron_precondition_eigen"):
        b, do, di = case.shape
        two = 2 * b * (do * do * di + do * di * di)
        if case.op == "kron_precondition":
            return two, "2*B*(d_out^2*d_in + d_out*d_in^2)"
        return 2 * two, "4*B*(d_out^2*d_in + d_out*d_in^2)"
    return step_flops * STEPS_PER_CALL, f"{STEPS_PER_CALL} steps x 3 x forward matmul/conv flops"


# ---------------------------------------------------------------------------------------------------------------
# whole step


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if (stride != 1 or c_in != c_out) else None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


class ResNetCNN(nn.Module):
    """A small ResNet: 3x3 stem, two residual stages (the second downsamples and doubles the width), pooled head.
    BatchNorm's affine parameters are not K-FAC layers: K-FAC leaves them to the optimizer."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.stage1 = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1))
        self.stage2 = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.stage2(self.stage1(x))
        return self.head(x.mean((2, 3)))


class MLPStack(nn.Module):
    """Transformer MLP blocks: ``x + W2 gelu(W1 LayerNorm(x))``, ``blocks`` times, on ``(N, T, d)``."""

    def __init__(self, d: int, hidden: int, blocks: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(d, hidden) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(hidden, d) for _ in range(blocks))

    def forward(self, x):
        for norm, up, down in zip(self.norms, self.up, self.down):
            x = x + down(torch.nn.functional.gelu(up(norm(x))))
        return x


def _step_problem(name: str):
    """(model, inputs, loss function) of a whole-step case; the model is built afresh for every implementation."""
    cfg = STEP_MODELS[grid_key()][name]
    torch.manual_seed(0)
    gen = _gen()
    if name == "resnet_cnn":
        model = ResNetCNN(cfg["width"])
        x = torch.randn(cfg["n"], 3, cfg["hw"], cfg["hw"], generator=gen)
        y = torch.randint(0, 10, (cfg["n"],), generator=gen)
        loss_fn = nn.functional.cross_entropy
    else:
        model = MLPStack(cfg["d"], cfg["hidden"], cfg["blocks"])
        x = torch.randn(cfg["n"], cfg["t"], cfg["d"], generator=gen)
        y = torch.randn(cfg["n"], cfg["t"], cfg["d"], generator=gen)
        loss_fn = nn.functional.mse_loss
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE), loss_fn, cfg


def _forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Matmul / convolution flops of one forward pass (2 per multiply-add), counted with forward hooks."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def _step_callable(impl: str, model, x, y, loss_fn):
    lr = 1e-3
    pre = None
    if impl.startswith("kfac-"):
        method = impl.split("-", 1)[1].split("+")[0]
        pre = pycurv.optim.KFAC(model, lr=lr, inv_update_steps=STEPS_PER_CALL, method=method)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif impl == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def steps():
        for _ in range(STEPS_PER_CALL):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if pre is not None:
                pre.step()
            opt.step()
        return loss.detach()

    return steps


def _time_slow(benchmark, fn, rounds: int = 2 if QUICK else 3) -> dict:
    """For calls of a second or more: one untimed call, then ``rounds`` timed ones, no calibration."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    benchmark.pedantic(_SyncEveryRound(fn, 1), rounds=rounds, iterations=1, warmup_rounds=0)
    return {"rounds": rounds, "calls_per_round": 1, "first_call_s": first}


# ---------------------------------------------------------------------------------------------------------------


def _make(case: Case, d: dict):
    """(callable to time, record fields) for ``case``; skips what cannot run here."""
    if case.op == "kfac_step":
        name = case.impl.split(":", 1)[1]
        if name.startswith("kfac-") and not hasattr(pycurv, "optim"):
            pytest.skip("pycurv.optim is not available: no K-FAC step to time")
        model, x, y, loss_fn, cfg = _step_problem(case.shape[0])
        # (b) is the Adam step; the plain SGD step is shown for scale but is no baseline
        kind = "pycurv" if case.impl.startswith("pycurv:") else ("baseline" if name == "adam" else "context")
        fn = _step_callable(name, model, x, y, loss_fn)
        return fn, {"kind": kind, "name": name, "model_config": cfg, "forward_flops": _forward_flops(model, x)}
    if case.impl.startswith("pycurv:"):
        parts = case.impl.split(":")
        backend, method = parts[1], (parts[2] if len(parts) > 2 else None)
        name = backend if method is None else f"{backend}/{method}"
        return _pycurv_call(case, d, backend, method), {"kind": "pycurv", "name": name}
    if case.impl.startswith(("a:", "b:")):
        role, name = case.impl.split(":", 1)
        return BASELINES[(case.op, name)](d), {"kind": "baseline-a" if role == "a" else "baseline", "name": name}
    if case.impl == "b+compile":
        fn, args_of, name = COMPILED[case.op]
        args = args_of(d)
        torch.compiler.reset()
        try:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            compiled(*args)
            sync()
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # the optional baseline: any compiler failure is a skip, not an error
            pytest.skip(f"torch.compile of baseline {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        record = {"kind": "baseline+compile", "name": f"{name}+compile", "compile_s": compile_s}
        return (lambda: compiled(*args)), record
    raise ValueError(f"unknown implementation {case.impl!r}")


def _dims(case: Case) -> dict:
    if case.op == "kfac_factor_update":
        b, r, d_x = case.shape
        return {"B": b, "R": r, "d_x": d_x, "bias": True, "decay": DECAY}
    if case.op == "damped_inverse":
        return {"B": case.shape[0], "d": case.shape[1]}
    if case.op == "kfac_step":
        return {"model": case.shape[0], "steps_per_call": STEPS_PER_CALL, "inv_update_steps": STEPS_PER_CALL}
    b, do, di = case.shape
    return {"B": b, "d_out": do, "d_in": di}


@pytest.mark.parametrize("case_id", list(CASES))
def test_kfac(benchmark, peaks, case_id):
    case = CASES[case_id]
    dtype_name = DTYPE_NAMES[case.dtype]
    d = _inputs(case)
    if case.op == "kfac_factor_update":
        # in place: each implementation updates its own copy, reset to the shared start before the checked call
        d = dict(d, factor=d["factor"].clone())
    fn, info = _make(case, d)
    benchmark.group = f"{case.op} {case.shape_id} {dtype_name}"

    if case.op == "kfac_step":
        loop = _time_slow(benchmark, fn) if not GPU else time_call(benchmark, fn)
        mem, out = peak_extra_memory(fn)
        err = None if torch.isfinite(out).all() else float("inf")
        flops, formula = flop_count(case, 3 * info["forward_flops"])
    else:
        loop = time_call(benchmark, fn)
        if case.op == "kfac_factor_update":
            d["factor"].copy_(_inputs(case)["factor"])
        mem, out = peak_extra_memory(fn)
        err = _rel_err(out, _reference(case, _inputs(case)))
        flops, formula = flop_count(case)
    del out

    benchmark.extra_info.update(
        op=case.op,
        shape=case.shape_id,
        dims=_dims(case),
        N=None,
        T=None,
        d_in=None,
        d_out=None,
        dtype=dtype_name,
        impl=info["kind"],
        name=info["name"],
        flops=flops,
        flop_formula=formula,
        peak_tflops=peaks["tflops"].get(dtype_name),
        peak_extra_mem_bytes=mem,
        rel_err_vs_reference=err,
        **{k: v for k, v in info.items() if k not in ("kind", "name")},
        **loop,
    )
