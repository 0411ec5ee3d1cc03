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


@torch.library.register_fake("pycurv::kfac_factor_update")
def _(factor, x, decay, bias):
    return None


@torch.library.register_fake("pycurv::damped_inverse")
def _(m, damping, method):
    return torch.empty_like(m, memory_format=torch.contiguous_format), m.new_empty((m.shape[0],), dtype=torch.int32)


@torch.library.register_fake("pycurv::sym_eig")
def _(m):
    return m.new_empty(m.shape[:-1]), torch.empty_like(m, memory_format=torch.contiguous_format)


@torch.library.register_fake("pycurv::kron_precondition")
def _(grad, g_inv, a_inv):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("pycurv::kron_precondition_eigen")
def _(grad, q_g, q_a, d_g, d_a, damping):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("pycurv::weighted_grad_sum")
def _(a, g, coef, bias):
    return a.new_empty((g.shape[-1], a.shape[-1] + int(bias)), dtype=acc_dtype(a.dtype))


@torch.library.register_fake("pycurv::logit_grad_sqnorms")
def _(logits, targets, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))
