"""Packaging: ``import pycurv`` survives a missing build, ``python -m pycurv.info`` reports it, and the Triton
kernels are installed as ``pycurv.kernels`` only (never as a top-level ``kernels`` module)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pycurv

# Blocks ``pycurv._C`` before pycurv is imported, as on a machine where the extension was never built.
_NO_EXTENSION = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pycurv._C":
            raise ImportError("pycurv._C blocked for this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYCURV_BACKEND", None)
    with tempfile.TemporaryDirectory() as cwd:  # outside the checkout: only the installed package is visible
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
        )


def test_import_without_extension_falls_back_to_torch():
    res = _run(
        _NO_EXTENSION
        + """
import torch, pycurv
from pycurv import _extension, ops, reference
assert _extension.LOAD_ERROR and "blocked" in _extension.LOAD_ERROR, _extension.LOAD_ERROR
assert not any(_extension.has_kernel(op, "CPU") for op in _extension.COMPILED_OPS)
assert "cpu" not in ops.available_backends("cpu"), ops.available_backends("cpu")
a, g = torch.randn(3, 2, 5), torch.randn(3, 2, 4)
assert torch.allclose(ops.per_sample_gram(a, g), reference.per_sample_gram(a, g))
f = ops.kfac_factor_update(torch.zeros(5, 5), a, 0.0)
assert torch.allclose(f, reference.kfac_factor(a.reshape(-1, 5)))
try:
    ops.per_sample_gram(a, g, backend="cpu")
except RuntimeError as exc:
    assert "backend 'cpu' is not available" in str(exc), exc
else:
    raise AssertionError("backend='cpu' without the extension did not raise")
from pycurv import info
info.main()
"""
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pycurv._C: NOT loaded" in res.stdout, res.stdout


def test_info_runs():
    res = _run("import runpy; runpy.run_module('pycurv.info', run_name='__main__')")
    assert res.returncode == 0, res.stdout + res.stderr
    for needle in ("torch ", "compiled kernels:", "live backends on cpu:"):
        assert needle in res.stdout, res.stdout
    if pycurv._extension.LOAD_ERROR is None:
        assert "pycurv._C: loaded" in res.stdout, res.stdout


def test_kernels_live_under_pycurv_only():
    res = _run(
        """
import importlib.util
import pycurv.kernels
assert pycurv.kernels.__name__ == "pycurv.kernels"
assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")
"""
    )
    assert res.returncode == 0, res.stdout + res.stderr
