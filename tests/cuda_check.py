"""Build check of the CUDA extension on a machine without a GPU (`make cuda-check`).

Run with the python of an environment where pycurv was built with FORCE_CUDA=1 against a CUDA torch, from outside
the source tree (so that the installed package, not the checkout, is imported). It checks that ``pycurv._C`` loads,
that every compiled op has a CPU kernel and every op of ``CUDA_OPS`` a CUDA kernel registered (the others run on
CUDA tensors through Triton), and prints the build configuration. It never
initialises CUDA, so it needs no driver. Exit status 0 on success, 1 with a message naming what is missing.
"""

from __future__ import annotations

import os
import sys

# Ops that must have a CUDA kernel in pycurv._C (csrc/cuda/*.cu).
CUDA_OPS = (
    "per_sample_grad_sqnorms",
    "per_sample_gram",
    "ef_diag",
    "damped_inverse",
)


def main() -> int:
    import torch

    import pycurv
    from pycurv import _extension

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); pycurv {pycurv.__version__} from {pycurv.__file__}")
    try:
        from pycurv._build_config import BUILD_CONFIG
    except ImportError as exc:
        BUILD_CONFIG = None
        print(f"pycurv._build_config: missing ({exc})")
    else:
        for key in sorted(BUILD_CONFIG):
            print(f"  {key}: {BUILD_CONFIG[key]}")

    problems: list[str] = []
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.dirname(os.path.dirname(os.path.abspath(pycurv.__file__))) == here:
        problems.append(f"pycurv was imported from the source tree {here}; run this from another directory")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build; a CUDA build is needed to check CUDA kernels")
    if _extension.LOAD_ERROR is not None:
        problems.append(f"pycurv._C failed to load: {_extension.LOAD_ERROR}")
    elif BUILD_CONFIG is not None and not BUILD_CONFIG.get("with_cuda"):
        problems.append("pycurv._C was built without CUDA (set FORCE_CUDA=1 and CUDA_HOME)")
    else:
        for op in CUDA_OPS:
            if op not in _extension.COMPILED_OPS:
                problems.append(f"{op} is listed in CUDA_OPS but not in pycurv._extension.COMPILED_OPS")
        for op in _extension.COMPILED_OPS:
            for key in ("CPU", "CUDA") if op in CUDA_OPS else ("CPU",):
                ok = _extension.has_kernel(op, key)
                print(f"  torch.ops.pycurv.{op}: {key} kernel {'registered' if ok else 'MISSING'}")
                if not ok:
                    problems.append(f"torch.ops.pycurv.{op} has no {key} kernel")

    if problems:
        print("cuda-check FAILED:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(
        f"cuda-check passed: {len(_extension.COMPILED_OPS)} ops with CPU kernels, {len(CUDA_OPS)} of them with CUDA "
        "kernels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
