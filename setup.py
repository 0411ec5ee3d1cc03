"""Builds pycurv._C: the C++ CPU kernels always, the CUDA kernels when FORCE_CUDA=1 or a CUDA torch and nvcc are
present (PYCURV_SKIP_CUDA_BUILD=1 turns them off). TORCH_CUDA_ARCH_LIST defaults to Hopper (9.0); MAX_JOBS is
honoured by torch's ninja build. Build with `pip install --no-build-isolation -e .` against the torch you run."""

import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("PYCURV_SKIP_CUDA_BUILD"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    with_cuda = _want_cuda()
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    kwargs = dict(
        name="pycurv._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DPYCURV_WITH_CUDA"]
        ext = CUDAExtension(
            sources=sources + rel("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DPYCURV_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    _write_build_config(with_cuda)
    return ext


def _write_build_config(with_cuda: bool) -> None:
    cfg = {
        "with_cuda": with_cuda,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "max_jobs": os.environ.get("MAX_JOBS"),
        "cuda_home": CUDA_HOME if with_cuda else None,
    }
    with open(os.path.join(ROOT, "pycurv", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time; not tracked.\n")
        f.write(f"BUILD_CONFIG = {cfg!r}\n")


setup(
    packages=["pycurv", "pycurv.optim", "pycurv.kernels"],
    package_dir={"pycurv": "pycurv", "pycurv.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
