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
    "kfac_factor",
    "kfac_factor_update",
    "damped_inverse",
    "newton_schulz_defaults",
    "sym_eig",
    "kron_precondition",
    "kron_precondition_eigen",
    "kl_clip_scale",
    "weighted_grad_sum",
    "per_sample_grad_dot",
    "logit_grad_sqnorms",
    "fop_update",
    "fop_precondition",
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


# ----------------------------------------------------------------------------------------------------------------
# K-FAC (Martens & Grosse 2015; Grosse & Martens 2016; MATH.md section 2). Batched forms take a leading batch
# dimension B of independent same-shape problems; 2-d inputs are one problem.
# ----------------------------------------------------------------------------------------------------------------


def _batched(x: torch.Tensor, nd: int) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == nd else x


def kfac_factor(x: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """``xb^T xb / R`` with ``xb = [x, 1]`` (ones column only with bias): ``x: (R, d_x)`` gives ``(d, d)``,
    ``x: (B, R, d_x)`` gives ``(B, d, d)``, ``d = d_x + bias``. Accumulated in float32 (float64 for float64)."""
    x3 = _batched(x, 2).to(acc_dtype(x.dtype))
    rows = x3.shape[1]
    f = x3.mT @ x3
    if bias:
        s = x3.sum(1)  # (B, d_x): the products with the ones column
        top = torch.cat([f, s.unsqueeze(2)], dim=2)
        corner = torch.full_like(s[:, :1], float(rows))
        f = torch.cat([top, torch.cat([s, corner], dim=1).unsqueeze(1)], dim=1)
    f = _symmetrize(f / rows)
    return f if x.dim() == 3 else f[0]


def kfac_factor_update(factor: torch.Tensor, x: torch.Tensor, decay: float, bias: bool = False) -> torch.Tensor:
    """In place ``factor <- decay * factor + (1 - decay) * xb^T xb / R`` (K-FAC running average), returns ``factor``.

    ``factor: (d, d)`` with ``x: (R, d_x)``, or ``factor: (B, d, d)`` with ``x: (B, R, d_x)``; ``d = d_x + bias``.
    ``decay = 0`` overwrites ``factor`` without reading it.
    """
    new = kfac_factor(x, bias).to(factor.dtype)
    if decay == 0:
        return factor.copy_(new)
    # like the kernels: the lower triangle of the average, mirrored (exactly symmetric even if factor was not)
    return factor.copy_(_symmetrize(factor * decay + new * (1.0 - decay)))


def newton_schulz_defaults(dtype: torch.dtype) -> tuple[int, float]:
    """``(max_iter, tol)`` of the Newton-Schulz inverse: converged when ``||M X - I||_F / sqrt(d) <= tol``."""
    return (60, 1e-10) if dtype == torch.float64 else (60, 1e-4)


def _symmetrize(x: torch.Tensor) -> torch.Tensor:
    """The lower triangle mirrored onto the upper one: exactly symmetric."""
    low = x.tril()
    return low + low.tril(-1).mT


def damped_inverse(
    m: torch.Tensor, damping: torch.Tensor | float, method: str = "cholesky"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((m + damping I)^{-1}, info)`` for symmetric ``m: (d, d) | (B, d, d)`` (float32 / float64; the lower
    triangle is read by "cholesky" and "eigh"); ``damping`` a float or one value per matrix, shape ``(B,)``.

    The inverse is exactly symmetric and has ``m``'s dtype. ``info`` (int32, one per matrix): 0 when the inverse
    is valid, ``k > 0`` when the damped matrix is not positive definite ("cholesky": the order of the failing
    leading minor; "eigh": 1 + the index of the first eigenvalue ``<= 0``) or, for "newton_schulz", when the
    iteration did not reach its tolerance or the inverse has a diagonal entry <= 0 (then 1; definiteness is not
    tested further). The public op redoes those with Cholesky and raises damping where needed.

    - "cholesky": ``L L^T = m + damping I``, inverse from ``L``.
    - "eigh": ``Q diag(1 / (lambda + damping)) Q^T``.
    - "newton_schulz" (Schulz 1933; Ben-Israel & Cohen 1966): ``X_{k+1} = X_k (2I - M X_k)``,
      ``X_0 = I / ||M||_inf``; matmuls only; stops when ``||M X - I||_F / sqrt(d) <= tol``
      (see :func:`newton_schulz_defaults`). ``||M||_inf`` bounds the eigenvalues of the symmetric ``M``, so the
      error ``I - M X_0`` has eigenvalues in ``[0, 1)`` when ``M`` is positive definite and the iteration converges;
      an eigenvalue ``<= 0`` gives an error eigenvalue ``>= 1``, which never shrinks, so an indefinite or singular
      ``M`` is flagged by its residual.
    """
    m3 = _batched(m, 2)
    b, d = m3.shape[0], m3.shape[-1]
    damp = torch.as_tensor(damping, dtype=m3.dtype, device=m3.device).expand(b).reshape(b, 1, 1)
    eye = torch.eye(d, dtype=m3.dtype, device=m3.device)
    md = m3 + damp * eye
    if method == "cholesky":
        low, info = torch.linalg.cholesky_ex(md)
        low = torch.where((info > 0).reshape(b, 1, 1), eye, low)  # failed factorisations: any finite output
        inv = _symmetrize(torch.cholesky_inverse(low))
    elif method == "eigh":
        vals, vecs = torch.linalg.eigh(md)
        bad = vals <= 0
        info = torch.where(bad.any(1), bad.int().argmax(1) + 1, 0)
        inv = _symmetrize((vecs / vals.unsqueeze(1)) @ vecs.mT)
    elif method == "newton_schulz":
        max_iter, tol = newton_schulz_defaults(m3.dtype)
        md = _symmetrize(md)  # the iteration reads the whole matrix; "lower triangle" like the others
        norminf = md.abs().sum(2).amax(1)
        x = eye / norminf.reshape(b, 1, 1)
        for it in range(max_iter):
            mx = md @ x
            res = (mx - eye).norm(dim=(1, 2)) / d**0.5
            done = res <= tol
            if it % 8 == 0 and bool(done.all()):
                break
            x = 2 * x - x @ mx
        res = (md @ x - eye).norm(dim=(1, 2)) / d**0.5
        # the iteration inverts indefinite matrices too: a non-positive diagonal of the inverse flags them
        info = (~(res <= tol) | (x.diagonal(dim1=1, dim2=2) <= 0).any(1)).int()
        inv = _symmetrize(x)
    else:
        raise ValueError(f"method must be 'cholesky', 'eigh' or 'newton_schulz', got {method!r}")
    info = info.to(torch.int32)
    return (inv, info) if m.dim() == 3 else (inv[0], info)


def sym_eig(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of symmetric ``m: (d, d) | (B, d, d)`` (lower triangle
    read), in ``m``'s dtype: ``m = Q diag(lambda) Q^T``."""
    return torch.linalg.eigh(m)


def kron_precondition(grad: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """``g_inv @ grad @ a_inv``: the K-FAC step ``(A ⊗ G)^{-1} vec(grad)`` of a layer whose weight gradient (bias
    folded in as the last column) is ``grad: (d_out, d_in) | (B, d_out, d_in)``, given the inverses of the factors
    ``G: (d_out, d_out)`` and ``A: (d_in, d_in)``. Accumulated in float32 (float64 for float64), ``grad``'s dtype."""
    dt = acc_dtype(grad.dtype)
    return (g_inv.to(dt) @ grad.to(dt) @ a_inv.to(dt)).to(grad.dtype)


def kron_precondition_eigen(
    grad: torch.Tensor,
    q_g: torch.Tensor,
    q_a: torch.Tensor,
    d_g: torch.Tensor,
    d_a: torch.Tensor,
    damping: torch.Tensor | float,
) -> torch.Tensor:
    """Eigenbasis K-FAC step with exact damping of the Kronecker product (George et al. 2018, EKFAC's basis):
    ``Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T`` where ``G = Q_G diag(d_G) Q_G^T`` and
    ``A = Q_A diag(d_A) Q_A^T``. Shapes as :func:`kron_precondition`, ``d_g: (d_out,) | (B, d_out)``,
    ``d_a: (d_in,) | (B, d_in)``, ``damping`` a float or ``(B,)``."""
    dt = acc_dtype(grad.dtype)
    g3, qg, qa = _batched(grad, 2).to(dt), _batched(q_g, 2).to(dt), _batched(q_a, 2).to(dt)
    dg, da = _batched(d_g, 1).to(dt), _batched(d_a, 1).to(dt)
    damp = torch.as_tensor(damping, dtype=dt, device=grad.device).expand(g3.shape[0]).reshape(-1, 1, 1)
    v = qg.mT @ g3 @ qa
    v = v / (dg.unsqueeze(2) * da.unsqueeze(1) + damp)
    out = (qg @ v @ qa.mT).to(grad.dtype)
    return out if grad.dim() == 3 else out[0]


def kl_clip_scale(
    precond: list[torch.Tensor], grads: list[torch.Tensor], lr: float, kl_clip: float
) -> torch.Tensor:
    """KL-clip factor (Ba, Grosse & Martens 2017) ``nu = min(1, sqrt(kl_clip / |sum_l lr^2 <p_l, g_l>|))`` as a
    0-d float32 (float64 for float64) tensor on the gradients' device (no host synchronisation)."""
    dt = acc_dtype(grads[0].dtype)
    vg = torch.stack([torch.vdot(p.reshape(-1).to(dt), g.reshape(-1).to(dt)) for p, g in zip(precond, grads)]).sum()
    return torch.sqrt(kl_clip / (lr * lr * vg.abs())).clamp(max=1.0)


# ----------------------------------------------------------------------------------------------------------------
# iEF / EF / SF (MATH.md section 3)
# ----------------------------------------------------------------------------------------------------------------


def weighted_grad_sum(a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """``sum_n coef_n G_n = sum_{n,t} coef_n B_n[t] A_n[t]^T``, shape ``(d_out, d_in)`` (``(d_out, d_in + 1)`` with
    bias, the bias part ``sum_{n,t} coef_n B_n[t]`` last): one matmul over the ``N T`` rows with the rows of ``g``
    scaled by their sample's coefficient; no ``G_n`` is formed."""
    a3, g3 = _prep(a, g)
    gw = g3 * coef.to(a3.dtype).reshape(-1, 1, 1)
    w = gw.flatten(0, 1).T @ a3.flatten(0, 1)
    if bias:
        w = torch.cat([w, gw.sum((0, 1)).unsqueeze(1)], dim=1)
    return w


def per_sample_grad_dot(a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """``r_n = <G_n, V>_F = sum_t B_n[t]^T V A_n[t]`` (+ ``<sum_t B_n[t], v_bias>``, ``v_bias = V[:, -1]``), shape
    ``(N,)``: the Jacobian-vector product ``J vec(V)`` of one layer; no ``G_n`` is formed."""
    a3, g3 = _prep(a, g)
    v = v.to(a3.dtype)
    d_in = a3.shape[2]
    r = ((g3 @ v[:, :d_in]) * a3).sum((1, 2))
    if bias:
        r = r + g3.sum(1) @ v[:, d_in]
    return r


def logit_grad_sqnorms(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``s_n = sum_t ||softmax(z_nt) - e_{y_nt}||^2`` for softmax cross-entropy, shape ``(N,)``: the squared norm of
    each sample's loss gradient with respect to its logits. ``logits: (N, C) | (N, T, C)``, ``targets: (N,) | (N, T)``;
    positions whose target is ``ignore_index`` contribute 0. Computed as ``(1 - p_y)^2 + sum_{c != y} p_c^2`` with
    ``1 - p_y = sum_{c != y} e_c / sum_c e_c`` (``e_c = exp(z_c - max z)``), so that nothing cancels when ``p_y`` is
    close to 1."""
    z = logits.to(acc_dtype(logits.dtype))
    if z.dim() == 2:
        z, targets = z.unsqueeze(1), targets.unsqueeze(1)
    valid = targets != ignore_index
    y = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    e = torch.exp(z - z.amax(-1, keepdim=True))
    e_y = e.gather(-1, y).squeeze(-1)
    e_other = e.scatter(-1, y, 0.0)
    s1 = e_other.sum(-1)
    total = s1 + e_y
    s = (s1 / total).square() + e_other.square().sum(-1) / total.square()
    return torch.where(valid, s, torch.zeros_like(s)).sum(1)


# ----------------------------------------------------------------------------------------------------------------
# FOP (MATH.md section 4)
# ----------------------------------------------------------------------------------------------------------------


def fop_update(
    m: torch.Tensor, grad_prev: torch.Tensor, grad_cur: torch.Tensor, lr: float, hyper_lr: float
) -> torch.Tensor:
    """In place ``M <- M + lr * hyper_lr * (G_prev^T G_cur + G_cur^T G_prev) M``, returns ``m``: one hypergradient
    descent step on the preconditioner ``P = M M^T`` of a gradient preconditioned on the right, ``G P``
    (``m: (k, k) | (B, k, k)``, gradients ``(r, k) | (B, r, k)``). The ``k x k`` product is accumulated in ``m``'s
    dtype from gradients cast to it."""
    m3 = _batched(m, 2)
    gp, gc = _batched(grad_prev, 2).to(m3.dtype), _batched(grad_cur, 2).to(m3.dtype)
    c = gp.mT @ gc
    step = (c + c.mT) @ m3
    m3.add_(step, alpha=float(lr) * float(hyper_lr))
    return m


def fop_precondition(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``G M M^T`` (``m: (k, k) | (B, k, k)``, ``grad: (r, k) | (B, r, k)``), accumulated in float32 (float64 for
    float64 inputs), in ``grad``'s dtype."""
    dt = acc_dtype(grad.dtype)
    m3 = _batched(m, 2).to(dt)
    out = _batched(grad, 2).to(dt) @ (m3 @ m3.mT)
    out = out.to(grad.dtype)
    return out if grad.dim() == 3 else out[0]
