"""K-FAC op family (MATH.md section 2): kfac_factor_update, damped_inverse, sym_eig, kron_precondition,
kron_precondition_eigen, kl_clip_scale.

Every backend that ``pycurv.ops.available_backends`` lists for an op (and, for damped_inverse, for a method) is
checked against a ground truth built another way, in float64 from the same (already rounded) inputs:

- factors: an explicit ``torch.cat([x, ones])`` then ``xb^T xb / R`` and the running average;
- inverses: ``torch.linalg.inv(m + damping I)``; tolerances follow the condition number of the damped matrix;
- eigenpairs: ``torch.linalg.eigvalsh`` and the reconstruction ``Q diag(lambda) Q^T``;
- preconditioning: the dense Kronecker system. With ``vec`` stacking the columns of a ``(d_out, d_in)`` matrix,
  ``(A ⊗ G) vec(X) = vec(G X A)`` for symmetric ``A``, so the K-FAC step ``G^{-1} grad A^{-1}`` is
  ``torch.linalg.solve(torch.kron(A, G), vec(grad))`` and the eigenbasis step solves with ``A ⊗ G + damping I``.

Under the Triton interpreter the Triton cases use a covering subset of each grid (every shape, layout and dtype at
least once) to keep the run short; everywhere else the grid is full.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import pycurv
from pycurv import ops, reference
from pycurv.ops import DampingRaisedWarning

from conftest import DEVICE, INTERPRET, REL_TOL, assert_rel_close, op_backends, raises_naming, rel_err

DT_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
METHODS = ("cholesky", "eigh", "newton_schulz")


def _reduced(backend: str) -> bool:
    """The Triton interpreter runs every program instance in Python: a few launches per test at most."""
    return backend == "triton" and INTERPRET


def inverse_backends(method: str) -> list[str]:
    return pycurv.ops.available_backends(DEVICE, "damped_inverse", method)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Drawn in float64 on the CPU (the same values for every backend and device), then rounded to ``dtype``."""
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _symmetric(d: int, b: int | None, seed: int, dtype) -> torch.Tensor:
    """Exactly symmetric random matrices ``(d, d)`` (``b`` None) or ``(b, d, d)``."""
    x = _randn(*(() if b is None else (b,)), d, d, seed=seed, dtype=torch.float64)
    return ((x + x.mT) / 2).to(dtype)


# ================================================================================================================
# kfac_factor_update
# ================================================================================================================

DECAYS = (0.0, 0.5, 0.95, 1.0)
D_XS = (1, 3, 17, 64, 100)
ROWS = (1, 7, 130)
LAYOUTS = ("2d", "3d", "4d", "batched")
BATCH = 3


def _lead_dims(layout: str, rows: int) -> tuple[int, ...]:
    """Leading dimensions of ``x`` whose product is ``rows`` (per factor, for the batched layout)."""
    split = {1: (1, 1, 1), 7: (7, 1, 1), 130: (2, 5, 13)}[rows]
    if layout == "2d":
        return (rows,)
    if layout == "3d":
        return (split[0] * split[1], split[2]) if rows == 130 else (1, rows)
    if layout == "4d":
        return split
    return (BATCH, rows)


def factor_truth(x: torch.Tensor, bias: bool, batched: bool) -> torch.Tensor:
    """``xb^T xb / R`` in float64 with the ones column materialised: ``(d, d)``, or ``(B, d, d)`` when batched."""
    x64 = x.detach().double().cpu()
    x3 = x64.reshape(x64.shape[0] if batched else 1, -1, x64.shape[-1])
    if bias:
        x3 = torch.cat([x3, torch.ones(*x3.shape[:-1], 1, dtype=torch.float64)], dim=-1)
    f = x3.mT @ x3 / x3.shape[1]
    return f if batched else f[0]


def expected_factor(f0: torch.Tensor, x: torch.Tensor, decay: float, bias: bool) -> torch.Tensor:
    new = factor_truth(x, bias, f0.dim() == 3)
    if decay == 0:
        return new
    return decay * f0.detach().double().cpu() + (1 - decay) * new


def _factor_tol(x_dtype, f_dtype) -> float:
    return REL_TOL[torch.float64] if f_dtype == torch.float64 else REL_TOL[x_dtype]


def run_factor_update(f, x, decay, bias, backend, what):
    """Calls the op and checks what every call must satisfy: in place, returns factor, exactly symmetric."""
    ptr, shape, dtype = f.data_ptr(), f.shape, f.dtype
    out = ops.kfac_factor_update(f, x, decay, bias, backend=backend)
    assert out is f, f"{what}: did not return factor itself"
    assert f.data_ptr() == ptr and f.shape == shape and f.dtype == dtype, f"{what}: factor was not updated in place"
    symmetric = torch.equal(f, f.mT)
    assert symmetric, f"{what}: result not exactly symmetric (max |F - F^T| {(f - f.mT).abs().max():.3g})"
    return out


def _sym_start(d: int, b: int | None, dtype, seed: int = 1) -> torch.Tensor:
    """A symmetric positive definite starting factor, like a running average would hold."""
    s = _symmetric(d, b, seed, torch.float64)
    return (s @ s.mT / d + torch.eye(d, dtype=torch.float64, device=DEVICE)).to(dtype)


def _factor_cases():
    params = []
    for backend in op_backends("kfac_factor_update"):
        combos = list(itertools.product(LAYOUTS, D_XS, ROWS))
        if _reduced(backend):
            # every layout twice, every d_x and every R at least once
            combos = [
                ("2d", 1, 7), ("2d", 100, 130), ("3d", 17, 130), ("3d", 3, 1),
                ("4d", 64, 130), ("4d", 17, 7), ("batched", 3, 130), ("batched", 100, 1),
            ]
        for layout, d_x, rows in combos:
            params.append(pytest.param(backend, layout, d_x, rows, id=f"{backend}-{layout}-dx{d_x}-R{rows}"))
    return params


@pytest.mark.parametrize("backend, layout, d_x, rows", _factor_cases())
def test_factor_update_shapes(backend, layout, d_x, rows):
    lead = _lead_dims(layout, rows)
    batched = layout == "batched"
    x = _randn(*lead, d_x, seed=d_x * 1000 + rows)
    # bias and decay: the full 2 x 4 grid, or for the interpreted Triton backend two of them per shape
    grid = list(itertools.product((False, True), DECAYS))
    if _reduced(backend):
        k = D_XS.index(d_x) + ROWS.index(rows)
        grid = [grid[k % 8], grid[(k + 5) % 8]]
    for bias, decay in grid:
        d = d_x + bias
        f = _sym_start(d, BATCH if batched else None, torch.float32)
        f0 = f.clone()
        what = f"factor[{backend}] x{tuple(x.shape)} bias={bias} decay={decay}"
        run_factor_update(f, x, decay, bias, backend, what)
        assert_rel_close(f, expected_factor(f0, x, decay, bias), torch.float32, what)


# (x dtype, factor dtype): 16-bit and float32 inputs accumulate in float32; a float64 factor accumulates in float64.
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
)


def _dtype_cases():
    params = []
    for backend in op_backends("kfac_factor_update"):
        for i, (xd, fd) in enumerate(DTYPE_PAIRS):
            for batched in (False, True):
                if _reduced(backend) and batched != bool(i % 2):
                    continue
                pid = f"{backend}-x{DT_ID[xd]}-f{DT_ID[fd]}-{'batched' if batched else 'single'}"
                params.append(pytest.param(backend, xd, fd, batched, id=pid))
    return params


@pytest.mark.parametrize("backend, x_dtype, f_dtype, batched", _dtype_cases())
def test_factor_update_dtypes(backend, x_dtype, f_dtype, batched):
    lead = (BATCH, 10, 13) if batched else (10, 13)
    x = _randn(*lead, 17, seed=7, dtype=x_dtype)
    grid = list(itertools.product((False, True), DECAYS))
    if _reduced(backend):
        grid = [(True, 0.95), (False, 0.0)]
    for bias, decay in grid:
        f = _sym_start(17 + bias, BATCH if batched else None, f_dtype)
        f0 = f.clone()
        what = f"factor[{backend}] x {x_dtype} factor {f_dtype} bias={bias} decay={decay}"
        run_factor_update(f, x, decay, bias, backend, what)
        err = rel_err(f, expected_factor(f0, x, decay, bias))
        tol = _factor_tol(x_dtype, f_dtype)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_low_precision_accumulates_in_float32(backend, dtype):
    # |x| ~ 100 over 130 rows: every entry of x^T x (about 1.3e6) exceeds float16's 65504, so a kernel that keeps a
    # partial sum in float16 overflows; float32 accumulation is exact enough.
    x = _randn(10, 13, 17, seed=3, dtype=torch.float64).mul(100).to(dtype)
    f = torch.zeros(18, 18, device=DEVICE)
    run_factor_update(f, x, 0.0, True, backend, f"factor[{backend}] large {dtype}")
    assert torch.isfinite(f).all(), f"factor[{backend}]: non-finite factor for {dtype} inputs of magnitude 100"
    assert_rel_close(f, factor_truth(x, True, False), dtype, f"factor[{backend}] large {dtype}")


def _noncontiguous_x(kind: str, d_x: int = 17) -> torch.Tensor:
    if kind == "transposed":  # (R, d_x) with unit stride along R
        x = _randn(d_x, 130, seed=11).T
    elif kind == "sliced":  # strided rows and an offset feature window
        x = _randn(2 * 130, d_x + 3, seed=12)[::2, 1 : d_x + 1]
    elif kind == "permuted":  # (N, T, d_x) from a (T, d_x, N) buffer
        x = _randn(13, d_x, 10, seed=13).permute(2, 0, 1)
    elif kind == "expanded":  # stride 0 along N
        x = _randn(1, 13, d_x, seed=14).expand(10, 13, d_x)
    else:
        raise AssertionError(kind)
    assert not x.is_contiguous()
    return x


@pytest.mark.parametrize("kind", ("transposed", "sliced", "permuted", "expanded"))
@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_noncontiguous_x(backend, kind):
    x = _noncontiguous_x(kind)
    x0 = x.clone()
    f = _sym_start(18, None, torch.float32)
    f0 = f.clone()
    run_factor_update(f, x, 0.5, True, backend, f"factor[{backend}] {kind} x")
    assert_rel_close(f, expected_factor(f0, x, 0.5, True), torch.float32, f"factor[{backend}] {kind} x")
    assert torch.equal(x, x0), "x was modified"


def _factor_views(kind: str, d: int):
    """(buffer, view of it used as the factor): only the view may change."""
    if kind == "strided_rows":
        buf = torch.full((2 * d + 1, d + 4), 7.0, device=DEVICE)
        view = buf[1::2, 2 : d + 2]
    elif kind == "transposed":
        buf = _sym_start(d, None, torch.float32).clone()
        view = buf.T
    elif kind == "batch_slice":
        buf = torch.full((2 * BATCH, d, d), 7.0, device=DEVICE)
        view = buf[::2]
    else:
        raise AssertionError(kind)
    if kind != "transposed":
        view.copy_(_sym_start(d, view.shape[0] if view.dim() == 3 else None, torch.float32))
    assert not view.is_contiguous()
    return buf, view


@pytest.mark.parametrize("kind", ("strided_rows", "transposed", "batch_slice"))
@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_noncontiguous_factor(backend, kind):
    d_x = 17
    buf, view = _factor_views(kind, d_x + 1)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset()).fill_(False)
    buf0, f0 = buf.clone(), view.clone()
    x = _randn(*((BATCH,) if view.dim() == 3 else ()), 7, d_x, seed=21)
    run_factor_update(view, x, 0.95, True, backend, f"factor[{backend}] {kind} view")
    assert_rel_close(view, expected_factor(f0, x, 0.95, True), torch.float32, f"factor[{backend}] {kind} view")
    assert torch.equal(buf[outside], buf0[outside]), "memory outside the factor view changed"


@pytest.mark.parametrize("batched", (False, True), ids=("single", "batched"))
@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_decay0_overwrites_nan(backend, batched):
    b = BATCH if batched else None
    f = torch.full(((b,) if b else ()) + (18, 18), float("nan"), device=DEVICE)
    x = _randn(*((b,) if b else ()), 7, 17, seed=5)
    run_factor_update(f, x, 0.0, True, backend, f"factor[{backend}] decay 0 over NaN")
    assert torch.isfinite(f).all(), "decay = 0 read the NaN factor"
    assert_rel_close(f, factor_truth(x, True, batched), torch.float32, f"factor[{backend}] decay 0 over NaN")


@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_repeated_running_average(backend):
    """Three updates with different batches equal the closed-form weighted sum of their factors."""
    f = torch.eye(5, device=DEVICE, dtype=torch.float64)
    xs = [_randn(7, 4, seed=40 + i, dtype=torch.float64) for i in range(3)]
    for x in xs:
        run_factor_update(f, x, 0.9, True, backend, f"factor[{backend}] repeated")
    want = 0.9**3 * torch.eye(5, dtype=torch.float64)
    for i, x in enumerate(xs):
        want = want + 0.1 * 0.9 ** (2 - i) * factor_truth(x, True, False)
    assert_rel_close(f, want, torch.float64, f"factor[{backend}] repeated running average")


@pytest.mark.parametrize("backend", op_backends("kfac_factor_update"))
def test_factor_update_matches_reference(backend):
    x = _randn(3, 10, 13, 17, seed=9)
    f = _sym_start(18, 3, torch.float32)
    want = reference.kfac_factor_update(f.clone(), x.reshape(3, -1, 17), 0.95, True)
    run_factor_update(f, x, 0.95, True, backend, f"factor[{backend}] vs reference")
    assert_rel_close(f, want, torch.float32, f"factor[{backend}] vs reference")


# ================================================================================================================
# damped_inverse
# ================================================================================================================

INV_DIMS = (1, 2, 17, 64, 100)
INV_BATCHES = (None, 1, 5)  # None: a 2-d (d, d) input
KINDS = ("spd", "illcond", "rankdef")


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _from_eigs(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` with a random orthogonal ``Q``, exactly symmetric, float64 on the CPU."""
    q = _orthogonal(eigs.shape[0], seed)
    m = (q * eigs) @ q.T
    return (m + m.T) / 2


def make_matrix(kind: str, d: int, seed: int) -> tuple[torch.Tensor, float]:
    """(float64 CPU matrix, damping) of one kind; the scale of each matrix differs with the seed."""
    scale = 10.0 ** ((seed % 5) - 2)  # 0.01 .. 100
    if kind == "spd":
        x = torch.randn(d, 2 * d, generator=_gen(seed), dtype=torch.float64)
        return scale * (x @ x.T / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)), 1e-3 * scale
    if kind == "illcond":  # condition number 1e6 before damping
        return _from_eigs(scale * torch.logspace(0, -6, d, dtype=torch.float64), seed), 1e-3 * scale
    if kind == "rankdef":  # rank d // 2 (the zero matrix for d = 1)
        x = torch.randn(d, d // 2, generator=_gen(seed), dtype=torch.float64)
        m = scale * (x @ x.T / max(d // 2, 1))
        return (m + m.T) / 2, 1e-2 * scale
    raise AssertionError(kind)


DAMPING_FORMS = ("vector", "float", "0d")


def make_batch(kind: str, d: int, b: int | None, dtype, seed: int = 0, form: str = "vector"):
    """(m on DEVICE in ``dtype``, damping argument, damping per matrix as a (B,) float64 tensor).

    ``form`` is the damping argument's form: ``"vector"`` a (B,) tensor of per-matrix values, ``"float"`` one
    shared Python float, ``"0d"`` one shared 0-d tensor."""
    n = 1 if b is None else b
    mats, damps = zip(*(make_matrix(kind, d, seed + 7 * i) for i in range(n)))
    m = torch.stack(mats)
    if form == "vector":
        damping = torch.tensor(damps, dtype=torch.float64)
    else:  # one shared value: the largest, so that every matrix of the batch is comfortably damped
        shared = max(damps)
        damps = (shared,) * n
        damping = shared if form == "float" else torch.tensor(shared, dtype=torch.float64)
    m = m.to(dtype)
    if b is None:
        m = m[0]
    if isinstance(damping, torch.Tensor):
        damping = damping.to(DEVICE)
    return m.to(DEVICE), damping, torch.tensor(damps, dtype=torch.float64)


def inverse_truth(m: torch.Tensor, damps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``torch.linalg.inv(m + damping I)`` in float64 of the rounded ``m``, condition number per matrix)."""
    m3 = m.detach().double().cpu()
    m3 = m3 if m3.dim() == 3 else m3.unsqueeze(0)
    md = m3 + damps.reshape(-1, 1, 1) * torch.eye(m3.shape[-1], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(md)
    cond = ev.abs().amax(1) / ev.abs().amin(1)
    # one matrix at a time: a batched LU of 200 x 200 or more fails in some MKL builds after torch.set_num_threads
    inv = torch.stack([torch.linalg.inv(x) for x in md])
    return (inv if m.dim() == 3 else inv[0]), cond


def inverse_tol(dtype: torch.dtype, cond: float, d: int, method: str) -> float:
    """Relative Frobenius error allowed for the inverse of a matrix of condition number ``cond``.

    Backward-stable methods: ``50 cond eps``. Newton-Schulz stops at ``||M X - I||_F / sqrt(d) <= tol``, and
    ``||X - M^{-1}||_F <= ||M^{-1}||_2 ||M X - I||_F <= ||M^{-1}||_F sqrt(d) tol``, which adds ``sqrt(d) tol``."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    tol = max(REL_TOL[dt], 50 * cond * EPS[dt])
    if method == "newton_schulz":
        tol += math.sqrt(d) * reference.newton_schulz_defaults(dt)[1]
    return tol


def check_inverse(inv, m, damps, method, what):
    assert inv.shape == m.shape, f"{what}: shape {tuple(inv.shape)} for m {tuple(m.shape)}"
    assert inv.dtype == m.dtype and inv.device == m.device, f"{what}: {inv.dtype} on {inv.device}"
    symmetric = torch.equal(inv, inv.mT)
    assert symmetric, f"{what}: inverse not exactly symmetric"
    truth, cond = inverse_truth(m, damps)
    inv3, truth3 = (inv, truth) if m.dim() == 3 else (inv.unsqueeze(0), truth.unsqueeze(0))
    for i in range(inv3.shape[0]):  # per matrix: their scales and condition numbers differ
        err = rel_err(inv3[i], truth3[i])
        tol = inverse_tol(m.dtype, cond[i].item(), m.shape[-1], method)
        assert err <= tol, f"{what}: matrix {i}: relative error {err:.3g} > {tol:.3g} (cond {cond[i]:.3g})"


def _inverse_cases():
    params = []
    for method in METHODS:
        for backend in inverse_backends(method):
            for kind, d, b, dtype in itertools.product(KINDS, INV_DIMS, INV_BATCHES, (torch.float32, torch.float64)):
                if _reduced(backend) and (d == 100 or (b == 5 and d == 64) or (b is None) != (dtype == torch.float32)):
                    continue
                pid = f"{method}-{backend}-{kind}-d{d}-{'2d' if b is None else f'B{b}'}-{DT_ID[dtype]}"
                params.append(pytest.param(method, backend, kind, d, b, dtype, id=pid))
    return params


@pytest.mark.parametrize("method, backend, kind, d, b, dtype", _inverse_cases())
def test_damped_inverse(method, backend, kind, d, b, dtype):
    # every damping form with every kind, size and batch layout
    form = DAMPING_FORMS[(KINDS.index(kind) + INV_DIMS.index(d) + INV_BATCHES.index(b)) % 3]
    m, damping, damps = make_batch(kind, d, b, dtype, seed=d, form=form)
    m0 = m.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DampingRaisedWarning)  # damping suffices here: it must not be raised
        inv, used = ops.damped_inverse(m, damping, method, backend=backend, return_damping=True)
    what = f"damped_inverse[{method}, {backend}] {kind} {tuple(m.shape)} {dtype}"
    check_inverse(inv, m, damps, method, what)
    assert torch.equal(used.cpu(), damps), f"{what}: damping used {used} != given {damps}"
    assert used.dtype == torch.float64 and used.shape == (1 if b is None else b,)
    assert torch.equal(m, m0), f"{what}: m was modified"


@pytest.mark.parametrize("backend", inverse_backends("cholesky"))
def test_damped_inverse_contiguous_on_every_path(backend, monkeypatch):
    """Contiguous and right whichever path the backend takes: d = 200 is past the CUDA kernel's shared memory (the
    CUDA op then runs ATen's batched Cholesky, whose inverse comes in column-major batches), and
    PYCURV_CUDA_INV_MAX_D=8 sends d = 17 there as well."""
    for d, env in ((17, None), (200, None), (17, "8")):
        if _reduced(backend) and d > 100:
            continue
        if env is not None:
            monkeypatch.setenv("PYCURV_CUDA_INV_MAX_D", env)
        m, damping, damps = make_batch("spd", d, 3, torch.float32, seed=d)
        inv = ops.damped_inverse(m, damping, "cholesky", backend=backend)
        what = f"damped_inverse[cholesky, {backend}] d={d} PYCURV_CUDA_INV_MAX_D={env}"
        assert inv.is_contiguous(), f"{what}: strides {inv.stride()}"
        check_inverse(inv, m, damps, "cholesky", what)


def _method_backend_params(reduced_ok: bool = True):
    return [
        pytest.param(method, backend, id=f"{method}-{backend}")
        for method in METHODS
        for backend in inverse_backends(method)
        if reduced_ok or not _reduced(backend)
    ]


@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_reads_lower_triangle(method, backend):
    m, damping, damps = make_batch("spd", 17, 5, torch.float64, seed=3)
    garbage = m + torch.triu(_randn(5, 17, 17, seed=4, dtype=torch.float64), diagonal=1) * 1e3
    inv = ops.damped_inverse(garbage, damping, method, backend=backend)
    check_inverse(inv, m, damps, method, f"damped_inverse[{method}, {backend}] upper triangle ignored")


@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_16bit_input(method, backend):
    m, damping, damps = make_batch("spd", 17, 2, torch.float32, seed=6, form="0d")
    mb = m.to(torch.bfloat16)
    inv = ops.damped_inverse(mb, damping, method, backend=backend)
    assert inv.dtype == torch.bfloat16 and inv.shape == mb.shape
    truth, _ = inverse_truth(mb, damps)
    assert_rel_close(inv, truth, torch.bfloat16, f"damped_inverse[{method}, {backend}] bf16")


def _indefinite(d: int, neg: float, seed: int, negative_inverse_diagonal: bool) -> torch.Tensor:
    """A symmetric matrix with one eigenvalue ``neg < 0`` and the others in [0.5, 2].

    With ``negative_inverse_diagonal`` the negative eigenvector is a coordinate axis, so the inverse has a negative
    diagonal entry; otherwise it is spread over all coordinates and every diagonal entry of the inverse is
    positive (the inverse is still indefinite)."""
    eigs = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    eigs[0] = neg
    if negative_inverse_diagonal:
        q = torch.eye(d, dtype=torch.float64)
        q[1:, 1:] = _orthogonal(d - 1, seed)
    else:
        q = _orthogonal(d, seed)
    m = (q * eigs) @ q.T
    m = (m + m.T) / 2
    if not negative_inverse_diagonal:
        assert (torch.linalg.inv(m).diagonal() > 0).all()
    return m


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_raises_damping(method, backend, dtype):
    """An indefinite matrix in a batch: its damping is raised (warned, returned), the others are unaffected."""
    d = 17
    spd0, _ = make_matrix("spd", d, 1)
    spd2, _ = make_matrix("spd", d, 2)
    m = torch.stack([spd0, _indefinite(d, -0.5, 3, True), spd2]).to(device=DEVICE, dtype=dtype)
    with pytest.warns(DampingRaisedWarning, match=r"damped_inverse: .*\{1: [^,}]*\}"):
        inv, used = ops.damped_inverse(m, 1e-3, method, backend=backend, return_damping=True)
    assert used.shape == (3,) and used.dtype == torch.float64
    used = used.cpu()
    assert used[0] == 1e-3 and used[2] == 1e-3, f"damping of the positive definite matrices changed: {used}"
    assert used[1] > 0.5, f"raised damping {used[1]} leaves the matrix indefinite"
    assert torch.isfinite(inv).all()
    check_inverse(inv, m, used, method, f"damped_inverse[{method}, {backend}] raised damping")
    # without return_damping: the same inverse
    with pytest.warns(DampingRaisedWarning):
        inv2 = ops.damped_inverse(m, 1e-3, method, backend=backend)
    assert_rel_close(inv2, inv, dtype, "without return_damping")


@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_raises_damping_2d(method, backend):
    m = _indefinite(5, -0.5, 8, True).to(DEVICE)
    with pytest.warns(DampingRaisedWarning):
        inv, used = ops.damped_inverse(m, 1e-3, method, backend=backend, return_damping=True)
    assert inv.shape == (5, 5) and used.shape == (1,)
    check_inverse(inv, m, used.cpu(), method, f"damped_inverse[{method}, {backend}] raised damping, 2-d")


@pytest.mark.parametrize("backend", inverse_backends("newton_schulz"))
@pytest.mark.parametrize("spread", (False, True), ids=("axis", "spread"))
def test_newton_schulz_indefinite_falls_back(backend, spread):
    """An indefinite matrix must be noticed by Newton-Schulz and get more damping.

    "axis": the inverse has a negative diagonal entry. "spread": every diagonal entry of the (indefinite) inverse
    is positive, so only the diverging residual of the iteration started at ``I / ||M||_inf`` gives it away."""
    spd0, _ = make_matrix("spd", 17, 1)
    m = torch.stack([spd0, _indefinite(17, -0.5, 5, not spread)]).to(DEVICE)
    with pytest.warns(DampingRaisedWarning):
        inv, used = ops.damped_inverse(m, 1e-3, "newton_schulz", backend=backend, return_damping=True)
    used = used.cpu()
    assert used[0] == 1e-3 and used[1] > 0.5, f"damping used {used}"
    check_inverse(inv, m, used, "cholesky", f"damped_inverse[newton_schulz, {backend}] indefinite")


@pytest.mark.parametrize("backend", inverse_backends("newton_schulz"))
def test_newton_schulz_not_converged_falls_back(backend):
    """Condition 1e10 needs more Newton-Schulz iterations than allowed: the result comes from Cholesky instead."""
    d = 17
    m = torch.stack([make_matrix("spd", d, 1)[0], _from_eigs(torch.logspace(0, -10, d, dtype=torch.float64), 2)])
    m = m.to(DEVICE)
    info = reference.damped_inverse(m, 0.0, "newton_schulz")[1]
    assert info.tolist() == [0, 1], "the premise: Newton-Schulz converges on the first matrix only"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DampingRaisedWarning)
        inv = ops.damped_inverse(m, 0.0, "newton_schulz", backend=backend)
    check_inverse(inv, m, torch.zeros(2, dtype=torch.float64), "cholesky", f"newton_schulz[{backend}] fallback")


@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_gives_up(method, backend):
    m = torch.stack([make_matrix("spd", 5, 1)[0], -1e6 * torch.eye(5, dtype=torch.float64)]).to(DEVICE)
    with pytest.raises(ValueError, match=r"damped_inverse: matrices \[1\] .*not positive definite"):
        ops.damped_inverse(m, 1e-3, method, backend=backend, max_raises=0)


@pytest.mark.parametrize("bad", ("nan", "inf"))
@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_nonfinite_raises(method, backend, bad):
    m = make_batch("spd", 6, 3, torch.float32, seed=1)[0]
    m[1, 2, 3] = m[1, 3, 2] = float(bad)
    with pytest.raises(ValueError, match=r"damped_inverse: m is not finite .*\[1\]"):
        ops.damped_inverse(m, 1e-3, method, backend=backend)


@pytest.mark.parametrize("method, backend", _method_backend_params())
def test_damped_inverse_matches_reference(method, backend):
    m, damping, damps = make_batch("spd", 17, 5, torch.float64, seed=2)
    inv = ops.damped_inverse(m, damps.to(DEVICE), method, backend=backend)
    want, info = reference.damped_inverse(m, damps.to(DEVICE), method)
    assert (info == 0).all()
    tol = inverse_tol(torch.float64, inverse_truth(m, damps)[1].max().item(), 17, method)
    assert rel_err(inv, want) <= 2 * tol


def test_damped_inverse_methods_agree():
    m, damping, damps = make_batch("illcond", 64, 5, torch.float64, seed=3)
    invs = {method: ops.damped_inverse(m, damping, method) for method in METHODS}
    cond = inverse_truth(m, damps)[1].max().item()
    for method in METHODS[1:]:
        err = rel_err(invs[method], invs["cholesky"])
        assert err <= 2 * inverse_tol(torch.float64, cond, 64, method), f"{method} vs cholesky: {err:.3g}"


# ================================================================================================================
# sym_eig
# ================================================================================================================


def _eig_matrix(kind: str, d: int, b: int | None, seed: int) -> torch.Tensor:
    n = 1 if b is None else b
    if kind == "random":
        m = torch.stack([make_matrix("spd", d, seed + i)[0] - 0.5 * (seed % 5 + 1) for i in range(n)])
    elif kind == "repeated":  # eigenvalues 1 and 3, each with multiplicity about d / 2
        eigs = torch.ones(d, dtype=torch.float64)
        eigs[: d // 2] = 3.0
        m = torch.stack([_from_eigs(eigs, seed + i) for i in range(n)])
    else:
        raise AssertionError(kind)
    return m if b is not None else m[0]


def _sym_eig_cases():
    params = []
    for backend in op_backends("sym_eig"):
        for kind, d, b, dtype in itertools.product(
            ("random", "repeated"), (1, 2, 17, 64), INV_BATCHES, (torch.float32, torch.float64)
        ):
            if _reduced(backend) and (d == 64 or (b is None) != (dtype == torch.float32)):
                continue
            pid = f"{backend}-{kind}-d{d}-{'2d' if b is None else f'B{b}'}-{DT_ID[dtype]}"
            params.append(pytest.param(backend, kind, d, b, dtype, id=pid))
    return params


def check_eig(vals, vecs, m, what):
    d = m.shape[-1]
    dt = torch.float64 if m.dtype == torch.float64 else torch.float32
    assert vals.shape == m.shape[:-1] and vecs.shape == m.shape, f"{what}: shapes {vals.shape}, {vecs.shape}"
    assert vals.dtype == dt and vecs.dtype == dt, f"{what}: dtypes {vals.dtype}, {vecs.dtype}"
    assert (vals[..., 1:] >= vals[..., :-1]).all(), f"{what}: eigenvalues not ascending"
    m64 = m.detach().double().cpu()
    v64, q64 = vals.double().cpu(), vecs.double().cpu()
    tol = max(REL_TOL[dt], 10 * d * EPS[dt])
    want = torch.linalg.eigvalsh(m64)
    scale = m64.norm(dim=(-2, -1)).clamp_min(1e-300).unsqueeze(-1)
    err = ((v64 - want).abs() / scale).max().item()
    assert err <= tol, f"{what}: eigenvalue error {err:.3g} (relative to ||m||) > {tol:.3g}"
    recon = (q64 * v64.unsqueeze(-2)) @ q64.mT
    err = ((recon - m64).norm(dim=(-2, -1)) / scale.squeeze(-1)).max().item()
    assert err <= tol, f"{what}: ||Q diag Q^T - m|| / ||m|| = {err:.3g} > {tol:.3g}"
    eye = torch.eye(d, dtype=torch.float64)
    err = (q64.mT @ q64 - eye).abs().max().item()
    assert err <= tol, f"{what}: max |Q^T Q - I| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend, kind, d, b, dtype", _sym_eig_cases())
def test_sym_eig(backend, kind, d, b, dtype):
    m = _eig_matrix(kind, d, b, seed=d).to(device=DEVICE, dtype=dtype)
    vals, vecs = ops.sym_eig(m, backend=backend)
    check_eig(vals, vecs, m, f"sym_eig[{backend}] {kind} {tuple(m.shape)} {dtype}")


@pytest.mark.parametrize("backend", op_backends("sym_eig"))
def test_sym_eig_reads_lower_triangle(backend):
    m = _eig_matrix("random", 17, 3, seed=1).to(DEVICE)
    garbage = m + torch.triu(_randn(3, 17, 17, seed=2, dtype=torch.float64), diagonal=1)
    vals, vecs = ops.sym_eig(garbage, backend=backend)
    check_eig(vals, vecs, m, f"sym_eig[{backend}] upper triangle ignored")


@pytest.mark.parametrize("backend", op_backends("sym_eig"))
def test_sym_eig_16bit_input(backend):
    m = _eig_matrix("random", 17, 2, seed=3).to(device=DEVICE, dtype=torch.bfloat16)
    vals, vecs = ops.sym_eig(m, backend=backend)
    check_eig(vals, vecs, m.float(), f"sym_eig[{backend}] bf16 input")


# ================================================================================================================
# kron_precondition, kron_precondition_eigen, kl_clip_scale
# ================================================================================================================

# (d_out, d_in); d_in includes the bias column where a layer has one (17 = 16 weights + bias)
KRON_SHAPES = ((1, 1), (3, 5), (17, 4), (8, 17))
KRON_BATCHES = (None, 3)
# (grad dtype, factor-matrix dtype)
KRON_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
    (torch.float32, torch.float64),
)


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec of ``(..., r, c)``: ``vec(G X A) = (A^T ⊗ G) vec(X)``."""
    return x.mT.reshape(*x.shape[:-2], -1)


def unvec(v: torch.Tensor, r: int, c: int) -> torch.Tensor:
    return v.reshape(*v.shape[:-1], c, r).mT


def _spd_factor(d: int, b: int | None, seed: int) -> torch.Tensor:
    """Well-conditioned SPD factors (float64, CPU), ``(d, d)`` or ``(b, d, d)``."""
    n = 1 if b is None else b
    out = []
    for i in range(n):
        x = torch.randn(d, 2 * d, generator=_gen(seed + i), dtype=torch.float64)
        out.append(x @ x.T / (2 * d) + 0.5 * torch.eye(d, dtype=torch.float64))
    s = torch.stack(out)
    return s if b is not None else s[0]


def _kron_cases(op: str):
    params = []
    for backend in op_backends(op):
        for i, ((d_out, d_in), b, (gd, md)) in enumerate(itertools.product(KRON_SHAPES, KRON_BATCHES, KRON_DTYPES)):
            if _reduced(backend) and i % 3:
                continue
            pid = f"{backend}-{d_out}x{d_in}-{'2d' if b is None else f'B{b}'}-g{DT_ID[gd]}-m{DT_ID[md]}"
            params.append(pytest.param(backend, d_out, d_in, b, gd, md, id=pid))
    return params


def _kron_tol(grad_dtype, mat_dtype) -> float:
    if grad_dtype == torch.float64 and mat_dtype == torch.float64:
        return REL_TOL[torch.float64]
    # the result has grad's dtype: a float32 grad with float64 matrices ends rounded to float32
    return REL_TOL[grad_dtype if grad_dtype != torch.float64 else torch.float32]


@pytest.mark.parametrize("backend, d_out, d_in, b, grad_dtype, mat_dtype", _kron_cases("kron_precondition"))
def test_kron_precondition(backend, d_out, d_in, b, grad_dtype, mat_dtype):
    lead = () if b is None else (b,)
    grad = _randn(*lead, d_out, d_in, seed=d_out * 31 + d_in, dtype=grad_dtype)
    g_inv = torch.linalg.inv(_spd_factor(d_out, b, 1)).to(device=DEVICE, dtype=mat_dtype)
    a_inv = torch.linalg.inv(_spd_factor(d_in, b, 2)).to(device=DEVICE, dtype=mat_dtype)
    g_inv, a_inv = (g_inv + g_inv.mT) / 2, (a_inv + a_inv.mT) / 2
    out = ops.kron_precondition(grad, g_inv, a_inv, backend=backend)
    assert out.shape == grad.shape and out.dtype == grad.dtype and out.device == grad.device
    # ground truth: the factors are the inverses of the (rounded) inverses given; solve the dense Kronecker system
    a64, g64 = torch.linalg.inv(a_inv.double().cpu()), torch.linalg.inv(g_inv.double().cpu())
    rhs = vec(grad.double().cpu())
    want = unvec(torch.linalg.solve(_kron(a64, g64), rhs), d_out, d_in)
    what = f"kron_precondition[{backend}] {tuple(grad.shape)} grad {grad_dtype} mats {mat_dtype}"
    err = rel_err(out, want)
    assert err <= _kron_tol(grad_dtype, mat_dtype), f"{what}: relative error {err:.3g}"


def _kron(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A ⊗ G``, batched over a leading dimension when there is one."""
    if a.dim() == 2:
        return torch.kron(a, g)
    return torch.stack([torch.kron(ai, gi) for ai, gi in zip(a, g)])


def test_vec_convention():
    """The ground truth's convention: K-FAC's ``(A ⊗ G)^{-1} vec(grad)`` is ``G^{-1} grad A^{-1}``; with row-major
    flattening the Kronecker order swaps."""
    a, g = _spd_factor(4, None, 1), _spd_factor(3, None, 2)
    x = torch.randn(3, 4, generator=_gen(3), dtype=torch.float64)
    step = torch.linalg.inv(g) @ x @ torch.linalg.inv(a)
    assert torch.allclose(unvec(torch.linalg.solve(torch.kron(a, g), vec(x)), 3, 4), step, rtol=1e-12, atol=0)
    assert torch.allclose(torch.linalg.solve(torch.kron(g, a), x.reshape(-1)).reshape(3, 4), step, rtol=1e-12, atol=0)
    assert not torch.allclose(unvec(torch.linalg.solve(torch.kron(g, a), vec(x)), 3, 4), step, rtol=1e-3)


def _eigen_inputs(d_out, d_in, b, mat_dtype, zero_eigs: bool = False):
    """(q_g, q_a, d_g, d_a) from float64 eigendecompositions of SPD factors, rounded to ``mat_dtype``. With
    ``zero_eigs`` the factors are singular (rank deficient), which only the damping makes invertible."""
    g, a = _spd_factor(d_out, b, 4), _spd_factor(d_in, b, 5)
    d_g, q_g = torch.linalg.eigh(g)
    d_a, q_a = torch.linalg.eigh(a)
    if zero_eigs:
        d_g[..., : (d_out + 1) // 2] = 0
        d_a[..., : (d_in + 1) // 2] = 0
    return tuple(t.to(device=DEVICE, dtype=mat_dtype) for t in (q_g, q_a, d_g, d_a))


def eigen_truth(grad, q_g, q_a, d_g, d_a, damps):
    """``(A ⊗ G + damping I)^{-1} vec(grad)`` by a dense solve, with ``A = Q_A diag(d_A) Q_A^T`` (and G) in float64
    of the rounded inputs."""
    q_g, q_a, d_g, d_a = (t.double().cpu() for t in (q_g, q_a, d_g, d_a))
    g = (q_g * d_g.unsqueeze(-2)) @ q_g.mT
    a = (q_a * d_a.unsqueeze(-2)) @ q_a.mT
    k = _kron(a, g)
    n = k.shape[-1]
    k = k + damps.reshape(*([-1] if k.dim() == 3 else []), 1, 1) * torch.eye(n, dtype=torch.float64)
    d_out, d_in = grad.shape[-2], grad.shape[-1]
    return unvec(torch.linalg.solve(k, vec(grad.double().cpu())), d_out, d_in)


@pytest.mark.parametrize("backend, d_out, d_in, b, grad_dtype, mat_dtype", _kron_cases("kron_precondition_eigen"))
def test_kron_precondition_eigen(backend, d_out, d_in, b, grad_dtype, mat_dtype):
    lead = () if b is None else (b,)
    grad = _randn(*lead, d_out, d_in, seed=d_out * 37 + d_in, dtype=grad_dtype)
    q_g, q_a, d_g, d_a = _eigen_inputs(d_out, d_in, b, mat_dtype, zero_eigs=d_out % 2 == 1)
    if b is None:
        damping, damps = 0.05, torch.tensor([0.05], dtype=torch.float64)
    else:
        damps = torch.tensor([0.05, 0.2, 1.0], dtype=torch.float64)
        damping = damps.to(DEVICE)
    out = ops.kron_precondition_eigen(grad, q_g, q_a, d_g, d_a, damping, backend=backend)
    assert out.shape == grad.shape and out.dtype == grad.dtype and out.device == grad.device
    want = eigen_truth(grad, q_g, q_a, d_g, d_a, damps if b is not None else damps[0])
    what = f"kron_precondition_eigen[{backend}] {tuple(grad.shape)} grad {grad_dtype} mats {mat_dtype}"
    err = rel_err(out, want)
    # the truth uses the rounded Q's as given; they are orthogonal only to eps, which the damped spectrum here
    # (condition number a few hundred at most) keeps far below the tolerance
    tol = _kron_tol(grad_dtype, mat_dtype)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", op_backends("kron_precondition_eigen"))
def test_eigen_with_zero_damping_equals_inverse_form(backend):
    """With zero damping both forms give ``G^{-1} grad A^{-1}``."""
    q_g, q_a, d_g, d_a = _eigen_inputs(6, 5, 2, torch.float64)
    g_inv = (q_g / d_g.unsqueeze(-2)) @ q_g.mT
    a_inv = (q_a / d_a.unsqueeze(-2)) @ q_a.mT
    grad = _randn(2, 6, 5, seed=8, dtype=torch.float64)
    x = ops.kron_precondition_eigen(grad, q_g, q_a, d_g, d_a, 0.0, backend=backend)
    y = ops.kron_precondition(grad, g_inv, a_inv)
    assert_rel_close(x, y, torch.float64, f"kron_precondition_eigen[{backend}] vs inverse form")


def _kl_hand(precond, grads, lr, kl_clip) -> float:
    vg = 0.0
    for p, g in zip(precond, grads):
        for pi, gi in zip(p.double().flatten().tolist(), g.double().flatten().tolist()):
            vg += pi * gi
    return min(1.0, math.sqrt(kl_clip / abs(lr * lr * vg)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=("f32", "bf16", "f64"))
@pytest.mark.parametrize("case", ("clipped", "unclipped", "negative"))
def test_kl_clip_scale(case, dtype):
    shapes = [(3, 4), (5,), (2, 3, 3)]
    grads = [_randn(*s, seed=i, dtype=dtype) for i, s in enumerate(shapes)]
    precond = [(g.double() * (1.5 + i)).to(dtype) for i, g in enumerate(grads)]
    if case == "negative":  # <p, g> < 0 overall: its absolute value counts
        precond = [-p for p in precond]
    lr, kl_clip = (0.1, 1e-3) if case != "unclipped" else (1e-3, 10.0)
    nu = ops.kl_clip_scale(precond, grads, lr, kl_clip)
    assert nu.dim() == 0 and nu.device == grads[0].device
    assert nu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _kl_hand(precond, grads, lr, kl_clip)
    assert (want < 1) == (case != "unclipped")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(nu.item() - want) <= tol * want, f"nu {nu.item()} != {want}"


# ================================================================================================================
# bad input
# ================================================================================================================

_OTHER = torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")
_WRONG_BACKEND = "cpu" if DEVICE.type == "cuda" else "cuda"
# a compiled backend of this device that does not implement Newton-Schulz
_NO_NS_BACKEND = "cuda" if DEVICE.type == "cuda" else "cpu"


def _f(*shape, dtype=torch.float32, device=DEVICE):
    if device.type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape).to(dtype).to(device)


def _spd(*shape):
    x = torch.randn(*shape, dtype=torch.float64)
    return (x @ x.mT + torch.eye(shape[-1], dtype=torch.float64)).float().to(DEVICE)


# name -> (factor, x, kwargs, exception, regex the message must match: it names the argument)
BAD_FACTOR = {
    "factor_1d": (lambda: (_f(4), _f(3, 4)), {}, ValueError, r"\bfactor must be square.*\(4,\)"),
    "factor_4d": (lambda: (_f(2, 2, 4, 4), _f(2, 2, 3, 4)), {}, ValueError, r"\bfactor must be square"),
    "factor_not_square": (lambda: (_f(4, 5), _f(3, 4)), {}, ValueError, r"\bfactor must be square.*\(4, 5\)"),
    "factor_int": (lambda: (torch.zeros(4, 4, dtype=torch.int64, device=DEVICE), _f(3, 4)), {}, TypeError,
                   r"\bfactor must have dtype"),
    "factor_bf16": (lambda: (_f(4, 4, dtype=torch.bfloat16), _f(3, 4)), {}, TypeError, r"\bfactor must have dtype"),
    "factor_not_tensor": (lambda: ([[1.0]], _f(3, 1)), {}, TypeError, r"\bfactor must be a torch.Tensor"),
    "x_int": (lambda: (_f(4, 4), torch.ones(3, 4, dtype=torch.int32, device=DEVICE)), {}, TypeError,
              r"\bx must have dtype"),
    "x_bool": (lambda: (_f(4, 4), torch.ones(3, 4, dtype=torch.bool, device=DEVICE)), {}, TypeError,
               r"\bx must have dtype"),
    "x_1d": (lambda: (_f(4, 4), _f(4)), {}, ValueError, r"\bx must be \(\.\.\., d_x\)"),
    "x_empty": (lambda: (_f(4, 4), _f(0, 4)), {}, ValueError, r"\bx must not be empty"),
    "x_not_tensor": (lambda: (_f(4, 4), [[1.0] * 4]), {}, TypeError, r"\bx must be a torch.Tensor"),
    "d_mismatch": (lambda: (_f(4, 4), _f(3, 5)), {}, ValueError, r"\bx must have d_x = 4"),
    "d_mismatch_bias": (lambda: (_f(4, 4), _f(3, 4)), {"bias": True}, ValueError, r"\bx must have d_x = 3.*bias=True"),
    "d_mismatch_no_bias": (lambda: (_f(5, 5), _f(3, 4)), {}, ValueError, r"\bx must have d_x = 5.*bias=False"),
    "batch_mismatch": (lambda: (_f(3, 4, 4), _f(2, 7, 4)), {}, ValueError, r"\bx must have factor's batch size 3"),
    "batched_x_2d": (lambda: (_f(3, 4, 4), _f(3, 4)), {}, ValueError, r"\bx must be \(B, \.\.\., d_x\)"),
    "x_f64_factor_f32": (lambda: (_f(4, 4), _f(3, 4, dtype=torch.float64)), {}, TypeError, r"float64 x.*\bfactor"),
    "x_other_device": (lambda: (_f(4, 4), _f(3, 4, device=_OTHER)), {}, ValueError, r"\bx must be on factor's device"),
    "decay_negative": (lambda: (_f(4, 4), _f(3, 4)), {"decay": -0.1}, ValueError, r"\bdecay must be .*\[0, 1\]"),
    "decay_above_1": (lambda: (_f(4, 4), _f(3, 4)), {"decay": 1.5}, ValueError, r"\bdecay must be .*-?1\.5"),
    "decay_nan": (lambda: (_f(4, 4), _f(3, 4)), {"decay": float("nan")}, ValueError, r"\bdecay must be"),
    "decay_bool": (lambda: (_f(4, 4), _f(3, 4)), {"decay": True}, ValueError, r"\bdecay must be"),
    "decay_str": (lambda: (_f(4, 4), _f(3, 4)), {"decay": "0.5"}, ValueError, r"\bdecay must be"),
    "decay_tensor": (lambda: (_f(4, 4), _f(3, 4)), {"decay": torch.tensor(0.5)}, ValueError, r"\bdecay must be"),
    "bias_not_bool": (lambda: (_f(5, 5), _f(3, 4)), {"bias": 1}, TypeError, r"\bbias must be a bool"),
    "unknown_backend": (lambda: (_f(4, 4), _f(3, 4)), {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
    "backend_wrong_device": (lambda: (_f(4, 4), _f(3, 4)), {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
}


@pytest.mark.parametrize("case", list(BAD_FACTOR))
def test_factor_update_bad_input(case):
    make, kw, exc, pattern = BAD_FACTOR[case]
    factor, x = make()
    kw = {"decay": 0.5, **kw}
    decay = kw.pop("decay")
    bias = kw.pop("bias", False)
    snap = factor.clone() if isinstance(factor, torch.Tensor) else None
    raises_naming("kfac_factor_update", exc, pattern, lambda: ops.kfac_factor_update(factor, x, decay, bias, **kw))
    if snap is not None:
        assert torch.equal(factor, snap), f"factor changed by the failing call {case}"


def test_factor_untouched_after_failing_calls():
    """Every failure is detected before anything is written, also for failures only the factor makes wrong."""
    f = _spd(6, 6)
    snap = f.clone()
    x = _f(5, 6)
    for bad in (
        lambda: ops.kfac_factor_update(f, x, 1.5),
        lambda: ops.kfac_factor_update(f, x, 0.5, True),
        lambda: ops.kfac_factor_update(f, x.double(), 0.5),
        lambda: ops.kfac_factor_update(f, x, 0.5, backend=_WRONG_BACKEND),
        lambda: ops.kfac_factor_update(f, x, 0.5, backend="numpy"),
        lambda: ops.kfac_factor_update(f, _f(5, 6, device=_OTHER), 0.5),
        lambda: ops.kfac_factor_update(f, x.long(), 0.5),
        lambda: ops.kfac_factor_update(f.T, x[:, :5], 0.0),
        lambda: ops.kfac_factor_update(f[None], x, 0.0),
    ):
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            bad()
        assert torch.equal(f, snap), "factor changed by a failing call"


BAD_INVERSE = {
    "m_1d": (lambda: _f(4), {}, ValueError, r"\bm must be square.*\(4,\)"),
    "m_4d": (lambda: _f(2, 2, 3, 3), {}, ValueError, r"\bm must be square.*\(2, 2, 3, 3\)"),
    "m_not_square": (lambda: _f(3, 4), {}, ValueError, r"\bm must be square.*\(3, 4\)"),
    "m_not_square_batched": (lambda: _f(2, 3, 4), {}, ValueError, r"\bm must be square"),
    "m_int": (lambda: torch.eye(3, dtype=torch.int64, device=DEVICE), {}, TypeError, r"\bm must have dtype"),
    "m_empty": (lambda: _f(0, 0), {}, ValueError, r"\bm must not be empty"),
    "m_not_tensor": (lambda: [[1.0]], {}, TypeError, r"\bm must be a torch.Tensor"),
    "damping_negative": (lambda: _spd(3, 3), {"damping": -1e-3}, ValueError, r"\bdamping must be finite and >= 0"),
    "damping_nan": (lambda: _spd(3, 3), {"damping": float("nan")}, ValueError, r"\bdamping must be finite"),
    "damping_inf": (lambda: _spd(3, 3), {"damping": float("inf")}, ValueError, r"\bdamping must be finite"),
    "damping_bool": (lambda: _spd(3, 3), {"damping": True}, TypeError, r"\bdamping must be a float or a tensor"),
    "damping_str": (lambda: _spd(3, 3), {"damping": "1e-3"}, TypeError, r"\bdamping must be a float or a tensor"),
    "damping_none": (lambda: _spd(3, 3), {"damping": None}, TypeError, r"\bdamping must be a float or a tensor"),
    "damping_wrong_length": (lambda: _spd(2, 3, 3), {"damping": torch.ones(3, dtype=torch.float64)}, ValueError,
                             r"\bdamping must be .*\(2,\).*\(3,\)"),
    "damping_2d": (lambda: _spd(2, 3, 3), {"damping": torch.ones(2, 1, dtype=torch.float64)}, ValueError,
                   r"\bdamping must be"),
    "damping_vector_for_2d_m": (lambda: _spd(3, 3), {"damping": torch.ones(2)}, ValueError, r"\bdamping must be"),
    "damping_int_tensor": (lambda: _spd(3, 3), {"damping": torch.tensor(1)}, TypeError,
                           r"\bdamping must be a floating tensor"),
    "method_unknown": (lambda: _spd(3, 3), {"method": "lu"}, ValueError, r"\bmethod must be one of"),
    "method_none": (lambda: _spd(3, 3), {"method": None}, ValueError, r"\bmethod must be one of"),
    "unknown_backend": (lambda: _spd(3, 3), {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
    "backend_wrong_device": (lambda: _spd(3, 3), {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
    "backend_without_method": (lambda: _spd(3, 3), {"backend": _NO_NS_BACKEND, "method": "newton_schulz"},
                               RuntimeError, rf"\bbackend '{_NO_NS_BACKEND}' is not available"),
    "triton_without_cholesky": (lambda: _spd(3, 3), {"backend": "triton", "method": "cholesky"}, RuntimeError,
                                r"\bbackend 'triton' is not available"),
}


@pytest.mark.parametrize("case", list(BAD_INVERSE))
def test_damped_inverse_bad_input(case):
    make, kw, exc, pattern = BAD_INVERSE[case]
    kw = {"damping": 1e-3, **kw}
    damping = kw.pop("damping")
    raises_naming("damped_inverse", exc, pattern, lambda: ops.damped_inverse(make(), damping, **kw))


BAD_EIG = {
    "m_1d": (lambda: _f(4), {}, ValueError, r"\bm must be square"),
    "m_not_square": (lambda: _f(2, 3, 4), {}, ValueError, r"\bm must be square.*\(2, 3, 4\)"),
    "m_int": (lambda: torch.eye(3, dtype=torch.int32, device=DEVICE), {}, TypeError, r"\bm must have dtype"),
    "m_empty": (lambda: _f(0, 3, 3), {}, ValueError, r"\bm must not be empty"),
    "unknown_backend": (lambda: _spd(3, 3), {"backend": "lapack"}, ValueError, r"\bbackend must be one of"),
    "backend_wrong_device": (lambda: _spd(3, 3), {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
}


@pytest.mark.parametrize("case", list(BAD_EIG))
def test_sym_eig_bad_input(case):
    make, kw, exc, pattern = BAD_EIG[case]
    with pytest.raises(exc, match=pattern) as info:
        ops.sym_eig(make(), **kw)
    assert "sym_eig" in str(info.value)


def _kron_args(d_out=4, d_in=3, b=None, **over):
    lead = () if b is None else (b,)
    args = {
        "grad": _f(*lead, d_out, d_in),
        "g_inv": _f(*lead, d_out, d_out),
        "a_inv": _f(*lead, d_in, d_in),
        "q_g": _f(*lead, d_out, d_out),
        "q_a": _f(*lead, d_in, d_in),
        "d_g": _f(*lead, d_out).abs(),
        "d_a": _f(*lead, d_in).abs(),
        "damping": 1e-3,
    }
    args.update(over)
    return args


# name -> (which ops, argument overrides, exception, regex)
BAD_KRON = {
    "grad_1d": ("both", lambda: {"grad": _f(4)}, ValueError, r"\bgrad must be \(d_out, d_in\)"),
    "grad_4d": ("both", lambda: {"grad": _f(1, 2, 4, 3)}, ValueError, r"\bgrad must be \(d_out, d_in\)"),
    "grad_int": ("both", lambda: {"grad": torch.ones(4, 3, dtype=torch.int64, device=DEVICE)}, TypeError,
                 r"\bgrad must have dtype"),
    "grad_empty": ("both", lambda: {"grad": _f(0, 3)}, ValueError, r"\bgrad must not be empty"),
    "grad_not_tensor": ("both", lambda: {"grad": [[0.0] * 3] * 4}, TypeError, r"\bgrad must be a torch.Tensor"),
    "g_inv_wrong_d": ("inverse", lambda: {"g_inv": _f(3, 3)}, ValueError, r"\bg_inv must be \(4, 4\), got \(3, 3\)"),
    "a_inv_missing_bias": ("inverse", lambda: {"grad": _f(4, 4)}, ValueError,
                           r"\ba_inv must be \(4, 4\), got \(3, 3\)"),
    "a_inv_not_square": ("inverse", lambda: {"a_inv": _f(3, 4)}, ValueError, r"\ba_inv must be \(3, 3\)"),
    "a_inv_int": ("inverse", lambda: {"a_inv": torch.eye(3, dtype=torch.int64, device=DEVICE)}, TypeError,
                  r"\ba_inv must have dtype"),
    "mixed_matrix_dtypes": ("inverse", lambda: {"a_inv": _f(3, 3, dtype=torch.float64)}, TypeError,
                            r"\ba_inv must have the dtype"),
    "batch_mismatch": ("inverse", lambda: _kron_args(b=2, g_inv=_f(3, 4, 4)), ValueError,
                       r"\bg_inv must be \(2, 4, 4\), got \(3, 4, 4\)"),
    "unbatched_mats_for_batched_grad": ("inverse", lambda: {"grad": _f(2, 4, 3)}, ValueError,
                                        r"\bg_inv must be \(2, 4, 4\)"),
    "a_inv_other_device": ("inverse", lambda: {"a_inv": _f(3, 3, device=_OTHER)}, ValueError,
                           r"\ba_inv must be on grad's device"),
    "q_g_wrong_d": ("eigen", lambda: {"q_g": _f(5, 5)}, ValueError, r"\bq_g must be \(4, 4\)"),
    "q_a_missing_bias": ("eigen", lambda: {"grad": _f(4, 4)}, ValueError, r"\bq_a must be \(4, 4\)"),
    "d_g_2d": ("eigen", lambda: {"d_g": _f(4, 1)}, ValueError, r"\bd_g must be \(4,\)"),
    "d_a_wrong_length": ("eigen", lambda: {"d_a": _f(4)}, ValueError, r"\bd_a must be \(3,\)"),
    "d_a_batch_mismatch": ("eigen", lambda: _kron_args(b=2, d_a=_f(3, 3)), ValueError, r"\bd_a must be \(2, 3\)"),
    "d_a_dtype": ("eigen", lambda: {"d_a": _f(3, dtype=torch.float64)}, TypeError, r"\bd_a must have the dtype"),
    "q_a_other_device": ("eigen", lambda: {"q_a": _f(3, 3, device=_OTHER)}, ValueError,
                         r"\bq_a must be on grad's device"),
    "damping_negative": ("eigen", lambda: {"damping": -1.0}, ValueError, r"\bdamping must be finite and >= 0"),
    "damping_bool": ("eigen", lambda: {"damping": False}, TypeError, r"\bdamping must be a float or a tensor"),
    "damping_wrong_shape": ("eigen", lambda: _kron_args(b=2, damping=torch.ones(3)), ValueError,
                            r"\bdamping must be .*\(2,\)"),
    "unknown_backend": ("both", lambda: {"backend": "blas"}, ValueError, r"\bbackend must be one of"),
    "backend_wrong_device": ("both", lambda: {"backend": _WRONG_BACKEND}, RuntimeError,
                             rf"\bbackend '{_WRONG_BACKEND}'"),
}


def _bad_kron_params():
    out = []
    for case, (which, *_rest) in BAD_KRON.items():
        for op in ("kron_precondition", "kron_precondition_eigen"):
            if which == "both" or (which == "inverse") == (op == "kron_precondition"):
                out.append(pytest.param(op, case, id=f"{op}-{case}"))
    return out


@pytest.mark.parametrize("op, case", _bad_kron_params())
def test_kron_precondition_bad_input(op, case):
    _, over, exc, pattern = BAD_KRON[case]
    over = over()
    args = over if "grad" in over and "g_inv" in over else _kron_args(**over)
    backend = args.pop("backend", "auto")

    def call():
        if op == "kron_precondition":
            return ops.kron_precondition(args["grad"], args["g_inv"], args["a_inv"], backend=backend)
        return ops.kron_precondition_eigen(
            args["grad"], args["q_g"], args["q_a"], args["d_g"], args["d_a"], args["damping"], backend=backend
        )

    raises_naming(op, exc, pattern, call)


BAD_KL = {
    "lengths": (lambda g: ([g[0]], g), {}, r"\bprecond and grads must be equally long"),
    "empty": (lambda g: ([], []), {}, r"\bprecond and grads must be equally long and non-empty"),
    "shape": (lambda g: ([g[0], g[1].T], g), {}, r"\bprecond\[1\] must have grads\[1\]'s shape"),
    "lr_zero": (lambda g: (g, g), {"lr": 0.0}, r"\blr must be a finite number > 0"),
    "lr_negative": (lambda g: (g, g), {"lr": -0.1}, r"\blr must be"),
    "lr_bool": (lambda g: (g, g), {"lr": True}, r"\blr must be"),
    "kl_clip_nan": (lambda g: (g, g), {"kl_clip": float("nan")}, r"\bkl_clip must be a finite number > 0"),
    "kl_clip_inf": (lambda g: (g, g), {"kl_clip": float("inf")}, r"\bkl_clip must be"),
    "kl_clip_none": (lambda g: (g, g), {"kl_clip": None}, r"\bkl_clip must be"),
}


@pytest.mark.parametrize("case", list(BAD_KL))
def test_kl_clip_scale_bad_input(case):
    make, kw, pattern = BAD_KL[case]
    grads = [_f(3, 4), _f(2, 5)]
    precond, grads = make(grads)
    kw = {"lr": 0.1, "kl_clip": 1e-3, **kw}
    with pytest.raises(ValueError, match=pattern) as info:
        ops.kl_clip_scale(precond, grads, kw["lr"], kw["kl_clip"])
    assert "kl_clip_scale" in str(info.value)


# ================================================================================================================
# torch.library / torch.compile
# ================================================================================================================


def _need_kernel(op: str, key: str) -> None:
    if pycurv._extension.LOAD_ERROR is not None:
        pytest.skip(f"pycurv._C did not load: {pycurv._extension.LOAD_ERROR}")
    if not pycurv._extension.has_kernel(op, key):
        pytest.skip(f"pycurv._C has no {key} kernel for {op}")


def _opcheck_args(op: str, dtype: torch.dtype, variant: str | None = None):
    """Small inputs as the compiled ops take them (batched, validated, damping as (B,) float64)."""
    dev = DEVICE
    if op == "kfac_factor_update":
        bias = variant == "bias"
        x = torch.randn(2, 3, 5, device=dev, dtype=dtype)
        fdt = torch.float64 if dtype == torch.float64 else torch.float32
        f = _spd(2, 5 + bias, 5 + bias).to(fdt)
        return (f, x, 0.9, bias)
    damping = torch.full((2,), 0.1, dtype=torch.float64, device=dev)
    if op == "damped_inverse":
        return (_spd(2, 5, 5).to(dtype), damping, variant)
    if op == "sym_eig":
        return (_spd(2, 5, 5).to(dtype),)
    grad = torch.randn(2, 4, 3, device=dev, dtype=dtype)
    if op == "kron_precondition":
        return (grad, _spd(2, 4, 4).to(dtype), _spd(2, 3, 3).to(dtype))
    d_g, q_g = torch.linalg.eigh(_spd(2, 4, 4).double())
    d_a, q_a = torch.linalg.eigh(_spd(2, 3, 3).double())
    return (grad, q_g.to(dtype), q_a.to(dtype), d_g.to(dtype), d_a.to(dtype), damping)


KFAC_OPS = ("kfac_factor_update", "damped_inverse", "sym_eig", "kron_precondition", "kron_precondition_eigen")


def _opcheck_params():
    out = []
    for op in KFAC_OPS:
        if op == "damped_inverse":
            variants = METHODS
        elif op == "kfac_factor_update":
            variants = ("bias", "nobias")
        else:
            variants = (None,)
        dtypes = (torch.float32, torch.bfloat16) if op == "kfac_factor_update" else (torch.float32, torch.float64)
        for dtype, variant in itertools.product(dtypes, variants):
            out.append(pytest.param(op, dtype, variant, id=f"{op}-{DT_ID[dtype]}-{variant or 'na'}"))
    return out


@pytest.mark.parametrize("op, dtype, variant", _opcheck_params())
def test_opcheck_compiled(op, dtype, variant):
    key = DEVICE.type.upper()
    _need_kernel(op, key)
    if op == "damped_inverse":
        backend = DEVICE.type if DEVICE.type == "cpu" else "cuda"
        if backend not in pycurv.ops.available_backends(DEVICE, op, variant):
            pytest.skip(f"the {backend} kernel does not implement method {variant!r}")
    torch.library.opcheck(getattr(torch.ops.pycurv, op).default, _opcheck_args(op, dtype, variant))


def _triton_custom_ops():
    out = []
    for op in KFAC_OPS:
        if "triton" not in op_backends(op):
            continue
        try:
            overload = getattr(torch.ops.pycurv, f"{op}_triton").default
        except (AttributeError, RuntimeError):
            continue
        variant = {"damped_inverse": "newton_schulz", "kfac_factor_update": "bias"}.get(op)
        out.append(pytest.param(op, overload, variant, id=op))
    return out


@pytest.mark.parametrize("op, overload, variant", _triton_custom_ops())
def test_opcheck_triton(op, overload, variant):
    args = _opcheck_args(op, torch.float32, variant)
    # a Triton op implements one method and may leave the compiled schema's trailing ``method`` out
    torch.library.opcheck(overload, args[: len(overload._schema.arguments)])


def test_torch_compile_fullgraph():
    """One compiled function with the factor update and the preconditioning, on the backend "auto" picks."""
    torch._dynamo.reset()

    def step(f_a, f_g, a, g, grad, g_inv, a_inv):
        ops.kfac_factor_update(f_a, a, 0.95, True)
        ops.kfac_factor_update(f_g, g, 0.95)
        return ops.kron_precondition(grad, g_inv, a_inv)

    compiled = torch.compile(step, fullgraph=True)
    a, g = _randn(4, 5, 6, seed=1), _randn(4, 5, 3, seed=2)
    f_a, f_g = _spd(7, 7), _spd(3, 3)
    grad, g_inv, a_inv = _randn(3, 7, seed=3), _spd(3, 3), _spd(7, 7)
    f_a0, f_g0 = f_a.clone(), f_g.clone()
    out = compiled(f_a, f_g, a, g, grad, g_inv, a_inv)
    assert_rel_close(f_a, expected_factor(f_a0, a, 0.95, True), torch.float32, "compiled factor update (A)")
    assert_rel_close(f_g, expected_factor(f_g0, g, 0.95, False), torch.float32, "compiled factor update (G)")
    assert_rel_close(out, reference.kron_precondition(grad, g_inv, a_inv), torch.float32, "compiled preconditioning")
