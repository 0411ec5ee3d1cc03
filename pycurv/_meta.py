"""Fake (meta) kernels for the C++ ops, so shapes propagate under torch.compile and FakeTensor."""

from __future__ import annotations

import torch

from .reference import acc_dtype


@torch.library.register_fake("pycurv::per_sample_grad_sqnorms")
def _(a, g, bias, method):
    return a.new_empty((a.shape[0],), dtype=acc_dtype(a.dtype))


@torch.library.register_fake("pycurv::per_sample_gram")
def _(a, g, bias, method):
    return a.new_empty((a.shape[0], a.shape[0]), dtype=acc_dtype(a.dtype))


@torch.library.register_fake("pycurv::ef_diag")
def _(a, g, bias):
    return a.new_empty((g.shape[-1], a.shape[-1] + int(bias)), dtype=acc_dtype(a.dtype))
