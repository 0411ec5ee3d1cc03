"""Pure-PyTorch reference of every pycurv op: the readable spec, the fallback and the benchmark baseline.

Conventions (DESIGN.md section 3): a linear layer ``y = x W^T (+ b)`` with ``W: (d_out, d_in)``. Sample ``n`` has
inputs ``A_n: (T, d_in)`` and output gradients ``B_n: (T, d_out)``; its weight gradient is ``G_n = B_n^T A_n``.
With ``bias=True`` the bias gradient ``sum_t B_n[t]`` is part of the per-sample gradient (a virtual column of ones
appended to ``A_n``; never materialised here either).

Every function accumulates in float32 (float64 for float64 inputs) and returns that dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "acc_dtype",
    "as_3d",
    "per_sample_grad_sqnorms",
    "per_sample_gram",
    "ef_diag",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / output dtype for an input dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_3d(x: torch.Tensor) -> torch.Tensor:
    """``(N, d)`` -> ``(N, 1, d)``; ``(N, T, d)`` unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _prep(a: torch.Tensor, g: torch.Tensor):
    dt = acc_dtype(a.dtype)
    return as_3d(a).to(dt), as_3d(g).to(dt)


def per_sample_grad_sqnorms(
    a: torch.Tensor, g: torch.Tensor, bias: bool = False, method: str = "ghost"
) -> torch.Tensor:
    """``s_n = ||G_n||_F^2`` (+ ``||sum_t B_n[t]||^2`` with bias), shape ``(N,)``.

    ghost (Goodfellow 2015; Li et al. 2022 for sequences): ``||G_n||^2 = sum((A_n A_n^T) * (B_n B_n^T))``,
    which for ``T = 1`` is ``||a_n||^2 ||b_n||^2``.  materialize: form ``G_n`` and square it.
    """
    a3, g3 = _prep(a, g)
    if method == "ghost":
        if a3.shape[1] == 1:
            s = a3.square().sum((1, 2)) * g3.square().sum((1, 2))
        else:
            s = (torch.bmm(a3, a3.mT) * torch.bmm(g3, g3.mT)).sum((1, 2))
    elif method == "materialize":
        s = torch.bmm(g3.mT, a3).square().sum((1, 2))
    else:
        raise ValueError(f"method must be 'ghost' or 'materialize', got {method!r}")
    if bias:
        s = s + g3.sum(1).square().sum(1)
    return s


def per_sample_gram(a: torch.Tensor, g: torch.Tensor, bias: bool = False, method: str = "ghost") -> torch.Tensor:
    """``K_ij = <G_i, G_j>_F`` (+ bias part ``<sum_t B_i[t], sum_t B_j[t]>``), shape ``(N, N)``.

    ghost: ``K_ij = sum_{t,s} (a_it . a_js)(b_it . b_js)``; for ``T = 1``, ``K = (A A^T) * (B B^T)``.
    materialize: ``K = J J^T`` with ``J = [vec(G_1); ...; vec(G_N)]``.
    """
    a3, g3 = _prep(a, g)
    n, t = a3.shape[0], a3.shape[1]
    if method == "ghost":
        if t == 1:
            k = (a3[:, 0] @ a3[:, 0].T) * (g3[:, 0] @ g3[:, 0].T)
        else:
            af, gf = a3.reshape(n * t, -1), g3.reshape(n * t, -1)
            k = ((af @ af.T) * (gf @ gf.T)).view(n, t, n, t).sum((1, 3))
    elif method == "materialize":
        j = torch.bmm(g3.mT, a3).reshape(n, -1)
        k = j @ j.T
    else:
        raise ValueError(f"method must be 'ghost' or 'materialize', got {method!r}")
    if bias:
        gs = g3.sum(1)
        k = k + gs @ gs.T
    return k


def ef_diag(a: torch.Tensor, g: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """Empirical-Fisher diagonal ``sum_n G_n * G_n``, shape ``(d_out, d_in)`` or ``(d_out, d_in + 1)`` with bias
    (the last column is ``sum_n (sum_t B_n[t])^2``)."""
    a3, g3 = _prep(a, g)
    if a3.shape[1] == 1:
        d = g3[:, 0].square().T @ a3[:, 0].square()
    else:
        d = torch.bmm(g3.mT, a3).square().sum(0)
    if bias:
        d = torch.cat([d, g3.sum(1).square().sum(0).unsqueeze(1)], dim=1)
    return d
