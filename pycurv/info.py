"""``python -m pycurv.info``: versions, build flags, which backends are live, which kernels are registered."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _extension, ops


def build_config() -> dict:
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:
        return {}
    return dict(BUILD_CONFIG)


def collect() -> dict:
    """Everything ``python -m pycurv.info`` prints, as a dict (benchmarks store it beside their results)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({type(exc).__name__})"
    cuda_ok = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    return {
        "pycurv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if cuda_ok else None,
        "extension_loaded": _extension.LOAD_ERROR is None,
        "extension_error": _extension.LOAD_ERROR,
        "build": build_config(),
        "kernels": {
            op: [key for key in ("CPU", "CUDA") if _extension.has_kernel(op, key)] for op in _extension.COMPILED_OPS
        },
        "backends": {dev: ops.available_backends(dev) for dev in devices},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "env_backend": os.environ.get("PYCURV_BACKEND"),
    }


def main() -> int:
    info = collect()
    print(f"pycurv {info['pycurv']}  python {info['python']} ({sys.executable})")
    print(f"torch {info['torch']}  cuda {info['torch_cuda']}  triton {info['triton']}")
    print(f"cuda device: {info['cuda_device'] or 'none'}")
    if info["extension_loaded"]:
        print("pycurv._C: loaded")
    else:
        print(f"pycurv._C: NOT loaded ({info['extension_error']}); compiled backends are off")
    for key, val in info["build"].items():
        print(f"  build.{key} = {val}")
    print("compiled kernels:")
    for op, keys in info["kernels"].items():
        print(f"  {op}: {', '.join(keys) or 'none'}")
    for dev, backends in info["backends"].items():
        print(f"live backends on {dev}: {', '.join(backends)}")
    if info["env_backend"]:
        print(f"PYCURV_BACKEND={info['env_backend']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
