"""Preconditioners built only from :mod:`pycurv.ops`: they rewrite ``p.grad`` after ``loss.backward()``, then any
``torch.optim`` optimizer steps."""

from __future__ import annotations

from .kfac import KFAC, KFACLayer

__all__ = ["KFAC", "KFACLayer"]
