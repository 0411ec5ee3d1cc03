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


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.pycurv.<op>`` has a kernel registered for ``dispatch_key`` ("CPU", "CUDA", ...)."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pycurv::{op}", dispatch_key)


COMPILED_OPS = ("per_sample_grad_sqnorms", "per_sample_gram", "ef_diag")
