"""Micro-benchmarks of a whole iEF step (Wu et al. 2024, arXiv 2406.06420; MATH.md section 3).

``ief_update``: the curvature part of one iEF step of a layer stack, from what one ordinary forward and backward pass
captured (every ``nn.Linear``'s input ``a: (N, T, d_in)`` and output gradient ``g: (N, T, d_out)``, the logits
``z: (N, T, C)`` and the targets ``y: (N, T)``; captured once with :class:`pycurv.capture.Capture` under a summed
cross-entropy, outside the timing) to every layer's update ``sum_n alpha_n G_n`` (weight and bias), with
``alpha = (J J^T + lambda I)^{-1} s`` and ``s_n = ||softmax(z_n) - e_{y_n}||^2`` summed over positions. Timed, on
the same inputs in the same process:

- ``pycurv:<backend>``: every layer's ``pycurv.ops.per_sample_gram`` accumulated into one ``(N, N)`` (``out=``),
  ``pycurv.ops.logit_grad_sqnorms``, ``pycurv.ops.ief_coefficients`` (float64 Cholesky, duplicate check) and every
  layer's ``pycurv.ops.weighted_grad_sum``, for each backend that ``available_backends`` lists for these ops (an op
  that lacks the backend runs on its own best one: the row's name then ends in ``*`` and ``op_backends`` says which);
- (a) ``torch.func``: per-sample gradients ``vmap(grad(loss_n))`` of every layer's weight and bias with
  ``loss_n(W, b) = sum_t <g[n,t], a[n,t] W^T + b>`` (as in ``bench/bench_per_sample.py``), concatenated into
  ``J: (N, P)``; ``s`` from ``vmap(grad)`` of the per-sample cross-entropy in the logits; ``J J^T``;
  ``torch.linalg.solve`` in float64; ``J^T alpha``;
- (b) plain PyTorch without the full ``J``: each layer's Gram by the ghost identity (``(A A^T + 1) * (B B^T)`` on the
  ``(N T, d)`` rows, summed over ``T x T`` blocks; ``ghost``), or in the per-layer cost-model variant by ``bmm``
  per-sample gradients of that one layer where ``pycurv.ops.choose_method`` would materialise (``cost_model``, only
  where it differs); ``s`` in closed form from ``softmax``; Cholesky and ``cholesky_solve`` in float64; every layer's
  update ``((g * alpha)^T a``, bias ``sum (g * alpha)``); on a GPU also ``torch.compile`` of the faster one.

``ief_step``: one whole training step (zero_grad, forward, cross-entropy with ``reduction="mean"``, backward,
[preconditioner], ``torch.optim.SGD`` step) with ``pycurv.optim.IEF`` / ``EF`` / ``SF`` against an Adam step (b) and
a plain SGD step shown for scale, on a digits-sized MLP, a wider MLP and a stack of Linear-only transformer MLP
blocks on ``(N, T, d)``.

Run through ``bench/run.py``; ``pytest`` alone does not collect this file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, GPU, grid_key, peak_extra_memory, sync, time_call, timed_backends
from torch import nn

import pycurv
from pycurv import reference
from pycurv.capture import Capture
from pycurv.ops import choose_method

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
COMPILE = GPU and os.environ.get("PYCURV_BENCH_COMPILE", "1") != "0"
# lambda of the update: the paper's range is 1e-12 to 1e-7 ("essentially none"); every implementation uses it.
DAMPING = 1e-7
# The ops of one update that have compiled kernels; ief_coefficients is torch.linalg on every backend.
UPDATE_OPS = ("per_sample_gram", "logit_grad_sqnorms", "weighted_grad_sum")
# Baseline (a) holds J (N x P values) and its per-layer pieces: skipped beyond this many bytes of J on the CPU.
CPU_FUNC_LIMIT_BYTES = 4 * 2**30
# Whole steps: the learning rate only keeps ten or so repeated steps on one batch finite; it does not change the work.
STEP_LR = 1e-5

# Problems: "mlp" = Linear(d_in, width), `depth - 1` x Linear(width, width), Linear(width, classes), ReLU between, on
# (N, d_in); "mlp_stack" = `blocks` x [x + down(gelu(up(layer_norm(x))))] then Linear(d, classes) on layer_norm(x),
# on (N, T, d), layer norms without parameters (every parameter belongs to a Linear).
PROBLEMS = {
    "gpu": {
        "mlp_digits": dict(kind="mlp", n=64, d_in=64, width=256, depth=2, classes=10),
        "mlp": dict(kind="mlp", n=256, d_in=2048, width=2048, depth=3, classes=10),
        "mlp_stack": dict(kind="stack", n=64, t=256, d=1024, hidden=4096, blocks=4, classes=1024),
    },
    "cpu": {
        "mlp_digits": dict(kind="mlp", n=64, d_in=64, width=256, depth=2, classes=10),
        "mlp": dict(kind="mlp", n=64, d_in=512, width=512, depth=3, classes=10),
        "mlp_stack": dict(kind="stack", n=8, t=128, d=512, hidden=2048, blocks=2, classes=512),
    },
    "quick": {
        "mlp_digits": dict(kind="mlp", n=64, d_in=64, width=256, depth=2, classes=10),
        "mlp": dict(kind="mlp", n=32, d_in=128, width=128, depth=3, classes=10),
        "mlp_stack": dict(kind="stack", n=4, t=32, d=128, hidden=512, blocks=2, classes=128),
    },
}
UPDATE_PROBLEMS = ("mlp", "mlp_stack")
STEP_IMPLS = ("pycurv:ief+sgd", "pycurv:ef+sgd", "pycurv:sf+sgd", "b:adam", "b:sgd")



def _dtypes() -> list[torch.dtype]:
    """float32; on a GPU also bfloat16 (inputs rounded from the float32 capture)."""
    return [torch.float32, torch.bfloat16] if GPU else [torch.float32]



def update_backends() -> list[str]:
    """Every backend that at least one op of the update has, in ``available_backends`` order."""
    names: list[str] = []
    for op in UPDATE_OPS:
        names += [b for b in timed_backends(op) if b not in names]
    return names


def op_backends(backend: str) -> dict[str, str]:
    """The backend each op of a ``pycurv:<backend>`` row runs on: ``backend`` where the op has it, else the op's
    best (what ``"auto"`` picks)."""
    return {op: backend if backend in timed_backends(op) else timed_backends(op)[0] for op in UPDATE_OPS}


def shape_label(name: str) -> str:
    c = PROBLEMS[grid_key()][name]
    if c["kind"] == "mlp":
        return f"{name}_N{c['n']}_{c['d_in']}-{c['width']}x{c['depth']}-{c['classes']}"
    return f"{name}_N{c['n']}_T{c['t']}_d{c['d']}_h{c['hidden']}x{c['blocks']}_C{c['classes']}"


@dataclass(frozen=True)
class Case:
    op: str  # "ief_update" | "ief_step"
    problem: str
    dtype: torch.dtype
    impl: str  # "pycurv:<backend>", "torch.func", "b:<name>", "b+compile"; ief_step: STEP_IMPLS

    @property
    def shape_id(self) -> str:
        return shape_label(self.problem)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape_id}-{DTYPE_NAMES[self.dtype]}-{self.impl}"


def _plain_candidates(problem: str) -> list[str]:
    """``ghost``, plus ``cost_model`` when ``choose_method`` materialises some layer of the problem."""
    layers = _layer_dims(problem)
    n, t = _nt(problem)
    differs = any(choose_method("gram", n, t, di, do) != "ghost" for di, do in layers)
    return ["ghost", "cost_model"] if differs else ["ghost"]


def _cases() -> list[Case]:
    key = grid_key()
    cases = []
    for problem in UPDATE_PROBLEMS:
        for dtype in _dtypes():
            impls = [f"pycurv:{b}" for b in update_backends()] + ["torch.func"]
            impls += [f"b:{name}" for name in _plain_candidates(problem)]
            impls += ["b+compile"] if COMPILE else []
            cases += [Case("ief_update", problem, dtype, impl) for impl in impls]
    for problem in PROBLEMS[key]:
        cases += [Case("ief_step", problem, torch.float32, impl) for impl in STEP_IMPLS]
    return cases


# ---------------------------------------------------------------------------------------------------------------
# models


class MLP(nn.Sequential):
    """``Linear(d_in, width)``, ``depth - 1`` hidden ``Linear(width, width)``, ``Linear(width, classes)``; ReLU."""

    def __init__(self, d_in: int, width: int, depth: int, classes: int):
        mods: list[nn.Module] = [nn.Linear(d_in, width)]
        for _ in range(depth - 1):
            mods += [nn.ReLU(), nn.Linear(width, width)]
        mods += [nn.ReLU(), nn.Linear(width, classes)]
        super().__init__(*mods)


class LinearMLPStack(nn.Module):
    """Transformer MLP blocks ``x + W2 gelu(W1 layer_norm(x))`` on ``(N, T, d)`` and a per-position classifier; the
    layer norms carry no parameters, so every parameter belongs to an ``nn.Linear`` that the iEF step handles."""

    def __init__(self, d: int, hidden: int, blocks: int, classes: int):
        super().__init__()
        self.up = nn.ModuleList(nn.Linear(d, hidden) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(hidden, d) for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        d = x.shape[-1]
        for up, down in zip(self.up, self.down):
            x = x + down(F.gelu(up(F.layer_norm(x, (d,)))))
        return self.head(F.layer_norm(x, (d,)))


def _layer_dims(problem: str) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every Linear of ``problem``, in forward order."""
    c = PROBLEMS[grid_key()][problem]
    if c["kind"] == "mlp":
        return [(c["d_in"], c["width"])] + [(c["width"], c["width"])] * (c["depth"] - 1) + [(c["width"], c["classes"])]
    return [(c["d"], c["hidden"]), (c["hidden"], c["d"])] * c["blocks"] + [(c["d"], c["classes"])]


def _nt(problem: str) -> tuple[int, int]:
    c = PROBLEMS[grid_key()][problem]
    return c["n"], (c["t"] if c["kind"] == "stack" else 1)


def _problem(problem: str):
    """(model, inputs, targets, config), built deterministically on the device."""
    c = PROBLEMS[grid_key()][problem]
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if c["kind"] == "mlp":
        model = MLP(c["d_in"], c["width"], c["depth"], c["classes"])
        x = torch.randn(c["n"], c["d_in"], generator=gen)
        y = torch.randint(0, c["classes"], (c["n"],), generator=gen)
    else:
        model = LinearMLPStack(c["d"], c["hidden"], c["blocks"], c["classes"])
        x = torch.randn(c["n"], c["t"], c["d"], generator=gen)
        y = torch.randint(0, c["classes"], (c["n"], c["t"]), generator=gen)
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE), c


def _flat_ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# ief_update: inputs (captured once per problem and dtype) and the float64 reference


class _Inputs:
    key: tuple | None = None
    data: dict = {}
    ref: list | None = None


def _inputs(case: Case) -> dict:
    """``{"layers": [(a, g)], "params": [(w, b)], "z": (N, T, C), "y": (N, T)}`` in the case's dtype; ``params`` are
    zero tensors of every layer's weight and bias shapes (baseline (a) differentiates in them)."""
    key = (case.problem, case.dtype)
    if _Inputs.key == key:
        return _Inputs.data
    _Inputs.key, _Inputs.data, _Inputs.ref = None, {}, None
    model, x, y, _ = _problem(case.problem)
    with Capture(model, loss_reduction="sum") as cap:
        logits = model(x)
        _flat_ce(logits, y, "sum").backward()
    got = list(cap.layers.values())
    dt = case.dtype
    layers = [(a.to(dt).contiguous(), g.to(dt).contiguous()) for _, a, g in got]
    params = [
        (torch.zeros_like(m.weight, dtype=dt), torch.zeros(m.weight.shape[0], dtype=dt, device=DEVICE))
        for m, _, _ in got
    ]
    z = logits.detach().to(dt)
    z, y = (z, y) if z.dim() == 3 else (z.unsqueeze(1), y.unsqueeze(1))
    cap.clear()
    del model, logits, got
    _Inputs.key, _Inputs.data = key, {"layers": layers, "params": params, "z": z.contiguous(), "y": y.contiguous()}
    return _Inputs.data


def _reference(d: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The update in float64 from the case's (rounded) inputs, by :mod:`pycurv.reference` and ``torch.linalg``."""
    if _Inputs.ref is None:
        n = d["z"].shape[0]
        k = torch.zeros(n, n, dtype=torch.float64, device=DEVICE)
        l64 = [(a.double(), g.double()) for a, g in d["layers"]]
        for a, g in l64:
            k += reference.per_sample_gram(a, g, True, choose_method("gram", n, a.shape[1], a.shape[2], g.shape[2]))
        s = reference.logit_grad_sqnorms(d["z"].double(), d["y"])
        alpha = torch.linalg.solve(k + DAMPING * torch.eye(n, dtype=torch.float64, device=DEVICE), s)
        out = []
        for a, g in l64:
            u = reference.weighted_grad_sum(a, g, alpha, True)
            out.append((u[:, :-1], u[:, -1]))
        _Inputs.ref = out
    return _Inputs.ref


def _flat(update: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for wb in update for t in wb])


def _rel_err(update, ref) -> float:
    x, r = _flat(update), _flat(ref)
    if x.shape != r.shape or not torch.isfinite(x).all():
        return float("inf")
    den = r.norm().item()
    return (x - r).norm().item() / den if den > 0 else (x - r).norm().item()


# ---------------------------------------------------------------------------------------------------------------
# ief_update implementations: each returns [(weight update (d_out, d_in), bias update (d_out,))] per layer


def pycurv_update(d: dict, backends: dict[str, str]):
    layers, z, y = d["layers"], d["z"], d["y"]
    n = z.shape[0]
    k = torch.zeros(n, n, dtype=reference.acc_dtype(z.dtype), device=z.device)
    for a, g in layers:
        pycurv.ops.per_sample_gram(a, g, True, out=k, backend=backends["per_sample_gram"])
    s = pycurv.ops.logit_grad_sqnorms(z, y, backend=backends["logit_grad_sqnorms"])
    alpha = pycurv.ops.ief_coefficients(k, s, DAMPING)
    out = []
    for a, g in layers:
        u = pycurv.ops.weighted_grad_sum(a, g, alpha, True, backend=backends["weighted_grad_sum"])
        out.append((u[:, :-1], u[:, -1]))
    return out


def _layer_loss(w: torch.Tensor, b: torch.Tensor, a_n: torch.Tensor, g_n: torch.Tensor) -> torch.Tensor:
    """``sum_t <g_n[t], a_n[t] W^T + b>``: its gradients are sample n's ``g_n^T a_n`` and ``sum_t g_n[t]``."""
    return (F.linear(a_n, w, b) * g_n).sum()


def _sample_ce(z_n: torch.Tensor, y_n: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z_n, y_n, reduction="sum")


_per_sample_grads = torch.func.vmap(torch.func.grad(_layer_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
_logit_grads = torch.func.vmap(torch.func.grad(_sample_ce))


def func_update(d: dict):
    layers, params, z, y = d["layers"], d["params"], d["z"], d["y"]
    n = z.shape[0]
    cols = []
    for (a, g), (w, b) in zip(layers, params):
        gw, gb = _per_sample_grads(w, b, a, g)
        cols += [gw.reshape(n, -1), gb]
    j = torch.cat(cols, 1)
    del cols
    s = _logit_grads(z.float(), y).reshape(n, -1).square().sum(1)
    k = (j @ j.T).double()
    alpha = torch.linalg.solve(k + DAMPING * torch.eye(n, dtype=torch.float64, device=z.device), s.double())
    u = alpha.to(j.dtype) @ j
    out, i = [], 0
    for w, b in params:
        out.append((u[i : i + w.numel()].view(w.shape), u[i + w.numel() : i + w.numel() + b.numel()]))
        i += w.numel() + b.numel()
    return out


def _gram_ghost(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum over T x T blocks of (A A^T + 1) * (B B^T)``: the ones column of the bias without materialising it."""
    n, t = a.shape[0], a.shape[1]
    af, gf = a.reshape(n * t, -1), g.reshape(n * t, -1)
    k = ((af @ af.T).float() + 1.0) * (gf @ gf.T).float()
    return k if t == 1 else k.view(n, t, n, t).sum((1, 3))


def _gram_bmm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = a.shape[0]
    jw = torch.bmm(g.mT, a).reshape(n, -1)
    jb = g.sum(1)
    return (jw @ jw.T).float() + (jb @ jb.T).float()


def plain_update(d: dict, methods: tuple[str, ...]):
    layers, z, y = d["layers"], d["z"], d["y"]
    n = z.shape[0]
    k = torch.zeros(n, n, dtype=torch.float32, device=z.device)
    for (a, g), method in zip(layers, methods):
        k += _gram_ghost(a, g) if method == "ghost" else _gram_bmm(a, g)
    p = torch.softmax(z.float(), -1)
    p_y = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    s = (p.square().sum(-1) - 2.0 * p_y + 1.0).sum(1)
    eye = torch.eye(n, dtype=torch.float64, device=z.device)
    low = torch.linalg.cholesky(k.double() + DAMPING * eye)
    alpha = torch.cholesky_solve(s.double().unsqueeze(1), low).squeeze(1)
    out = []
    for a, g in layers:
        ga = g * alpha.to(g.dtype).reshape(-1, 1, 1)
        w = ga.reshape(-1, ga.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        out.append((w, ga.sum((0, 1))))
    return out


def _plain_methods(case: Case, name: str) -> tuple[str, ...]:
    n, t = _nt(case.problem)
    if name == "ghost":
        return tuple("ghost" for _ in _layer_dims(case.problem))
    return tuple(choose_method("gram", n, t, di, do) for di, do in _layer_dims(case.problem))


# Median seconds of the eager (b) candidates measured so far, keyed by (problem, dtype): b+compile compiles the faster.
_EAGER_B: dict[tuple, dict[str, float]] = {}


# ---------------------------------------------------------------------------------------------------------------
# flop counts (2 per multiply-add; the same count on every row of one case, so TFLOP/s is an effective rate)


def update_flops(problem: str) -> tuple[int, str]:
    n, t = _nt(problem)
    total = 0
    for d_in, d_out in _layer_dims(problem):
        if choose_method("gram", n, t, d_in, d_out) == "ghost":
            total += n * (n + 1) * t * t * (d_in + d_out)
        else:
            total += 2 * n * t * d_in * d_out + n * (n + 1) * d_in * d_out
        total += 2 * n * t * d_in * d_out
    total += n**3 // 3
    formula = (
        "sum over layers of [gram + 2*N*T*d_in*d_out (weighted_grad_sum)] + N^3/3 (Cholesky), gram by "
        "choose_method: N*(N+1)*T^2*(d_in+d_out) (ghost) or 2*N*T*d_in*d_out + N*(N+1)*d_in*d_out (materialize), "
        "the symmetric Gram counted on and above its diagonal; "
        "bias columns and the softmax ignored"
    )
    return total, formula


def _forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Matmul flops of one forward pass (2 per multiply-add), counted with forward hooks."""
    total = [0]

    def hook(mod, inp, out):
        total[0] += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


# ---------------------------------------------------------------------------------------------------------------
# ief_step


def _step_callable(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One training step per call: zero_grad, forward, mean cross-entropy, backward, [preconditioner], step."""
    pre = None
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=STEP_LR)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=STEP_LR)
        if name == "ief+sgd":
            pre = pycurv.optim.IEF(model, damping=DAMPING)
        elif name == "ef+sgd":
            pre = pycurv.optim.EF(model, damping=DAMPING)
        elif name == "sf+sgd":
            pre = pycurv.optim.SF(model, damping=1e-3, generator=torch.Generator(device=DEVICE).manual_seed(0))
    retain = name == "sf+sgd"

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _flat_ce(model(x), y)
        loss.backward(retain_graph=retain)
        if pre is not None:
            pre.step(y)
        opt.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------------------------


def _make(case: Case, d: dict):
    """(callable to time, record fields) for an ``ief_update`` case; skips what cannot run here."""
    if case.impl.startswith("pycurv:"):
        backend = case.impl.split(":", 1)[1]
        chosen = op_backends(backend)
        name = backend if all(b == backend for b in chosen.values()) else f"{backend}*"
        return (lambda: pycurv_update(d, chosen)), {"kind": "pycurv", "name": name, "op_backends": chosen}
    if case.impl == "torch.func":
        n = d["z"].shape[0]
        p = sum(w.numel() + b.numel() for w, b in d["params"])
        j_bytes = n * p * d["layers"][0][0].element_size()
        if not GPU and j_bytes > CPU_FUNC_LIMIT_BYTES:
            pytest.skip(f"baseline (a) skipped on CPU: J needs {j_bytes / 2**30:.1f} GiB")
        if GPU:
            free, _ = torch.cuda.mem_get_info(DEVICE)
            if 3 * j_bytes > free:
                pytest.skip(f"baseline (a) skipped: J needs {j_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return (lambda: func_update(d)), {"kind": "torch.func", "name": "vmap(grad)", "J_bytes": j_bytes}
    if case.impl.startswith("b:"):
        name = case.impl.split(":", 1)[1]
        methods = _plain_methods(case, name)
        return (lambda: plain_update(d, methods)), {"kind": "baseline", "name": name, "gram_methods": list(methods)}
    if case.impl == "b+compile":
        measured = _EAGER_B.get((case.problem, case.dtype), {})
        name = min(measured, key=measured.get) if measured else _plain_candidates(case.problem)[-1]
        methods = _plain_methods(case, name)
        torch.compiler.reset()
        try:
            compiled = torch.compile(plain_update, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            compiled(d, methods)
            sync()
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # the optional baseline: any compiler failure is a skip, not an error
            pytest.skip(f"torch.compile of baseline {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        record = {"kind": "baseline+compile", "name": f"{name}+compile", "compile_s": compile_s}
        return (lambda: compiled(d, methods)), record
    raise ValueError(f"unknown implementation {case.impl!r}")


CASES = {c.id: c for c in _cases()}


@pytest.mark.parametrize("case_id", list(CASES))
def test_ief(benchmark, peaks, case_id):
    case = CASES[case_id]
    dtype_name = DTYPE_NAMES[case.dtype]
    benchmark.group = f"{case.op} {case.shape_id} {dtype_name}"
    n, t = _nt(case.problem)
    cfg = PROBLEMS[grid_key()][case.problem]

    if case.op == "ief_step":
        name = case.impl.split(":", 1)[1]
        model, x, y, _ = _problem(case.problem)
        kind = "pycurv" if case.impl.startswith("pycurv:") else ("baseline" if name == "adam" else "context")
        fn = _step_callable(name, model, x, y)
        fwd = _forward_flops(model, x)
        loop = time_call(benchmark, fn)
        mem, out = peak_extra_memory(fn)
        err = None if torch.isfinite(out).all() else float("inf")
        flops, formula = 3 * fwd, "3 x forward matmul flops (one step per call)"
        info = {"kind": kind, "name": name, "forward_flops": fwd}
    else:
        d = _inputs(case)
        fn, info = _make(case, d)
        loop = time_call(benchmark, fn)
        mem, out = peak_extra_memory(fn)
        err = _rel_err(out, _reference(d))
        flops, formula = update_flops(case.problem)
        if info["kind"] == "baseline":
            _EAGER_B.setdefault((case.problem, case.dtype), {})[info["name"]] = benchmark.stats.stats.median
    del out

    benchmark.extra_info.update(
        op=case.op,
        shape=case.shape_id,
        dims=dict(cfg, T=t, layers=[list(dims) for dims in _layer_dims(case.problem)], damping=DAMPING),
        N=n,
        T=t,
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
