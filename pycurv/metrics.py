"""How good is an update direction? The approximation-quality indicator of Wu et al. 2024 (arXiv 2406.06420;
MATH.md section 3), with exact Fisher (GGN) products.

For a direction ``d`` on a batch with loss ``L``::

    gamma(d) = sqrt(d^T F d) / |d^T grad L|

with ``F`` the generalised Gauss-Newton matrix of ``L`` (for softmax cross-entropy, the exact Fisher):
``F = J_z^T H_z J_z``, ``J_z`` the Jacobian of the model outputs and ``H_z`` the Hessian of the loss with respect
to them. ``gamma`` is invariant to the scale of ``d`` and of the loss; it is smallest for the exact natural
gradient ``F^{-1} grad L`` (Cauchy-Schwarz in the ``F`` inner product, ``F`` positive definite), where it equals
``1 / sqrt(grad L^T F^{-1} grad L)``. :func:`update_quality` reports ``gamma(d) / gamma(grad L)``: below 1 the
direction is better than plain gradient descent.

``d^T F d`` needs no matrix: ``u = J_z d`` is one forward-mode product (``torch.func.jvp``) and ``u^T H_z u`` one
Hessian-vector product of the loss with respect to the outputs (double back-propagation), so it is exact for any
loss and any model that ``torch.func`` can run. :func:`ggn_vector_product` gives the full product ``F v`` (one more
reverse pass) for building exact natural-gradient baselines.

Updates are given as a ``{name: tensor}`` dict over the trainable parameters (names as in
``model.named_parameters()``; a missing name counts as zero), a list or tuple in the order of the trainable
``model.parameters()``, or one flat tensor of all of them concatenated in that order. The model's buffers
(BatchNorm running statistics) are restored after every call; the model runs in whatever mode it is in.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = ["update_quality", "gamma", "ggn_quadratic", "ggn_vector_product", "flat_params"]


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def flat_params(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order flat updates use."""
    return list(_trainable(model))


def _as_dict(model: nn.Module, update, what: str) -> dict[str, torch.Tensor]:
    params = _trainable(model)
    if isinstance(update, dict):
        unknown = [k for k in update if k not in params]
        if unknown:
            raise ValueError(f"{what}: names {unknown} are not trainable parameters of model")
        out = {}
        for n, p in params.items():
            v = update.get(n)
            if v is None:
                out[n] = torch.zeros_like(p)
            elif tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{what}: {n!r} must have shape {tuple(p.shape)}, got {tuple(v.shape)}")
            else:
                out[n] = v.detach().to(p.dtype)
        return out
    if isinstance(update, torch.Tensor) and update.dim() == 1:
        total = sum(p.numel() for p in params.values())
        if update.numel() != total:
            raise ValueError(f"{what}: a flat update must have {total} elements (all trainable parameters), got {update.numel()}")
        out, i = {}, 0
        for n, p in params.items():
            out[n] = update[i : i + p.numel()].detach().reshape(p.shape).to(p.dtype)
            i += p.numel()
        return out
    if isinstance(update, (list, tuple)):
        if len(update) != len(params):
            raise ValueError(f"{what}: a list update must have {len(params)} tensors (trainable parameters), got {len(update)}")
        out = {}
        for (n, p), v in zip(params.items(), update):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{what}: the entry for {n!r} must have shape {tuple(p.shape)}, got {shape}")
            out[n] = v.detach().to(p.dtype)
        return out
    raise TypeError(f"{what}: update must be a dict, a list/tuple of tensors or a flat 1-d tensor, got {type(update).__name__}")


def _split_batch(batch) -> tuple[tuple, object]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("batch must be a pair (inputs, targets); inputs may be a tensor or a tuple of model arguments")
    inputs, targets = batch
    return (inputs if isinstance(inputs, tuple) else (inputs,)), targets


class _KeepBuffers:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = {n: b.clone() for n, b in self.model.named_buffers()}

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.saved[n])


def _out_hvp(loss_fn, out: torch.Tensor, targets, u: torch.Tensor) -> torch.Tensor:
    """``H_z u`` with ``H_z`` the Hessian of ``loss_fn(out, targets)`` with respect to ``out``."""
    z = out.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z, targets)
        (gz,) = torch.autograd.grad(loss, z, create_graph=True)
        (hu,) = torch.autograd.grad(gz, z, grad_outputs=u)
    return hu


def _jvp(model: nn.Module, params: dict, inputs: tuple, v: dict) -> tuple[torch.Tensor, torch.Tensor]:
    buffers = dict(model.named_buffers())

    def f(p):
        # fresh copies made inside the transform: a train-mode BatchNorm updates its running statistics in place,
        # which a transform refuses for tensors captured from outside (the real buffers are left untouched)
        return functional_call(model, {**p, **{n: b.clone() for n, b in buffers.items()}}, inputs)

    out, u = jvp(f, (params,), (v,))
    if not isinstance(out, torch.Tensor):
        raise TypeError("the model must return one tensor (the outputs loss_fn takes)")
    return out, u


def ggn_quadratic(model: nn.Module, loss_fn: Callable, batch, v) -> torch.Tensor:
    """``v^T F v`` for the GGN ``F`` of ``loss_fn(model(inputs), targets)`` (exact; 0-d tensor)."""
    inputs, targets = _split_batch(batch)
    vd = _as_dict(model, v, "ggn_quadratic")
    params = {n: p.detach() for n, p in _trainable(model).items()}
    with _KeepBuffers(model):
        out, u = _jvp(model, params, inputs, vd)
        hu = _out_hvp(loss_fn, out, targets, u)
    return (u * hu).sum()


def ggn_vector_product(model: nn.Module, loss_fn: Callable, batch, v) -> dict[str, torch.Tensor]:
    """``F v`` for the GGN ``F`` of ``loss_fn(model(inputs), targets)``, as ``{name: tensor}`` (exact: a jvp, a
    Hessian-vector product with respect to the outputs, and a vjp)."""
    inputs, targets = _split_batch(batch)
    vd = _as_dict(model, v, "ggn_vector_product")
    params = {n: p.detach() for n, p in _trainable(model).items()}
    with _KeepBuffers(model):
        out, u = _jvp(model, params, inputs, vd)
        hu = _out_hvp(loss_fn, out, targets, u)
        with torch.enable_grad():
            p_req = {n: p.requires_grad_(True) for n, p in ((n, p.clone()) for n, p in params.items())}
            out2 = functional_call(model, {**p_req, **dict(model.named_buffers())}, inputs)
            grads = torch.autograd.grad(out2, list(p_req.values()), grad_outputs=hu, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}


def _loss_grad(model: nn.Module, loss_fn: Callable, batch) -> dict[str, torch.Tensor]:
    inputs, targets = _split_batch(batch)
    params = _trainable(model)
    with _KeepBuffers(model), torch.enable_grad():
        loss = loss_fn(model(*inputs), targets)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params.items(), grads)}


def _dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def gamma(model: nn.Module, loss_fn: Callable, batch, update, grad: dict | None = None) -> float:
    """``gamma(d) = sqrt(d^T F d) / |d^T grad L|`` for the direction ``update`` (inf when ``d`` is orthogonal to the
    gradient). ``grad``: the loss gradient as ``{name: tensor}``, computed when not given."""
    d = _as_dict(model, update, "gamma")
    g = _loss_grad(model, loss_fn, batch) if grad is None else grad
    quad = float(ggn_quadratic(model, loss_fn, batch, d))
    dg = abs(float(_dot(d, g)))
    if not math.isfinite(quad) or not math.isfinite(dg):
        raise FloatingPointError("gamma: the update or the loss gradient is not finite")
    if dg == 0.0:
        return math.inf
    return math.sqrt(max(quad, 0.0)) / dg


def update_quality(
    model: nn.Module, loss_fn: Callable, batch, update, *, return_parts: bool = False
):
    """The indicator ``gamma(update) / gamma(grad L)`` of Wu et al. 2024 on ``batch = (inputs, targets)``.

    ``loss_fn(outputs, targets)`` is the training loss (e.g. ``F.cross_entropy``); ``update`` the direction an
    optimizer would move along (its sign does not matter), as a dict, a list or a flat tensor (module docstring).
    Below 1 the direction is a better approximation of the natural gradient than SGD's; the exact natural gradient
    attains the minimum. With ``return_parts=True`` returns ``(ratio, {"gamma_update", "gamma_grad"})``.
    """
    g = _loss_grad(model, loss_fn, batch)
    gu = gamma(model, loss_fn, batch, update, grad=g)
    gg = gamma(model, loss_fn, batch, g, grad=g)
    ratio = gu / gg if gg > 0 else math.inf
    if return_parts:
        return ratio, {"gamma_update": gu, "gamma_grad": gg}
    return ratio
