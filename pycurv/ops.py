"""Public ops: validate the inputs, pick a backend and an algorithm, dispatch.

Backends (``backend=``): ``"auto"`` (default; the environment variable ``PYCURV_BACKEND`` overrides it) picks
Triton, then CUDA, on CUDA tensors and the C++ kernel on CPU tensors, falling back to ``"torch"``
(:mod:`pycurv.reference`) when nothing compiled is available. ``"triton"`` also runs on CPU tensors under
``TRITON_INTERPRET=1``.

Shapes follow DESIGN.md section 3: ``a: (N, d_in) | (N, T, d_in)``, ``g: (N, d_out) | (N, T, d_out)``, where ``g``
holds the gradient of each sample's own loss (a loss with ``reduction="sum"``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Sequence

import torch

from . import _extension, reference
from .reference import acc_dtype, as_3d

__all__ = [
    "BACKENDS",
    "available_backends",
    "choose_method",
    "per_sample_grad_sqnorms",
    "per_sample_gram",
    "ef_diag",
    "kfac_factor_update",
    "damped_inverse",
    "DampingRaisedWarning",
    "sym_eig",
    "kron_precondition",
    "kron_precondition_eigen",
    "kl_clip_scale",
    "weighted_grad_sum",
    "per_sample_grad_dot",
    "logit_grad_sqnorms",
    "ief_coefficients",
    "fop_update",
    "fop_precondition",
]

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Triton launcher module of each op family, imported on first use (importing triton is slow and may fail).
_FAMILY = {
    "per_sample_grad_sqnorms": "per_sample",
    "per_sample_gram": "per_sample",
    "ef_diag": "per_sample",
    "kfac_factor_update": "kfac",
    "damped_inverse": "kfac",
    "sym_eig": "kfac",
    "kron_precondition": "kfac",
    "kron_precondition_eigen": "kfac",
    "weighted_grad_sum": "ief",
    "logit_grad_sqnorms": "ief",
    "fop_update": "fop",
    "fop_precondition": "fop",
}
_triton_modules: dict = {}
_triton_errors: dict[str, str] = {}

# Methods that a compiled backend implements for ops with a ``method``; the others run on "torch" under "auto".
_METHODS = {
    ("damped_inverse", "cpu"): ("cholesky", "eigh"),
    ("damped_inverse", "cuda"): ("cholesky",),
    ("damped_inverse", "triton"): ("newton_schulz",),
}


def _triton(family: str = "per_sample"):
    """``pycurv.kernels.<family>``, or None when triton cannot be imported (the reason is kept)."""
    if family not in _triton_modules and family not in _triton_errors:
        try:
            import importlib

            _triton_modules[family] = importlib.import_module(f"{__package__}.kernels.{family}")
        except Exception as exc:  # triton missing or broken: report through available_backends / pycurv.info
            _triton_errors[family] = f"{type(exc).__name__}: {exc}"
    return _triton_modules.get(family)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_status(backend: str, device: torch.device, op: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        if not _extension.has_kernel(op, "CPU"):
            return f"pycurv._C has no CPU kernel for {op} ({_extension.LOAD_ERROR or 'not registered'})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        if not _extension.has_kernel(op, "CUDA"):
            return f"pycurv._C has no CUDA kernel for {op} ({_extension.LOAD_ERROR or 'built without CUDA'})"
        return None
    if backend == "triton":
        if device.type == "cpu" and not _triton_interpreting():
            return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' needs CUDA tensors, got tensors on {device}"
        family = _FAMILY.get(op, "per_sample")
        mod = _triton(family)
        if mod is None:
            return f"triton is not usable ({_triton_errors[family]})"
        if not hasattr(mod, f"{op}_triton"):
            return f"there is no Triton kernel for {op}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _method_status(backend: str, op: str, method: str | None) -> str | None:
    if method is None or backend == "torch":
        return None
    have = _METHODS.get((op, backend))
    if have is not None and method not in have:
        return f"the {backend} kernel of {op} implements method {' / '.join(map(repr, have))}, not {method!r}"
    return None


def available_backends(device: torch.device | str, op: str = "per_sample_gram", method: str | None = None) -> list[str]:
    """Backends that can run ``op`` (with ``method``, for ops that have one) on tensors of ``device``, best first
    (the order "auto" tries)."""
    device = torch.device(device)
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    if device.type == "cpu" and _triton_interpreting():
        order = ("cpu", "torch", "triton")
    return [
        b for b in order if _backend_status(b, device, op) is None and _method_status(b, op, method) is None
    ]


def _resolve_backend(backend: str, device: torch.device, op: str, method: str | None = None) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("PYCURV_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{op}: PYCURV_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device, op, method)[0]
    why = _backend_status(backend, device, op) or _method_status(backend, op, method)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {why}")
    return backend


def _check_ag(a, g, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates ``a`` and ``g`` and returns them as ``(N, T, d)`` views (no copy)."""
    for name, x in (("a", a), ("g", g)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(
                f"{op}: {name} must be 2-d (N, d) or 3-d (N, T, d), got {x.dim()}-d of shape {tuple(x.shape)}"
            )
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")
    if a.dim() != g.dim():
        raise ValueError(
            f"{op}: a and g must both be 2-d or both 3-d, got a {tuple(a.shape)} and g {tuple(g.shape)}"
        )
    if g.dtype != a.dtype:
        raise TypeError(f"{op}: g must have a's dtype {a.dtype}, got {g.dtype}")
    if a.device != g.device:
        raise ValueError(f"{op}: a and g must be on one device, got a on {a.device} and g on {g.device}")
    if a.shape[0] != g.shape[0]:
        raise ValueError(f"{op}: a and g must have the same N (dim 0), got a {tuple(a.shape)} and g {tuple(g.shape)}")
    if a.dim() == 3 and a.shape[1] != g.shape[1]:
        raise ValueError(f"{op}: a and g must have the same T (dim 1), got a {tuple(a.shape)} and g {tuple(g.shape)}")
    return as_3d(a), as_3d(g)


def _check_bias(bias, op: str) -> bool:
    if not isinstance(bias, bool):
        raise TypeError(f"{op}: bias must be a bool, got {type(bias).__name__}")
    return bias


def choose_method(kind: str, n: int, t: int, d_in: int, d_out: int) -> str:
    """Ghost or materialize-per-sample, whichever needs fewer multiply-adds (MATH.md section 1).

    ``kind="gram"``:  ghost ``N^2 T^2 (d_in + d_out)`` against ``N T d_in d_out + N^2 d_in d_out``;
    ``kind="sqnorms"``: ghost ``N T^2 (d_in + d_out)`` against ``N T d_in d_out + N d_in d_out``.
    With ``T = 1`` the ghost form needs no ``T x T`` Grams and always wins.
    """
    if t == 1:
        return "ghost"
    if kind == "gram":
        ghost = n * n * t * t * (d_in + d_out)
        mat = n * t * d_in * d_out + n * n * d_in * d_out
    elif kind == "sqnorms":
        ghost = n * t * t * (d_in + d_out)
        mat = n * t * d_in * d_out + n * d_in * d_out
    else:
        raise ValueError(f"kind must be 'gram' or 'sqnorms', got {kind!r}")
    return "ghost" if ghost <= mat else "materialize"


def _check_method(method, op: str) -> str:
    if method not in ("auto", "ghost", "materialize"):
        raise ValueError(f"{op}: method must be 'auto', 'ghost' or 'materialize', got {method!r}")
    return method


def _dispatch(op: str, backend: str, *args):
    fn: Callable
    if backend == "torch":
        fn = getattr(reference, op)
    elif backend in ("cpu", "cuda"):
        fn = getattr(torch.ops.pycurv, op)
    else:  # triton
        fn = getattr(_triton(_FAMILY[op]), f"{op}_triton")
    return fn(*args)


def per_sample_grad_sqnorms(
    a: torch.Tensor, g: torch.Tensor, bias: bool = False, *, backend: str = "auto", method: str = "auto"
) -> torch.Tensor:
    """Per-sample squared gradient norms ``||G_n||_F^2`` (+ the bias part), shape ``(N,)``, without materialising
    any full ``G_n``. float32 result (float64 for float64 inputs)."""
    op = "per_sample_grad_sqnorms"
    a3, g3 = _check_ag(a, g, op)
    bias = _check_bias(bias, op)
    method = _check_method(method, op)
    if method == "auto":
        method = choose_method("sqnorms", a3.shape[0], a3.shape[1], a3.shape[2], g3.shape[2])
    be = _resolve_backend(backend, a3.device, op)
    return _dispatch(op, be, a3, g3, bias, method)


def per_sample_gram(
    a: torch.Tensor,
    g: torch.Tensor,
    bias: bool = False,
    out: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    method: str = "auto",
) -> torch.Tensor:
    """Per-sample gradient Gram ``K_ij = <G_i, G_j>_F`` (+ the bias part), shape ``(N, N)``.

    With ``out`` (float32, or float64 for float64 inputs, shape ``(N, N)``, on the inputs' device) the result is
    accumulated, ``out += K``, which sums Grams over layers; ``out`` is untouched if the call fails.
    """
    op = "per_sample_gram"
    a3, g3 = _check_ag(a, g, op)
    bias = _check_bias(bias, op)
    method = _check_method(method, op)
    n = a3.shape[0]
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
        want = acc_dtype(a3.dtype)
        if tuple(out.shape) != (n, n):
            raise ValueError(f"{op}: out must have shape ({n}, {n}), got {tuple(out.shape)}")
        if out.dtype != want:
            raise TypeError(f"{op}: out must have dtype {want} for {a3.dtype} inputs, got {out.dtype}")
        if out.device != a3.device:
            raise ValueError(f"{op}: out must be on {a3.device}, got {out.device}")
    if method == "auto":
        method = choose_method("gram", n, a3.shape[1], a3.shape[2], g3.shape[2])
    be = _resolve_backend(backend, a3.device, op)
    k = _dispatch(op, be, a3, g3, bias, method)
    if out is None:
        return k
    return out.add_(k)


def ef_diag(a: torch.Tensor, g: torch.Tensor, bias: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """Empirical-Fisher diagonal ``sum_n G_n * G_n``, shape ``(d_out, d_in)`` (``(d_out, d_in + 1)`` with bias,
    the bias in the last column). float32 result (float64 for float64 inputs)."""
    op = "ef_diag"
    a3, g3 = _check_ag(a, g, op)
    bias = _check_bias(bias, op)
    be = _resolve_backend(backend, a3.device, op)
    return _dispatch(op, be, a3, g3, bias)


# ----------------------------------------------------------------------------------------------------------------
# K-FAC (MATH.md section 2)
# ----------------------------------------------------------------------------------------------------------------


def _check_tensor(x, name: str, op: str, dtypes=_FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, x in items[1:]:
        if x.device != first.device:
            raise ValueError(f"{op}: {name} must be on {first_name}'s device {first.device}, got {x.device}")


def _check_square(m: torch.Tensor, name: str, op: str) -> tuple[int, int]:
    """``(B, d)`` of a ``(d, d)`` (B = 1) or ``(B, d, d)`` tensor."""
    if m.dim() not in (2, 3) or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{op}: {name} must be square, (d, d) or (B, d, d), got shape {tuple(m.shape)}")
    return (m.shape[0] if m.dim() == 3 else 1), m.shape[-1]


def _damping_vector(damping, b: int, device: torch.device, op: str, name: str = "damping") -> torch.Tensor:
    """``damping`` (a number, a 0-d tensor or one value per matrix) as a ``(B,)`` float64 tensor on ``device``.
    Python numbers are checked here (finite, >= 0); tensors are not inspected (no host synchronisation)."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float, torch.Tensor)):
        raise TypeError(f"{op}: {name} must be a float or a tensor, got {type(damping).__name__}")
    if isinstance(damping, torch.Tensor):
        if damping.dim() > 1 or (damping.dim() == 1 and damping.shape[0] != b):
            raise ValueError(f"{op}: {name} must be a number, 0-d or shape ({b},), got shape {tuple(damping.shape)}")
        if not damping.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {damping.dtype}")
        return damping.to(device=device, dtype=torch.float64).expand(b).contiguous()
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{op}: {name} must be finite and >= 0, got {damping}")
    return torch.full((b,), float(damping), dtype=torch.float64, device=device)


def kfac_factor_update(
    factor: torch.Tensor, x: torch.Tensor, decay: float, bias: bool = False, *, backend: str = "auto"
) -> torch.Tensor:
    """K-FAC running average, in place: ``factor <- decay * factor + (1 - decay) * xb^T xb / R``, returns ``factor``.

    ``xb`` is ``x`` flattened over all leading dimensions into ``R`` rows, with a column of ones appended when
    ``bias`` (never materialised). One factor: ``factor (d, d)``, ``x (..., d_x)``. Batched (many same-shape
    factors in one launch): ``factor (B, d, d)``, ``x (B, ..., d_x)``. ``d = d_x + bias``. The result is exactly
    symmetric; ``decay = 0`` overwrites ``factor`` without reading it.

    ``factor`` is float32 or float64; ``x`` any float dtype (16-bit and float32 accumulate in float32; a float64
    factor accumulates in float64). ``factor`` is untouched if the call fails.
    """
    op = "kfac_factor_update"
    _check_tensor(factor, "factor", op, (torch.float32, torch.float64))
    _check_tensor(x, "x", op)
    b, d = _check_square(factor, "factor", op)
    batched = factor.dim() == 3
    if x.dim() < (3 if batched else 2):
        want = "(B, ..., d_x) for a batched (B, d, d) factor" if batched else "(..., d_x) with at least 2 dims"
        raise ValueError(f"{op}: x must be {want}, got shape {tuple(x.shape)}")
    if batched and x.shape[0] != b:
        raise ValueError(f"{op}: x must have factor's batch size {b} in dim 0, got shape {tuple(x.shape)}")
    bias = _check_bias(bias, op)
    if x.shape[-1] + int(bias) != d:
        raise ValueError(
            f"{op}: factor is ({d}, {d}), so x must have d_x = {d - int(bias)} features (bias={bias}), got shape "
            f"{tuple(x.shape)}"
        )
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"{op}: decay must be a number in [0, 1], got {decay!r}")
    _check_same_device(op, factor=factor, x=x)
    if x.dtype == torch.float64 and factor.dtype != torch.float64:
        raise TypeError(f"{op}: float64 x needs a float64 factor, got factor {factor.dtype}")
    if factor.dtype == torch.float64 and x.dtype != torch.float64:
        x = x.double()
    x3 = x.reshape(b, -1, x.shape[-1])
    be = _resolve_backend(backend, factor.device, op)
    f3 = factor if batched else factor.unsqueeze(0)
    target = f3 if f3.is_contiguous() else f3.contiguous()
    _dispatch(op, be, target, x3, float(decay), bias)
    if target is not f3:
        f3.copy_(target)
    return factor


class DampingRaisedWarning(RuntimeWarning):
    """:func:`damped_inverse` raised the damping of a matrix that was not positive definite after damping."""


_INVERSE_METHODS = ("cholesky", "eigh", "newton_schulz")


def damped_inverse(
    m: torch.Tensor,
    damping,
    method: str = "cholesky",
    *,
    backend: str = "auto",
    max_raises: int = 12,
    return_damping: bool = False,
):
    """``(m + damping I)^{-1}`` for symmetric positive semi-definite ``m: (d, d) | (B, d, d)``, shaped like ``m``.

    ``damping``: a number or one value per matrix (``(B,)``), >= 0. ``method``: ``"cholesky"``, ``"eigh"`` or
    ``"newton_schulz"`` (matmuls only; matrices whose residual ``||M X - I||_F / sqrt(d)`` has not reached the
    tolerance are redone with Cholesky). "cholesky" and "eigh" read the lower triangle; the result is exactly
    symmetric, in ``m``'s dtype (float32 / float64; 16-bit inputs are inverted in float32 and rounded back).

    Matrices that are not positive definite after damping (indefinite, or rank-deficient with ``damping = 0``)
    are not turned into NaN: their damping is raised, to at least ``eps * d * max|diag|`` and then geometrically
    (at least tenfold a time) up to a Gershgorin bound that makes the matrix certainly positive definite, reached
    at the ``max_raises``-th raise, with a :class:`DampingRaisedWarning` naming them; ``max_raises=0`` gives up at
    once with ``ValueError``, as does an ``m`` that is not finite. "newton_schulz" assumes ``m`` is positive
    semi-definite (as K-FAC factors are): it recognises an indefinite ``m`` only by a non-positive diagonal entry
    of the inverse. With ``return_damping=True`` the damping actually used, ``(B,)``
    float64, is returned too: ``(inverse, damping_used)``. One host synchronisation per call (the check).
    """
    op = "damped_inverse"
    _check_tensor(m, "m", op)
    b, _ = _check_square(m, "m", op)
    if method not in _INVERSE_METHODS:
        raise ValueError(f"{op}: method must be one of {_INVERSE_METHODS}, got {method!r}")
    damp = _damping_vector(damping, b, m.device, op)
    be = _resolve_backend(backend, m.device, op, method)
    m3 = m if m.dim() == 3 else m.unsqueeze(0)
    if m3.dtype in (torch.float16, torch.bfloat16):
        m3 = m3.float()
    try:
        inv, info = _dispatch(op, be, m3, damp, method)
    except RuntimeError as exc:  # LAPACK-backed solvers refuse NaN/inf themselves: report it the same way
        _check_finite_batch(op, m3, torch.arange(m3.shape[0], device=m3.device), exc)
        raise
    # a solver may pass NaN through without flagging it: a non-finite result counts as a failure too
    bad = (info != 0) | ~torch.isfinite(inv).flatten(1).all(1)
    if method == "newton_schulz" and bool(bad.any()):
        idx = bad.nonzero().flatten()
        be_c = _resolve_backend("auto", m.device, op, "cholesky")
        inv_c, info_c = _dispatch(op, be_c, m3[idx].contiguous(), damp[idx].contiguous(), "cholesky")
        inv[idx], info[idx] = inv_c, info_c
        bad = (info != 0) | ~torch.isfinite(inv).flatten(1).all(1)
    if bool(bad.any()):
        inv, damp = _raise_damping(op, be, m3, inv, damp, bad, method, max_raises)
    inv = inv.to(m.dtype)
    if m.dim() == 2:
        inv = inv[0]
    return (inv, damp) if return_damping else inv


def _check_finite_batch(op: str, sub: torch.Tensor, idx: torch.Tensor, cause: Exception | None = None) -> None:
    finite = torch.isfinite(sub).flatten(1).all(1)
    if not bool(finite.all()):
        rows = idx[~finite].tolist()
        raise ValueError(f"{op}: m is not finite (matrices {rows} of the batch hold inf or NaN)") from cause


def _raise_damping(op, be, m3, inv, damp, bad, method, max_raises):
    """Redoes the matrices flagged in ``bad`` with more damping (see :func:`damped_inverse`).

    First at ``max(damping, eps * d * max|diag|)``, then raised geometrically, by at least tenfold, towards the
    Gershgorin bound ``max_i (sum_{j != i} |m_ij| - m_ii)`` (plus a margin), past which the damped matrix is
    certainly positive definite; the ``max_raises``-th raise reaches it."""
    if method == "newton_schulz":
        method, be = "cholesky", _resolve_backend("auto", m3.device, op, "cholesky")
    idx = bad.nonzero().flatten()
    sub = m3[idx].contiguous()
    _check_finite_batch(op, sub, idx)
    damp = damp.clone()
    low = sub.tril().double()
    sym = low + low.tril(-1).mT  # the lower triangle is what the solvers read
    diag = sym.diagonal(dim1=1, dim2=2)
    floor = diag.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny) * torch.finfo(m3.dtype).eps * m3.shape[-1]
    cur = torch.maximum(damp[idx], floor)
    radius = sym.abs().sum(2) - diag.abs()
    bound = torch.maximum((radius - diag).amax(1).clamp_min(0) * 1.01 + 100 * floor, cur * 10)
    factor = (bound / cur).pow(1.0 / max(max_raises, 1)).clamp_min(10.0)
    for _ in range(max_raises + 1):
        inv_s, info_s = _dispatch(op, be, sub, cur, method)
        ok = info_s == 0
        if bool(ok.all()):
            break
        cur = torch.where(ok, cur, torch.minimum(cur * factor, bound))
    else:
        rows = idx[info_s != 0].tolist()
        raise ValueError(
            f"{op}: matrices {rows} of the batch are not positive definite even with damping raised "
            f"{max_raises} times to {cur[info_s != 0].tolist()}"
        )
    inv[idx] = inv_s
    damp[idx] = cur
    pairs = ", ".join(f"{i}: {d:.3g}" for i, d in zip(idx.tolist(), cur.tolist()))
    warnings.warn(
        f"{op}: matrices not positive definite after damping; damping raised to {{{pairs}}}",
        DampingRaisedWarning,
        stacklevel=3,
    )
    return inv, damp


def sym_eig(m: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric ``m: (d, d) | (B, d, d)`` (lower triangle
    read), batched in one call: ``m = Q diag(lambda) Q^T``. float32 / float64 (16-bit inputs in float32)."""
    op = "sym_eig"
    _check_tensor(m, "m", op)
    _check_square(m, "m", op)
    be = _resolve_backend(backend, m.device, op)
    m3 = m if m.dim() == 3 else m.unsqueeze(0)
    if m3.dtype in (torch.float16, torch.bfloat16):
        m3 = m3.float()
    vals, vecs = _dispatch(op, be, m3)
    return (vals, vecs) if m.dim() == 3 else (vals[0], vecs[0])


def _check_precondition_args(op: str, grad, **mats) -> tuple[torch.Tensor, int, torch.dtype]:
    """Validates ``grad`` and the per-layer matrices; returns ``(grad3, B, compute dtype)``."""
    _check_tensor(grad, "grad", op)
    if grad.dim() not in (2, 3):
        raise ValueError(f"{op}: grad must be (d_out, d_in) or (B, d_out, d_in), got shape {tuple(grad.shape)}")
    b = grad.shape[0] if grad.dim() == 3 else 1
    d_out, d_in = grad.shape[-2], grad.shape[-1]
    want = {"g_inv": (d_out, d_out), "a_inv": (d_in, d_in), "q_g": (d_out, d_out), "q_a": (d_in, d_in),
            "d_g": (d_out,), "d_a": (d_in,)}
    dtype = None
    for name, x in mats.items():
        _check_tensor(x, name, op)
        shape = ((b,) if grad.dim() == 3 else ()) + want[name]
        if tuple(x.shape) != shape:
            raise ValueError(f"{op}: grad is {tuple(grad.shape)}, so {name} must be {shape}, got {tuple(x.shape)}")
        if dtype is not None and x.dtype != dtype:
            raise TypeError(f"{op}: {name} must have the dtype {dtype} of the other factor matrices, got {x.dtype}")
        dtype = x.dtype
    _check_same_device(op, grad=grad, **mats)
    # 16-bit gradients are preconditioned with the (usually float32) factor matrices' precision
    compute = grad.dtype if grad.dtype == dtype else torch.promote_types(grad.dtype, dtype)
    return (grad if grad.dim() == 3 else grad.unsqueeze(0)), b, compute


def _b3(x: torch.Tensor, nd: int, dtype: torch.dtype) -> torch.Tensor:
    return (x if x.dim() == nd + 1 else x.unsqueeze(0)).to(dtype)


def kron_precondition(
    grad: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """K-FAC step of a layer, ``g_inv @ grad @ a_inv`` = ``(A ⊗ G)^{-1} vec(grad)`` with the inverses of the factors
    given. ``grad: (d_out, d_in) | (B, d_out, d_in)`` (bias gradient folded in as the last column),
    ``g_inv: ([B,] d_out, d_out)``, ``a_inv: ([B,] d_in, d_in)``. Accumulated in float32 (float64 for float64);
    returns ``grad``'s dtype. A 16-bit ``grad`` with float32 inverses is computed in float32."""
    op = "kron_precondition"
    g3, _, dt = _check_precondition_args(op, grad, g_inv=g_inv, a_inv=a_inv)
    be = _resolve_backend(backend, grad.device, op)
    out = _dispatch(op, be, g3.to(dt), _b3(g_inv, 2, dt), _b3(a_inv, 2, dt)).to(grad.dtype)
    return out if grad.dim() == 3 else out[0]


def kron_precondition_eigen(
    grad: torch.Tensor,
    q_g: torch.Tensor,
    q_a: torch.Tensor,
    d_g: torch.Tensor,
    d_a: torch.Tensor,
    damping,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """K-FAC step in the factors' eigenbasis with exact damping of the Kronecker product:
    ``Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T`` where ``G = Q_G diag(d_G) Q_G^T``,
    ``A = Q_A diag(d_A) Q_A^T`` (from :func:`sym_eig`). Shapes as :func:`kron_precondition` with ``d_g: ([B,] d_out)``,
    ``d_a: ([B,] d_in)``; ``damping`` a number or ``(B,)``."""
    op = "kron_precondition_eigen"
    g3, b, dt = _check_precondition_args(op, grad, q_g=q_g, q_a=q_a, d_g=d_g, d_a=d_a)
    damp = _damping_vector(damping, b, grad.device, op)
    be = _resolve_backend(backend, grad.device, op)
    out = _dispatch(
        op, be, g3.to(dt), _b3(q_g, 2, dt), _b3(q_a, 2, dt), _b3(d_g, 1, dt), _b3(d_a, 1, dt), damp
    ).to(grad.dtype)
    return out if grad.dim() == 3 else out[0]


def kl_clip_scale(
    precond: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float, kl_clip: float
) -> torch.Tensor:
    """KL-clip factor ``nu = min(1, sqrt(kl_clip / |sum_l lr^2 <p_l, g_l>|))`` over all layers (Ba, Grosse &
    Martens 2017), a 0-d tensor on the gradients' device: multiply every preconditioned gradient by it. No host
    synchronisation."""
    op = "kl_clip_scale"
    if len(precond) != len(grads) or not grads:
        raise ValueError(f"{op}: precond and grads must be equally long and non-empty, got {len(precond)} and {len(grads)}")
    for i, (p, g) in enumerate(zip(precond, grads)):
        if p.shape != g.shape:
            raise ValueError(f"{op}: precond[{i}] must have grads[{i}]'s shape {tuple(g.shape)}, got {tuple(p.shape)}")
    for name, v in (("lr", lr), ("kl_clip", kl_clip)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite number > 0, got {v!r}")
    return reference.kl_clip_scale(list(precond), list(grads), float(lr), float(kl_clip))


# ----------------------------------------------------------------------------------------------------------------
# iEF / EF / SF (MATH.md section 3)
# ----------------------------------------------------------------------------------------------------------------


def _check_coef(coef, n: int, device: torch.device, dtype: torch.dtype, op: str, name: str = "coef") -> torch.Tensor:
    _check_tensor(coef, name, op)
    if coef.dim() != 1 or coef.shape[0] != n:
        raise ValueError(f"{op}: {name} must have shape ({n},) (one value per sample), got {tuple(coef.shape)}")
    if coef.device != device:
        raise ValueError(f"{op}: {name} must be on a's device {device}, got {coef.device}")
    return coef.to(acc_dtype(dtype)).contiguous()


def weighted_grad_sum(
    a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bias: bool = False, *, backend: str = "auto"
) -> torch.Tensor:
    """``sum_n coef_n G_n`` in one pass over ``a`` and ``g``, never forming a per-sample gradient ``G_n``: shape
    ``(d_out, d_in)`` (``(d_out, d_in + 1)`` with bias, the bias part last). ``coef: (N,)``, any float dtype (used
    in float32, float64 for float64 inputs). This is ``J^T coef`` for one layer: the iEF / EF update from the dual
    coefficients of :func:`ief_coefficients`. float32 result (float64 for float64 inputs). ``coef`` is not
    inspected (no host synchronisation): NaN in it gives NaN in the result."""
    op = "weighted_grad_sum"
    a3, g3 = _check_ag(a, g, op)
    bias = _check_bias(bias, op)
    c = _check_coef(coef, a3.shape[0], a3.device, a3.dtype, op)
    be = _resolve_backend(backend, a3.device, op)
    return _dispatch(op, be, a3, g3, c, bias)


def per_sample_grad_dot(
    a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, bias: bool = False, *, backend: str = "auto"
) -> torch.Tensor:
    """``r_n = <G_n, V>_F`` for every sample, shape ``(N,)``: the Jacobian-vector product ``J vec(V)`` of one layer
    (``V: (d_out, d_in)``, or ``(d_out, d_in + 1)`` with bias, the bias part last), without forming any ``G_n``
    (one matmul: ``sum_t B_n[t]^T V A_n[t]``). Used by the SF step. float32 result (float64 for float64 inputs)."""
    op = "per_sample_grad_dot"
    a3, g3 = _check_ag(a, g, op)
    bias = _check_bias(bias, op)
    _check_tensor(v, "v", op)
    want = (g3.shape[2], a3.shape[2] + int(bias))
    if tuple(v.shape) != want:
        raise ValueError(f"{op}: v must have shape {want} (d_out, d_in{' + 1' if bias else ''}), got {tuple(v.shape)}")
    _check_same_device(op, a=a3, v=v)
    be = _resolve_backend(backend, a3.device, op)
    return _dispatch(op, be, a3, g3, v, bias)


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def logit_grad_sqnorms(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, backend: str = "auto"
) -> torch.Tensor:
    """Squared norms of the softmax cross-entropy gradient with respect to each sample's logits, shape ``(N,)``:
    ``s_n = sum_t ||softmax(z_nt) - e_{y_nt}||^2 = sum_t [(1 - p_y)^2 + sum_{c != y} p_c^2]``.

    ``logits: (N, C)`` or ``(N, T, C)`` (classes last; for ``F.cross_entropy``'s ``(N, C, T)`` layout pass
    ``logits.transpose(1, 2)``), float32 / float64 / float16 / bfloat16, any strides; ``targets: (N,)`` or
    ``(N, T)`` integer class indices. Positions whose target equals ``ignore_index`` contribute 0. One fused pass
    per row with float32 accumulation (float64 for float64 logits); the sums over ``c != y`` are accumulated
    directly, so the result keeps its relative accuracy when ``p_y`` is close to 1. These are the gradients of the
    per-sample losses ``l_n`` (``reduction="sum"``); under ``reduction="mean"`` the logit gradients carry ``1/N``
    and their squared norms ``1/N^2``. Targets outside ``[0, C)`` raise ``ValueError`` (one host synchronisation
    for the check)."""
    op = "logit_grad_sqnorms"
    _check_tensor(logits, "logits", op)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{op}: logits must be (N, C) or (N, T, C), got shape {tuple(logits.shape)}")
    if targets.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: targets must hold integer class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: targets must have shape {tuple(logits.shape[:-1])} (logits without the class dim), "
            f"got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_same_device(op, logits=logits, targets=targets)
    c = logits.shape[-1]
    t64 = targets.long()
    bad = (t64 != ignore_index) & ((t64 < 0) | (t64 >= c))
    if bool(bad.any()):
        first = t64[bad].flatten()[0].item()
        raise ValueError(f"{op}: targets must be in [0, {c}) or equal ignore_index={ignore_index}, got {first}")
    z3 = logits if logits.dim() == 3 else logits.unsqueeze(1)
    t2 = t64 if t64.dim() == 2 else t64.unsqueeze(1)
    be = _resolve_backend(backend, logits.device, op)
    return _dispatch(op, be, z3, t2, int(ignore_index))


def ief_coefficients(
    gram: torch.Tensor,
    logit_grad_sqnorms: torch.Tensor,
    damping=1e-12,
    *,
    dedup_threshold: float | None = 0.99,
    singular: str = "pinv",
    rtol: float | None = None,
    return_info: bool = False,
    backend: str = "auto",
):
    """Dual coefficients ``alpha = (K + damping I)^{-1} s`` of the iEF step ``J^T alpha`` (MATH.md section 3),
    shape ``(N,)`` (``(B, N)`` for batched ``gram: (B, N, N)``, ``logit_grad_sqnorms: (B, N)``), in ``gram``'s dtype.

    Pass ``torch.ones(N)`` as ``logit_grad_sqnorms`` for the EF step. The system is solved in float64 on ``gram``'s
    device, after two clean-ups that the iEF authors also make:

    * samples whose gradient is numerically zero (``K_jj <= N eps max_i K_ii``, ``eps`` of ``gram``'s dtype) get
      ``alpha_j = 0``;
    * near-duplicate samples, ``|K_ij| / sqrt(K_ii K_jj) > dedup_threshold`` (default 0.99; ``None`` turns this
      off), are dropped greedily in index order: the later one of such a pair gets ``alpha_j = 0`` and the system is
      solved over the samples kept.

    ``damping``: a number or one value per problem, >= 0 (the paper uses 1e-12 to 1e-7, essentially none).

    Singular Grams. ``K`` carries the rounding of the dtype it was formed in, and ``(K + damping I)^{-1}`` with a
    tiny damping divides that rounding by the damping wherever ``K`` is singular (in float32 this can turn ``J^T
    alpha`` into noise). The noise floor is judged on the Jacobi-scaled Gram ``C = R K R``, ``R = diag(K_jj)^(-1/2)``
    (the cosines between per-sample gradients, rounded to about ``eps`` whatever the gradients' norms): its
    eigenvalues up to ``rtol``, by default ``10 N eps`` (``eps`` of ``gram``'s dtype; bfloat16 / float16 Grams count
    as float32), are noise. The solve is a Cholesky factorisation of the scaled system; a problem whose
    factorisation fails or has a pivot below ``100 rtol`` goes through an eigendecomposition of ``C`` instead, and
    if ``C`` has eigenvalues at or below ``rtol`` (``K`` numerically singular), ``singular`` decides:

    * ``"pinv"`` (default): the null space ``Z`` those directions span in ``K``'s coordinates is deflated. As
      ``J^T Z = 0`` in exact arithmetic, ``J^T (K + damping I)^{-1} s`` equals ``J^T`` applied to the solution of
      ``(K + damping I + max_j K_jj Z Z^T) alpha = (I - Z Z^T) s``, which is what is returned: the same step
      without dividing the noise along ``Z`` by the damping. For ``damping -> 0`` the step is the minimum-norm
      least-squares solution ``pinv(J) s`` of ``J d = s``. The damping is never changed; ``info["rank"]`` is the
      number of samples kept minus the dimension of ``Z``.
    * ``"error"``: ``ValueError`` naming the problems that are numerically singular.

    An eigenvalue of ``C`` below ``-100 rtol`` (an indefinite ``gram``, which no Gram matrix is) raises
    ``ValueError``.

    Non-finite inputs raise ``ValueError``. With ``return_info=True`` returns ``(alpha, info)``, ``info =
    {"kept": (B, N) bool | (N,), "damping": (B,) float64 | 0-d, "rank": (B,) int64 | 0-d}``. Host synchronisations:
    one for the checks (and whether duplicates exist), one for the factorisation, one more for the
    eigendecomposition when a problem needs it."""
    op = "ief_coefficients"
    _check_tensor(gram, "gram", op)
    _check_tensor(logit_grad_sqnorms, "logit_grad_sqnorms", op)
    b, n = _check_square(gram, "gram", op)
    batched = gram.dim() == 3
    want = (b, n) if batched else (n,)
    if tuple(logit_grad_sqnorms.shape) != want:
        raise ValueError(f"{op}: logit_grad_sqnorms must have shape {want}, got {tuple(logit_grad_sqnorms.shape)}")
    _check_same_device(op, gram=gram, logit_grad_sqnorms=logit_grad_sqnorms)
    if dedup_threshold is not None and (
        isinstance(dedup_threshold, bool)
        or not isinstance(dedup_threshold, (int, float))
        or not 0 < dedup_threshold <= 1
    ):
        raise ValueError(f"{op}: dedup_threshold must be in (0, 1] or None, got {dedup_threshold!r}")
    if singular not in ("pinv", "error"):
        raise ValueError(f"{op}: singular must be 'pinv' or 'error', got {singular!r}")
    eps = torch.finfo(gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float32).eps
    if rtol is None:
        rtol = 10 * n * eps
    elif isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ValueError(f"{op}: rtol must be a number in [0, 1) or None, got {rtol!r}")
    damp = _damping_vector(damping, b, gram.device, op)
    _resolve_backend(backend, gram.device, op)  # validates the name; the solve itself is torch.linalg in float64
    k = (gram if batched else gram.unsqueeze(0)).double()
    rhs = (logit_grad_sqnorms if batched else logit_grad_sqnorms.unsqueeze(0)).double()
    k = 0.5 * (k + k.mT)
    diag = k.diagonal(dim1=1, dim2=2)
    tiny = torch.finfo(torch.float64).tiny
    keep = diag > n * eps * diag.amax(1, keepdim=True).clamp_min(tiny)
    # the Jacobi-scaled Gram (below) holds the cosines the duplicate check needs
    r_all = diag.clamp_min(tiny).rsqrt()
    cos = k * (r_all.unsqueeze(2) * r_all.unsqueeze(1))
    dup = _duplicates(cos, keep, float(dedup_threshold)) if dedup_threshold is not None and n > 1 else None
    # One synchronisation for the checks (a sum is finite only when every term is), whether every sample is kept
    # and whether duplicates exist. Few, batch-wide operations: on a GPU each is a launch.
    flags = [k.sum(), rhs.sum(), damp.amin(), damp.sum(), keep.all().double()]
    if dup is not None:
        flags.append(dup.any().double())
    k_sum, s_sum, damp_min, damp_sum, all_kept, *dup_any = torch.stack(flags).tolist()
    if not math.isfinite(k_sum):
        fin_k = torch.isfinite(k).flatten(1).all(1)
        raise ValueError(f"{op}: gram is not finite (problems {(~fin_k).nonzero().flatten().tolist()} hold inf or NaN)")
    if not math.isfinite(s_sum):
        fin_s = torch.isfinite(rhs).all(1)
        raise ValueError(
            f"{op}: logit_grad_sqnorms is not finite (problems {(~fin_s).nonzero().flatten().tolist()} hold inf or NaN)"
        )
    if not (damp_min >= 0 and math.isfinite(damp_sum)):
        raise ValueError(f"{op}: damping must be finite and >= 0, got {damp.tolist()}")
    if dup_any and dup_any[0]:
        keep, all_kept = _dedup(dup, keep), False
    # Jacobi scaling over the kept samples: C = R K R, R = diag(K_jj)^(-1/2), holds the cosines between per-sample
    # gradients, whose rounding is about eps whatever the gradients' norms, so one noise floor (rtol) serves every
    # direction. (K + damping I) alpha = s  <=>  (C + damping R^2) beta = R s, alpha = R beta. Dropped samples:
    # zero row and column, 1 on the diagonal, 0 on the right, so alpha_j = 0 exactly.
    if all_kept:
        r, c0 = r_all, cos
    else:
        kf = keep.double()
        r = r_all * kf
        c0 = cos * (kf.unsqueeze(2) * kf.unsqueeze(1)) + torch.diag_embed(1.0 - kf)
    cm = c0.clone()
    cm.diagonal(dim1=1, dim2=2).add_(damp.unsqueeze(1) * r.square())
    chol, info = torch.linalg.cholesky_ex(cm)
    # a failed factorisation or a pivot near the noise floor sends the problem to the eigendecomposition (the
    # dropped samples' unit pivots do not count)
    pivot = chol.diagonal(dim1=1, dim2=2).square()
    if not all_kept:
        pivot = pivot.masked_fill(~keep, math.inf)
    route = (info != 0) | (pivot.amin(1) <= 100 * rtol)
    alpha = torch.cholesky_solve((rhs * r).unsqueeze(2), chol).squeeze(2) * r
    rank = None
    idx = route.nonzero().flatten()
    if idx.numel():
        alpha_r, rank_r = _ief_deflated(
            op, idx, k[idx], rhs[idx], damp[idx], r[idx], c0[idx], keep[idx], rtol, singular
        )
        alpha = alpha.index_copy(0, idx, alpha_r)
        rank = keep.sum(1).index_copy(0, idx, rank_r)
    alpha = alpha.to(gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float32)
    if not return_info:
        return alpha if batched else alpha[0]
    if rank is None:
        rank = keep.sum(1)
    if not batched:
        return alpha[0], {"kept": keep[0], "damping": damp[0], "rank": rank[0]}
    return alpha, {"kept": keep, "damping": damp, "rank": rank}


def _ief_deflated(op, idx, k, rhs, damp, r, c0, keep, rtol, singular):
    """``ief_coefficients`` for problems near or at singularity: the eigenvectors of the scaled Gram ``c0`` with
    eigenvalues at most ``rtol`` span its numerical null space; ``R`` maps them to ``K``'s, ``Z`` (orthonormal). As
    ``J^T Z = 0``, ``J^T (K + damping I)^{-1} s = J^T (K + damping I + m Z Z^T)^{-1} (I - Z Z^T) s`` for any ``m > 0``
    in exact arithmetic; with ``m = max K_jj`` the noise of ``K`` along ``Z`` is no longer divided by ``damping``,
    and the deflated system is solved (Jacobi-scaled, Cholesky in float64) without dividing by anything at the noise
    floor. ``idx``: the problems' indices in the caller's batch (for the messages); ``keep``: their kept samples
    (``c0`` has 1 on the diagonal of the others). Returns ``(alpha, rank)``."""
    nu, v = torch.linalg.eigh(c0)
    null = nu <= rtol  # eigh sorts ascending: the null directions come first
    kept = keep.sum(1)
    rank = kept - null.sum(1)
    indefinite = nu[:, 0] < -100 * rtol
    any_indefinite, any_low = torch.stack([indefinite.any(), (rank < kept).any()]).tolist()
    if any_indefinite:
        raise ValueError(
            f"{op}: gram is not positive semi-definite for problems {idx[indefinite].tolist()} (eigenvalues "
            f"{nu[indefinite, 0].tolist()} of the Jacobi-scaled gram, noise floor {rtol:.3g}): not a Gram matrix"
        )
    if singular == "error" and any_low:
        low = rank < kept
        raise ValueError(
            f"{op}: gram + damping I is numerically singular for problems {idx[low].tolist()} (rank "
            f"{rank[low].tolist()} of {kept[low].tolist()} samples kept at rtol {rtol:.3g}); increase damping or pass "
            "singular='pinv'"
        )
    # Z: an orthonormal basis of R V_null (Householder QR copes with any column scaling; the padding columns are 0)
    q, _ = torch.linalg.qr(r.unsqueeze(2) * v * null.unsqueeze(1))
    z = q * null.unsqueeze(1)
    proj = z @ z.mT
    scale = k.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(torch.float64).tiny)
    kf = keep.double()
    m = k * (kf.unsqueeze(2) * kf.unsqueeze(1)) + torch.diag_embed(damp.unsqueeze(1) * kf + (1.0 - kf))
    m = m + scale.reshape(-1, 1, 1) * proj
    b = rhs.unsqueeze(2) - proj @ rhs.unsqueeze(2)
    # Jacobi-scaled solve: rows / columns of the kept samples by diag(M)^(-1/2), the dropped ones by 1
    d = torch.where(keep, m.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 1.0)
    ms, bs = m * (d.unsqueeze(2) * d.unsqueeze(1)), d.unsqueeze(2) * b
    # M is positive definite by construction: Cholesky, with LU where rounding says otherwise (a batched LU of
    # 200 x 200 or more fails in some MKL builds once torch.set_num_threads has been called)
    low, info = torch.linalg.cholesky_ex(ms)
    y = torch.cholesky_solve(bs, low)
    if bool(info.any()):
        bad = info > 0
        y[bad] = torch.linalg.solve(ms[bad], bs[bad])
    return (d.unsqueeze(2) * y).squeeze(2) * kf, rank


def _duplicates(cos: torch.Tensor, keep: torch.Tensor, threshold: float) -> torch.Tensor:
    """``dup[b, j, i]``: samples ``j > i`` both kept with ``|cos(G_i, G_j)| > threshold`` (``cos``: the Gram scaled
    by its diagonal)."""
    return (cos.abs() > threshold).tril(-1) & keep.unsqueeze(1) & keep.unsqueeze(2)


def _dedup(dup: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Greedy near-duplicate removal in index order: sample j is dropped when an earlier kept sample i is its
    near-duplicate (``dup[b, j, i]``, from :func:`_duplicates`)."""
    dup_c, keep_c = dup.cpu(), keep.cpu().clone()
    for bi in dup_c.any(2).any(1).nonzero().flatten().tolist():
        rows = dup_c[bi]
        for j in rows.any(1).nonzero().flatten().tolist():
            if keep_c[bi, j] and bool((rows[j] & keep_c[bi]).any()):
                keep_c[bi, j] = False
    return keep_c.to(keep.device)


# ----------------------------------------------------------------------------------------------------------------
# FOP (MATH.md section 4)
# ----------------------------------------------------------------------------------------------------------------


def _check_fop_grad(grad, name: str, m: torch.Tensor, op: str) -> torch.Tensor:
    _check_tensor(grad, name, op)
    b, k = _check_square(m, "m", op)
    if m.dim() == 3:
        if grad.dim() != 3 or grad.shape[0] != b or grad.shape[2] != k:
            raise ValueError(f"{op}: {name} must be (B={b}, r, k={k}) for m of shape {tuple(m.shape)}, got {tuple(grad.shape)}")
    elif grad.dim() != 2 or grad.shape[1] != k:
        raise ValueError(f"{op}: {name} must be (r, k={k}) for m of shape {tuple(m.shape)}, got {tuple(grad.shape)}")
    if grad.device != m.device:
        raise ValueError(f"{op}: {name} must be on m's device {m.device}, got {grad.device}")
    return grad if grad.dim() == 3 else grad.unsqueeze(0)


def fop_update(
    m: torch.Tensor,
    grad_prev: torch.Tensor,
    grad_cur: torch.Tensor,
    lr: float,
    hyper_lr: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """FOP hypergradient step on the preconditioner factor, in place:
    ``M <- M + lr * hyper_lr * (G_prev^T G_cur + G_cur^T G_prev) M``; returns ``m``.

    ``P = M M^T`` preconditions a gradient on the right, ``G P``; ``-lr (G_prev^T G_cur + G_cur^T G_prev) M`` is
    the derivative of the loss after the step ``theta - lr G_prev P`` with respect to ``M`` (MATH.md section 4), so
    this is gradient descent on ``M`` with step ``hyper_lr``. One matrix: ``m (k, k)``, gradients ``(r, k)``;
    batched (same-shape layers in one launch): ``m (B, k, k)``, gradients ``(B, r, k)``. ``m`` is float32 or
    float64; the gradients any float dtype (float64 needs a float64 ``m``), any strides, accumulated in ``m``'s
    dtype. ``m`` is untouched if the call fails. Nothing checks that ``M`` stays bounded: :class:`pycurv.optim.FOP`
    does."""
    op = "fop_update"
    _check_tensor(m, "m", op, (torch.float32, torch.float64))
    _check_square(m, "m", op)
    gp = _check_fop_grad(grad_prev, "grad_prev", m, op)
    gc = _check_fop_grad(grad_cur, "grad_cur", m, op)
    if gp.shape != gc.shape:
        raise ValueError(f"{op}: grad_prev and grad_cur must have one shape, got {tuple(grad_prev.shape)} and {tuple(grad_cur.shape)}")
    if gp.dtype != gc.dtype:
        raise TypeError(f"{op}: grad_prev and grad_cur must have one dtype, got {gp.dtype} and {gc.dtype}")
    if gp.dtype == torch.float64 and m.dtype != torch.float64:
        raise TypeError(f"{op}: float64 gradients need a float64 m, got m {m.dtype}")
    if m.dtype == torch.float64 and gp.dtype != torch.float64:
        gp, gc = gp.double(), gc.double()
    for name, v in (("lr", lr), ("hyper_lr", hyper_lr)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: {name} must be a finite number >= 0, got {v!r}")
    be = _resolve_backend(backend, m.device, op)
    m3 = m if m.dim() == 3 else m.unsqueeze(0)
    target = m3 if m3.is_contiguous() else m3.contiguous()
    _dispatch(op, be, target, gp, gc, float(lr), float(hyper_lr))
    if target is not m3:
        m3.copy_(target)
    return m


def fop_precondition(m: torch.Tensor, grad: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``G M M^T``: the FOP-preconditioned gradient, shaped and typed like ``grad`` (``m (k, k)``, ``grad (r, k)``;
    batched ``m (B, k, k)``, ``grad (B, r, k)``), accumulated in float32 (float64 for float64)."""
    op = "fop_precondition"
    _check_tensor(m, "m", op, (torch.float32, torch.float64))
    _check_square(m, "m", op)
    g3 = _check_fop_grad(grad, "grad", m, op)
    if g3.dtype == torch.float64 and m.dtype != torch.float64:
        raise TypeError(f"{op}: a float64 grad needs a float64 m, got m {m.dtype}")
    be = _resolve_backend(backend, m.device, op)
    m3 = m if m.dim() == 3 else m.unsqueeze(0)
    out = _dispatch(op, be, m3, g3)
    return out if grad.dim() == 3 else out[0]
