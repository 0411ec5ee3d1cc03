"""Loads the compiled extension ``pycurv._C`` if present; never raises."""

from __future__ import annotations

import torch

LOAD_ERROR: str | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.pycurv.*)
except Exception as exc:  # a missing or stale build must not break `import pycurv`
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if _C is not None:
    from . import _meta  # noqa: F401  (fake kernels for torch.compile / FakeTensor)


COMPILED_OPS = (
    "per_sample_grad_sqnorms",
    "per_sample_gram",
    "ef_diag",
    "kfac_factor_update",
    "damped_inverse",
    "sym_eig",
    "kron_precondition",
    "kron_precondition_eigen",
    "weighted_grad_sum",
    "logit_grad_sqnorms",
    "fop_update",
    "fop_precondition",
)


def _defined(op: str) -> bool:
    """Whether the loaded ``pycurv._C`` declares ``op`` (a build older than this Python package may not)."""
    try:
        getattr(torch.ops.pycurv, op)
    except (AttributeError, RuntimeError):
        return False
    return True

# Read once at import: kernels are registered by loading _C and never change afterwards, and a plain dict
# lookup keeps backend selection traceable by torch.compile.
_KERNELS: dict[tuple[str, str], bool] = {
    (op, key): _C is not None and _defined(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"pycurv::{op}", key)
    for op in COMPILED_OPS
    for key in ("CPU", "CUDA")
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.pycurv.<op>`` has a kernel registered for ``dispatch_key`` ("CPU" or "CUDA")."""
    return _KERNELS.get((op, dispatch_key), False)
