"""pycurv: fused curvature kernels for PyTorch.

``import pycurv`` never fails because the compiled extension is missing: the pure-PyTorch backend still works and
``python -m pycurv.info`` says what was found.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _extension  # noqa: F401  (loads pycurv._C if it was built, records why not otherwise)
from . import reference  # noqa: F401
from . import ops  # noqa: F401
from . import capture  # noqa: F401
from . import optim  # noqa: F401
from . import metrics  # noqa: F401

__all__ = ["ops", "reference", "capture", "optim", "metrics", "__version__"]
