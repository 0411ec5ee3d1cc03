"""Per-sample gradient products (MATH.md section 1): per_sample_grad_sqnorms, per_sample_gram, ef_diag.

Every backend that can run an op here is checked against (i) pycurv.reference and (ii) an independent float64
ground truth, the per-sample gradients of a real nn.Linear taken with torch.func from the same rounded inputs
(tests/models.py). Under the Triton interpreter the Triton cases use a covering subset of the shape/dtype/bias/method
grid (every shape/dtype pair, one method and bias setting each) to keep the run short; everywhere else the grid is full.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import pycurv
from pycurv import ops, reference
from pycurv.reference import acc_dtype

from conftest import DEVICE, INTERPRET, REL_TOL, assert_rel_close, need_backend, op_backends, raises_naming
from models import ground_truth as _ground_truth

OPS = ("per_sample_grad_sqnorms", "per_sample_gram", "ef_diag")
METHOD_OPS = ("per_sample_grad_sqnorms", "per_sample_gram")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DT_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}

# (N, T, d_in, d_out); T=None is a 2-D input (N, d). Every N in {1, 3, 7}, T in {2-D, 1, 5}, d in {1, 3, 17}.
SHAPES = [
    (1, None, 1, 1),
    (3, None, 17, 3),
    (7, None, 3, 17),
    (1, 1, 3, 17),
    (3, 1, 1, 3),
    (7, 1, 17, 1),
    (1, 5, 17, 3),
    (3, 5, 3, 1),
    (7, 5, 1, 17),
    (7, 5, 17, 17),
]


def _shape_id(s):
    n, t, di, do = s
    return f"N{n}-{'2d' if t is None else f'T{t}'}-{di}x{do}"


def _reduced(backend: str) -> bool:
    """The Triton interpreter runs every program instance in Python: a few launches per test at most."""
    return backend == "triton" and INTERPRET


def _cases(op: str) -> list:
    """pytest params (backend, shape, dtype, bias, method) for ``op``: the full grid, or for the interpreted Triton
    backend every (shape, dtype) pair with one (method, bias) choice, each dtype seeing all four choices."""
    methods = ("ghost", "materialize", "auto") if op in METHOD_OPS else (None,)
    params = []
    for backend in op_backends(op):
        if _reduced(backend):
            # every shape with every dtype once; per dtype, the shape index k walks through all four
            # (method, bias) pairs
            combos = []
            for (k, shape), (j, dtype) in itertools.product(enumerate(SHAPES), enumerate(DTYPES)):
                method = ("ghost", "materialize")[(k + j) % 2] if op in METHOD_OPS else None
                combos.append((shape, dtype, (k // 2 + j) % 2 == 1, method))
            if op in METHOD_OPS:
                combos.append((SHAPES[9], torch.float32, True, "auto"))
        else:
            combos = list(itertools.product(SHAPES, DTYPES, (False, True), methods))
        for shape, dtype, bias, method in combos:
            pid = f"{backend}-{_shape_id(shape)}-{DT_ID[dtype]}-{'bias' if bias else 'nobias'}"
            if method is not None:
                pid += f"-{method}"
            params.append(pytest.param(backend, shape, dtype, bias, method, id=pid))
    return params


_GT_CACHE: dict = {}


def ground_truth(a, g, bias):
    """models.ground_truth, memoised on the exact input values: the same inputs recur across backends and methods,
    and torch.func's per-call overhead dominates these small cases."""
    key = (
        bias,
        a.dtype,
        tuple(a.shape),
        tuple(g.shape),
        a.detach().double().cpu().contiguous().numpy().tobytes(),
        g.detach().double().cpu().contiguous().numpy().tobytes(),
    )
    if key not in _GT_CACHE:
        _GT_CACHE[key] = _ground_truth(a, g, bias)
    return _GT_CACHE[key]


def make_ag(n, t, d_in, d_out, dtype, device=DEVICE, scale=1.0):
    """Random a, g (2-D when t is None), drawn in float32 and rounded to ``dtype``."""
    sa = (n, d_in) if t is None else (n, t, d_in)
    sg = (n, d_out) if t is None else (n, t, d_out)
    a = (torch.randn(sa, device=device) * scale).to(dtype)
    g = torch.randn(sg, device=device).to(dtype)
    return a, g


def run_op(op, a, g, bias, method, backend, **kw):
    fn = getattr(ops, op)
    if op == "ef_diag":
        return fn(a, g, bias, backend=backend, **kw)
    return fn(a, g, bias, backend=backend, method=method, **kw)


def ref_op(op, a, g, bias, method):
    fn = getattr(reference, op)
    if op == "ef_diag":
        return fn(a, g, bias)
    return fn(a, g, bias, "ghost" if method in (None, "auto") else method)


def expected_shape(op, a, g, bias):
    n = a.shape[0]
    shapes = {"per_sample_grad_sqnorms": (n,), "per_sample_gram": (n, n), "ef_diag": (g.shape[-1], a.shape[-1] + bias)}
    return shapes[op]


def check_against_both(op, x, a, g, bias, method, dtype, what):
    assert tuple(x.shape) == expected_shape(op, a, g, bias), f"{what}: shape {tuple(x.shape)}"
    assert x.dtype == acc_dtype(dtype), f"{what}: dtype {x.dtype} for {dtype} inputs"
    assert x.device == a.device, f"{what}: device {x.device}"
    assert_rel_close(x, ref_op(op, a, g, bias, method), dtype, f"{what} vs reference")
    assert_rel_close(x, ground_truth(a, g, bias)[op], dtype, f"{what} vs torch.func ground truth")


# -- numerics -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, shape, dtype, bias, method", _cases("per_sample_grad_sqnorms"))
def test_per_sample_grad_sqnorms(backend, shape, dtype, bias, method):
    a, g = make_ag(*shape, dtype)
    x = ops.per_sample_grad_sqnorms(a, g, bias, backend=backend, method=method)
    check_against_both("per_sample_grad_sqnorms", x, a, g, bias, method, dtype, f"sqnorms[{backend}]")


@pytest.mark.parametrize("backend, shape, dtype, bias, method", _cases("per_sample_gram"))
def test_per_sample_gram(backend, shape, dtype, bias, method):
    a, g = make_ag(*shape, dtype)
    x = ops.per_sample_gram(a, g, bias, backend=backend, method=method)
    check_against_both("per_sample_gram", x, a, g, bias, method, dtype, f"gram[{backend}]")


@pytest.mark.parametrize("backend, shape, dtype, bias, method", _cases("ef_diag"))
def test_ef_diag(backend, shape, dtype, bias, method):
    a, g = make_ag(*shape, dtype)
    x = ops.ef_diag(a, g, bias, backend=backend)
    check_against_both("ef_diag", x, a, g, bias, None, dtype, f"ef_diag[{backend}]")


def _noncontiguous(layout: str, dtype=torch.float32):
    """(a, g) views with unusual strides: transposed, strided slices with an offset, a stride-0 broadcast, 2-D
    transposed."""
    n, t, d_in, d_out = 3, 5, 17, 3
    dev = DEVICE
    if layout == "transposed":
        a = torch.randn(n, d_in, t, device=dev).to(dtype).transpose(1, 2)
        g = torch.randn(t, n, d_out, device=dev).to(dtype).permute(1, 0, 2)
    elif layout == "sliced":
        a = torch.randn(n + 1, 2 * t, 2 * d_in, device=dev).to(dtype)[1:, ::2, 1::2]
        g = torch.randn(2 * n, t, d_out + 2, device=dev).to(dtype)[::2, :, 2:]
    elif layout == "expanded":
        a = torch.randn(1, t, d_in, device=dev).to(dtype).expand(n, t, d_in)
        g = torch.randn(n, 1, d_out, device=dev).to(dtype).expand(n, t, d_out)
    elif layout == "transposed2d":
        a = torch.randn(d_in, 7, device=dev).to(dtype).T
        g = torch.randn(d_out, 14, device=dev).to(dtype)[:, ::2].T
    else:
        raise AssertionError(layout)
    assert not (a.is_contiguous() and g.is_contiguous())
    return a, g


LAYOUTS = ("transposed", "sliced", "expanded", "transposed2d")


def _op_method_params():
    out = []
    for op in OPS:
        for backend in op_backends(op):
            for method in ("ghost", "materialize") if op in METHOD_OPS else (None,):
                out.append(pytest.param(op, backend, method, id=f"{op}-{backend}-{method or 'na'}"))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op, backend, method", _op_method_params())
def test_noncontiguous_inputs(op, backend, method, layout):
    a, g = _noncontiguous(layout)
    a0, g0 = a.clone(), g.clone()
    x = run_op(op, a, g, True, method, backend)
    check_against_both(op, x, a, g, True, method, torch.float32, f"{op}[{backend}, {layout}]")
    assert torch.equal(a, a0) and torch.equal(g, g0), "inputs were modified"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("op, backend, method", _op_method_params())
def test_low_precision_accumulates_in_float32(op, backend, method, dtype):
    # |a| ~ 100: every a_t . a_s (about 17 * 1e4) and every G_n entry exceeds float16's 65504, so a kernel that
    # keeps a Gram, a G_n or a partial sum in float16 overflows; float32 accumulation is exact enough.
    a, g = make_ag(3, 5, 17, 3, dtype, scale=100.0)
    assert torch.isfinite(a.float()).all()
    x = run_op(op, a, g, True, method, backend)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all(), f"{op}[{backend}]: non-finite output for {dtype} inputs of magnitude 100"
    assert_rel_close(x, ground_truth(a, g, True)[op], dtype, f"{op}[{backend}] large {dtype}")


@pytest.fixture
def reduced_float32_matmul():
    """Lets torch.matmul round float32 as coarsely as it may (TF32 on the GPU, bfloat16 passes in oneDNN on the
    CPU), then restores the settings."""
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("op, backend, method", [p for p in _op_method_params() if p.values[1] != "torch"])
def test_float32_ignores_reduced_matmul_precision(op, backend, method, monkeypatch, reduced_float32_matmul):
    """pycurv's kernels keep float32 accuracy whatever torch's float32 matmul precision (the reference backend
    follows it, as torch does). PYCURV_CUDA_FUSED_MAX_D=1 sends the CUDA ghost Gram through its cuBLAS path."""
    monkeypatch.setenv("PYCURV_CUDA_FUSED_MAX_D", "1")
    a, g = make_ag(5, 8, 64, 48, torch.float32)
    x = run_op(op, a, g, True, method, backend)
    assert_rel_close(x, ground_truth(a, g, True)[op], torch.float32, f"{op}[{backend}, {method}] reduced precision")


@pytest.mark.parametrize("chunk_bytes", ("1", "1000"), ids=("one-per-chunk", "uneven-chunks"))
def test_cuda_chunked_paths(chunk_bytes, monkeypatch):
    """The CUDA paths that work in chunks (per-sample gradients by blocks of d_out rows; the cuBLAS ghost Gram by
    blocks of samples, mirrored) with chunks of one row / one sample, and of two (the last one shorter)."""
    need_backend("per_sample_gram", "cuda")
    monkeypatch.setenv("PYCURV_CUDA_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setenv("PYCURV_CUDA_FUSED_MAX_D", "1")
    a, g = make_ag(7, 5, 17, 3, torch.float32)
    for op in OPS:
        for method in ("ghost", "materialize") if op in METHOD_OPS else (None,):
            for bias in (False, True):
                x = run_op(op, a, g, bias, method, "cuda")
                check_against_both(op, x, a, g, bias, method, torch.float32, f"{op}[cuda, {method}, chunks]")


def _agree_params():
    shapes = [(3, 1, 17, 3), (7, 5, 3, 17), (1, 5, 17, 1)]
    out = []
    for op in METHOD_OPS:
        for backend in op_backends(op):
            for shape in shapes[1:2] if _reduced(backend) else shapes:
                out.append(pytest.param(op, backend, shape, id=f"{op}-{backend}-{_shape_id(shape)}"))
    return out


@pytest.mark.parametrize("op, backend, shape", _agree_params())
def test_methods_agree(op, backend, shape):
    a, g = make_ag(*shape, torch.float64)
    xg = run_op(op, a, g, True, "ghost", backend)
    xm = run_op(op, a, g, True, "materialize", backend)
    assert_rel_close(xg, xm, torch.float64, f"{op}[{backend}] ghost vs materialize")


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("op, backend", [pytest.param(o, b, id=f"{o}-{b}") for o in OPS for b in op_backends(o)])
def test_wide_output_16bit(op, backend, dtype):
    """d_out = 200 spans several output blocks of every tile height the 16-bit GPU kernels try while autotuning (64
    and 128): a kernel whose tuning runs leave partial sums behind for the real run shows it here, on the first call
    with this shape, for both methods."""
    a, g = make_ag(3, 5, 24, 200, dtype)
    for method in ("ghost", "materialize"):
        x = run_op(op, a, g, True, method, backend)
        check_against_both(op, x, a, g, True, method, dtype, f"{op}[{backend}, {method}] {dtype} d_out=200")


def test_cuda_atomics_alert_in_deterministic_mode():
    """The CUDA kernels that sum with float atomics raise under torch.use_deterministic_algorithms(True), as
    torch's own do; "auto" on a GPU prefers Triton, which has no atomics and keeps working."""
    if "cuda" not in op_backends("per_sample_gram"):
        pytest.skip("no CUDA kernels here")
    a, g = make_ag(4, 3, 17, 5, torch.float32)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="atomicAdd"):
            ops.per_sample_gram(a, g, True, backend="cuda", method="ghost")
        if "triton" in op_backends("per_sample_gram"):
            x = ops.per_sample_gram(a, g, True, backend="auto", method="ghost")
            check_against_both("per_sample_gram", x, a, g, True, "ghost", torch.float32, "auto, deterministic mode")
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_repeat_bit_for_bit(op):
    """Two threads, tiles handed out dynamically: the C++ kernels must still give the same bits on every call (the
    materialize Gram once summed per-thread partials whose tiles depended on timing)."""
    if "cpu" not in op_backends(op) or DEVICE.type != "cpu":
        pytest.skip("the C++ CPU kernels only")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, g = make_ag(16, 32, 256, 256, torch.float32)
        for method in ("ghost", "materialize"):
            first = run_op(op, a, g, True, method, "cpu")
            for _ in range(6):
                assert torch.equal(run_op(op, a, g, True, method, "cpu"), first), f"{op}[cpu, {method}] changed"
    finally:
        torch.set_num_threads(threads)


def _unreduced_backend_params(ops_=OPS):
    return [
        pytest.param(op, b, id=f"{op}-{b}") for op in ops_ for b in op_backends(op) if not _reduced(b)
    ]


@pytest.mark.parametrize("op, backend", _unreduced_backend_params())
def test_2d_equals_3d_with_t1(op, backend):
    a, g = make_ag(7, None, 17, 3, torch.float32)
    x2 = run_op(op, a, g, True, "ghost", backend)
    x3 = run_op(op, a.unsqueeze(1), g.unsqueeze(1), True, "ghost", backend)
    assert_rel_close(x2, x3, torch.float32, f"{op}[{backend}] 2-D vs T=1")


# -- out= accumulation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=("f32", "bf16", "f64"))
@pytest.mark.parametrize("backend", op_backends("per_sample_gram"))
def test_gram_out_accumulates(backend, dtype):
    n = 3
    a1, g1 = make_ag(n, 5, 17, 3, dtype)
    a2, g2 = make_ag(n, None, 3, 17, dtype)
    out = torch.randn(n, n, dtype=acc_dtype(dtype), device=DEVICE)
    out0 = out.clone()
    ptr = out.data_ptr()
    r1 = ops.per_sample_gram(a1, g1, True, out=out, backend=backend, method="ghost")
    r2 = ops.per_sample_gram(a2, g2, False, out=out, backend=backend, method="materialize")
    assert r1 is out and r2 is out and out.data_ptr() == ptr
    k1, k2 = ground_truth(a1, g1, True)["per_sample_gram"], ground_truth(a2, g2, False)["per_sample_gram"]
    want = out0.double() + k1 + k2
    # the tolerance applies to the added part; out0 is carried exactly
    err = (out.double() - want).norm() / (want - out0.double()).norm()
    assert err <= REL_TOL[dtype], f"out accumulation error {err:.3g}"


# -- bad input ----------------------------------------------------------------------------------------------------

_OTHER = torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")
_WRONG_BACKEND = "cpu" if DEVICE.type == "cuda" else "cuda"


def _f(*shape, dtype=torch.float32, device=DEVICE):
    if device.type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape).to(dtype).to(device)


# name -> (a, g, kwargs, exception type, regex the message must match: it names the argument)
BAD = {
    "N_mismatch": (lambda: (_f(3, 5, 4), _f(2, 5, 6)), {}, ValueError, r"same N"),
    "T_mismatch": (lambda: (_f(3, 5, 4), _f(3, 4, 6)), {}, ValueError, r"same T"),
    "N_mismatch_2d": (lambda: (_f(3, 4), _f(2, 6)), {}, ValueError, r"same N"),
    "a_1d": (lambda: (_f(4), _f(3, 6)), {}, ValueError, r"\ba must be 2-d"),
    "g_1d": (lambda: (_f(3, 4), _f(6)), {}, ValueError, r"\bg must be 2-d"),
    "a_4d": (lambda: (_f(3, 2, 5, 4), _f(3, 5, 6)), {}, ValueError, r"\ba must be 2-d.*4-d"),
    "g_4d": (lambda: (_f(3, 5, 4), _f(3, 2, 5, 6)), {}, ValueError, r"\bg must be 2-d.*4-d"),
    "a2d_g3d": (lambda: (_f(3, 4), _f(3, 1, 6)), {}, ValueError, r"a and g must both be 2-d or both 3-d"),
    "a_int": (lambda: (torch.ones(3, 4, dtype=torch.int64), _f(3, 6)), {}, TypeError, r"\ba must be float"),
    "g_int": (lambda: (_f(3, 4), torch.ones(3, 6, dtype=torch.int32)), {}, TypeError, r"\bg must be float"),
    "a_bool": (lambda: (torch.ones(3, 4, dtype=torch.bool), _f(3, 6)), {}, TypeError, r"\ba must be float"),
    "mixed_dtype": (lambda: (_f(3, 4), _f(3, 6, dtype=torch.float64)), {}, TypeError, r"\bg must have a's dtype"),
    "mixed_lowp": (
        lambda: (_f(3, 4, dtype=torch.bfloat16), _f(3, 6, dtype=torch.float16)),
        {},
        TypeError,
        r"\bg must have a's dtype",
    ),
    "mixed_device": (lambda: (_f(3, 4), _f(3, 6, device=_OTHER)), {}, ValueError, r"a and g must be on one device"),
    "a_empty": (lambda: (_f(0, 4), _f(0, 6)), {}, ValueError, r"\ba must not be empty"),
    "a_not_tensor": (lambda: ([[1.0]], _f(1, 6)), {}, TypeError, r"\ba must be a torch.Tensor"),
    "bias_not_bool": (lambda: (_f(3, 4), _f(3, 6)), {"bias": 1}, TypeError, r"\bbias must be a bool"),
    "unknown_backend": (lambda: (_f(3, 4), _f(3, 6)), {"backend": "numpy"}, ValueError, r"backend must be one of"),
    "backend_wrong_device": (
        lambda: (_f(3, 4), _f(3, 6)),
        {"backend": _WRONG_BACKEND},
        RuntimeError,
        rf"backend '{_WRONG_BACKEND}'",
    ),
    "unknown_method": (lambda: (_f(3, 4), _f(3, 6)), {"method": "fast"}, ValueError, r"\bmethod must be"),
    "method_none": (lambda: (_f(3, 4), _f(3, 6)), {"method": None}, ValueError, r"\bmethod must be"),
}
NO_METHOD = {"unknown_method", "method_none"}  # ef_diag takes no method


def _bad_params():
    return [
        pytest.param(op, case, id=f"{op}-{case}")
        for op in OPS
        for case in BAD
        if not (op == "ef_diag" and case in NO_METHOD)
    ]


def _call(op, a, g, kw, out=None):
    kw = dict(kw)
    bias = kw.pop("bias", False)
    if out is not None:
        kw["out"] = out
    return getattr(ops, op)(a, g, bias, **kw)


@pytest.mark.parametrize("op, case", _bad_params())
def test_bad_input_raises(op, case):
    make, kw, exc, pattern = BAD[case]
    a, g = make()
    raises_naming(op, exc, pattern, lambda: _call(op, a, g, kw))


def _bad_out_params():
    n = 3
    return {
        "out_shape": (lambda: torch.zeros(n, n + 1, device=DEVICE), ValueError, r"\bout must have shape \(3, 3\)"),
        "out_1d": (lambda: torch.zeros(n * n, device=DEVICE), ValueError, r"\bout must have shape"),
        "out_f64": (lambda: torch.zeros(n, n, dtype=torch.float64, device=DEVICE), TypeError, r"\bout must have dtype"),
        "out_bf16": (lambda: torch.zeros(n, n, dtype=torch.bfloat16, device=DEVICE), TypeError, r"\bout must have dt"),
        "out_device": (lambda: torch.zeros(n, n, device=_OTHER), ValueError, r"\bout must be on"),
        "out_not_tensor": (lambda: [[0.0] * n] * n, TypeError, r"\bout must be a torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_out_params()))
def test_bad_out_raises(case):
    make, exc, pattern = _bad_out_params()[case]
    a, g = _f(3, 5, 4), _f(3, 5, 6)
    with pytest.raises(exc, match=pattern):
        ops.per_sample_gram(a, g, out=make())


def test_out_unchanged_after_failing_calls():
    n = 3
    out = torch.randn(n, n, device=DEVICE)
    snap = out.clone()
    failing = [(name, *BAD[name][:2]) for name in BAD if name != "a_not_tensor"]
    for name, make, kw in failing:
        a, g = make()
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            _call("per_sample_gram", a, g, kw, out=out)
        assert torch.equal(out, snap), f"out changed by the failing call {name}"
    # failures that involve out itself or that only out makes wrong
    a, g = _f(n, 5, 4), _f(n, 5, 6)
    for bad in (
        lambda: ops.per_sample_gram(_f(n + 1, 5, 4), _f(n + 1, 5, 6), out=out),  # N of the inputs differs from out
        lambda: ops.per_sample_gram(a.double(), g.double(), out=out),  # float64 inputs need a float64 out
        lambda: ops.per_sample_gram(a, g, True, out=out, backend=_WRONG_BACKEND),
        lambda: ops.per_sample_gram(a, g, True, out=out, method="fast"),
        lambda: ops.per_sample_gram(a, g, True, out=out, backend="numpy"),
    ):
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            bad()
        assert torch.equal(out, snap), "out changed by a failing call"


def _need_kernel(op: str, key: str) -> None:
    if pycurv._extension.LOAD_ERROR is not None:
        pytest.skip(f"pycurv._C did not load: {pycurv._extension.LOAD_ERROR}")
    if not pycurv._extension.has_kernel(op, key):
        pytest.skip(f"pycurv._C has no {key} kernel for {op}")


@pytest.mark.parametrize("op", OPS)
def test_compiled_op_checks_inputs(op):
    """The C++ ops check their inputs too (they can be called directly, bypassing pycurv.ops)."""
    _need_kernel(op, "CPU")
    fn = getattr(torch.ops.pycurv, op)
    extra = () if op == "ef_diag" else ("ghost",)
    a, g = torch.randn(3, 5, 4), torch.randn(3, 5, 6)
    with pytest.raises(ValueError, match=r"\ba must be \(N, T, d_in\)"):
        fn(a[:, 0], g, False, *extra)
    with pytest.raises(ValueError, match=r"\bg must be \(N, T, d_out\)"):
        fn(a, g[:, 0], False, *extra)
    with pytest.raises(ValueError, match=r"same N"):
        fn(a, g[:2], False, *extra)
    with pytest.raises(ValueError, match=r"same T"):
        fn(a, g[:, :4], False, *extra)
    with pytest.raises(TypeError, match=r"\bg must have a's dtype"):
        fn(a, g.double(), False, *extra)
    with pytest.raises(TypeError, match=r"\ba must be float"):
        fn(a.long(), g.long(), False, *extra)
    if extra:
        with pytest.raises(ValueError, match=r"\bmethod must be"):
            fn(a, g, False, "fast")


# -- torch.library / torch.compile --------------------------------------------------------------------------------


def _opcheck_params():
    out = []
    for op in OPS:
        for dtype in (torch.float32, torch.bfloat16):
            for method in ("ghost", "materialize") if op in METHOD_OPS else (None,):
                out.append(pytest.param(op, dtype, method, id=f"{op}-{DT_ID[dtype]}-{method or 'na'}"))
    return out


@pytest.mark.parametrize("op, dtype, method", _opcheck_params())
def test_opcheck_compiled(op, dtype, method):
    _need_kernel(op, DEVICE.type.upper())
    a = torch.randn(3, 4, 5, device=DEVICE).to(dtype)
    g = torch.randn(3, 6, 4, device=DEVICE).to(dtype).transpose(1, 2)  # non-contiguous
    args = (a, g, True) if method is None else (a, g, True, method)
    torch.library.opcheck(getattr(torch.ops.pycurv, op).default, args)


def _triton_custom_ops():
    """The Triton launchers' torch ops (``torch.ops.pycurv.<op>_triton``, a ``triton_op``, or a ``custom_op`` under the
    interpreter), if the Triton backend is live and registers them."""
    out = []
    for op in OPS:
        if "triton" not in op_backends(op):
            continue
        try:
            overload = getattr(torch.ops.pycurv, f"{op}_triton").default
        except (AttributeError, RuntimeError):
            continue
        out.append(pytest.param(op, overload, id=op))
    return out


@pytest.mark.parametrize("op, overload", _triton_custom_ops())
def test_opcheck_triton(op, overload):
    a = torch.randn(3, 2, 5, device=DEVICE)
    g = torch.randn(3, 2, 4, device=DEVICE)
    args = (a, g, True) if op == "ef_diag" else (a, g, True, "ghost")
    torch.library.opcheck(overload, args)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op):
    backend = "cuda" if DEVICE.type == "cuda" else "cpu"
    if backend not in op_backends(op):
        pytest.skip(f"backend {backend!r} is not available for {op}")
    torch._dynamo.reset()
    fn = getattr(ops, op)
    if op == "ef_diag":
        compiled = torch.compile(lambda a, g: fn(a, g, True, backend=backend), fullgraph=True)
    else:
        compiled = torch.compile(lambda a, g: fn(a, g, True, backend=backend, method="auto"), fullgraph=True)
    a, g = make_ag(3, 4, 5, 2, torch.float32)
    x = compiled(a, g)
    assert_rel_close(x, ref_op(op, a, g, True, "ghost"), torch.float32, f"compiled {op}")


# -- choose_method ------------------------------------------------------------------------------------------------


def test_choose_method():
    for kind in ("gram", "sqnorms"):
        assert ops.choose_method(kind, 64, 1, 4096, 4096) == "ghost"  # T = 1: no T x T Gram at all
        assert ops.choose_method(kind, 1, 1, 1, 1) == "ghost"
    # a transformer layer: the Gram's ghost cost N^2 T^2 (2d) exceeds the materialize cost N T d^2 + N^2 d^2
    assert ops.choose_method("gram", 64, 256, 1024, 1024) == "materialize"
    # the norms' ghost cost N T^2 (2d) beats N T d^2 while T < d/2, and loses beyond
    assert ops.choose_method("sqnorms", 64, 256, 1024, 1024) == "ghost"
    assert ops.choose_method("sqnorms", 64, 2048, 1024, 1024) == "materialize"
    for kind in ("gram", "sqnorms"):
        assert ops.choose_method(kind, 64, 4, 1024, 1024) == "ghost"  # small T, large d
        assert ops.choose_method(kind, 8, 1024, 16, 16) == "materialize"  # long T, tiny d
    with pytest.raises(ValueError, match="kind"):
        ops.choose_method("ef", 4, 4, 4, 4)


@pytest.mark.parametrize("op, backend", _unreduced_backend_params(METHOD_OPS))
def test_auto_method_matches_both(op, backend):
    """"auto" picks one of two exact methods; on a shape where each one is chosen, all three agree."""
    kind = "gram" if op == "per_sample_gram" else "sqnorms"
    shapes = ((2, 9, 1, 1), (3, 2, 17, 17))
    assert {ops.choose_method(kind, *s) for s in shapes} == {"ghost", "materialize"}
    for shape in shapes:
        a, g = make_ag(*shape, torch.float64)
        xa = run_op(op, a, g, True, "auto", backend)
        for method in ("ghost", "materialize"):
            assert_rel_close(xa, run_op(op, a, g, True, method, backend), torch.float64, f"{op}[{backend}] {method}")
