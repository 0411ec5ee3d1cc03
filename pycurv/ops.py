"""Public ops: validate the inputs, pick a backend and an algorithm, dispatch.

Backends (``backend=``): ``"auto"`` (default; the environment variable ``PYCURV_BACKEND`` overrides it) picks
Triton, then CUDA, on CUDA tensors and the C++ kernel on CPU tensors, falling back to ``"torch"``
(:mod:`pycurv.reference`) when nothing compiled is available. ``"triton"`` also runs on CPU tensors under
``TRITON_INTERPRET=1``.

Shapes follow DESIGN.md section 3: ``a: (N, d_in) | (N, T, d_in)``, ``g: (N, d_out) | (N, T, d_out)``, where ``g``
holds the gradient of each sample's own loss (a loss with ``reduction="sum"``).
"""

from __future__ import annotations

import os
from typing import Callable

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
]

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_triton_module = None
_triton_error: str | None = None


def _triton():
    """pycurv.kernels.per_sample, imported on first use (importing triton is slow and may be missing)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from .kernels import per_sample as mod

            _triton_module = mod
        except Exception as exc:  # triton missing or broken: report through available_backends / pycurv.info
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_module


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
        if _triton() is None:
            return f"triton is not usable ({_triton_error})"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str, op: str = "per_sample_gram") -> list[str]:
    """Backends that can run ``op`` on tensors of ``device``, best first (the order "auto" tries)."""
    device = torch.device(device)
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    if device.type == "cpu" and _triton_interpreting():
        order = ("cpu", "torch", "triton")
    return [b for b in order if _backend_status(b, device, op) is None]


def _resolve_backend(backend: str, device: torch.device, op: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("PYCURV_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{op}: PYCURV_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device, op)[0]
    why = _backend_status(backend, device, op)
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


def _dispatch(op: str, backend: str, a3: torch.Tensor, g3: torch.Tensor, *args) -> torch.Tensor:
    fn: Callable
    if backend == "torch":
        fn = getattr(reference, op)
    elif backend in ("cpu", "cuda"):
        fn = getattr(torch.ops.pycurv, op)
    else:  # triton
        fn = getattr(_triton(), f"{op}_triton")
    return fn(a3, g3, *args)


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
