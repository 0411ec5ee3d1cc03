"""Preconditioners built only from :mod:`pycurv.ops`: they rewrite ``p.grad`` after ``loss.backward()``, then any
``torch.optim`` optimizer steps."""

from __future__ import annotations

from .fop import FOP, HD
from .ief import EF, IEF, SF
from .kfac import KFAC, KFACLayer

__all__ = ["KFAC", "KFACLayer", "IEF", "EF", "SF", "FOP", "HD"]
