"""Fake (meta) kernels for the C++ ops, so shapes propagate under torch.compile and FakeTensor."""

from __future__ import annotations

import torch

from .reference import acc_dtype


def _fake(op: str):
    """``torch.library.register_fake`` for ``pycurv::<op>`` when the loaded build declares ``op``; a build older
    than this package simply lacks the newer ops (their compiled backends then report as unavailable)."""

    def register(fn):
        try:
            getattr(torch.ops.pycurv, op)
        except (AttributeError, RuntimeError):
            return fn
        return torch.library.register_fake(f"pycurv::{op}")(fn)

    return register


@_fake("per_sample_grad_sqnorms")
def _(a, g, bias, method):
    return a.new_empty((a.shape[0],), dtype=acc_dtype(a.dtype))


@_fake("per_sample_gram")
def _(a, g, bias, method):
    return a.new_empty((a.shape[0], a.shape[0]), dtype=acc_dtype(a.dtype))


@_fake("ef_diag")
def _(a, g, bias):
    return a.new_empty((g.shape[-1], a.shape[-1] + int(bias)), dtype=acc_dtype(a.dtype))


@_fake("kfac_factor_update")
def _(factor, x, decay, bias):
    return None


@_fake("damped_inverse")
def _(m, damping, method):
    return torch.empty_like(m, memory_format=torch.contiguous_format), m.new_empty((m.shape[0],), dtype=torch.int32)


@_fake("sym_eig")
def _(m):
    return m.new_empty(m.shape[:-1]), torch.empty_like(m, memory_format=torch.contiguous_format)


@_fake("kron_precondition")
def _(grad, g_inv, a_inv):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@_fake("kron_precondition_eigen")
def _(grad, q_g, q_a, d_g, d_a, damping):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@_fake("weighted_grad_sum")
def _(a, g, coef, bias):
    return a.new_empty((g.shape[-1], a.shape[-1] + int(bias)), dtype=acc_dtype(a.dtype))


@_fake("logit_grad_sqnorms")
def _(logits, targets, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))


@_fake("fop_update")
def _(m, grad_prev, grad_cur, lr, hyper_lr):
    return None


@_fake("fop_precondition")
def _(m, grad):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)
