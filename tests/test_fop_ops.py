"""FOP op family (MATH.md section 4): fop_update and fop_precondition.

Every backend is checked against the dense formulas evaluated here in float64 from the same (already rounded)
inputs, never against pycurv.reference:

- fop_update: ``M + lr * hyper_lr * S M`` with ``S = sum_i (p_i c_i^T + c_i p_i^T)`` summed over the rows ``p_i``,
  ``c_i`` of ``grad_prev``, ``grad_cur`` (rank-one terms, by einsum), and the old ``M`` on the right;
- fop_precondition: ``G (M M^T)``.

``lr`` and ``hyper_lr`` are chosen so that ``lr * hyper_lr * ||S||_2 = 1/2``: the increment is as large as ``M``
itself, so the check on the updated ``M`` also checks the increment to the same relative tolerance.

Backends: whatever ``pycurv.ops.available_backends`` lists for an op at collection time, plus explicit entries for
this device's compiled backend ("cpu" or "cuda") and "triton", skipped with the reason while those are not
available. Under the Triton interpreter the Triton cases use a covering subset of each grid (every k, r, layout and
dtype at least once).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pycurv import ops

from conftest import DEVICE, INTERPRET, REL_TOL, assert_rel_close, native_offered, op_backends, raises_naming, rel_err
from conftest import need_backend as _need
from conftest import need_registered as _need_registered

F64 = torch.float64
DT_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
OPS = ("fop_update", "fop_precondition")
_NATIVE = "cpu" if DEVICE.type == "cpu" else "cuda"
_OTHER = torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")
_WRONG_BACKEND = "cpu" if DEVICE.type == "cuda" else "cuda"

K_S = (1, 3, 9, 17, 100)
R_S = (1, 5, 37)
BATCH = 3


def _backends(op: str) -> list[str]:
    live = op_backends(op)
    return live + [b for b in (_NATIVE, "triton") if b not in live]


def _reduced(backend: str) -> bool:
    """The Triton interpreter runs every program instance in Python: a few launches per test at most."""
    return backend == "triton" and INTERPRET


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Drawn in float64 on the CPU (the same values for every backend and device), then rounded to ``dtype``."""
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(device=DEVICE, dtype=dtype)


def _factor(k: int, b: int | None, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A well-conditioned non-symmetric factor ``I + 0.3 X / sqrt(k)``, ``(k, k)`` or ``(b, k, k)``."""
    lead = () if b is None else (b,)
    x = torch.randn(*lead, k, k, generator=_gen(seed), dtype=F64)
    return (torch.eye(k, dtype=F64) + 0.3 * x / math.sqrt(k)).to(device=DEVICE, dtype=dtype)


# ================================================================================================================
# ground truth
# ================================================================================================================


def sym_product(gp: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """``sum_i p_i c_i^T + c_i p_i^T`` in float64 on the CPU, ``(k, k)`` or ``(B, k, k)``."""
    p, c = gp.detach().double().cpu(), gc.detach().double().cpu()
    s = torch.einsum("...ri,...rj->...ij", p, c)
    return s + s.mT


def update_truth(m0: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor, lr: float, hyper: float) -> torch.Tensor:
    m64 = m0.detach().double().cpu()
    return m64 + (lr * hyper) * (sym_product(gp, gc) @ m64)


def precondition_truth(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    m64 = m.detach().double().cpu()
    return grad.detach().double().cpu() @ (m64 @ m64.mT)


def scaled_rates(gp: torch.Tensor, gc: torch.Tensor, lr: float = 0.5) -> tuple[float, float]:
    """``(lr, hyper_lr)`` with ``lr * hyper_lr * max ||S||_2 = 1/2`` (``hyper_lr = 1`` when ``S`` is 0)."""
    s = sym_product(gp, gc)
    norm = torch.linalg.matrix_norm(s, ord=2).max().item()
    return lr, (0.5 / (lr * norm) if norm > 0 else 1.0)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-for-bit equal values, NaN included."""
    return x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)


def run_update(m, gp, gc, lr, hyper, backend, what):
    """Calls fop_update and checks what every call must satisfy: returns ``m`` itself, in place, gradients read
    only."""
    ptr, shape, stride, dtype = m.data_ptr(), m.shape, m.stride(), m.dtype
    gp0, gc0 = gp.clone(), gc.clone()
    out = ops.fop_update(m, gp, gc, lr, hyper, backend=backend)
    assert out is m, f"{what}: did not return m itself"
    same = (m.data_ptr(), m.shape, m.stride(), m.dtype) == (ptr, shape, stride, dtype)
    assert same, f"{what}: m not updated in place"
    assert _same(gp, gp0) and _same(gc, gc0), f"{what}: a gradient was modified"
    return out


def check_update(m, gp, gc, lr, hyper, backend, tol, what):
    m0 = m.detach().clone()
    run_update(m, gp, gc, lr, hyper, backend, what)
    want = update_truth(m0, gp, gc, lr, hyper)
    err = rel_err(m, want)
    assert err <= tol, f"{what}: relative error of M {err:.3g} > {tol:.1g}"
    inc_err = rel_err(m.double().cpu() - m0.double().cpu(), want - m0.double().cpu())
    assert inc_err <= 4 * tol, f"{what}: relative error of the increment {inc_err:.3g} > {4 * tol:.1g}"


# ================================================================================================================
# fop_update
# ================================================================================================================


def _shape_cases(op: str, reduced: list) -> list:
    """(backend, k, r, batched) for every backend of ``op``: the whole grid, or the ``reduced`` combinations under
    the Triton interpreter."""
    params = []
    for backend in _backends(op):
        combos = reduced if _reduced(backend) else list(itertools.product(K_S, R_S, (False, True)))
        for k, r, batched in combos:
            pid = f"{backend}-k{k}-r{r}-{'batched' if batched else 'single'}"
            params.append(pytest.param(backend, k, r, batched, id=pid))
    return params


def _dtype_cases(op: str, dtypes) -> list:
    """(backend, grad dtype, m dtype, batched) for every backend of ``op``; under the Triton interpreter each dtype
    pair once, batched or single by turns."""
    params = []
    for backend in _backends(op):
        for i, (gd, md) in enumerate(dtypes):
            for batched in (False, True):
                if _reduced(backend) and batched != bool(i % 2):
                    continue
                pid = f"{backend}-g{DT_ID[gd]}-m{DT_ID[md]}-{'batched' if batched else 'single'}"
                params.append(pytest.param(backend, gd, md, batched, id=pid))
    return params


def _update_shape_cases():
    return _shape_cases(
        "fop_update", [(1, 5, False), (3, 37, True), (9, 1, False), (17, 5, True), (100, 37, False), (100, 1, True)]
    )


@pytest.mark.parametrize("backend, k, r, batched", _update_shape_cases())
def test_fop_update_shapes(backend, k, r, batched):
    _need("fop_update", backend)
    lead = (BATCH,) if batched else ()
    gp, gc = _randn(*lead, r, k, seed=10 * k + r), _randn(*lead, r, k, seed=10 * k + r + 1)
    m = _factor(k, BATCH if batched else None, seed=k)
    lr, hyper = scaled_rates(gp, gc)
    what = f"fop_update[{backend}] k={k} r={r} {'batched' if batched else 'single'}"
    check_update(m, gp, gc, lr, hyper, backend, REL_TOL[torch.float32], what)


def test_truth_matches_definition():
    """The einsum ground truth against the derivative it stands for: S = G_p^T G_c + G_c^T G_p as plain matmuls,
    and a batched call being the stack of single calls."""
    gp, gc = _randn(3, 7, 4, seed=1, dtype=F64), _randn(3, 7, 4, seed=2, dtype=F64)
    s = sym_product(gp, gc)
    for b in range(3):
        dense = gp[b].cpu().T @ gc[b].cpu() + gc[b].cpu().T @ gp[b].cpu()
        assert torch.allclose(s[b], dense, rtol=1e-13, atol=1e-13)
        assert torch.equal(sym_product(gp[b], gc[b]), s[b])
    assert torch.equal(s, s.mT)


# (grad dtype, m dtype): accumulation happens in m's dtype, so m's dtype sets the tolerance
UPDATE_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float64),
)


@pytest.mark.parametrize("backend, grad_dtype, m_dtype, batched", _dtype_cases("fop_update", UPDATE_DTYPES))
def test_fop_update_dtypes(backend, grad_dtype, m_dtype, batched):
    _need("fop_update", backend)
    lead = (BATCH,) if batched else ()
    gp, gc = _randn(*lead, 13, 17, seed=3, dtype=grad_dtype), _randn(*lead, 13, 17, seed=4, dtype=grad_dtype)
    m = _factor(17, BATCH if batched else None, seed=5, dtype=m_dtype)
    lr, hyper = scaled_rates(gp, gc)
    what = f"fop_update[{backend}] grads {grad_dtype} m {m_dtype}"
    check_update(m, gp, gc, lr, hyper, backend, REL_TOL[m_dtype], what)
    assert m.dtype == m_dtype


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_low_precision_accumulates_in_float32(backend, dtype):
    # all-positive gradients of magnitude 50..100 over 37 rows: every entry of S is about 4e5, beyond float16's
    # 65504, and an all-positive sum shows a 16-bit accumulator's rounding (bfloat16: ~1e-2) at once
    _need("fop_update", backend)
    gp = (50 + 50 * torch.rand(37, 9, generator=_gen(6), dtype=F64)).to(DEVICE, dtype)
    gc = (50 + 50 * torch.rand(37, 9, generator=_gen(7), dtype=F64)).to(DEVICE, dtype)
    assert sym_product(gp, gc).min() > 65504
    m = _factor(9, None, seed=8)
    lr, hyper = scaled_rates(gp, gc)
    what = f"fop_update[{backend}] large {dtype}"
    check_update(m, gp, gc, lr, hyper, backend, REL_TOL[torch.float32], what)
    assert torch.isfinite(m).all(), f"{what}: non-finite M"


def _as_view(kind: str, buf: torch.Tensor) -> torch.Tensor:
    """The non-contiguous view of ``buf`` that a test passes as m."""
    k = buf.shape[-1] if kind != "strided_rows" else buf.shape[-1] - 4
    return {
        "transposed": lambda: buf.T,
        "batch_transposed": lambda: buf.mT,
        "batch_slice": lambda: buf[::2],
        "strided_rows": lambda: buf[1::2, 2 : k + 2],
    }[kind]()


def _m_views(kind: str, k: int):
    """(buffer, view of it used as m): the view must be updated through the buffer, the rest left alone."""
    if kind == "transposed":
        buf = _factor(k, None, seed=20)
    elif kind == "batch_transposed":
        buf = _factor(k, BATCH, seed=21)
    elif kind == "batch_slice":
        buf = torch.full((2 * BATCH, k, k), 7.0, device=DEVICE)
    elif kind == "strided_rows":
        buf = torch.full((2 * k + 1, k + 4), 7.0, device=DEVICE)
    else:
        raise AssertionError(kind)
    view = _as_view(kind, buf)
    if kind in ("batch_slice", "strided_rows"):
        view.copy_(_factor(k, view.shape[0] if view.dim() == 3 else None, seed=22))
    assert not view.is_contiguous()
    return buf, view


@pytest.mark.parametrize("kind", ("transposed", "batch_transposed", "batch_slice", "strided_rows"))
@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_noncontiguous_m(backend, kind):
    _need("fop_update", backend)
    k = 6
    buf, view = _m_views(kind, k)
    lead = (BATCH,) if view.dim() == 3 else ()
    gp, gc = _randn(*lead, 5, k, seed=30), _randn(*lead, 5, k, seed=31)
    lr, hyper = scaled_rates(gp, gc)
    inside = torch.zeros_like(buf, dtype=torch.bool)
    _as_view(kind, inside).fill_(True)
    buf0 = buf.clone()
    what = f"fop_update[{backend}] m {kind}"
    check_update(view, gp, gc, lr, hyper, backend, REL_TOL[torch.float32], what)
    assert torch.equal(buf[~inside], buf0[~inside]), f"{what}: entries outside the view changed"
    assert not torch.equal(buf, buf0), f"{what}: the buffer behind the view was not updated"


def _grad_layout(kind: str, k: int = 7, r: int = 11):
    """(grad_prev, grad_cur) with the named layout; single unless the layout is batched."""
    if kind == "transposed":
        return _randn(k, r, seed=40).T, _randn(k, r, seed=41).T
    if kind == "sliced":
        return _randn(2 * r, k + 3, seed=42)[::2, 1 : k + 1], _randn(r, 2 * k, seed=43)[:, ::2]
    if kind == "expanded":  # stride 0 along the rows
        return _randn(1, k, seed=44).expand(r, k), _randn(r, k, seed=45)
    if kind == "mixed":  # one contiguous, one transposed
        return _randn(r, k, seed=46), _randn(k, r, seed=47).T
    if kind == "aliased":  # the same tensor twice: S = 2 G^T G
        g = _randn(r, k, seed=48)
        return g, g
    if kind == "batch_permuted":  # (B, r, k) from an (r, k, B) buffer
        return _randn(r, k, BATCH, seed=49).permute(2, 0, 1), _randn(BATCH, k, r, seed=50).mT
    if kind == "batch_expanded":  # stride 0 along B
        return _randn(1, r, k, seed=51).expand(BATCH, r, k), _randn(BATCH, r, k, seed=52)
    raise AssertionError(kind)


GRAD_LAYOUTS = ("transposed", "sliced", "expanded", "mixed", "aliased", "batch_permuted", "batch_expanded")


@pytest.mark.parametrize("kind", GRAD_LAYOUTS)
@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_noncontiguous_grads(backend, kind):
    _need("fop_update", backend)
    gp, gc = _grad_layout(kind)
    if kind not in ("mixed", "aliased"):
        assert not (gp.is_contiguous() and gc.is_contiguous())
    m = _factor(7, BATCH if gp.dim() == 3 else None, seed=53)
    lr, hyper = scaled_rates(gp, gc)
    check_update(m, gp, gc, lr, hyper, backend, REL_TOL[torch.float32], f"fop_update[{backend}] grads {kind}")


@pytest.mark.parametrize("which", ("lr", "hyper_lr", "both", "int_lr"))
@pytest.mark.parametrize("batched", (False, True), ids=("single", "batched"))
@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_zero_rate_leaves_m_unchanged(backend, batched, which):
    _need("fop_update", backend)
    lead = (BATCH,) if batched else ()
    gp, gc = _randn(*lead, 5, 9, seed=60), _randn(*lead, 5, 9, seed=61)
    m = _factor(9, BATCH if batched else None, seed=62)
    m0 = m.clone()
    lr, hyper = {"lr": (0.0, 3.0), "hyper_lr": (0.5, 0.0), "both": (0.0, 0.0), "int_lr": (0, 3)}[which]
    run_update(m, gp, gc, lr, hyper, backend, f"fop_update[{backend}] {which} = 0")
    assert torch.equal(m, m0), f"fop_update[{backend}]: {which} = 0 changed m"
    # and the same gradients with both rates positive do change it
    run_update(m, gp, gc, 0.5, 3.0, backend, f"fop_update[{backend}] positive rates")
    assert not torch.equal(m, m0)


@pytest.mark.parametrize("bad", ("nan", "inf"))
@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_nonfinite_gradient_reaches_m(backend, bad):
    """A non-finite gradient must make its own factor non-finite (the optimizer's guard rail relies on it) and
    leave the other factors of the batch exact."""
    _need("fop_update", backend)
    gp, gc = _randn(BATCH, 5, 4, seed=70), _randn(BATCH, 5, 4, seed=71)
    gc[1, 2, 3] = float(bad)
    m = _factor(4, BATCH, seed=72)
    m0 = m.clone()
    run_update(m, gp, gc, 0.5, 0.01, backend, f"fop_update[{backend}] {bad} gradient")
    assert not torch.isfinite(m[1]).all(), f"fop_update[{backend}]: a {bad} gradient left its factor finite"
    for b in (0, 2):
        want = update_truth(m0[b], gp[b], gc[b], 0.5, 0.01)
        assert_rel_close(m[b], want, torch.float32, f"fop_update[{backend}] factor {b} beside a {bad} gradient")


@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_repeated(backend):
    """Ten steps in a row, each from the previous result (a factor drifting away from the identity)."""
    _need("fop_update", backend)
    m = _factor(5, 2, seed=80)
    want = m.double().cpu()
    for t in range(10):
        gp, gc = _randn(2, 6, 5, seed=81 + t), _randn(2, 6, 5, seed=82 + t)
        want = update_truth(want, gp, gc, 0.1, 0.2)
        run_update(m, gp, gc, 0.1, 0.2, backend, f"fop_update[{backend}] step {t}")
    assert_rel_close(m, want, torch.float32, f"fop_update[{backend}] after 10 steps")
    assert rel_err(want, _factor(5, 2, seed=80).double().cpu()) > 0.1


# ================================================================================================================
# fop_precondition
# ================================================================================================================


def check_precondition(m, grad, backend, tol, what):
    m0, g0 = m.clone(), grad.clone()
    out = ops.fop_precondition(m, grad, backend=backend)
    assert out.shape == grad.shape, f"{what}: shape {tuple(out.shape)} for grad {tuple(grad.shape)}"
    assert out.dtype == grad.dtype, f"{what}: dtype {out.dtype} for grad {grad.dtype}"
    assert out.device == grad.device, f"{what}: device {out.device}"
    assert torch.equal(m, m0) and torch.equal(grad, g0), f"{what}: an input was modified"
    err = rel_err(out, precondition_truth(m, grad))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"
    return out


def _precondition_shape_cases():
    return _shape_cases(
        "fop_precondition",
        [(1, 37, True), (3, 1, False), (9, 5, True), (17, 37, False), (40, 45, True), (100, 5, False), (100, 1, True)],
    )


@pytest.mark.parametrize("backend, k, r, batched", _precondition_shape_cases())
def test_fop_precondition_shapes(backend, k, r, batched):
    _need("fop_precondition", backend)
    lead = (BATCH,) if batched else ()
    grad = _randn(*lead, r, k, seed=90 + k + r)
    m = _factor(k, BATCH if batched else None, seed=91 + k)
    what = f"fop_precondition[{backend}] k={k} r={r} {'batched' if batched else 'single'}"
    check_precondition(m, grad, backend, REL_TOL[torch.float32], what)


# The C++ kernels' small-k loops (k <= 12, AVX2; 13 is past them): a full block of 8 columns and a partial one,
# groups of rows with a tail, row chunks of 4096 / k rows (update), whole-block stores that spill into the next row
# (precondition), and k = 1 as a dot product / a scaling when the rows are contiguous (bfloat16, widened).
SMALL_K = (1, 2, 3, 5, 7, 8, 9, 11, 12, 13)
SMALL_R = (1, 2, 3, 4, 5, 6, 9, 2500)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
@pytest.mark.parametrize("k", SMALL_K)
def test_fop_small_k_loops(k, dtype):
    """Every r in SMALL_R at once, batched and single, both ops, against the float64 truth. Gradients are slices
    of wider buffers (the row stride is not k) for float32, contiguous for bfloat16 (widened chunk by chunk)."""
    _need("fop_update", _NATIVE)
    for r in SMALL_R:
        for lead in ((), (BATCH,)):
            def grad(seed):
                if dtype == torch.float32:
                    return _randn(*lead, r, k + 3, seed=seed)[..., 1 : k + 1]
                return _randn(*lead, r, k, seed=seed, dtype=dtype)

            what = f"k={k} r={r} {dtype} {'batched' if lead else 'single'}"
            gp, gc = grad(200 + r), grad(201 + r)
            m = _factor(k, BATCH if lead else None, seed=202 + k)
            lr, hyper = scaled_rates(gp, gc)
            check_update(m, gp, gc, lr, hyper, _NATIVE, REL_TOL[dtype], f"fop_update[{_NATIVE}] {what}")
            check_precondition(m, gp, _NATIVE, REL_TOL[dtype], f"fop_precondition[{_NATIVE}] {what}")


@pytest.mark.parametrize(
    "grad_dtype, m_dtype",
    ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)),
    ids=("f32", "bf16", "f64"),
)
def test_fop_few_rows_many_columns(grad_dtype, m_dtype):
    """r well below k (a classifier head): the CPU kernels never form S or D there (thin forms); batched and
    single, and gradients read through a transpose."""
    _need("fop_update", _NATIVE)
    for r, k in ((1, 40), (5, 64), (21, 64)):
        for lead in ((), (BATCH,)):
            gp = _randn(*lead, k, r, seed=220 + r, dtype=grad_dtype).mT
            gc = _randn(*lead, r, k, seed=221 + r, dtype=grad_dtype)
            m = _factor(k, BATCH if lead else None, seed=222 + k, dtype=m_dtype)
            lr, hyper = scaled_rates(gp, gc)
            what = f"r={r} k={k} {grad_dtype} {'batched' if lead else 'single'}"
            check_update(m, gp, gc, lr, hyper, _NATIVE, REL_TOL[m_dtype], f"fop_update[{_NATIVE}] {what}")
            check_precondition(m, gc, _NATIVE, REL_TOL[grad_dtype], f"fop_precondition[{_NATIVE}] {what}")


def test_fop_precondition_many_chunks():
    """More rows than one chunk of the CPU kernel (and an odd count): chunk boundaries in the middle of a matrix."""
    _need("fop_precondition", _NATIVE)
    for k in (3, 9):
        grad = _randn(2, 70001 // k, k, seed=210 + k)
        m = _factor(k, 2, seed=211 + k)
        check_precondition(m, grad, _NATIVE, REL_TOL[torch.float32], f"fop_precondition[{_NATIVE}] k={k} many rows")


# (grad dtype, m dtype): the result is in grad's dtype, accumulated in float32 (float64 for float64 gradients)
PRECONDITION_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
)


@pytest.mark.parametrize(
    "backend, grad_dtype, m_dtype, batched", _dtype_cases("fop_precondition", PRECONDITION_DTYPES)
)
def test_fop_precondition_dtypes(backend, grad_dtype, m_dtype, batched):
    _need("fop_precondition", backend)
    lead = (BATCH,) if batched else ()
    grad = _randn(*lead, 13, 17, seed=100, dtype=grad_dtype)
    m = _factor(17, BATCH if batched else None, seed=101, dtype=m_dtype)
    what = f"fop_precondition[{backend}] grad {grad_dtype} m {m_dtype}"
    check_precondition(m, grad, backend, REL_TOL[grad_dtype], what)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("backend", _backends("fop_precondition"))
def test_fop_precondition_low_precision_accumulates_in_float32(backend, dtype):
    # M ~ 300 I: P = M M^T has entries near 9e4, beyond float16's range, while G P ~ 1e-3 * 9e4 fits; a kernel
    # that forms P (or any partial sum) in the gradient's 16-bit dtype overflows or loses the float32 accuracy
    _need("fop_precondition", backend)
    grad = (1e-3 * torch.randn(11, 9, generator=_gen(110), dtype=F64)).to(DEVICE, dtype)
    m = 300 * _factor(9, None, seed=111)
    assert (m.double() @ m.double().T).abs().max() > 65504
    out = check_precondition(m, grad, backend, REL_TOL[dtype], f"fop_precondition[{backend}] large M {dtype}")
    assert torch.isfinite(out).all()


PRECONDITION_LAYOUTS = ("transposed", "sliced", "expanded", "batch_permuted", "batch_expanded")


@pytest.mark.parametrize("kind", PRECONDITION_LAYOUTS)
@pytest.mark.parametrize("backend", _backends("fop_precondition"))
def test_fop_precondition_noncontiguous(backend, kind):
    _need("fop_precondition", backend)
    grad = _grad_layout(kind)[0]
    assert not grad.is_contiguous()
    m = _factor(7, BATCH if grad.dim() == 3 else None, seed=120)
    check_precondition(m, grad, backend, REL_TOL[torch.float32], f"fop_precondition[{backend}] grad {kind}")


@pytest.mark.parametrize("backend", _backends("fop_precondition"))
def test_fop_precondition_noncontiguous_m(backend):
    _need("fop_precondition", backend)
    _, view = _m_views("batch_transposed", 6)
    grad = _randn(BATCH, 4, 6, seed=121)
    check_precondition(view, grad, backend, REL_TOL[torch.float32], f"fop_precondition[{backend}] m transposed")


@pytest.mark.parametrize("backend", _backends("fop_precondition"))
def test_fop_precondition_identity_is_exact(backend):
    """``M = I`` (every factor at its start) must hand the gradient back unchanged, bit for bit: more rows than
    columns and fewer (the CPU kernel's thin form), float32 and bfloat16."""
    _need("fop_precondition", backend)
    for r, k in ((9, 6), (9, 40)):
        m = torch.eye(k, device=DEVICE).expand(BATCH, k, k).contiguous()
        for dtype in (torch.float32, torch.bfloat16):
            grad = _randn(BATCH, r, k, seed=130, dtype=dtype)
            out = ops.fop_precondition(m, grad, backend=backend)
            assert torch.equal(out, grad), f"fop_precondition[{backend}]: M = I changed the gradient ({r}x{k} {dtype})"


# ================================================================================================================
# bad input
# ================================================================================================================


def _f(*shape, dtype=torch.float32, device=DEVICE):
    if torch.device(device).type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape).to(dtype).to(device)


def _i(*shape, dtype=torch.int64):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


def _eye(k, b=None, dtype=torch.float32):
    e = torch.eye(k, dtype=dtype, device=DEVICE)
    return e if b is None else e.expand(b, k, k).clone()


# name -> (make (m, grad_prev, grad_cur), kwargs, exception, regex the message must match: it names the argument)
UPDATE_BAD = {
    "m_not_square": (lambda: (_f(4, 5), _f(3, 5), _f(3, 5)), {}, ValueError, r"\bm must be square.*\(4, 5\)"),
    "m_1d": (lambda: (_f(4), _f(3, 4), _f(3, 4)), {}, ValueError, r"\bm must be square.*\(4,\)"),
    "m_4d": (lambda: (_f(2, 2, 4, 4), _f(2, 3, 4), _f(2, 3, 4)), {}, ValueError, r"\bm must be square"),
    "m_batched_not_square": (lambda: (_f(2, 4, 5), _f(2, 3, 5), _f(2, 3, 5)), {}, ValueError, r"\bm must be square"),
    "m_bf16": (lambda: (_eye(4, dtype=torch.bfloat16), _f(3, 4), _f(3, 4)), {}, TypeError, r"\bm must have dtype"),
    "m_f16": (lambda: (_eye(4, dtype=torch.float16), _f(3, 4), _f(3, 4)), {}, TypeError, r"\bm must have dtype"),
    "m_int": (lambda: (_i(4, 4), _f(3, 4), _f(3, 4)), {}, TypeError, r"\bm must have dtype"),
    "m_not_tensor": (lambda: ([[1.0]], _f(3, 1), _f(3, 1)), {}, TypeError, r"\bm must be a torch.Tensor"),
    "batch_mismatch": (lambda: (_eye(4, 3), _f(2, 5, 4), _f(2, 5, 4)), {}, ValueError,
                       r"\bgrad_prev must be \(B=3, r, k=4\).*\(2, 5, 4\)"),
    "batch_mismatch_cur": (lambda: (_eye(4, 3), _f(3, 5, 4), _f(2, 5, 4)), {}, ValueError,
                           r"\bgrad_cur must be \(B=3, r, k=4\)"),
    "batched_m_2d_grads": (lambda: (_eye(4, 3), _f(5, 4), _f(5, 4)), {}, ValueError, r"\bgrad_prev must be \(B=3"),
    "single_m_3d_grads": (lambda: (_eye(4), _f(3, 5, 4), _f(3, 5, 4)), {}, ValueError,
                          r"\bgrad_prev must be \(r, k=4\)"),
    "k_mismatch": (lambda: (_eye(4), _f(5, 3), _f(5, 3)), {}, ValueError, r"\bgrad_prev must be \(r, k=4\).*\(5, 3\)"),
    "k_mismatch_cur": (lambda: (_eye(4), _f(5, 4), _f(5, 5)), {}, ValueError,
                       r"\bgrad_cur must be \(r, k=4\).*\(5, 5\)"),
    "k_mismatch_batched": (lambda: (_eye(4, 2), _f(2, 5, 4), _f(2, 5, 3)), {}, ValueError, r"\bgrad_cur must be"),
    "r_mismatch": (lambda: (_eye(4), _f(5, 4), _f(6, 4)), {}, ValueError,
                   r"\bgrad_prev and grad_cur must have one shape.*\(5, 4\).*\(6, 4\)"),
    "r_mismatch_batched": (lambda: (_eye(4, 2), _f(2, 5, 4), _f(2, 6, 4)), {}, ValueError,
                           r"\bgrad_prev and grad_cur must have one shape"),
    "grad_1d": (lambda: (_eye(4), _f(4), _f(4)), {}, ValueError, r"\bgrad_prev must be \(r, k=4\)"),
    "grad_empty": (lambda: (_eye(4), _f(0, 4), _f(0, 4)), {}, ValueError, r"\bgrad_prev must not be empty"),
    "mixed_dtypes": (lambda: (_eye(4), _f(5, 4), _f(5, 4, dtype=torch.bfloat16)), {}, TypeError,
                     r"\bgrad_prev and grad_cur must have one dtype"),
    "mixed_16bit": (lambda: (_eye(4), _f(5, 4, dtype=torch.float16), _f(5, 4, dtype=torch.bfloat16)), {}, TypeError,
                    r"\bgrad_prev and grad_cur must have one dtype"),
    "f64_grads_f32_m": (lambda: (_eye(4), _f(5, 4, dtype=F64), _f(5, 4, dtype=F64)), {}, TypeError,
                        r"float64 gradients need a float64 m"),
    "grad_prev_int": (lambda: (_eye(4), _i(5, 4), _f(5, 4)), {}, TypeError, r"\bgrad_prev must have dtype"),
    "grad_cur_int32": (lambda: (_eye(4), _f(5, 4), _i(5, 4, dtype=torch.int32)), {}, TypeError,
                       r"\bgrad_cur must have dtype"),
    "grad_cur_bool": (lambda: (_eye(4), _f(5, 4), _i(5, 4, dtype=torch.bool)), {}, TypeError,
                      r"\bgrad_cur must have dtype"),
    "grad_prev_not_tensor": (lambda: (_eye(2), [[1.0, 2.0]], _f(1, 2)), {}, TypeError,
                             r"\bgrad_prev must be a torch.Tensor"),
    "grad_prev_other_device": (lambda: (_eye(4), _f(5, 4, device=_OTHER), _f(5, 4)), {}, ValueError,
                               r"\bgrad_prev must be on m's device"),
    "grad_cur_other_device": (lambda: (_eye(4), _f(5, 4), _f(5, 4, device=_OTHER)), {}, ValueError,
                              r"\bgrad_cur must be on m's device"),
    "lr_negative": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": -0.1}, ValueError, r"\blr must be .*-0\.1"),
    "lr_nan": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": float("nan")}, ValueError, r"\blr must be .*nan"),
    "lr_inf": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": float("inf")}, ValueError, r"\blr must be .*inf"),
    "lr_bool": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": True}, ValueError, r"\blr must be .*True"),
    "lr_str": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": "0.1"}, ValueError, r"\blr must be"),
    "lr_tensor": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"lr": torch.tensor(0.1)}, ValueError, r"\blr must be"),
    "hyper_lr_negative": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"hyper_lr": -1e-3}, ValueError,
                          r"\bhyper_lr must be .*-0\.001"),
    "hyper_lr_nan": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"hyper_lr": float("nan")}, ValueError,
                     r"\bhyper_lr must be .*nan"),
    "hyper_lr_bool": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"hyper_lr": False}, ValueError,
                      r"\bhyper_lr must be .*False"),
    "hyper_lr_none": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"hyper_lr": None}, ValueError, r"\bhyper_lr must be"),
    "unknown_backend": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"backend": "numpy"}, ValueError,
                        r"\bbackend must be one of"),
    "backend_wrong_device": (lambda: (_eye(4), _f(5, 4), _f(5, 4)), {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
}


@pytest.mark.parametrize("case", list(UPDATE_BAD))
def test_fop_update_bad_input(case):
    make, kw, exc, pattern = UPDATE_BAD[case]
    m, gp, gc = make()
    kw = {"lr": 0.5, "hyper_lr": 0.1, **kw}
    lr, hyper = kw.pop("lr"), kw.pop("hyper_lr")
    snap = m.clone() if isinstance(m, torch.Tensor) else None
    raises_naming("fop_update", exc, pattern, lambda: ops.fop_update(m, gp, gc, lr, hyper, **kw))
    if snap is not None:
        assert torch.equal(m, snap), f"m changed by the failing call {case}"


def test_fop_update_accepted_inputs():
    """The valid neighbours of the failing cases go through: batched, float64 m with float64 or 16-bit gradients."""
    m, gp, gc = _eye(4), _f(5, 4), _f(5, 4)
    m0 = m.clone()
    ops.fop_update(m, gp, gc, 0.5, 0.1)
    assert not torch.equal(m, m0)
    m = _eye(4, 3)
    ops.fop_update(m, _f(3, 5, 4), _f(3, 5, 4), 0.5, 0.1, backend="torch")
    m64 = _eye(4, dtype=F64)
    ops.fop_update(m64, _f(5, 4, dtype=F64), _f(5, 4, dtype=F64), 0.5, 0.1)
    ops.fop_update(m64, _f(5, 4, dtype=torch.bfloat16), _f(5, 4, dtype=torch.bfloat16), 0.5, 0.1)


@pytest.mark.parametrize("backend", _backends("fop_update"))
def test_fop_update_m_untouched_after_failing_calls(backend):
    """Every failure is detected before anything is written, on every backend, also for a non-contiguous m."""
    _need("fop_update", backend)
    buf = _factor(6, 2, seed=140)
    m = buf.mT
    snap = buf.clone()
    gp, gc = _randn(2, 5, 6, seed=141), _randn(2, 5, 6, seed=142)
    for bad in (
        lambda: ops.fop_update(m, gp, gc, -1.0, 0.1, backend=backend),
        lambda: ops.fop_update(m, gp, gc, 0.5, float("nan"), backend=backend),
        lambda: ops.fop_update(m, gp, gc[:, :4], 0.5, 0.1, backend=backend),
        lambda: ops.fop_update(m, gp[:1], gc[:1], 0.5, 0.1, backend=backend),
        lambda: ops.fop_update(m, gp.double(), gc.double(), 0.5, 0.1, backend=backend),
        lambda: ops.fop_update(m, gp, gc.half(), 0.5, 0.1, backend=backend),
        lambda: ops.fop_update(m, gp, gc, 0.5, 0.1, backend=_WRONG_BACKEND),
    ):
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            bad()
        assert torch.equal(buf, snap), f"fop_update[{backend}]: m changed by a failing call"


# name -> (make (m, grad), kwargs, exception, regex)
PRECONDITION_BAD = {
    "m_not_square": (lambda: (_f(4, 5), _f(3, 5)), {}, ValueError, r"\bm must be square.*\(4, 5\)"),
    "m_1d": (lambda: (_f(4), _f(3, 4)), {}, ValueError, r"\bm must be square"),
    "m_bf16": (lambda: (_eye(4, dtype=torch.bfloat16), _f(3, 4)), {}, TypeError, r"\bm must have dtype"),
    "m_int": (lambda: (_i(4, 4), _f(3, 4)), {}, TypeError, r"\bm must have dtype"),
    "m_not_tensor": (lambda: ([[1.0]], _f(3, 1)), {}, TypeError, r"\bm must be a torch.Tensor"),
    "k_mismatch": (lambda: (_eye(4), _f(3, 5)), {}, ValueError, r"\bgrad must be \(r, k=4\).*\(3, 5\)"),
    "grad_transposed": (lambda: (_eye(4), _f(4, 3)), {}, ValueError, r"\bgrad must be \(r, k=4\).*\(4, 3\)"),
    "batch_mismatch": (lambda: (_eye(4, 3), _f(2, 5, 4)), {}, ValueError, r"\bgrad must be \(B=3, r, k=4\)"),
    "batched_m_2d_grad": (lambda: (_eye(4, 3), _f(5, 4)), {}, ValueError, r"\bgrad must be \(B=3"),
    "grad_1d": (lambda: (_eye(4), _f(4)), {}, ValueError, r"\bgrad must be \(r, k=4\)"),
    "grad_empty": (lambda: (_eye(4), _f(0, 4)), {}, ValueError, r"\bgrad must not be empty"),
    "grad_int": (lambda: (_eye(4), _i(3, 4)), {}, TypeError, r"\bgrad must have dtype"),
    "grad_bool": (lambda: (_eye(4), _i(3, 4, dtype=torch.bool)), {}, TypeError, r"\bgrad must have dtype"),
    "grad_not_tensor": (lambda: (_eye(2), [[1.0, 2.0]]), {}, TypeError, r"\bgrad must be a torch.Tensor"),
    "f64_grad_f32_m": (lambda: (_eye(4), _f(3, 4, dtype=F64)), {}, TypeError, r"float64 grad needs a float64 m"),
    "grad_other_device": (lambda: (_eye(4), _f(3, 4, device=_OTHER)), {}, ValueError, r"\bgrad must be on m's device"),
    "unknown_backend": (lambda: (_eye(4), _f(3, 4)), {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
    "backend_wrong_device": (lambda: (_eye(4), _f(3, 4)), {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
}


@pytest.mark.parametrize("case", list(PRECONDITION_BAD))
def test_fop_precondition_bad_input(case):
    make, kw, exc, pattern = PRECONDITION_BAD[case]
    m, grad = make()
    raises_naming("fop_precondition", exc, pattern, lambda: ops.fop_precondition(m, grad, **kw))


# ================================================================================================================
# compiled ops: registration, their own checks, torch.library / torch.compile
# ================================================================================================================


@pytest.mark.parametrize("op", OPS)
def test_registered_kernel_is_used(op):
    """A kernel registered with the dispatcher must also be reachable through pycurv.ops, and picked by "auto"."""
    live = native_offered(op, _NATIVE)
    assert live.index(_NATIVE) < live.index("torch")


def test_compiled_fop_update_checks_inputs():
    """The compiled op checks its inputs too (it can be called directly, bypassing pycurv.ops), and leaves m alone."""
    _need_registered("fop_update", DEVICE.type.upper())
    fn = torch.ops.pycurv.fop_update
    m, gp, gc = _eye(4, 2), _f(2, 5, 4), _f(2, 5, 4)
    snap = m.clone()
    bad = {
        r"\bm\b": (_f(2, 4, 5), gp, gc),
        r"\bgrad_prev\b": (m, _f(3, 5, 4), gc),
        r"\bgrad_cur\b": (m, gp, _f(2, 5, 3)),
        r"\bgrad_(prev|cur)\b": (m, gp, _f(2, 6, 4)),
    }
    for pattern, args in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            fn(*args, 0.5, 0.1)
        assert torch.equal(m, snap)


def test_compiled_fop_precondition_checks_inputs():
    _need_registered("fop_precondition", DEVICE.type.upper())
    fn = torch.ops.pycurv.fop_precondition
    bad = {
        r"\bm\b": (_f(2, 4, 5), _f(2, 3, 5)),
        r"\bgrad\b": (_eye(4, 2), _f(3, 5, 4)),
        r"\bgrad\b.*\b4\b": (_eye(4, 2), _f(2, 5, 3)),
    }
    for pattern, args in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            fn(*args)


def _opcheck_args(op: str, grad_dtype: torch.dtype):
    """Small inputs as the compiled ops take them: batched, m contiguous, gradients non-contiguous."""
    m_dtype = F64 if grad_dtype == F64 else torch.float32
    m = _factor(5, 2, seed=150, dtype=m_dtype)
    gp = _randn(2, 5, 4, seed=151, dtype=grad_dtype).mT  # (2, 4, 5), non-contiguous
    if op == "fop_precondition":
        return (m, gp)
    return (m, gp, _randn(2, 4, 5, seed=152, dtype=grad_dtype), 0.5, 0.1)


def _opcheck_params():
    return [
        pytest.param(op, dt, id=f"{op}-{DT_ID[dt]}")
        for op in OPS
        for dt in (torch.float32, torch.bfloat16, torch.float64)
    ]


@pytest.mark.parametrize("op, grad_dtype", _opcheck_params())
def test_opcheck_compiled(op, grad_dtype):
    _need_registered(op, DEVICE.type.upper())
    torch.library.opcheck(getattr(torch.ops.pycurv, op).default, _opcheck_args(op, grad_dtype))


def _triton_custom_ops():
    out = []
    for op in OPS:
        overload = None
        if "triton" in op_backends(op):
            try:
                overload = getattr(torch.ops.pycurv, f"{op}_triton").default
            except (AttributeError, RuntimeError):
                overload = None
        out.append(pytest.param(op, overload, id=op))
    return out


@pytest.mark.parametrize("op, overload", _triton_custom_ops())
def test_opcheck_triton(op, overload):
    _need(op, "triton")
    if overload is None:
        pytest.skip(f"the Triton launcher of {op} registers no torch.ops.pycurv.{op}_triton")
    torch.library.opcheck(overload, _opcheck_args(op, torch.float32))


@pytest.mark.parametrize("backend", ["auto", _NATIVE, "triton"])
def test_torch_compile_fullgraph(backend):
    """One compiled graph with the factor update and the preconditioning, as an FOP step takes them."""
    if backend != "auto":
        _need("fop_update", backend)
        _need("fop_precondition", backend)
    torch._dynamo.reset()

    def step(m, gp, gc):
        ops.fop_update(m, gp, gc, 0.5, 0.1, backend=backend)
        return ops.fop_precondition(m, gc, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    m = _factor(5, 2, seed=160)
    gp, gc = _randn(2, 4, 5, seed=161), _randn(2, 4, 5, seed=162)
    m0 = m.clone()
    out = compiled(m, gp, gc)
    want_m = update_truth(m0, gp, gc, 0.5, 0.1)
    assert_rel_close(m, want_m, torch.float32, f"compiled fop_update[{backend}]")
    want_out = gc.double().cpu() @ (want_m @ want_m.mT)
    assert_rel_close(out, want_out, torch.float32, f"compiled fop_precondition[{backend}]")
