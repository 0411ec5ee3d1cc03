"""Micro-benchmarks of the per-sample op family: per_sample_gram, per_sample_grad_sqnorms, ef_diag.

For every shape and dtype, on the same inputs in the same process, each pycurv backend that can run the op here is
timed against pure PyTorch:

(a) ``torch.func``: per-sample gradients ``vmap(grad(loss_n))`` of a linear layer's weight ``W: (d_out, d_in)`` with
    ``loss_n(W) = sum_t <g[n,t], a[n,t] W^T>`` (so ``grad = g_n^T a_n``), flattened into ``J: (N, d_out d_in)``,
    then ``J J^T``, the row norms of ``J`` or the column sums of squares;
(b) the best plain formulation, chosen per shape among the candidates below (the faster one is baseline (b) in the
    results and is named there); matmuls run in the input dtype, everything after them in float32:
    ghost (Goodfellow 2015; Li et al. 2022): ``K = sum over T x T blocks of (A A^T) * (B B^T)`` with ``A, B`` the
    ``(N T, d)`` flattened inputs (``(A A^T) * (B B^T)`` for T = 1); materialize: ``G_n = g_n^T a_n`` by one
    ``bmm`` (faster than the equivalent ``einsum``, which copies its output into place), then ``J J^T``;
(b+compile) on a GPU, ``torch.compile`` of the faster (b) candidate, skipped when it fails.

Run through ``bench/run.py``; ``pytest`` alone does not collect this file (``testpaths = ["tests"]`` and the file
does not match ``test_*.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, QUICK, peak_extra_memory, sync, time_call, timed_backends

import pycurv
from pycurv.ops import choose_method

OPS = ("per_sample_gram", "per_sample_grad_sqnorms", "ef_diag")

# (N, T, d_in, d_out): MLP layers (T = 1) to transformer / conv layers (T = sequence length or output positions).
GPU_SHAPES = [
    (32, 1, 64, 64),
    (256, 1, 512, 512),
    (128, 1, 1024, 1024),
    (64, 16, 256, 256),
    (32, 64, 512, 512),
    (64, 256, 1024, 1024),
]
# The CPU grid keeps `make bench` near 5 minutes on 2 cores: the same MLP shapes and smaller transformer layers.
CPU_SHAPES = [
    (32, 1, 64, 64),
    (256, 1, 512, 512),
    (128, 1, 1024, 1024),
    (64, 16, 256, 256),
    (32, 64, 512, 512),
    (16, 128, 768, 768),
]
CPU_BF16_SHAPES = [(256, 1, 512, 512)]
QUICK_SHAPES = [(32, 1, 64, 64), (256, 1, 512, 512), (64, 16, 256, 256)]

# Baseline (a) materialises J, N d_out d_in values, after N T d_in d_out multiply-adds: above this on the CPU it
# would dominate the run's time and memory, so it is skipped with a note.
CPU_FUNC_LIMIT = 2**31

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    impl: str  # "pycurv:<backend>", "torch.func", "b:<formulation>" or "b+compile"

    @property
    def shape_id(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape_id}-{DTYPE_NAMES[self.dtype]}-{self.impl}"


def baseline_candidates(op: str, t: int) -> list[str]:
    """Names of the plain-PyTorch formulations tried for baseline (b)."""
    if op == "ef_diag":
        return ["squares_mm"] if t == 1 else ["materialize"]
    if t == 1:
        return ["ghost"]
    return ["ghost", "materialize"]


def _grid() -> list[tuple[tuple[int, int, int, int], torch.dtype]]:
    if DEVICE.type == "cuda":
        shapes = QUICK_SHAPES if QUICK else GPU_SHAPES
        return [(s, dt) for s in shapes for dt in (torch.float32, torch.bfloat16)]
    if QUICK:
        return [(s, torch.float32) for s in QUICK_SHAPES] + [(QUICK_SHAPES[1], torch.bfloat16)]
    return [(s, torch.float32) for s in CPU_SHAPES] + [(s, torch.bfloat16) for s in CPU_BF16_SHAPES]


def _cases() -> list[Case]:
    cases = []
    for shape, dtype in _grid():
        for op in OPS:
            impls = [f"pycurv:{b}" for b in timed_backends(op)] + ["torch.func"]
            impls += [f"b:{name}" for name in baseline_candidates(op, shape[1])]
            if DEVICE.type == "cuda":
                impls.append("b+compile")  # after the eager candidates, so it can compile the faster one
            cases += [Case(op, shape, dtype, impl) for impl in impls]
    return cases


CASES = {c.id: c for c in _cases()}


# ---------------------------------------------------------------------------------------------------------------
# flop counts: the algorithm pycurv.ops.choose_method picks, 2 flops per multiply-add, elementwise work ignored;
# a symmetric product counts its entries on and above the diagonal only (the work it needs), so that a share of the
# peak above 1 would be a timing error, never a kernel skipping half of a symmetric product


def flop_count(op: str, n: int, t: int, d_in: int, d_out: int) -> tuple[int, str, str]:
    """(flops, formula, method) of the algorithm pycurv runs for this op and shape."""
    if op == "ef_diag":
        if t == 1:
            return 2 * n * d_in * d_out, "2*N*d_in*d_out", "squares_mm"
        return 2 * n * t * d_in * d_out + 2 * n * d_in * d_out, "2*N*T*d_in*d_out + 2*N*d_in*d_out", "materialize"
    kind = "gram" if op == "per_sample_gram" else "sqnorms"
    method = choose_method(kind, n, t, d_in, d_out)
    if kind == "gram":
        if method == "ghost":
            return n * (n + 1) * t * t * (d_in + d_out), "N*(N+1)*T^2*(d_in+d_out)", method
        return (
            2 * n * t * d_in * d_out + n * (n + 1) * d_in * d_out,
            "2*N*T*d_in*d_out + N*(N+1)*d_in*d_out",
            method,
        )
    if method == "ghost":
        return n * t * (t + 1) * (d_in + d_out), "N*T*(T+1)*(d_in+d_out)", method
    return 2 * n * t * d_in * d_out + 2 * n * d_in * d_out, "2*N*T*d_in*d_out + 2*N*d_in*d_out", method


# ---------------------------------------------------------------------------------------------------------------
# baseline (a): torch.func per-sample gradients


def _linear_loss(w: torch.Tensor, a_n: torch.Tensor, g_n: torch.Tensor) -> torch.Tensor:
    """``sum_t <g_n[t], a_n[t] W^T>``: its gradient in ``W`` is sample n's weight gradient ``g_n^T a_n``."""
    return (torch.nn.functional.linear(a_n, w) * g_n).sum()


_per_sample_grads = torch.func.vmap(torch.func.grad(_linear_loss), in_dims=(None, 0, 0))


def _func_baseline(op: str, a: torch.Tensor, g: torch.Tensor):
    w = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)

    def run():
        grads = _per_sample_grads(w, a, g)  # (N, d_out, d_in)
        if op == "ef_diag":
            return torch.linalg.vector_norm(grads, dim=0, dtype=torch.float32).square()
        j = grads.reshape(grads.shape[0], -1)
        if op == "per_sample_gram":
            return (j @ j.T).float()
        return torch.linalg.vector_norm(j, dim=1, dtype=torch.float32).square()

    return run


# ---------------------------------------------------------------------------------------------------------------
# baseline (b): plain formulations


def _gram_ghost(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, t = a.shape[0], a.shape[1]
    af, gf = a.reshape(n * t, -1), g.reshape(n * t, -1)
    k = (af @ af.T).float() * (gf @ gf.T).float()
    return k if t == 1 else k.view(n, t, n, t).sum((1, 3))


def _gram_materialize(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    j = torch.bmm(g.mT, a).reshape(a.shape[0], -1)
    return (j @ j.T).float()


def _sqnorms_ghost(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if a.shape[1] == 1:
        na = torch.linalg.vector_norm(a[:, 0], dim=1, dtype=torch.float32)
        ng = torch.linalg.vector_norm(g[:, 0], dim=1, dtype=torch.float32)
        return (na * ng).square()
    return (torch.bmm(a, a.mT).float() * torch.bmm(g, g.mT).float()).sum((1, 2))


def _sqnorms_materialize(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    j = torch.bmm(g.mT, a).reshape(a.shape[0], -1)
    return torch.linalg.vector_norm(j, dim=1, dtype=torch.float32).square()


def _ef_diag_squares_mm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g[:, 0].square().T @ a[:, 0].square()).float()


def _ef_diag_materialize(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    grads = torch.bmm(g.mT, a)
    return torch.linalg.vector_norm(grads, dim=0, dtype=torch.float32).square()


BASELINES = {
    ("per_sample_gram", "ghost"): _gram_ghost,
    ("per_sample_gram", "materialize"): _gram_materialize,
    ("per_sample_grad_sqnorms", "ghost"): _sqnorms_ghost,
    ("per_sample_grad_sqnorms", "materialize"): _sqnorms_materialize,
    ("ef_diag", "squares_mm"): _ef_diag_squares_mm,
    ("ef_diag", "materialize"): _ef_diag_materialize,
}

# Median seconds of the eager (b) candidates measured so far, keyed by (op, shape, dtype): b+compile compiles
# the faster one.
_EAGER_B: dict[tuple, dict[str, float]] = {}


# ---------------------------------------------------------------------------------------------------------------
# inputs and reference results, shared by every implementation of one shape and dtype


class _Inputs:
    key: tuple | None = None
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    refs: dict[str, torch.Tensor] = {}


def _inputs(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if _Inputs.key != (shape, dtype):
        _Inputs.a = _Inputs.g = None
        _Inputs.refs = {}
        n, t, d_in, d_out = shape
        gen = torch.Generator(device="cpu").manual_seed(0)
        _Inputs.a = torch.randn(n, t, d_in, generator=gen).to(device=DEVICE, dtype=dtype)
        _Inputs.g = torch.randn(n, t, d_out, generator=gen).to(device=DEVICE, dtype=dtype)
        _Inputs.key = (shape, dtype)
    return _Inputs.a, _Inputs.g


def _reference(op: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if op not in _Inputs.refs:
        n, t, d_in, d_out = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        if op == "ef_diag":
            _Inputs.refs[op] = pycurv.reference.ef_diag(a, g, False)
        else:
            kind = "gram" if op == "per_sample_gram" else "sqnorms"
            fn = getattr(pycurv.reference, op)
            _Inputs.refs[op] = fn(a, g, False, choose_method(kind, n, t, d_in, d_out))
    return _Inputs.refs[op]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64, r64 = x.detach().double(), ref.detach().double()
    if x64.shape != r64.shape or not torch.isfinite(x64).all():
        return float("inf")
    den = r64.norm().item()
    return (x64 - r64).norm().item() / den if den > 0 else (x64 - r64).norm().item()


# ---------------------------------------------------------------------------------------------------------------


def _make(case: Case, a: torch.Tensor, g: torch.Tensor) -> tuple[callable, dict]:
    """The callable to time for ``case`` and what to record about it; skips when it cannot or should not run."""
    op, (n, t, d_in, d_out) = case.op, case.shape
    if case.impl.startswith("pycurv:"):
        backend = case.impl.split(":", 1)[1]
        fn = getattr(pycurv.ops, op)
        return (lambda: fn(a, g, backend=backend)), {"kind": "pycurv", "name": backend}
    if case.impl == "torch.func":
        work = n * t * d_in * d_out
        if DEVICE.type == "cpu" and work > CPU_FUNC_LIMIT:
            pytest.skip(f"baseline (a) skipped on CPU: N*T*d_in*d_out = {work} > {CPU_FUNC_LIMIT}")
        if DEVICE.type == "cuda":
            j_bytes = n * d_in * d_out * a.element_size()
            free, _ = torch.cuda.mem_get_info(DEVICE)
            if 3 * j_bytes > free:
                pytest.skip(f"baseline (a) skipped: J needs {j_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return _func_baseline(op, a, g), {"kind": "torch.func", "name": "vmap(grad)"}
    if case.impl.startswith("b:"):
        name = case.impl.split(":", 1)[1]
        f = BASELINES[(op, name)]
        return (lambda: f(a, g)), {"kind": "baseline", "name": name}
    if case.impl == "b+compile":
        if os.environ.get("PYCURV_BENCH_COMPILE", "1") == "0":
            pytest.skip("torch.compile baseline disabled (PYCURV_BENCH_COMPILE=0)")
        measured = _EAGER_B.get((op, case.shape, case.dtype), {})
        if measured:
            name = min(measured, key=measured.get)
        else:  # eager candidates were deselected: take the one matching pycurv's cost model
            method = flop_count(op, n, t, d_in, d_out)[2]
            cands = baseline_candidates(op, t)
            name = method if method in cands else cands[0]
        torch.compiler.reset()  # one compiled function is reused across shapes: stay clear of recompile limits
        try:
            compiled = torch.compile(BASELINES[(op, name)], fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            compiled(a, g)
            sync()
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # the optional baseline: any compiler failure is a skip, not an error
            pytest.skip(f"torch.compile of baseline {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        return (lambda: compiled(a, g)), {"kind": "baseline+compile", "name": f"{name}+compile", "compile_s": compile_s}
    raise ValueError(f"unknown implementation {case.impl!r}")


@pytest.mark.parametrize("case_id", list(CASES))
def test_per_sample(benchmark, peaks, case_id):
    case = CASES[case_id]
    op, (n, t, d_in, d_out) = case.op, case.shape
    dtype_name = DTYPE_NAMES[case.dtype]
    a, g = _inputs(case.shape, case.dtype)
    fn, info = _make(case, a, g)

    benchmark.group = f"{op} {case.shape_id} {dtype_name}"
    loop = time_call(benchmark, fn)
    mem, out = peak_extra_memory(fn)
    err = _rel_err(out, _reference(op, a, g))
    del out

    flops, formula, method = flop_count(op, n, t, d_in, d_out)
    if info["kind"] == "baseline":
        _EAGER_B.setdefault((op, case.shape, case.dtype), {})[info["name"]] = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=op,
        N=n,
        T=t,
        d_in=d_in,
        d_out=d_out,
        dtype=dtype_name,
        impl=info["kind"],
        name=info["name"],
        method=method,
        flops=flops,
        flop_formula=formula,
        peak_tflops=peaks["tflops"].get(dtype_name),
        peak_extra_mem_bytes=mem,
        rel_err_vs_reference=err,
        **{k: v for k, v in info.items() if k not in ("kind", "name")},
        **loop,
    )
