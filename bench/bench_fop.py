"""Micro-benchmarks of the FOP op family (Moskovitz et al. 2019, arXiv 1910.08461; MATH.md section 4), and a whole
FOP step against the bare base optimizer's step.

Every measurement runs on the same inputs, in the same process, as its pure-PyTorch baselines:

- ``fop_update``: ``pycurv.ops.fop_update`` (each backend) on ``B`` same-shape layers, ``M: (B, k, k)`` float32,
  gradients ``(B, r, k)``, against the plain ``C = G_prev^T G_cur; M += lr rho (C + C^T) M`` as one batched matmul
  chain (``bmm``) or a Python loop over the layers (``matmul_loop``); the faster is baseline (b).
- ``fop_precondition``: ``pycurv.ops.fop_precondition`` against ``G (M M^T)``, batched or per layer.
- ``fop_step``: one training step (zero_grad, forward, backward, step) with ``pycurv.optim.FOP`` in front of SGD
  (momentum 0.9) or Adam, against the bare SGD-momentum or Adam step (b), with ``pycurv.optim.HD`` (SGD-HD with
  momentum 0.9, Adam-HD) beside them, on the ResNet-style CNN and the transformer MLP stack of
  ``bench/bench_kfac.py``.

Layer shapes: a 3x3 convolution ``(c_out, c_in, 3, 3)`` has its factor on the ``k = 9`` spatial taps, shared by the
``r = c_out c_in`` channel pairs; a linear layer ``(d_out, d_in)`` on the input dimension, ``k = d_in``, ``r = d_out``.
Gradients in float32 (and bfloat16 on a GPU: the factor stays float32), the plain baselines' matmuls in the
gradients' dtype, everything after them in float32.

``fop_update`` works in place, and repeated calls multiply ``M`` by ``I + lr rho S`` each time: the timed calls
alternate between ``grad_cur`` and ``-grad_cur``, so that two calls make ``(I - c S)(I + c S) = I - c^2 S^2`` and
``M`` stays bounded over thousands of calls. ``rho`` is set per case so that ``c = lr rho = 0.02 / max |eig(S)|``:
one call changes ``M`` by up to 2 % of its norm, enough to compare the increment with the reference in float32.

Run through ``bench/run.py``; ``pytest`` alone does not collect this file.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest
import torch
from bench_kfac import STEP_MODELS, _forward_flops, _step_problem
from conftest import DEVICE, GPU, grid_key, peak_extra_memory, sync, time_call, timed_backends

import pycurv
from pycurv import reference

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
COMPILE = GPU and os.environ.get("PYCURV_BENCH_COMPILE", "1") != "0"
OPS = ("fop_update", "fop_precondition")
LR = 0.1
# lr * rho * max |eig(S)| of every fop_update case: the relative size of one update of M.
UPDATE_SCALE = 0.02
# Whole steps: the same lr for every optimizer; FOP's and HD's hyper-learning-rates are their defaults.
STEP_LR = 1e-3
STEP_BASES = ("sgd", "adam")

# (layer kind, B, d_out or c_out, d_in or c_in): conv3x3 -> r = c_out * c_in, k = 9; linear -> r = d_out, k = d_in
OP_SHAPES = {
    "gpu": [
        ("conv3x3", 8, 64, 64),
        ("conv3x3", 8, 256, 256),
        ("conv3x3", 8, 512, 512),
        ("linear", 1, 1024, 1024),
        ("linear", 4, 1024, 1024),
        ("linear", 1, 4096, 4096),
        ("linear", 4, 4096, 4096),
        ("linear", 1, 1024, 4096),
    ],
    "cpu": [
        ("conv3x3", 8, 64, 64),
        ("conv3x3", 8, 256, 256),
        ("linear", 1, 512, 512),
        ("linear", 4, 512, 512),
        ("linear", 1, 1024, 1024),
        ("linear", 4, 1024, 1024),
        ("linear", 1, 256, 1024),
    ],
    "quick": [("conv3x3", 8, 32, 32), ("linear", 1, 256, 256), ("linear", 4, 128, 128)],
}



def _dtypes() -> list[torch.dtype]:
    """float32; on a GPU also bfloat16 gradients."""
    return [torch.float32, torch.bfloat16] if GPU else [torch.float32]



def _rk(shape: tuple) -> tuple[int, int, int]:
    """``(B, r, k)`` of an op shape."""
    kind, b, d_out, d_in = shape
    return (b, d_out * d_in, 9) if kind == "conv3x3" else (b, d_out, d_in)


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple  # OP_SHAPES entry; fop_step: (model, base)
    dtype: torch.dtype
    # "pycurv:<backend>", "b:<name>", "b+compile"; fop_step: "pycurv:fop+<base>", "pycurv:hd-<base>", "b:<base>"
    impl: str

    @property
    def shape_id(self) -> str:
        if self.op == "fop_step":
            return "{}/{}".format(*self.shape)
        kind, b, d_out, d_in = self.shape
        return f"{kind}_B{b}_{d_out}x{d_in}"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape_id}-{DTYPE_NAMES[self.dtype]}-{self.impl}"


def _cases() -> list[Case]:
    key = grid_key()
    cases = []
    for op in OPS:
        for shape in OP_SHAPES[key]:
            for dtype in _dtypes():
                impls = [f"pycurv:{b}" for b in timed_backends(op)] + ["b:matmul_loop"]
                impls += ["b:bmm"] if shape[1] > 1 else []
                impls += ["b+compile"] if COMPILE else []
                cases += [Case(op, shape, dtype, impl) for impl in impls]
    for model in STEP_MODELS[key]:
        for base in STEP_BASES:
            impls = [f"pycurv:fop+{base}", f"pycurv:hd-{base}", f"b:{base}"]
            cases += [Case("fop_step", (model, base), torch.float32, impl) for impl in impls]
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


def _inputs(case: Case) -> dict:
    """Gradients of two consecutive steps (correlation 0.6, unit variance) and a factor ``M = I + 0.3 X / sqrt(k)``
    (``X`` standard normal: not symmetric, so a kernel that used ``M^T`` would show). Drawn on the CPU; B = 1 is
    one layer (2-d inputs)."""
    key = (case.op, case.shape, case.dtype)
    if _Inputs.key == key:
        return _Inputs.data
    _Inputs.key, _Inputs.data, _Inputs.ref = None, {}, None
    b, r, k = _rk(case.shape)
    gen = _gen()
    gp = torch.randn(b, r, k, generator=gen)
    m = torch.eye(k) + 0.3 * torch.randn(b, k, k, generator=gen) / math.sqrt(k)
    m = m.to(DEVICE)
    gp = gp.to(device=DEVICE, dtype=case.dtype)
    unbatch = b == 1
    if case.op == "fop_update":
        gc = 0.6 * gp.float() + 0.8 * torch.randn(b, r, k, generator=gen).to(DEVICE)
        gc = gc.to(case.dtype)
        c = gp.float().mT @ gc.float()
        top = torch.linalg.eigvalsh(c + c.mT).abs().max().item()
        del c
        hyper_lr = UPDATE_SCALE / (LR * top)
        data = {"m0": m, "gp": gp, "gcs": (gc, -gc), "hyper_lr": hyper_lr}
        if unbatch:
            data.update(m0=m[0], gp=gp[0], gcs=(gc[0], -gc[0]))
    else:
        data = {"m": m[0] if unbatch else m, "grad": gp[0] if unbatch else gp}
    _Inputs.key, _Inputs.data = key, data
    return data


def _reference(case: Case, d: dict) -> torch.Tensor:
    """The case's result by :mod:`pycurv.reference` in float64 from the same (rounded) inputs, computed once per
    case: ``fop_update``'s increment ``M_new - M`` of the first call (with ``+grad_cur``), ``fop_precondition``'s
    output."""
    if _Inputs.ref is None:
        if case.op == "fop_update":
            m0 = d["m0"].double()
            new = reference.fop_update(m0.clone(), d["gp"].double(), d["gcs"][0].double(), LR, d["hyper_lr"])
            _Inputs.ref = new - m0
        else:
            _Inputs.ref = reference.fop_precondition(d["m"].double(), d["grad"].double())
    return _Inputs.ref


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64, r64 = x.detach().double(), ref.detach().double()
    if x64.shape != r64.shape or not torch.isfinite(x64).all():
        return float("inf")
    den = r64.norm().item()
    return (x64 - r64).norm().item() / den if den > 0 else (x64 - r64).norm().item()


# ---------------------------------------------------------------------------------------------------------------
# plain-PyTorch formulations (matmuls in the gradients' dtype, the rest in float32)


def update_bmm(m: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor, c: float) -> torch.Tensor:
    """``C = G_prev^T G_cur``, ``M += c (C + C^T) M`` for one layer or a batch (``@`` batches as ``bmm``); the
    product with the old ``M`` is formed before ``M`` is written."""
    s = (gp.mT @ gc).to(m.dtype)
    return m.add_((s + s.mT) @ m, alpha=c)


def update_matmul_loop(m: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor, c: float) -> torch.Tensor:
    if m.dim() == 2:
        return update_bmm(m, gp, gc, c)
    for i in range(m.shape[0]):
        update_bmm(m[i], gp[i], gc[i], c)
    return m


def precondition_bmm(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``G (M M^T)``, one layer or batched; ``P`` rounded to the gradient's dtype for the matmul."""
    return grad @ (m @ m.mT).to(grad.dtype)


def precondition_matmul_loop(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if m.dim() == 2:
        return precondition_bmm(m, grad)
    return torch.stack([precondition_bmm(m[i], grad[i]) for i in range(m.shape[0])])


PLAIN = {
    ("fop_update", "bmm"): update_bmm,
    ("fop_update", "matmul_loop"): update_matmul_loop,
    ("fop_precondition", "bmm"): precondition_bmm,
    ("fop_precondition", "matmul_loop"): precondition_matmul_loop,
}


class _Alternating:
    """The timed ``fop_update`` callable: ``fn(grad_cur)`` with ``+grad_cur`` and ``-grad_cur`` in turn, so that two
    calls multiply ``M`` by ``I - c^2 S^2`` and repeated calls leave it bounded. ``reset()`` makes the next call the
    ``+grad_cur`` one."""

    def __init__(self, fn, gcs: tuple[torch.Tensor, torch.Tensor]):
        self.fn, self.gcs, self.sign = fn, gcs, 0

    def __call__(self):
        out = self.fn(self.gcs[self.sign])
        self.sign ^= 1
        return out

    def reset(self) -> None:
        self.sign = 0


def _op_callable(case: Case, d: dict, impl):
    """The case's callable (an :class:`_Alternating` for ``fop_update``) from ``impl(m, gp, gc, c)`` or
    ``impl(m, grad)``."""
    if case.op == "fop_update":
        m, gp, c = d["m"], d["gp"], LR * d["hyper_lr"]
        return _Alternating(lambda gc: impl(m, gp, gc, c), d["gcs"])
    return lambda: impl(d["m"], d["grad"])


def _pycurv_impl(case: Case, backend: str, hyper_lr: float | None):
    if case.op == "fop_update":
        return lambda m, gp, gc, c: pycurv.ops.fop_update(m, gp, gc, LR, hyper_lr, backend=backend)
    return lambda m, grad: pycurv.ops.fop_precondition(m, grad, backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# flop and byte counts (2 flops per multiply-add; the same count on every row of one case)


def flop_count(case: Case) -> tuple[int, str]:
    b, r, k = _rk(case.shape)
    if case.op == "fop_update":
        return 2 * b * min(r * k * k + k**3, 4 * r * k * k), (
            "2*B*min(r*k^2 + k^3, 4*r*k^2): G_prev^T G_cur once (G_cur^T G_prev is its transpose) and the product "
            "with M, or G_prev^T (G_cur M) + G_cur^T (G_prev M), whichever needs fewer"
        )
    return 2 * b * min(r * k * k + k**3, 2 * r * k * k), (
        "2*B*min(r*k^2 + k^3, 2*r*k^2): P = M M^T then G P, or (G M) M^T, whichever needs fewer"
    )


def byte_count(case: Case) -> tuple[int, str]:
    """The traffic the op cannot avoid: every input read once, every output written once."""
    b, r, k = _rk(case.shape)
    e = torch.finfo(case.dtype).bits // 8
    if case.op == "fop_update":
        return b * (2 * r * k * e + 2 * k * k * 4), "B*(2*r*k*e + 2*k^2*4): both gradients read, M read and written"
    return b * (2 * r * k * e + k * k * 4), "B*(2*r*k*e + k^2*4): the gradient read, the output written, M read"


# ---------------------------------------------------------------------------------------------------------------
# whole step


def _step_callable(impl: str, model, x, y, loss_fn):
    """One training step per call: zero_grad, forward, backward, step."""
    name = impl.split(":", 1)[1]
    params = list(model.parameters())
    if name.startswith("fop+"):
        base = name.split("+", 1)[1]
        if base == "sgd":
            opt = pycurv.optim.FOP(params, base=torch.optim.SGD, lr=STEP_LR, momentum=0.9)
        else:
            opt = pycurv.optim.FOP(params, base=torch.optim.Adam, lr=STEP_LR)
    elif name.startswith("hd-"):
        base = name.split("-", 1)[1]
        opt = pycurv.optim.HD(params, base=base, lr=STEP_LR, momentum=0.9 if base == "sgd" else 0.0)
    elif name == "adam":
        opt = torch.optim.Adam(params, lr=STEP_LR)
    else:
        opt = torch.optim.SGD(params, lr=STEP_LR, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _fop_layers(model) -> list[list[int]]:
    """``[B, r, k]`` of every same-shape group of weights that :class:`pycurv.optim.FOP` preconditions (2-d
    ``(d_out, d_in)``: ``r = d_out``, ``k = d_in``; conv ``(c_out, c_in, *kernel)``: ``r = c_out c_in``, ``k`` the
    taps)."""
    groups: dict[tuple[int, int], int] = {}
    for p in model.parameters():
        if p.dim() >= 2:
            rk = (p.shape[0], p.shape[1]) if p.dim() == 2 else (p.shape[0] * p.shape[1], math.prod(p.shape[2:]))
            groups[rk] = groups.get(rk, 0) + 1
    return [[b, r, k] for (r, k), b in groups.items()]


# ---------------------------------------------------------------------------------------------------------------


def _make(case: Case, d: dict):
    """(callable to time, record fields) for an op case; skips what cannot run here."""
    if case.impl.startswith("pycurv:"):
        backend = case.impl.split(":", 1)[1]
        impl = _pycurv_impl(case, backend, d.get("hyper_lr"))
        return _op_callable(case, d, impl), {"kind": "pycurv", "name": backend}
    if case.impl.startswith("b:"):
        name = case.impl.split(":", 1)[1]
        return _op_callable(case, d, PLAIN[(case.op, name)]), {"kind": "baseline", "name": name}
    if case.impl == "b+compile":
        torch.compiler.reset()
        try:
            compiled = torch.compile(PLAIN[(case.op, "bmm")], fullgraph=True, dynamic=False)
            fn = _op_callable(case, d, compiled)
            t0 = time.perf_counter()
            fn()
            sync()
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # the optional baseline: any compiler failure is a skip, not an error
            pytest.skip(f"torch.compile of baseline bmm failed: {type(exc).__name__}: {str(exc)[:300]}")
        return fn, {"kind": "baseline+compile", "name": "bmm+compile", "compile_s": compile_s}
    raise ValueError(f"unknown implementation {case.impl!r}")


def _dims(case: Case, d: dict) -> dict:
    if case.op == "fop_step":
        return {"model": case.shape[0], "base": case.shape[1], "lr": STEP_LR}
    kind, b, d_out, d_in = case.shape
    _, r, k = _rk(case.shape)
    names = ("c_out", "c_in") if kind == "conv3x3" else ("d_out", "d_in")
    dims = {"layer": kind, "B": b, names[0]: d_out, names[1]: d_in, "r": r, "k": k}
    if case.op == "fop_update":
        dims.update(lr=LR, hyper_lr=d["hyper_lr"], update_scale=UPDATE_SCALE)
    return dims


@pytest.mark.parametrize("case_id", list(CASES))
def test_fop(benchmark, peaks, case_id):
    case = CASES[case_id]
    dtype_name = DTYPE_NAMES[case.dtype]
    benchmark.group = f"{case.op} {case.shape_id} {dtype_name}"
    extra = {}

    if case.op == "fop_step":
        model, x, y, loss_fn, cfg = _step_problem(case.shape[0])
        name = case.impl.split(":", 1)[1]
        fn = _step_callable(case.impl, model, x, y, loss_fn)
        fwd = _forward_flops(model, x)
        loop = time_call(benchmark, fn)
        mem, out = peak_extra_memory(fn)
        err = None if torch.isfinite(out).all() else float("inf")
        flops, formula = 3 * fwd, "3 x forward matmul/conv flops (one step per call)"
        info = {"kind": "pycurv" if case.impl.startswith("pycurv:") else "baseline", "name": name}
        extra = {"model_config": cfg, "forward_flops": fwd}
        if name.startswith("fop+"):
            extra["fop_groups_B_r_k"] = _fop_layers(model)
        d = {}
    else:
        d = _inputs(case)
        if case.op == "fop_update":
            # in place: each implementation updates its own copy, reset to the shared start before the checked call
            d = dict(d, m=d["m0"].clone())
        fn, info = _make(case, d)
        loop = time_call(benchmark, fn)
        if case.op == "fop_update":
            d["m"].copy_(d["m0"])
            fn.reset()
        mem, out = peak_extra_memory(fn)
        ref = _reference(case, _inputs(case))
        err = _rel_err(out.double() - d["m0"].double() if case.op == "fop_update" else out, ref)
        flops, formula = flop_count(case)
        nbytes, byte_formula = byte_count(case)
        extra = {
            "min_bytes": nbytes,
            "byte_formula": byte_formula,
            "gb_per_s": nbytes / benchmark.stats.stats.median / 1e9,
        }
    del out

    benchmark.extra_info.update(
        op=case.op,
        shape=case.shape_id,
        dims=_dims(case, d),
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
        **extra,
        **loop,
    )
