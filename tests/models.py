"""Small models and a torch.func ground truth for the per-sample tests.

``per_sample_jacobian`` computes the per-sample gradients of the per-sample losses with
``torch.func.vmap(torch.func.grad(...))`` in float64, independently of the hooks in :mod:`pycurv.capture`:
``J: (N, P)`` over the weights and biases of the chosen layers, each layer's block laid out like
``pycurv.ops.ef_diag``'s output (``weight.view(d_out, -1)`` row-major, the bias as a last column when present).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear+bias, Tanh, Linear+bias, Tanh, Linear without bias: inputs ``(N, d_in)``."""

    def __init__(self, d_in: int = 5, hidden: int = 7, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block (single-head attention on q/k/v/o projections, then a GELU MLP) on ``(N, T, d)`` inputs,
    followed by a per-token classifier. LayerNorm parameters are not captured (they are not Linear/Conv2d)."""

    def __init__(self, d: int = 6, ff: int = 10, n_out: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)
        self.cls = nn.Linear(d, n_out)

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(att @ v)
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return self.cls(x)


class CNN(nn.Module):
    """Conv2d variants (stride 2 + padding 1; padding='same' + dilation 2 without bias; rectangular kernel with
    tuple stride/padding/dilation; padding='valid'), then a Linear head: inputs ``(N, 2, 9, 8)``."""

    def __init__(self, n_out: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding="same", dilation=2, bias=False)
        self.c3 = nn.Conv2d(4, 3, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.c4 = nn.Conv2d(3, 2, (2, 1), padding="valid")
        self.fc = nn.Linear(self.flat_features(), n_out)

    @staticmethod
    def flat_features() -> int:
        # 9x8 -c1-> 5x4 -c2-> 5x4 -c3-> 5x1 -c4-> 4x1, 2 channels
        return 2 * 4 * 1

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        x = torch.tanh(self.c4(x))
        return self.fc(x.flatten(1))


def captured_layer_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear / nn.Conv2d submodules with a trainable weight, in ``named_modules`` order."""
    return [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad
    ]


def per_sample_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn,
    layer_names: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample gradients of ``l_n = loss_fn(model(x[n:n+1]), target[n:n+1])`` in float64 with torch.func.

    Returns ``J: (N, P)`` and ``{name: (N, d_out, d_in [+1])}`` per layer (weight flattened as ``(d_out, -1)``
    row-major, bias as the last column when the layer has a trainable one). Only the chosen layers' weights and
    biases enter ``J``; every other parameter (LayerNorm, frozen layers) is held fixed.
    """
    model64 = copy.deepcopy(model).double()
    if layer_names is None:
        layer_names = captured_layer_names(model64)
    mods = dict(model64.named_modules())
    layout = []  # (layer name, weight key, bias key or None)
    for name in layer_names:
        m = mods[name]
        pre = f"{name}." if name else ""
        bias_key = f"{pre}bias" if m.bias is not None and m.bias.requires_grad else None
        layout.append((name, f"{pre}weight", bias_key))
    free_keys = [k for _, w, b in layout for k in (w, b) if k is not None]
    all_params = {k: v.detach() for k, v in model64.named_parameters()}
    free = {k: all_params[k] for k in free_keys}
    fixed = {k: v for k, v in all_params.items() if k not in free}
    buffers = {k: v.detach() for k, v in model64.named_buffers()}

    def loss_one(p, xn, tn):
        out = torch.func.functional_call(model64, {**fixed, **p, **buffers}, (xn.unsqueeze(0),))
        return loss_fn(out, tn.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(free, x.double(), target)
    blocks = {}
    for name, wk, bk in layout:
        gw = grads[wk]
        n, d_out = gw.shape[0], gw.shape[1]
        blk = gw.reshape(n, d_out, -1)
        if bk is not None:
            blk = torch.cat([blk, grads[bk].reshape(n, d_out, 1)], dim=2)
        blocks[name] = blk
    j = torch.cat([b.reshape(b.shape[0], -1) for b in blocks.values()], dim=1)
    return j, blocks


def linear_per_sample_grads(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-sample gradients of a real ``nn.Linear(d_in, d_out)`` in float64, ``(N, d_out, d_in [+1])``.

    The function differentiated is ``f_n(W, b) = sum_t <g[n, t], Linear(a[n, t])>``, whose gradient is exactly
    ``G_n = g_n^T a_n`` (and ``sum_t g[n, t]`` for the bias): it is evaluated with torch.func from ``a.double()``,
    ``g.double()`` (the same rounded inputs the kernels see), ``a``, ``g`` of shape ``(N, T, d)`` or ``(N, d)``.
    """
    a64, g64 = a.double(), g.double()
    if a64.dim() == 2:
        a64, g64 = a64.unsqueeze(1), g64.unsqueeze(1)
    d_in, d_out = a64.shape[-1], g64.shape[-1]
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64, device=a.device)
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def f(p, an, gn):
        return (torch.func.functional_call(lin, p, (an,)) * gn).sum()

    grads = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, a64, g64)
    blk = grads["weight"]
    if bias:
        blk = torch.cat([blk, grads["bias"].unsqueeze(2)], dim=2)
    return blk


def ground_truth(a: torch.Tensor, g: torch.Tensor, bias: bool) -> dict[str, torch.Tensor]:
    """float64 ``gram = J J^T``, ``sqnorms`` (row norms squared) and ``ef_diag`` (column sums of squares) from
    :func:`linear_per_sample_grads`."""
    blk = linear_per_sample_grads(a, g, bias)
    j = blk.reshape(blk.shape[0], -1)
    return {"per_sample_gram": j @ j.T, "per_sample_grad_sqnorms": j.square().sum(1), "ef_diag": blk.square().sum(0)}


def logit_grad_sqnorms_truth(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``s_n = sum_t ||d l_n / d z_{n,t}||^2`` in float64 by autograd: torch.func gradients of each sample's own loss
    ``l_n = F.cross_entropy(z_n, y_n, reduction="sum", ignore_index=ignore_index)`` with respect to its logits
    (through log-softmax, not the closed form). ``logits: (N, C) | (N, T, C)``, ``targets: (N,) | (N, T)``.

    The gradient ``p - e_y`` is formed explicitly, so where ``p_y`` rounds to 1 its relative accuracy is lost: use
    it for moderate logits."""
    z, y = logits.detach().double(), targets.long()
    if z.dim() == 2:
        z, y = z.unsqueeze(1), y.unsqueeze(1)

    def loss_one(zn, yn):
        return F.cross_entropy(zn, yn, reduction="sum", ignore_index=ignore_index)

    return torch.func.vmap(torch.func.grad(loss_one))(z, y).square().sum((1, 2))


def split_blocks(vec: torch.Tensor, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vector over the columns of :func:`per_sample_jacobian`'s ``J``, cut into its per-layer
    ``(d_out, d_in [+1])`` blocks (the layout of ``blocks``, as returned next to ``J``)."""
    out, start = {}, 0
    for name, blk in blocks.items():
        shape = tuple(blk.shape[1:])
        size = shape[0] * shape[1]
        out[name] = vec[start : start + size].reshape(shape)
        start += size
    if start != vec.shape[0]:
        raise ValueError(f"split_blocks: vec has {vec.shape[0]} entries, the blocks hold {start}")
    return out


class LinearBlock(nn.Module):
    """A transformer-like block built from nn.Linear only (no LayerNorm, so every trainable parameter sits in a
    Linear): single-head attention on q/k/v/o projections and a Tanh MLP with residuals, then a per-token classifier.
    Inputs ``(N, T, d)``, logits ``(N, T, n_out)``; tokens mix only within a sample."""

    def __init__(self, d: int = 4, ff: int = 6, n_out: int = 3):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)
        self.cls = nn.Linear(d, n_out)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(att @ v)
        x = x + self.down(torch.tanh(self.up(x)))
        return self.cls(x)
