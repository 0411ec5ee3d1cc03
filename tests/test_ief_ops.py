"""iEF / EF / SF op family (MATH.md section 3): weighted_grad_sum, per_sample_grad_dot, logit_grad_sqnorms,
ief_coefficients, and the iEF / SF steps they make up.

Every backend is checked against a ground truth built another way, in float64 from the same (already rounded)
inputs, never against pycurv.reference:

- weighted_grad_sum / per_sample_grad_dot: per-sample gradients from torch.func, of a real nn.Linear fed the test's
  ``a`` and ``g`` and of the Linear / Conv2d layers of whole models seen through pycurv.capture (tests/models.py);
  ``sum_n coef_n G_n`` and ``<G_n, V>`` are then formed densely;
- logit_grad_sqnorms: the torch.func gradient of each sample's summed cross-entropy with respect to its logits;
  for extreme logits (``p_y -> 1``, spreads of 1e4), where that gradient cancels in float64 itself, the closed form
  evaluated in 80-digit decimal arithmetic from the exact values of the logits;
- ief_coefficients: ``torch.linalg.solve`` / ``pinv`` in float64 on Grams of real per-sample gradients;
- the whole steps: iEF ``J^T (J J^T + lambda I)^{-1} s`` and SF ``(J^T J + lambda I)^{-1} grad`` with dense ``J``.

Backends: whatever ``pycurv.ops.available_backends`` lists for an op at collection time. The two ops with compiled
kernels (weighted_grad_sum, logit_grad_sqnorms) also get explicit entries for this device's compiled backend
("cpu" or "cuda") and "triton", skipped with the reason while those are not available. Under the Triton
interpreter the Triton cases use a covering subset of the larger grids (every shape and dtype at least once); the
extreme-logit grid runs in full.
"""

from __future__ import annotations

import decimal
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from pycurv import ops
from pycurv.capture import Capture
from pycurv.reference import acc_dtype

from conftest import DEVICE, INTERPRET, REL_TOL, assert_rel_close, native_offered, op_backends, raises_naming, rel_err
from conftest import need_backend as _need
from conftest import need_registered as _need_registered
from models import (
    CNN,
    MLP,
    TransformerBlock,
    linear_per_sample_grads,
    logit_grad_sqnorms_truth,
    per_sample_jacobian,
    split_blocks,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DT_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
COMPILED = ("weighted_grad_sum", "logit_grad_sqnorms")
_NATIVE = "cpu" if DEVICE.type == "cpu" else "cuda"
_OTHER = torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")

# Element-wise relative tolerance of logit_grad_sqnorms against a float64 truth from the same rounded logits: the
# kernels accumulate in float32 (float64 for float64 logits) whatever the input dtype, so 16-bit logits get the
# float32 bound too (sums over up to a few hundred classes, exp with a few ulp of error).
LGS_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5}


def _backends(op: str) -> list[str]:
    live = op_backends(op)
    if op not in COMPILED:
        return live
    return live + [b for b in (_NATIVE, "triton") if b not in live]


def _reduced(backend: str) -> bool:
    """The Triton interpreter runs every program instance in Python: a few launches per test at most."""
    return backend == "triton" and INTERPRET


def _unreduced(op: str) -> list[str]:
    return [b for b in _backends(op) if not _reduced(b)]


def ce_sum(out, y):
    """Cross-entropy summed over every leading position: ``l_n`` for a batch of one, ``sum_n l_n`` for a batch."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _key(*tensors) -> tuple:
    return tuple((t.dtype, tuple(t.shape), t.detach().double().cpu().contiguous().numpy().tobytes()) for t in tensors)


_GRADS: dict = {}


def per_sample_grads(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """``models.linear_per_sample_grads`` (float64, ``(N, d_out, d_in [+1])``), memoised on the input values."""
    key = (bias, *_key(a, g))
    if key not in _GRADS:
        _GRADS[key] = linear_per_sample_grads(a, g, bias).cpu()
    return _GRADS[key]


def _randn(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Drawn in float32 on the CPU (the same values for every backend), scaled, rounded to ``dtype``."""
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def make_agc(n, t, d_in, d_out, dtype):
    """Random ``a``, ``g`` (2-D when ``t`` is None) in ``dtype`` and a mixed-sign ``coef`` in the accumulation dtype."""
    lead = (n,) if t is None else (n, t)
    a, g = _randn(*lead, d_in, dtype=dtype), _randn(*lead, d_out, dtype=dtype)
    coef = _randn(n, dtype=acc_dtype(dtype))
    return a, g, coef


def wgs_truth(a, g, coef, bias):
    return torch.einsum("n,nij->ij", coef.double().cpu(), per_sample_grads(a, g, bias))


def check_wgs(x, a, g, coef, bias, dtype, what):
    d_in, d_out = a.shape[-1], g.shape[-1]
    assert tuple(x.shape) == (d_out, d_in + bias), f"{what}: shape {tuple(x.shape)}"
    assert x.dtype == acc_dtype(dtype), f"{what}: dtype {x.dtype} for {dtype} inputs"
    assert x.device == a.device, f"{what}: device {x.device}"
    assert_rel_close(x, wgs_truth(a, g, coef, bias), dtype, f"{what} vs torch.func per-sample gradients")


# (N, T, d_in, d_out); T=None is a 2-D input (N, d). N in {1, 3, 5, 7, 37}, T in {2-D, 1, 3, 5, 9}, d in
# {1, 2, 3, 17, 19, 33}; (37, 9, 3, 2) has many rows (N T = 333) and few outputs, the shape of a split-K path.
WGS_SHAPES = [
    (1, None, 1, 1),
    (3, None, 17, 3),
    (7, None, 3, 17),
    (1, 1, 3, 17),
    (3, 1, 1, 3),
    (5, 5, 17, 3),
    (1, 5, 3, 1),
    (37, 9, 3, 2),
    (7, 3, 33, 19),
]


def _shape_id(s):
    n, t, di, do = s
    return f"N{n}-{'2d' if t is None else f'T{t}'}-{di}x{do}"


def _grid_cases(op: str, shapes, with_bias: bool = True) -> list:
    """(backend, shape, dtype, bias): the full grid, or for the interpreted Triton backend every shape once with
    the dtypes (and bias settings) cycling, so that each dtype meets both bias settings."""
    params = []
    for backend in _backends(op):
        if _reduced(backend):
            combos = [
                (shape, DTYPES[k % len(DTYPES)], with_bias and (k // len(DTYPES)) % 2 == 1)
                for k, shape in enumerate(shapes)
            ]
        else:
            combos = list(itertools.product(shapes, DTYPES, (False, True) if with_bias else (False,)))
        for shape, dtype, bias in combos:
            pid = f"{backend}-{_shape_id(shape) if len(shape) == 4 else _lgs_id(shape)}-{DT_ID[dtype]}"
            if with_bias:
                pid += "-bias" if bias else "-nobias"
            params.append(pytest.param(backend, shape, dtype, bias, id=pid))
    return params


# ================================================================================================================
# weighted_grad_sum
# ================================================================================================================


@pytest.mark.parametrize("backend, shape, dtype, bias", _grid_cases("weighted_grad_sum", WGS_SHAPES))
def test_weighted_grad_sum(backend, shape, dtype, bias):
    _need("weighted_grad_sum", backend)
    a, g, coef = make_agc(*shape, dtype)
    x = ops.weighted_grad_sum(a, g, coef, bias, backend=backend)
    check_wgs(x, a, g, coef, bias, dtype, f"weighted_grad_sum[{backend}] {_shape_id(shape)} {DT_ID[dtype]}")


def _coef_cases():
    kinds = ("zeros", "negative", "one_hot", "half_zero", "float64_coef")
    return [
        pytest.param(b, k, id=f"{b}-{k}")
        for b in _backends("weighted_grad_sum")
        for k in kinds
        if not (_reduced(b) and k in ("negative", "half_zero"))
    ]


@pytest.mark.parametrize("backend, kind", _coef_cases())
def test_weighted_grad_sum_special_coef(backend, kind):
    _need("weighted_grad_sum", backend)
    n = 5
    a, g, coef = make_agc(n, 4, 6, 3, torch.float32)
    if kind == "zeros":
        coef = torch.zeros(n, device=DEVICE)
    elif kind == "negative":
        coef = -coef.abs() - 0.1
    elif kind == "one_hot":
        coef = torch.zeros(n, device=DEVICE)
        coef[3] = 1.0
    elif kind == "half_zero":
        coef[::2] = 0.0
    elif kind == "float64_coef":  # converted to float32 for float32 inputs
        coef = coef.double()
    x = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
    what = f"weighted_grad_sum[{backend}] coef {kind}"
    if kind == "zeros":
        assert torch.count_nonzero(x) == 0, f"{what}: nonzero entries {x}"
        assert x.shape == (3, 7)
        return
    check_wgs(x, a, g, coef.float(), True, torch.float32, what)
    if kind == "one_hot":  # exactly sample 3's own gradient
        assert_rel_close(x, per_sample_grads(a, g, True)[3], torch.float32, f"{what}: G_3")


def _noncontiguous(layout: str, dtype=torch.float32):
    """(a, g) views with unusual strides: transposed, strided slices with an offset, a stride-0 broadcast, 2-D
    transposed; shape (3, 5, 17) / (3, 5, 3), or (7, 17) / (7, 3) for the 2-D layout."""
    n, t, d_in, d_out = 3, 5, 17, 3
    if layout == "transposed":
        a = _randn(n, d_in, t, dtype=dtype).transpose(1, 2)
        g = _randn(t, n, d_out, dtype=dtype).permute(1, 0, 2)
    elif layout == "sliced":
        a = _randn(n + 1, 2 * t, 2 * d_in, dtype=dtype)[1:, ::2, 1::2]
        g = _randn(2 * n, t, d_out + 2, dtype=dtype)[::2, :, 2:]
    elif layout == "expanded":
        a = _randn(1, t, d_in, dtype=dtype).expand(n, t, d_in)
        g = _randn(n, 1, d_out, dtype=dtype).expand(n, t, d_out)
    elif layout == "transposed2d":
        a = _randn(d_in, 7, dtype=dtype).T
        g = _randn(d_out, 14, dtype=dtype)[:, ::2].T
    else:
        raise AssertionError(layout)
    assert not (a.is_contiguous() or g.is_contiguous())
    return a, g


def _noncontiguous_coef(layout: str, n: int, dtype) -> torch.Tensor:
    if layout == "transposed2d":  # strided slice with an offset
        return _randn(3 * n, dtype=dtype)[1::3]
    if layout == "expanded":  # stride 0
        return _randn(1, dtype=dtype).expand(n)
    return _randn(n, 2, dtype=dtype)[:, 1]


LAYOUTS = ("transposed", "sliced", "expanded", "transposed2d")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends("weighted_grad_sum"))
def test_weighted_grad_sum_noncontiguous(backend, layout):
    _need("weighted_grad_sum", backend)
    a, g = _noncontiguous(layout)
    coef = _noncontiguous_coef(layout, a.shape[0], torch.float32)
    assert not coef.is_contiguous()
    snap = [x.clone() for x in (a, g, coef)]
    x = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
    check_wgs(x, a, g, coef, True, torch.float32, f"weighted_grad_sum[{backend}] {layout}")
    assert all(torch.equal(u, v) for u, v in zip((a, g, coef), snap)), "inputs were modified"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("backend", _backends("weighted_grad_sum"))
def test_weighted_grad_sum_low_precision_accumulates_in_float32(backend, dtype):
    # positive a, g of magnitude 100 and positive coef over N T = 48 rows: every weight entry is about 3e5, beyond
    # float16's 65504, so a kernel that keeps a partial sum (or the result) in float16 overflows.
    _need("weighted_grad_sum", backend)
    a = _randn(6, 8, 17, dtype=dtype, scale=100.0).abs()
    g = _randn(6, 8, 3, dtype=dtype, scale=100.0).abs()
    coef = torch.rand(6, device=DEVICE) + 0.5
    x = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all(), f"weighted_grad_sum[{backend}]: non-finite output for {dtype} inputs"
    truth = wgs_truth(a, g, coef, True)
    assert truth[:, :-1].min() > 65504, "the premise: every weight entry exceeds the float16 range"
    assert_rel_close(x, truth, dtype, f"weighted_grad_sum[{backend}] large {dtype}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=("f32", "bf16", "f64"))
@pytest.mark.parametrize("backend", _unreduced("weighted_grad_sum"))
def test_weighted_grad_sum_many_rows(backend, dtype):
    """N T = 4096 rows into a 3 x 6 output: the reduction over rows is split and combined."""
    _need("weighted_grad_sum", backend)
    a, g, coef = make_agc(512, 8, 5, 3, dtype)
    x = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
    check_wgs(x, a, g, coef, True, dtype, f"weighted_grad_sum[{backend}] N T = 4096 {DT_ID[dtype]}")


@pytest.mark.parametrize("backend", _unreduced("weighted_grad_sum"))
def test_weighted_grad_sum_2d_equals_3d_with_t1(backend):
    _need("weighted_grad_sum", backend)
    a, g, coef = make_agc(7, None, 17, 3, torch.float64)
    x2 = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
    x3 = ops.weighted_grad_sum(a.unsqueeze(1), g.unsqueeze(1), coef, True, backend=backend)
    assert_rel_close(x2, x3, torch.float64, f"weighted_grad_sum[{backend}] 2-D vs T=1")


# ================================================================================================================
# per_sample_grad_dot
# ================================================================================================================


def dot_truth(a, g, v, bias):
    return torch.einsum("nij,ij->n", per_sample_grads(a, g, bias), v.double().cpu())


@pytest.mark.parametrize("backend, shape, dtype, bias", _grid_cases("per_sample_grad_dot", WGS_SHAPES))
def test_per_sample_grad_dot(backend, shape, dtype, bias):
    _need("per_sample_grad_dot", backend)
    a, g, _ = make_agc(*shape, dtype)
    v = _randn(shape[3], shape[2] + bias, dtype=acc_dtype(dtype))
    r = ops.per_sample_grad_dot(a, g, v, bias, backend=backend)
    what = f"per_sample_grad_dot[{backend}] {_shape_id(shape)} {DT_ID[dtype]}"
    assert tuple(r.shape) == (shape[0],) and r.dtype == acc_dtype(dtype), f"{what}: {tuple(r.shape)} {r.dtype}"
    assert_rel_close(r, dot_truth(a, g, v, bias), dtype, f"{what} vs dense J vec(V)")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends("per_sample_grad_dot"))
def test_per_sample_grad_dot_noncontiguous(backend, layout):
    _need("per_sample_grad_dot", backend)
    a, g = _noncontiguous(layout)
    v = _randn(a.shape[-1] + 1, g.shape[-1]).T  # (d_out, d_in + 1), transposed
    r = ops.per_sample_grad_dot(a, g, v, True, backend=backend)
    assert_rel_close(r, dot_truth(a, g, v, True), torch.float32, f"per_sample_grad_dot[{backend}] {layout}")


# ================================================================================================================
# whole models through pycurv.capture: Linear with leading dims, Conv2d patches
# ================================================================================================================


def make_problem(kind: str, n: int, dtype=torch.float64):
    if kind == "mlp":
        model, x, y = MLP(), torch.randn(n, 5), torch.randint(0, 3, (n,))
    elif kind == "transformer":
        model, x, y = TransformerBlock(), torch.randn(n, 4, 6), torch.randint(0, 4, (n, 4))
    elif kind == "cnn":
        model, x, y = CNN(), torch.randn(n, 2, 9, 8), torch.randint(0, 3, (n,))
    else:
        raise AssertionError(kind)
    return model.to(DEVICE, dtype), x.to(DEVICE, dtype), y.to(DEVICE)


def run_capture(model, x, y):
    with Capture(model) as cap:
        logits = model(x)
        ce_sum(logits, y).backward()
    return cap, logits.detach()


def _model_cases(op: str):
    out = []
    for backend in _backends(op):
        kinds = ("transformer", "cnn") if _reduced(backend) else ("mlp", "transformer", "cnn")
        out += [pytest.param(backend, k, id=f"{backend}-{k}") for k in kinds]
    return out


@pytest.mark.parametrize("backend, kind", _model_cases("weighted_grad_sum"))
def test_weighted_grad_sum_captured_layers(backend, kind):
    """Every captured layer (Linear on (N, d) and (N, T, d), Conv2d patches) against torch.func per-sample
    gradients of the whole model in float64."""
    _need("weighted_grad_sum", backend)
    model, x, y = make_problem(kind, 5)
    cap, _ = run_capture(model, x, y)
    _, blocks = per_sample_jacobian(model, x, y, ce_sum)
    coef = torch.randn(5, dtype=torch.float64, device=DEVICE)
    assert set(cap.layers) == set(blocks)
    for name, (mod, a, g) in cap.layers.items():
        bias = mod.bias is not None
        got = ops.weighted_grad_sum(a, g, coef, bias, backend=backend)
        want = torch.einsum("n,nij->ij", coef.cpu(), blocks[name].cpu())
        assert_rel_close(got, want, torch.float64, f"weighted_grad_sum[{backend}] {kind}.{name}")


@pytest.mark.parametrize("backend, kind", _model_cases("per_sample_grad_dot"))
def test_per_sample_grad_dot_captured_layers(backend, kind):
    """Summed over the captured layers, per_sample_grad_dot is the Jacobian-vector product ``J vec(V)``."""
    _need("per_sample_grad_dot", backend)
    model, x, y = make_problem(kind, 5)
    cap, _ = run_capture(model, x, y)
    j, blocks = per_sample_jacobian(model, x, y, ce_sum)
    vec = torch.randn(j.shape[1], dtype=torch.float64)
    vs = split_blocks(vec, blocks)
    total = torch.zeros(5, dtype=torch.float64)
    for name, (mod, a, g) in cap.layers.items():
        total += ops.per_sample_grad_dot(a, g, vs[name].to(DEVICE), mod.bias is not None, backend=backend).cpu()
    assert_rel_close(total, j.cpu() @ vec, torch.float64, f"per_sample_grad_dot[{backend}] {kind}: J v")


# ================================================================================================================
# logit_grad_sqnorms
# ================================================================================================================

# (N, T, C); T=None is 2-D (N, C). C = 1 gives s = 0; C = 300 is longer than one block of classes.
LGS_SHAPES = [
    (1, None, 1),
    (4, None, 2),
    (3, None, 7),
    (5, None, 300),
    (1, 1, 7),
    (3, 5, 1),
    (2, 4, 33),
    (4, 3, 7),
]


def _lgs_id(s):
    n, t, c = s
    return f"N{n}-{'2d' if t is None else f'T{t}'}-C{c}"


def make_logits(n, t, c, dtype, scale=3.0, ignore_frac=0.25, ignore_index=-100):
    """Logits ``(N, C) | (N, T, C)`` drawn in float32 and rounded to ``dtype``; int64 targets, about
    ``ignore_frac`` of them set to ``ignore_index`` (never all of them)."""
    lead = (n,) if t is None else (n, t)
    z = _randn(*lead, c, dtype=dtype, scale=scale)
    y = torch.randint(0, c, lead)
    drop = torch.rand(lead) < ignore_frac
    drop.view(-1)[0] = False
    y = torch.where(drop, torch.full_like(y, ignore_index), y)
    return z, y.to(DEVICE)


def assert_close_elementwise(x, truth, rtol, what, atol=None):
    """``|x - truth| <= rtol |truth| + atol`` entry by entry, ``atol`` a few smallest normal numbers of ``x``'s dtype
    (values below it cannot be represented to any relative accuracy)."""
    if atol is None:
        atol = 4 * torch.finfo(x.dtype).tiny
    x64, t64 = x.detach().double().cpu(), truth.detach().double().cpu()
    assert x64.shape == t64.shape, f"{what}: shape {tuple(x64.shape)} != {tuple(t64.shape)}"
    assert torch.isfinite(x64).all(), f"{what}: non-finite values {x64}"
    excess = (x64 - t64).abs() - (rtol * t64.abs() + atol)
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"{what}: entry {worst} is {x64[worst].item():.17g}, want {t64[worst].item():.17g} "
        f"(relative error {abs(x64[worst] - t64[worst]).item() / max(abs(t64[worst].item()), 1e-300):.3g} > {rtol:g})"
    )


def check_lgs(s, logits, truth, what):
    dtype = logits.dtype
    assert tuple(s.shape) == (logits.shape[0],), f"{what}: shape {tuple(s.shape)}"
    assert s.dtype == acc_dtype(dtype), f"{what}: dtype {s.dtype} for {dtype} logits"
    assert s.device == logits.device, f"{what}: device {s.device}"
    assert_close_elementwise(s, truth, LGS_RTOL[dtype], what)


LGS_CASES = [pytest.param(*p.values[:3], id=p.id) for p in _grid_cases("logit_grad_sqnorms", LGS_SHAPES, False)]


@pytest.mark.parametrize("backend, shape, dtype", LGS_CASES)
def test_logit_grad_sqnorms(backend, shape, dtype):
    _need("logit_grad_sqnorms", backend)
    z, y = make_logits(*shape, dtype)
    s = ops.logit_grad_sqnorms(z, y, backend=backend)
    what = f"logit_grad_sqnorms[{backend}] {_lgs_id(shape)} {DT_ID[dtype]}"
    check_lgs(s, z, logit_grad_sqnorms_truth(z, y), f"{what} vs torch.func gradients")
    if shape[2] == 1:
        assert torch.count_nonzero(s) == 0, f"{what}: one class gives p_y = 1 and s = 0, got {s}"


_DECIMAL: dict = {}


def decimal_truth(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``s_n = sum_t (S1o / S)^2 + S2o / S^2`` (``e_c = exp(z_c - max z)``, ``S1o``, ``S2o`` the sums of ``e_c`` and
    ``e_c^2`` over ``c != y``, ``S = S1o + e_y``) in 80-digit decimal arithmetic from the exact binary values of the
    logits, rounded to float64 at the end: correct to the last bit of float64 wherever the result is a normal
    float64, however close ``p_y`` is to 1."""
    key = (ignore_index, *_key(logits, targets))
    if key in _DECIMAL:
        return _DECIMAL[key]
    z = logits.detach().double().cpu()
    y = targets.long().cpu()
    if z.dim() == 2:
        z, y = z.unsqueeze(1), y.unsqueeze(1)
    out = []
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        ctx.Emin = -999999
        for zn, yn in zip(z.tolist(), y.tolist()):
            total = decimal.Decimal(0)
            for row, target in zip(zn, yn):
                if target == ignore_index:
                    continue
                vals = [decimal.Decimal(v) for v in row]  # exact (-inf included)
                m = max(vals)
                e = [(v - m).exp() for v in vals]
                s1 = sum((ec for c, ec in enumerate(e) if c != target), decimal.Decimal(0))
                s2 = sum((ec * ec for c, ec in enumerate(e) if c != target), decimal.Decimal(0))
                tot = s1 + e[target]
                total += (s1 / tot) ** 2 + s2 / (tot * tot)
            out.append(float(total))
    _DECIMAL[key] = torch.tensor(out, dtype=torch.float64)
    return _DECIMAL[key]


def make_extreme(kind: str, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that defeat a naive implementation, rounded to ``dtype``, and their int64 targets (none ignored).

    spread_1e4: uniform over [-5e3, 5e3] (exp without the max subtracted overflows), half the targets at the argmax;
    p_y_to_1: the target logit above all others by a gap of 8 to 35 (300 for float64), so ``1 - p_y`` is as small
    as 1e-15 (1e-130) and ``(1 - p_y)^2`` as 1e-30 (1e-260): forming ``p_y - 1`` loses every digit;
    offset_1e4: moderate logits shifted by 1e4; all_equal: ``p = 1/C``; tie_at_max: the target ties with another
    class at the maximum; masked: most non-target classes at -inf (also the first class, where a running max
    starts), the target and one other finite."""
    n, t, c = shape
    lead = (n,) if t is None else (n, t)
    y = torch.randint(0, c, lead)
    gen = torch.Generator().manual_seed(7)
    if kind == "spread_1e4":
        z = (torch.rand(*lead, c, generator=gen, dtype=torch.float64) - 0.5) * 1e4
        at_max = z.argmax(-1)
        y = torch.where(torch.arange(y.numel()).reshape(lead) % 2 == 0, at_max, y)
    elif kind == "p_y_to_1":
        z = torch.randn(*lead, c, generator=gen, dtype=torch.float64)
        top = 300.0 if dtype == torch.float64 else 35.0
        gap = 8.0 + (top - 8.0) * torch.rand(*lead, generator=gen, dtype=torch.float64)
        others = z.scatter(-1, y.unsqueeze(-1), -math.inf).amax(-1)
        z = z.scatter(-1, y.unsqueeze(-1), (others + gap).unsqueeze(-1))
    elif kind == "offset_1e4":
        z = 1e4 + 3.0 * torch.randn(*lead, c, generator=gen, dtype=torch.float64)
    elif kind == "all_equal":
        z = torch.full((*lead, c), 7.25, dtype=torch.float64)
    elif kind == "tie_at_max":
        z = torch.randn(*lead, c, generator=gen, dtype=torch.float64)
        other = (y + 1) % c
        peak = z.amax(-1, keepdim=True) + 2.0
        z = z.scatter(-1, y.unsqueeze(-1), peak).scatter(-1, other.unsqueeze(-1), peak)
    elif kind == "masked":
        z = torch.full((*lead, c), -math.inf, dtype=torch.float64)
        y = torch.randint(1, c, lead)
        other = 1 + (y % (c - 1))  # another class >= 1
        z = z.scatter(-1, y.unsqueeze(-1), torch.randn(*lead, 1, generator=gen, dtype=torch.float64))
        z = z.scatter(-1, other.unsqueeze(-1), torch.randn(*lead, 1, generator=gen, dtype=torch.float64))
    else:
        raise AssertionError(kind)
    return z.to(device=DEVICE, dtype=dtype), y.to(DEVICE)


EXTREME = ("spread_1e4", "p_y_to_1", "offset_1e4", "all_equal", "tie_at_max", "masked")
EXTREME_SHAPES = ((4, 3, 9), (6, None, 300))


def _extreme_cases():
    out = []
    for backend in _backends("logit_grad_sqnorms"):
        for kind, dtype, shape in itertools.product(EXTREME, DTYPES, EXTREME_SHAPES):  # cheap even interpreted
            pid = f"{backend}-{kind}-{DT_ID[dtype]}-{_lgs_id(shape)}"
            out.append(pytest.param(backend, kind, dtype, shape, id=pid))
    return out


@pytest.mark.parametrize("backend, kind, dtype, shape", _extreme_cases())
def test_logit_grad_sqnorms_extreme(backend, kind, dtype, shape):
    _need("logit_grad_sqnorms", backend)
    z, y = make_extreme(kind, shape, dtype)
    truth = decimal_truth(z, y)
    what = f"logit_grad_sqnorms[{backend}] {kind} {DT_ID[dtype]} {_lgs_id(shape)}"
    if kind == "p_y_to_1":
        assert truth.max() < 1e-2 and truth.min() > 1e-300, f"the premise: tiny but normal s, got {truth}"
    if kind == "all_equal":
        c, t = shape[2], shape[1] or 1
        assert torch.allclose(truth, torch.full_like(truth, t * (c - 1) / c), rtol=1e-15)
    s = ops.logit_grad_sqnorms(z, y, backend=backend)
    check_lgs(s, z, truth, what)


@pytest.mark.parametrize("backend", _backends("logit_grad_sqnorms"))
def test_logit_grad_sqnorms_ignore_index(backend):
    _need("logit_grad_sqnorms", backend)
    z, y = make_logits(4, 5, 6, torch.float32, ignore_frac=0.0)
    y[1] = -100  # a whole sample ignored
    y[2, ::2] = -100
    s = ops.logit_grad_sqnorms(z, y, backend=backend)
    check_lgs(s, z, logit_grad_sqnorms_truth(z, y), f"logit_grad_sqnorms[{backend}] default ignore_index")
    assert s[1] == 0, f"a sample whose positions are all ignored must give exactly 0, got {s[1]}"
    assert (s[[0, 2, 3]] > 0).all()
    # a custom ignore_index that is also a class: positions with target 2 are dropped, not treated as class 2
    y2 = torch.randint(0, 6, (4, 5), device=DEVICE)
    y2[0, 0], y2[3] = 2, 2
    s2 = ops.logit_grad_sqnorms(z, y2, ignore_index=2, backend=backend)
    truth2 = logit_grad_sqnorms_truth(z, y2, ignore_index=2)
    check_lgs(s2, z, truth2, f"logit_grad_sqnorms[{backend}] ignore_index=2")
    assert s2[3] == 0
    assert rel_err(s2, logit_grad_sqnorms_truth(z, y2)) > 1e-3, "the premise: ignoring class 2 matters"
    # an ignore_index beyond the classes is not a range error
    y3 = y2.clone()
    y3[1, 1] = 1000
    s3 = ops.logit_grad_sqnorms(z, y3, ignore_index=1000, backend=backend)
    check_lgs(s3, z, logit_grad_sqnorms_truth(z, y3, ignore_index=1000), f"logit_grad_sqnorms[{backend}] 1000")
    # everything ignored
    s4 = ops.logit_grad_sqnorms(z, torch.full_like(y, -100), backend=backend)
    assert s4.shape == (4,) and torch.count_nonzero(s4) == 0


def _lgs_layouts(layout: str, dtype=torch.float32):
    """Logits with the class dimension strided, plus targets, both non-contiguous where it applies."""
    n, t, c = 3, 4, 7
    if layout == "class_strided":  # F.cross_entropy's (N, C, T) layout passed as (N, T, C)
        z = _randn(n, c, t, dtype=dtype, scale=3.0).transpose(1, 2)
        y = torch.randint(0, c, (t, n)).T
    elif layout == "sliced":
        z = _randn(n + 1, 2 * t, 2 * c, dtype=dtype, scale=3.0)[1:, ::2, 1::2]
        y = torch.randint(0, c, (n, 2 * t))[:, 1::2]
    elif layout == "expanded":
        z = _randn(n, 1, c, dtype=dtype, scale=3.0).expand(n, t, c)
        y = torch.randint(0, c, (n, t))
    elif layout == "transposed2d":
        z = _randn(c, n, dtype=dtype, scale=3.0).T
        y = torch.randint(0, c, (2 * n,))[::2]
    else:
        raise AssertionError(layout)
    assert not z.is_contiguous()
    return z, y.to(DEVICE)


@pytest.mark.parametrize("layout", ("class_strided", "sliced", "expanded", "transposed2d"))
@pytest.mark.parametrize("backend", _backends("logit_grad_sqnorms"))
def test_logit_grad_sqnorms_noncontiguous(backend, layout):
    _need("logit_grad_sqnorms", backend)
    for dtype in (torch.float32, torch.bfloat16) if not _reduced(backend) else (torch.bfloat16,):
        z, y = _lgs_layouts(layout, dtype)
        z0 = z.clone()
        s = ops.logit_grad_sqnorms(z, y, backend=backend)
        check_lgs(s, z, logit_grad_sqnorms_truth(z, y), f"logit_grad_sqnorms[{backend}] {layout} {DT_ID[dtype]}")
        assert torch.equal(z, z0), "logits were modified"


@pytest.mark.parametrize("backend", _backends("logit_grad_sqnorms"))
def test_logit_grad_sqnorms_target_dtypes(backend):
    _need("logit_grad_sqnorms", backend)
    z, y = make_logits(3, 4, 7, torch.float32)
    want = ops.logit_grad_sqnorms(z, y, backend=backend)
    check_lgs(want, z, logit_grad_sqnorms_truth(z, y), f"logit_grad_sqnorms[{backend}] int64 targets")
    for dt in (torch.int32, torch.int16):
        got = ops.logit_grad_sqnorms(z, y.to(dt), backend=backend)
        assert torch.equal(got, want), f"logit_grad_sqnorms[{backend}]: {dt} targets give {got}, int64 {want}"
    y8 = y.clamp_min(0)
    got = ops.logit_grad_sqnorms(z, y8.to(torch.uint8), backend=backend)
    assert torch.equal(got, ops.logit_grad_sqnorms(z, y8, backend=backend)), "uint8 targets"


@pytest.mark.parametrize("backend", _backends("logit_grad_sqnorms"))
def test_logit_grad_sqnorms_model_logits(backend):
    """The logits of a real model: s_n equals the squared norm of dL/dz_n that autograd gives for the batch loss
    with reduction="sum" (each sample's logits only reach its own loss)."""
    _need("logit_grad_sqnorms", backend)
    model, x, y = make_problem("transformer", 4)
    y[0, 1] = -100
    logits = model(x).detach().requires_grad_(True)
    F.cross_entropy(logits.transpose(1, 2), y, reduction="sum").backward()
    want = logits.grad.square().sum((1, 2))
    s = ops.logit_grad_sqnorms(logits.detach(), y, backend=backend)
    check_lgs(s, logits, want, f"logit_grad_sqnorms[{backend}] transformer logits")


# ================================================================================================================
# ief_coefficients
# ================================================================================================================

_JAC: dict = {}


def real_jacobian(n: int, seed: int, duplicate: tuple[int, int] | None = None):
    """``J: (N, P)`` (P = 119), the per-sample gradients of an MLP from torch.func in float64, and
    ``s = logit_grad_sqnorms`` of its logits from torch.func; with ``duplicate=(i, j)`` sample j repeats sample i."""
    key = (n, seed, duplicate)
    if key not in _JAC:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = MLP().double()
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
        if duplicate is not None:
            i, j = duplicate
            x[j], y[j] = x[i], y[i]
        jac, _ = per_sample_jacobian(model, x, y, ce_sum)
        with torch.no_grad():
            s = logit_grad_sqnorms_truth(model(x), y)
        _JAC[key] = (jac, s)
    jac, s = _JAC[key]
    return jac.clone(), s.clone()


def solve_truth(k: torch.Tensor, s: torch.Tensor, damping: float) -> torch.Tensor:
    k = k.double().cpu()
    return torch.linalg.solve(k + damping * torch.eye(k.shape[-1], dtype=torch.float64), s.double().cpu())


def solve_tol(k: torch.Tensor, damping: float, dtype) -> float:
    """Relative accuracy to expect: the dtype's tolerance, or float64 rounding amplified by the condition number."""
    ev = torch.linalg.eigvalsh(k.double().cpu()) + damping
    return max(REL_TOL[dtype], 100 * (ev.max() / ev.min()).item() * torch.finfo(torch.float64).eps)


def ief_backends() -> list[str]:
    return ["auto"] + _backends("ief_coefficients")


@pytest.mark.parametrize("rel_damping", (0.0, 1e-6, 1e-1))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("f64", "f32"))
@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_solve(backend, dtype, rel_damping):
    j, s = real_jacobian(8, 0)
    k = (j @ j.T).to(dtype)
    damping = rel_damping * k.double().diagonal().mean().item()
    alpha, info = ops.ief_coefficients(
        k.to(DEVICE), s.to(device=DEVICE, dtype=dtype), damping, return_info=True, backend=backend
    )
    what = f"ief_coefficients[{backend}] {DT_ID[dtype]} damping {damping:.3g}"
    assert alpha.shape == (8,) and alpha.dtype == dtype and alpha.device == DEVICE, what
    assert info["kept"].dtype == torch.bool and bool(info["kept"].all()), f"{what}: kept {info['kept']}"
    assert float(info["damping"]) == damping and int(info["rank"]) == 8, f"{what}: info {info}"
    want = solve_truth(k, s.to(dtype), damping)
    err = rel_err(alpha, want)
    assert err <= solve_tol(k, damping, dtype), f"{what}: relative error {err:.3g} against torch.linalg.solve"
    if rel_damping == 0.0 and dtype == torch.float64:
        # the undamped step reaches the target exactly: J (J^T alpha) = s
        assert_rel_close(j @ (j.T @ alpha.cpu()), s, torch.float64, f"{what}: J J^T alpha = s")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_ef(backend):
    """EF: s = 1, and without damping the step changes every sample's loss by the same amount, J (J^T alpha) = 1."""
    j, _ = real_jacobian(8, 1)
    k = j @ j.T
    ones = torch.ones(8, dtype=torch.float64)
    alpha = ops.ief_coefficients(k.to(DEVICE), ones.to(DEVICE), 0.0, backend=backend).cpu()
    assert_rel_close(alpha, solve_truth(k, ones, 0.0), torch.float64, "EF coefficients")
    assert_rel_close(j @ (j.T @ alpha), ones, torch.float64, "EF: J J^T alpha = 1")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_low_precision_gram(backend):
    j, s = real_jacobian(6, 2)
    k = (j @ j.T).to(torch.bfloat16)
    damping = 0.1 * k.double().diagonal().mean().item()
    alpha = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE, torch.bfloat16), damping, backend=backend)
    assert alpha.dtype == torch.float32
    want = solve_truth(k, s.to(torch.bfloat16), damping)
    assert_rel_close(alpha, want, torch.float32, "ief_coefficients bf16 gram")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_batched(backend):
    n, b = 6, 3
    js = [real_jacobian(n, 10 + i)[0] for i in range(b)]
    k = torch.stack([jj @ jj.T for jj in js])
    s = torch.stack([real_jacobian(n, 10 + i)[1] for i in range(b)])
    scale = k.diagonal(dim1=1, dim2=2).mean().item()
    damps = torch.tensor([0.0, 1e-3, 0.5], dtype=torch.float64) * scale
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), damps.to(DEVICE), return_info=True, backend=backend)
    assert alpha.shape == (b, n) and info["kept"].shape == (b, n) and info["damping"].shape == (b,)
    assert torch.equal(info["damping"].cpu(), damps)
    for i in range(b):
        d = damps[i].item()
        want = solve_truth(k[i], s[i], d)
        err = rel_err(alpha[i], want)
        assert err <= solve_tol(k[i], d, torch.float64), f"problem {i}: relative error {err:.3g}"
        single = ops.ief_coefficients(k[i].to(DEVICE), s[i].to(DEVICE), d, backend=backend)
        assert_rel_close(alpha[i], single, torch.float64, f"problem {i}: batched vs alone")
    # one number for every problem
    alpha1 = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 1e-3 * scale, backend=backend)
    for i in range(b):
        assert_rel_close(alpha1[i], solve_truth(k[i], s[i], 1e-3 * scale), torch.float64, f"scalar damping, {i}")


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return (u @ v).abs().item() / (u.norm() * v.norm()).item()


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_drops_duplicates(backend):
    """A repeated sample (same input and label, hence the same gradient) gets alpha = 0, is reported as dropped,
    and the others solve the system restricted to the kept samples."""
    j, s = real_jacobian(8, 3, duplicate=(2, 5))
    assert rel_err(j[5], j[2]) < 1e-12, "the premise: the same per-sample gradient (up to rounding)"
    k = j @ j.T
    damping = 1e-8 * k.diagonal().mean().item()
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), damping, return_info=True, backend=backend)
    alpha, kept = alpha.cpu(), info["kept"].cpu()
    assert kept.tolist() == [i != 5 for i in range(8)], f"kept {kept.tolist()}"
    assert alpha[5] == 0, f"the dropped duplicate has alpha {alpha[5]}"
    idx = torch.tensor([i for i in range(8) if i != 5])
    want = solve_truth(k[idx][:, idx], s[idx], damping)
    assert_rel_close(alpha[idx], want, torch.float64, "solve on the kept samples")
    # with the check off the duplicate stays; by symmetry both copies get the same coefficient
    alpha_all, info_all = ops.ief_coefficients(
        k.to(DEVICE), s.to(DEVICE), damping, dedup_threshold=None, return_info=True, backend=backend
    )
    alpha_all = alpha_all.cpu()
    assert bool(info_all["kept"].all())
    assert alpha_all[5] != 0 and abs(alpha_all[2] - alpha_all[5]) <= 1e-6 * alpha_all[2].abs(), alpha_all
    m = k + damping * torch.eye(8, dtype=torch.float64)
    resid = (m @ alpha_all - s).norm() / (torch.linalg.matrix_norm(m, 2) * alpha_all.norm())
    assert resid <= 1e-12, f"dedup_threshold=None: scaled residual {resid:.3g} of (K + damping I) alpha = s"


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_near_duplicates_and_threshold(backend):
    j, s = real_jacobian(8, 4)
    noise = torch.randn(j.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    j_near = j.clone()
    j_near[6] = j[1] + 1e-3 * j[1].norm() * noise / noise.norm()  # |cos| ~ 1 - 1e-6
    j_near[7] = -2.0 * j[4]  # |cos| = 1, opposite sign
    assert _cos(j_near[1], j_near[6]) > 0.999 and _cos(j_near[4], j_near[7]) > 0.999
    k = j_near @ j_near.T
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 0.0, return_info=True, backend=backend)
    alpha, kept = alpha.cpu(), info["kept"].cpu()
    assert kept.tolist() == [True] * 6 + [False, False], f"kept {kept.tolist()}"
    assert alpha[6] == 0 and alpha[7] == 0
    assert_rel_close(alpha[:6], solve_truth(k[:6, :6], s[:6], 0.0), torch.float64, "near duplicates dropped")

    # a pair at |cos| = c: kept above the threshold c, dropped below it
    j_mid = j.clone()
    j_mid[6] = j[1] + 0.5 * j[1].norm() * noise / noise.norm()
    c = _cos(j_mid[1], j_mid[6])
    others = [_cos(j_mid[p], j_mid[q]) for p in range(8) for q in range(p) if (p, q) != (6, 1)]
    assert 0.5 < c < 0.99 and max(others) < c - 0.05, f"the premise: cos {c}, other pairs up to {max(others)}"
    k = j_mid @ j_mid.T
    _, info_hi = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 0.0, return_info=True, backend=backend)
    assert bool(info_hi["kept"].all()), "default threshold 0.99 dropped a pair at |cos| < 0.99"
    alpha_lo, info_lo = ops.ief_coefficients(
        k.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=c - 0.02, return_info=True, backend=backend
    )
    assert info_lo["kept"].cpu().tolist() == [i != 6 for i in range(8)]
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 7])
    assert_rel_close(alpha_lo.cpu()[idx], solve_truth(k[idx][:, idx], s[idx], 0.0), torch.float64, "threshold")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_duplicates_batched(backend):
    """Only the problem that holds a duplicate is reduced."""
    j0, s0 = real_jacobian(6, 5)
    j1, s1 = real_jacobian(6, 6, duplicate=(0, 3))
    k = torch.stack([j0 @ j0.T, j1 @ j1.T])
    s = torch.stack([s0, s1])
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 0.0, return_info=True, backend=backend)
    alpha, kept = alpha.cpu(), info["kept"].cpu()
    assert kept[0].all() and kept[1].tolist() == [True, True, True, False, True, True]
    assert_rel_close(alpha[0], solve_truth(k[0], s0, 0.0), torch.float64, "problem 0")
    idx = torch.tensor([0, 1, 2, 4, 5])
    assert alpha[1, 3] == 0
    assert_rel_close(alpha[1, idx], solve_truth(k[1][idx][:, idx], s1[idx], 0.0), torch.float64, "problem 1")


@pytest.mark.parametrize("rel_damping", (0.0, 1e-3))
@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_zero_gradient_samples(backend, rel_damping):
    j, s = real_jacobian(8, 7)
    j[3] = 0.0
    j[6] *= 1e-10  # K_66 ~ 1e-20 K_ii: below N eps max K_ii, numerically zero
    k = j @ j.T
    damping = rel_damping * k.diagonal().mean().item()
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), damping, return_info=True, backend=backend)
    alpha, kept = alpha.cpu(), info["kept"].cpu()
    assert kept.tolist() == [i not in (3, 6) for i in range(8)], f"kept {kept.tolist()}"
    assert int(info["rank"]) == 6, f"rank {info['rank']}"
    assert alpha[3] == 0 and alpha[6] == 0, alpha
    idx = torch.tensor([0, 1, 2, 4, 5, 7])
    want = solve_truth(k[idx][:, idx], s[idx], damping)
    assert_rel_close(alpha[idx], want, torch.float64, "zero-gradient samples dropped")
    # no gradient at all: every coefficient is 0, no error, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alpha0, info0 = ops.ief_coefficients(
            torch.zeros(5, 5, dtype=torch.float64, device=DEVICE),
            torch.ones(5, dtype=torch.float64, device=DEVICE),
            damping,
            return_info=True,
            backend=backend,
        )
    assert torch.count_nonzero(alpha0) == 0 and not bool(info0["kept"].any()) and int(info0["rank"]) == 0


def _rank_deficient(n: int = 8, rank: int = 4, seed: int = 8):
    """``J = C J_r`` from ``rank`` real per-sample gradients: ``K = J J^T`` has rank ``rank`` < N."""
    j, s = real_jacobian(rank, seed)
    c = torch.randn(n, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return c @ j, torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.1


def _min_norm_err(j: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> float:
    """Relative distance of the step ``J^T alpha`` from the minimum-norm solution ``pinv(J) s`` of ``J d = s``."""
    return rel_err(j.T.double() @ alpha.cpu().double(), torch.linalg.pinv(j.double()) @ s.double())


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_singular_gram(backend):
    """Rank-deficient K without damping: the eigen-directions at the noise floor are left out, the damping is not
    touched, ``info["rank"]`` is the rank, and ``J^T alpha`` is the minimum-norm solution ``pinv(J) s`` to rounding,
    for ``s`` in the range of K and for a generic ``s`` (whose null-space part a damped solve would multiply by
    ``1 / damping``). ``singular="error"`` names the problem instead."""
    j, s_generic = _rank_deficient()
    k = j @ j.T
    s_range = k @ torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for s in (s_range, s_generic):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            alpha, info = ops.ief_coefficients(
                k.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=None, return_info=True, backend=backend
            )
        assert torch.isfinite(alpha).all()
        assert float(info["damping"]) == 0.0 and int(info["rank"]) == 4, f"info {info}"
        err = _min_norm_err(j, alpha, s)
        assert err <= 1e-10, f"J^T alpha vs pinv(J) s: relative error {err:.3g}"
    with pytest.raises(ValueError, match=r"ief_coefficients: .*numerically singular for problems \[0\] \(rank \[4\]"):
        ops.ief_coefficients(k.to(DEVICE), s_generic.to(DEVICE), 0.0, dedup_threshold=None, singular="error")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_singular_large_batch_after_set_num_threads(backend):
    """A rank-deficient batch of two problems of 256 samples, after ``torch.set_num_threads`` (whose call makes a
    batched LU of this size fail in some MKL builds): the deflated solve still gives ``pinv(J) s``."""
    gen = torch.Generator().manual_seed(7)
    js = [
        torch.randn(256, 64, dtype=torch.float64, generator=gen) @ torch.randn(64, 300, dtype=torch.float64, generator=gen)
        for _ in range(2)
    ]
    k = torch.stack([j @ j.T for j in js])
    s = torch.rand(2, 256, dtype=torch.float64, generator=gen) + 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alpha, info = ops.ief_coefficients(
            k.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=None, return_info=True, backend=backend
        )
    finally:
        torch.set_num_threads(threads)
    assert info["rank"].tolist() == [64, 64], f"info {info}"
    for b in range(2):
        err = _min_norm_err(js[b], alpha[b], s[b])
        assert err <= 1e-9, f"problem {b}: J^T alpha vs pinv(J) s: relative error {err:.3g}"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_singular_float32_gram(backend, seed):
    """A rank-deficient J in float32 with many parameters: the float32 Gram's null space is noise of either sign.
    Left out, the step is ``pinv(J) s`` to float32 accuracy; a Cholesky solve damped up to the noise floor
    (``N eps max K_ii``) is off by 10 to 50 percent on these problems."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(8, 4, dtype=torch.float64, generator=gen)
    j = c @ torch.randn(4, 20000, dtype=torch.float64, generator=gen)
    j32 = j.float()
    k = j32 @ j32.T
    s = torch.rand(8, dtype=torch.float64, generator=gen) + 0.1
    damping = 1e-12 * k.diagonal().mean().item()
    alpha, info = ops.ief_coefficients(
        k.to(DEVICE), s.float().to(DEVICE), damping, dedup_threshold=None, return_info=True, backend=backend
    )
    assert int(info["rank"]) == 4, f"info {info}"
    err = _min_norm_err(j, alpha, s.float())
    assert err <= 1e-4, f"J^T alpha vs pinv(J) s: relative error {err:.3g}"


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_positive_noise_floor(backend):
    """Noise that leaves K positive definite (Cholesky succeeds at the given damping) but at the noise floor: the
    tiny pivots send the problem to the eigendecomposition, the noise directions are left out, and the step is
    ``pinv(J) s`` to the noise's accuracy. A plain solve of this K gives coefficients of 1e13 whose null-space parts
    cancel in ``J^T alpha`` only to about ten percent."""
    j, s = _rank_deficient()
    k = j @ j.T
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    rtol = 10 * 8 * torch.finfo(torch.float64).eps  # the default noise floor of the Jacobi-scaled Gram
    # noise D^(1/2) E D^(1/2) with E positive definite, eigenvalues in [0.25, 0.5] rtol: above the rounding of K
    # itself, below the floor
    e = 0.25 * rtol * (torch.eye(8, dtype=torch.float64) + (e @ e.T) / torch.linalg.matrix_norm(e @ e.T, 2))
    d = k.diagonal().sqrt()
    k_noisy = k + d.unsqueeze(1) * e * d.unsqueeze(0)
    k_noisy = 0.5 * (k_noisy + k_noisy.T)
    assert torch.linalg.cholesky_ex(k_noisy)[1] == 0, "the premise: Cholesky succeeds"
    plain = torch.linalg.solve(k_noisy, s)
    assert _min_norm_err(j, plain, s) > 1e-2, "the premise: the plain solve amplifies the noise"
    alpha, info = ops.ief_coefficients(
        k_noisy.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=None, return_info=True, backend=backend
    )
    assert int(info["rank"]) == 4, f"info {info}"
    err = _min_norm_err(j, alpha, s)
    assert err <= 1e-8, f"J^T alpha vs pinv(J) s: relative error {err:.3g}"


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_near_singular_full_rank(backend):
    """Full rank but ill-conditioned beyond Cholesky's comfort (smallest eigenvalue 1e-9 max K_ii, above the
    float64 noise floor): whichever solver runs, every direction is kept and alpha is the exact solve."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=gen))
    mu = torch.tensor([1e-9, 1e-6, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    k = (q * mu) @ q.T
    s = torch.rand(6, dtype=torch.float64, generator=gen) + 0.1
    alpha, info = ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 0.0, return_info=True, backend=backend)
    assert int(info["rank"]) == 6 and bool(info["kept"].all()), f"info {info}"
    want = (q / mu) @ (q.T @ s)
    assert rel_err(alpha, want) <= 1e-5, f"relative error {rel_err(alpha, want):.3g}"


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_singular_in_batch(backend):
    """Only the singular problem goes through the eigendecomposition; the other problem is the plain solve."""
    j0, s0 = real_jacobian(8, 9)
    j1, _ = _rank_deficient()
    k = torch.stack([j0 @ j0.T, j1 @ j1.T])
    s = torch.stack([s0, torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1])
    alpha, info = ops.ief_coefficients(
        k.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=None, return_info=True, backend=backend
    )
    assert info["rank"].cpu().tolist() == [8, 4] and info["damping"].cpu().tolist() == [0.0, 0.0], f"info {info}"
    alpha = alpha.cpu()
    assert_rel_close(alpha[0], solve_truth(k[0], s0, 0.0), torch.float64, "the regular problem")
    assert _min_norm_err(j1, alpha[1], s[1]) <= 1e-10
    with pytest.raises(ValueError, match=r"numerically singular for problems \[1\]"):
        ops.ief_coefficients(k.to(DEVICE), s.to(DEVICE), 0.0, dedup_threshold=None, singular="error")


@pytest.mark.parametrize("backend", ief_backends())
def test_ief_coefficients_singular_with_dropped_samples(backend):
    """Rank 3 from 7 samples, plus a repeated sample and a zero gradient: the dropped samples get 0 and the kept
    ones the minimum-norm step on their own rows."""
    gen = torch.Generator().manual_seed(0)
    j = torch.randn(7, 3, dtype=torch.float64, generator=gen) @ torch.randn(3, 50, dtype=torch.float64, generator=gen)
    j = torch.cat([j, j[1:2], torch.zeros(1, 50, dtype=torch.float64)])
    s = torch.rand(9, dtype=torch.float64, generator=gen) + 0.1
    alpha, info = ops.ief_coefficients((j @ j.T).to(DEVICE), s.to(DEVICE), 0.0, return_info=True, backend=backend)
    alpha, kept = alpha.cpu(), info["kept"].cpu()
    assert not kept[7] and not kept[8] and int(info["rank"]) == 3, f"info {info}"
    assert torch.count_nonzero(alpha[~kept]) == 0
    assert rel_err(j.T @ alpha, torch.linalg.pinv(j[kept]) @ s[kept]) <= 1e-10


def test_ief_coefficients_indefinite_gram():
    """A symmetric matrix with an eigenvalue far below zero is no Gram matrix: a clear error, not a truncation."""
    k = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.9], [0.0, 0.9, 1.0]], dtype=torch.float64).to(DEVICE)
    assert torch.linalg.eigvalsh(k)[0] < -0.2, "the premise: eigenvalues 1 and 1 +- 0.9 sqrt(2)"
    with pytest.raises(ValueError, match=r"ief_coefficients: gram is not positive semi-definite for problems \[0\]"):
        ops.ief_coefficients(k, torch.ones(3, dtype=torch.float64, device=DEVICE), 0.0)


def _ief_bad_cases():
    def ks(n=4, b=None):
        j = torch.randn(*(() if b is None else (b,)), n, 9, dtype=torch.float64)
        return (j @ j.mT).to(DEVICE)

    def nan_at(m, i, j):
        m = m.clone()
        m[..., i, j] = float("nan")
        return m

    def inf_diag(m):
        m = m.clone()
        m[..., 0, 0] = float("inf")
        return m

    ones = lambda *s: torch.ones(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    # name -> (factory of (gram, s, kwargs), exception, regex)
    return {
        "gram_nan": (lambda: (nan_at(ks(), 1, 2), ones(4), {}), ValueError, r"\bgram is not finite"),
        "gram_inf": (lambda: (inf_diag(ks()), ones(4), {}), ValueError, r"\bgram is not finite"),
        "gram_nan_batched": (lambda: (nan_at(ks(b=3), 0, 0), ones(3, 4), {}), ValueError, r"\bgram is not finite"),
        "s_nan": (
            lambda: (ks(), torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64, device=DEVICE), {}),
            ValueError,
            r"\blogit_grad_sqnorms is not finite",
        ),
        "s_inf": (
            lambda: (ks(), torch.tensor([1.0, 1.0, 1.0, -float("inf")], dtype=torch.float64, device=DEVICE), {}),
            ValueError,
            r"\blogit_grad_sqnorms is not finite",
        ),
        "gram_not_square": (lambda: (ks()[:, :3], ones(4), {}), ValueError, r"\bgram must be square"),
        "gram_1d": (lambda: (ones(4), ones(4), {}), ValueError, r"\bgram must be square"),
        "gram_4d": (lambda: (ks(b=3).unsqueeze(0), ones(3, 4), {}), ValueError, r"\bgram must be square"),
        "s_wrong_length": (lambda: (ks(), ones(5), {}), ValueError, r"\blogit_grad_sqnorms must have shape \(4,\)"),
        "s_2d_for_2d_gram": (lambda: (ks(), ones(1, 4), {}), ValueError, r"\blogit_grad_sqnorms must have shape"),
        "s_1d_for_batched": (
            lambda: (ks(b=2), ones(4), {}),
            ValueError,
            r"\blogit_grad_sqnorms must have shape \(2, 4\)",
        ),
        "gram_int": (
            lambda: (torch.ones(4, 4, dtype=torch.int64, device=DEVICE), ones(4), {}),
            TypeError,
            r"\bgram must have dtype",
        ),
        "s_int": (lambda: (ks(), torch.ones(4, dtype=torch.int64, device=DEVICE), {}), TypeError, r"\blogit_grad_sq"),
        "gram_not_tensor": (lambda: ([[1.0]], ones(1), {}), TypeError, r"\bgram must be a torch.Tensor"),
        "s_other_device": (
            lambda: (ks(), torch.ones(4, dtype=torch.float64, device=_OTHER), {}),
            ValueError,
            r"\blogit_grad_sqnorms must be on gram's device",
        ),
        "damping_negative": (lambda: (ks(), ones(4), {"damping": -1e-3}), ValueError, r"\bdamping\b"),
        "damping_nan": (lambda: (ks(), ones(4), {"damping": float("nan")}), ValueError, r"\bdamping\b"),
        "damping_tensor_negative": (
            lambda: (ks(b=2), ones(2, 4), {"damping": torch.tensor([1e-3, -1e-3], dtype=torch.float64)}),
            ValueError,
            r"\bdamping must be finite and >= 0",
        ),
        "damping_wrong_length": (
            lambda: (ks(b=2), ones(2, 4), {"damping": torch.ones(3, dtype=torch.float64)}),
            ValueError,
            r"\bdamping must be a number, 0-d or shape \(2,\)",
        ),
        "damping_str": (lambda: (ks(), ones(4), {"damping": "1e-3"}), TypeError, r"\bdamping must be"),
        "dedup_zero": (lambda: (ks(), ones(4), {"dedup_threshold": 0.0}), ValueError, r"\bdedup_threshold must be"),
        "dedup_above_1": (lambda: (ks(), ones(4), {"dedup_threshold": 1.5}), ValueError, r"\bdedup_threshold must"),
        "dedup_bool": (lambda: (ks(), ones(4), {"dedup_threshold": True}), ValueError, r"\bdedup_threshold must"),
        "singular_unknown": (lambda: (ks(), ones(4), {"singular": "damp"}), ValueError, r"\bsingular must be"),
        "rtol_negative": (lambda: (ks(), ones(4), {"rtol": -1e-3}), ValueError, r"\brtol must be"),
        "rtol_one": (lambda: (ks(), ones(4), {"rtol": 1.0}), ValueError, r"\brtol must be"),
        "unknown_backend": (lambda: (ks(), ones(4), {"backend": "numpy"}), ValueError, r"\bbackend must be one of"),
    }


IEF_BAD = _ief_bad_cases()


@pytest.mark.parametrize("case", list(IEF_BAD))
def test_ief_coefficients_bad_input(case):
    make, exc, pattern = IEF_BAD[case]
    gram, s, kw = make()
    kw = dict(kw)
    damping = kw.pop("damping", 1e-3)
    raises_naming("ief_coefficients", exc, pattern, lambda: ops.ief_coefficients(gram, s, damping, **kw))


# ================================================================================================================
# the iEF / EF / SF steps end to end
# ================================================================================================================


def _step_cases():
    out = []
    for backend in _backends("weighted_grad_sum"):
        kinds = ("mlp",) if _reduced(backend) else ("mlp", "transformer", "cnn")
        for kind in kinds:
            for rhs in ("ief", "ef"):
                out.append(pytest.param(backend, kind, rhs, id=f"{backend}-{kind}-{rhs}"))
    return out


@pytest.mark.parametrize("backend, kind, rhs", _step_cases())
def test_ief_step_end_to_end(backend, kind, rhs):
    """capture -> Gram -> logit_grad_sqnorms -> ief_coefficients -> weighted_grad_sum per layer equals
    ``J^T (J J^T + lambda I)^{-1} s`` (``s = 1`` for EF) with ``J`` and ``s`` from torch.func, layer by layer."""
    _need("weighted_grad_sum", backend)
    n = 6
    model, x, y = make_problem(kind, n)
    if kind == "transformer":
        y[1, 2] = -100
    cap, logits = run_capture(model, x, y)
    gram = cap.per_sample_gram()
    lgs_backend = backend if backend in ops.available_backends(DEVICE, "logit_grad_sqnorms") else "auto"
    if rhs == "ief":
        s = ops.logit_grad_sqnorms(logits, y, backend=lgs_backend)
    else:
        s = torch.ones(n, dtype=torch.float64, device=DEVICE)
    damping = 1e-3 * gram.diagonal().mean().item()
    alpha = ops.ief_coefficients(gram, s, damping)
    step = {
        name: ops.weighted_grad_sum(a, g, alpha, mod.bias is not None, backend=backend)
        for name, (mod, a, g) in cap.layers.items()
    }

    j, blocks = per_sample_jacobian(model, x, y, ce_sum)
    j = j.cpu()
    s_truth = logit_grad_sqnorms_truth(logits, y).cpu() if rhs == "ief" else torch.ones(n, dtype=torch.float64)
    dense = j.T @ torch.linalg.solve(j @ j.T + damping * torch.eye(n, dtype=torch.float64), s_truth)
    want = split_blocks(dense, blocks)
    assert set(step) == set(want)
    for name in want:
        assert_rel_close(step[name], want[name], torch.float64, f"{rhs} step [{backend}] {kind}.{name}")


@pytest.mark.parametrize("backend", _backends("per_sample_grad_dot"))
def test_sf_step_end_to_end(backend):
    """The SF step by Woodbury from per_sample_grad_dot, ief_coefficients and weighted_grad_sum:
    ``(1 / lambda) [grad - J^T (J J^T + lambda I)^{-1} J grad]`` equals the dense ``(J^T J + lambda I)^{-1} grad``,
    with ``J`` the per-sample gradients for labels sampled from the model and ``grad`` the true-label gradient."""
    _need("per_sample_grad_dot", backend)
    wgs_backend = backend if backend in ops.available_backends(DEVICE, "weighted_grad_sum") else "auto"
    n = 6
    model, x, y = make_problem("mlp", n)
    with torch.no_grad():
        y_hat = torch.distributions.Categorical(logits=model(x)).sample()
    cap, _ = run_capture(model, x, y_hat)
    j_hat, blocks = per_sample_jacobian(model, x, y_hat, ce_sum)
    j_true, _ = per_sample_jacobian(model, x, y, ce_sum)
    grad = j_true.sum(0).cpu()
    grad_blocks = split_blocks(grad, blocks)
    gram = cap.per_sample_gram()
    damping = 0.1 * gram.diagonal().mean().item()

    r = sum(
        ops.per_sample_grad_dot(a, g, grad_blocks[name].to(DEVICE), mod.bias is not None, backend=backend)
        for name, (mod, a, g) in cap.layers.items()
    )
    beta = ops.ief_coefficients(gram, r, damping, dedup_threshold=None)
    j_hat = j_hat.cpu()
    dense = torch.linalg.solve(j_hat.T @ j_hat + damping * torch.eye(j_hat.shape[1], dtype=torch.float64), grad)
    want = split_blocks(dense, blocks)
    for name, (mod, a, g) in cap.layers.items():
        corr = ops.weighted_grad_sum(a, g, beta, mod.bias is not None, backend=wgs_backend)
        got = (grad_blocks[name].to(DEVICE) - corr) / damping
        assert_rel_close(got, want[name], torch.float64, f"SF step [{backend}] {name}")


# ================================================================================================================
# bad input
# ================================================================================================================


def _f(*shape, dtype=torch.float32, device=DEVICE):
    if torch.device(device).type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape).to(dtype).to(device)


# (a, g) failures shared by weighted_grad_sum and per_sample_grad_dot: name -> (a, g, exception, regex)
AG_BAD = {
    "N_mismatch": (lambda: (_f(3, 5, 4), _f(2, 5, 6)), ValueError, r"same N"),
    "T_mismatch": (lambda: (_f(3, 5, 4), _f(3, 4, 6)), ValueError, r"same T"),
    "a_1d": (lambda: (_f(4), _f(3, 6)), ValueError, r"\ba must be 2-d"),
    "g_4d": (lambda: (_f(3, 5, 4), _f(3, 2, 5, 6)), ValueError, r"\bg must be 2-d.*4-d"),
    "a2d_g3d": (lambda: (_f(3, 4), _f(3, 1, 6)), ValueError, r"a and g must both be 2-d or both 3-d"),
    "a_int": (lambda: (torch.ones(3, 4, dtype=torch.int64, device=DEVICE), _f(3, 6)), TypeError, r"\ba must be float"),
    "g_int": (lambda: (_f(3, 4), torch.ones(3, 6, dtype=torch.int32, device=DEVICE)), TypeError, r"\bg must be float"),
    "mixed_dtype": (lambda: (_f(3, 4), _f(3, 6, dtype=torch.float64)), TypeError, r"\bg must have a's dtype"),
    "mixed_device": (lambda: (_f(3, 4), _f(3, 6, device=_OTHER)), ValueError, r"a and g must be on one device"),
    "a_empty": (lambda: (_f(0, 4), _f(0, 6)), ValueError, r"\ba must not be empty"),
}


def _wgs_bad():
    cases = {name: (make, None, {}, exc, pat) for name, (make, exc, pat) in AG_BAD.items()}
    ag = lambda: (_f(3, 5, 4), _f(3, 5, 6))  # noqa: E731
    cases.update(
        {
            "coef_too_long": (ag, lambda: _f(4), {}, ValueError, r"\bcoef must have shape \(3,\)"),
            "coef_2d": (ag, lambda: _f(3, 1), {}, ValueError, r"\bcoef must have shape \(3,\)"),
            "coef_0d": (ag, lambda: torch.tensor(1.0, device=DEVICE), {}, ValueError, r"\bcoef must have shape \(3,\)"),
            "coef_int": (ag, lambda: torch.ones(3, dtype=torch.int64, device=DEVICE), {}, TypeError, r"\bcoef must"),
            "coef_bool": (ag, lambda: torch.ones(3, dtype=torch.bool, device=DEVICE), {}, TypeError, r"\bcoef must"),
            "coef_other_device": (ag, lambda: _f(3, device=_OTHER), {}, ValueError, r"\bcoef must be on a's device"),
            "coef_not_tensor": (ag, lambda: [1.0, 2.0, 3.0], {}, TypeError, r"\bcoef must be a torch.Tensor"),
            "bias_not_bool": (ag, None, {"bias": 1}, TypeError, r"\bbias must be a bool"),
            "unknown_backend": (ag, None, {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
        }
    )
    return cases


def _dot_bad():
    cases = {name: (make, None, {}, exc, pat) for name, (make, exc, pat) in AG_BAD.items()}
    ag = lambda: (_f(3, 5, 4), _f(3, 5, 6))  # noqa: E731
    cases.update(
        {
            "v_no_bias_column": (ag, lambda: _f(6, 4), {"bias": True}, ValueError, r"\bv must have shape \(6, 5\)"),
            "v_extra_column": (ag, lambda: _f(6, 5), {}, ValueError, r"\bv must have shape \(6, 4\)"),
            "v_transposed": (ag, lambda: _f(4, 6), {}, ValueError, r"\bv must have shape \(6, 4\)"),
            "v_1d": (ag, lambda: _f(24), {}, ValueError, r"\bv must have shape"),
            "v_int": (ag, lambda: torch.ones(6, 4, dtype=torch.int64, device=DEVICE), {}, TypeError, r"\bv must"),
            "v_other_device": (ag, lambda: _f(6, 4, device=_OTHER), {}, ValueError, r"\bv must be on a's device"),
            "v_not_tensor": (ag, lambda: [[0.0] * 4] * 6, {}, TypeError, r"\bv must be a torch.Tensor"),
            "bias_not_bool": (ag, None, {"bias": "yes"}, TypeError, r"\bbias must be a bool"),
            "unknown_backend": (ag, None, {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
        }
    )
    return cases


WGS_BAD, DOT_BAD = _wgs_bad(), _dot_bad()


@pytest.mark.parametrize("case", list(WGS_BAD))
def test_weighted_grad_sum_bad_input(case):
    make_ag, make_c, kw, exc, pattern = WGS_BAD[case]
    a, g = make_ag()
    coef = make_c() if make_c is not None else torch.ones(a.shape[0], device=DEVICE)
    kw = dict(kw)
    bias = kw.pop("bias", False)
    raises_naming("weighted_grad_sum", exc, pattern, lambda: ops.weighted_grad_sum(a, g, coef, bias, **kw))


@pytest.mark.parametrize("case", list(DOT_BAD))
def test_per_sample_grad_dot_bad_input(case):
    make_ag, make_v, kw, exc, pattern = DOT_BAD[case]
    a, g = make_ag()
    kw = dict(kw)
    bias = kw.pop("bias", False)
    v = make_v() if make_v is not None else torch.ones(g.shape[-1], a.shape[-1] + (bias is True), device=DEVICE)
    raises_naming("per_sample_grad_dot", exc, pattern, lambda: ops.per_sample_grad_dot(a, g, v, bias, **kw))


def _y(*shape, high=7, dtype=torch.int64, device=DEVICE):
    if torch.device(device).type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randint(0, high, shape).to(dtype).to(device)


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# name -> (logits, targets, kwargs, exception, regex)
LGS_BAD = {
    "logits_1d": (lambda: (_f(7), _y(1)), {}, ValueError, r"\blogits must be \(N, C\) or \(N, T, C\)"),
    "logits_4d": (lambda: (_f(2, 3, 4, 7), _y(2, 3, 4)), {}, ValueError, r"\blogits must be \(N, C\) or"),
    "logits_int": (
        lambda: (torch.ones(3, 7, dtype=torch.int64, device=DEVICE), _y(3)),
        {},
        TypeError,
        r"\blogits must have dtype",
    ),
    "logits_empty": (lambda: (_f(0, 7), _y(0)), {}, ValueError, r"\blogits must not be empty"),
    "logits_not_tensor": (lambda: ([[0.0] * 7], _y(1)), {}, TypeError, r"\blogits must be a torch.Tensor"),
    "targets_float": (lambda: (_f(3, 7), _f(3)), {}, TypeError, r"\btargets must hold integer class indices"),
    "targets_bool": (lambda: (_f(3, 7), _y(3, high=2).bool()), {}, TypeError, r"\btargets must hold integer"),
    "targets_not_tensor": (lambda: (_f(3, 7), [0, 1, 2]), {}, TypeError, r"\btargets must be a torch.Tensor"),
    "N_mismatch": (lambda: (_f(3, 7), _y(4)), {}, ValueError, r"\btargets must have shape \(3,\)"),
    "T_mismatch": (lambda: (_f(3, 5, 7), _y(3, 4)), {}, ValueError, r"\btargets must have shape \(3, 5\)"),
    "targets_2d_for_2d": (lambda: (_f(3, 7), _y(3, 1)), {}, ValueError, r"\btargets must have shape \(3,\)"),
    "targets_1d_for_3d": (lambda: (_f(3, 5, 7), _y(3)), {}, ValueError, r"\btargets must have shape \(3, 5\)"),
    "targets_other_device": (
        lambda: (_f(3, 7), _y(3, device=_OTHER)),
        {},
        ValueError,
        r"\btargets must be on logits's device",
    ),
    "target_equals_C": (
        lambda: (_f(3, 7), _with(_y(3), 1, 7)),
        {},
        ValueError,
        r"\btargets must be in \[0, 7\).*got 7",
    ),
    "target_negative": (
        lambda: (_f(3, 5, 7), _with(_y(3, 5), (2, 4), -1)),
        {},
        ValueError,
        r"\btargets must be in \[0, 7\).*got -1",
    ),
    "target_huge_int32": (
        lambda: (_f(3, 7), _with(_y(3, dtype=torch.int32), 0, 2**31 - 1)),
        {},
        ValueError,
        r"\btargets must be in \[0, 7\)",
    ),
    "target_is_other_ignore": (
        lambda: (_f(3, 7), _with(_y(3), 2, -100)),
        {"ignore_index": -1},
        ValueError,
        r"\btargets must be in \[0, 7\).*got -100",
    ),
    "ignore_index_float": (lambda: (_f(3, 7), _y(3)), {"ignore_index": -100.0}, TypeError, r"\bignore_index must"),
    "ignore_index_bool": (lambda: (_f(3, 7), _y(3)), {"ignore_index": True}, TypeError, r"\bignore_index must"),
    "unknown_backend": (lambda: (_f(3, 7), _y(3)), {"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
}


@pytest.mark.parametrize("case", list(LGS_BAD))
def test_logit_grad_sqnorms_bad_input(case):
    make, kw, exc, pattern = LGS_BAD[case]
    logits, targets = make()
    raises_naming("logit_grad_sqnorms", exc, pattern, lambda: ops.logit_grad_sqnorms(logits, targets, **kw))


# ================================================================================================================
# compiled ops: registration, their own checks, torch.library / torch.compile
# ================================================================================================================


@pytest.mark.parametrize("op", COMPILED)
def test_registered_kernel_is_used(op):
    """A kernel registered with the dispatcher must also be reachable through pycurv.ops."""
    native_offered(op, _NATIVE)


def test_compiled_weighted_grad_sum_checks_inputs():
    """The compiled op checks its inputs too (it can be called directly, bypassing pycurv.ops)."""
    _need_registered("weighted_grad_sum", DEVICE.type.upper())
    fn = torch.ops.pycurv.weighted_grad_sum
    a, g, coef = _f(3, 5, 4), _f(3, 5, 6), _f(3)
    bad = {
        r"\ba\b": (a[:, 0], g, coef),
        r"\bg\b": (a, g[:, 0], coef),
        r"same N": (a, g[:2], coef),
        r"\bcoef\b.*\b3\b": (a, g, _f(4)),
        r"\bcoef\b": (a, g, _f(3, 1)),
        r"\bcoef\b.*(Double|float64)": (a, g, coef.double()),
    }
    for pattern, args in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            fn(*args, False)


def test_compiled_logit_grad_sqnorms_checks_inputs():
    _need_registered("logit_grad_sqnorms", DEVICE.type.upper())
    fn = torch.ops.pycurv.logit_grad_sqnorms
    z, y = _f(3, 4, 7), _y(3, 4)
    bad = {
        r"\blogits\b": (z[:, 0], y),
        r"\btargets\b": (z, y[:, :3]),
        r"\btargets\b.*(Int|int32)": (z, y.int()),
    }
    for pattern, args in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError), match=pattern):
            fn(*args, -100)


def _opcheck_args(op: str, dtype: torch.dtype, variant: str):
    if op == "weighted_grad_sum":
        a = _randn(3, 4, 5, dtype=dtype)
        g = _randn(3, 6, 4, dtype=dtype).transpose(1, 2)  # non-contiguous
        return (a, g, _randn(3, dtype=acc_dtype(dtype)), variant == "bias")
    z = _randn(3, 7, 4, dtype=dtype, scale=3.0).transpose(1, 2)
    y = torch.randint(0, 7, (3, 4), device=DEVICE)
    y[1, 2] = -100
    return (z, y, -100)


def _opcheck_params():
    out = []
    for op, variants in (("weighted_grad_sum", ("bias", "nobias")), ("logit_grad_sqnorms", ("na",))):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for variant in variants:
                out.append(pytest.param(op, dtype, variant, id=f"{op}-{DT_ID[dtype]}-{variant}"))
    return out


@pytest.mark.parametrize("op, dtype, variant", _opcheck_params())
def test_opcheck_compiled(op, dtype, variant):
    _need_registered(op, DEVICE.type.upper())
    torch.library.opcheck(getattr(torch.ops.pycurv, op).default, _opcheck_args(op, dtype, variant))


def _triton_custom_ops():
    out = []
    for op in COMPILED:
        if "triton" not in op_backends(op):
            out.append(pytest.param(op, None, id=op))
            continue
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
    args = _opcheck_args(op, torch.float32, "bias")
    torch.library.opcheck(overload, args[: len(overload._schema.arguments)])


@pytest.mark.parametrize("backend", ["auto", _NATIVE])
def test_torch_compile_fullgraph(backend):
    """weighted_grad_sum and per_sample_grad_dot (the SF product) in one compiled graph."""
    if backend != "auto":
        _need("weighted_grad_sum", backend)
    torch._dynamo.reset()

    def step(a, g, coef, v):
        w = ops.weighted_grad_sum(a, g, coef, True, backend=backend)
        return w, ops.per_sample_grad_dot(a, g, v + w, True)

    compiled = torch.compile(step, fullgraph=True)
    a, g, coef = make_agc(3, 4, 5, 2, torch.float32)
    v = _randn(2, 6)
    w, r = compiled(a, g, coef, v)
    check_wgs(w, a, g, coef, True, torch.float32, f"compiled weighted_grad_sum[{backend}]")
    assert_rel_close(r, dot_truth(a, g, v + w, True), torch.float32, "compiled per_sample_grad_dot")
