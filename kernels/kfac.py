"""Triton kernels of the K-FAC family: fused factor updates, Newton-Schulz damped inverses and Kronecker
preconditioning (plain and eigenbasis).

Conventions as in ``per_sample.py``: operands are read through their strides (no copies, transposes included),
``tl.dot`` multiplies in the input dtype with float32 accumulation (float64 stays float64); float32 operands use
``tf32x3`` (three TF32 products, float32 accuracy, whatever ``torch.backends.cuda.matmul.allow_tf32`` says), a
float32 intermediate multiplied by a 16-bit operand uses ``tf32`` (it rounds no worse than the 16-bit input), float64
uses ``ieee``. The bias of a factor is a virtual column of ones after the last feature of ``x``, never stored: the
tiles that hold its row set it in registers after loading, so its products (the column sums of ``x`` and the row
count) come out of the same tile products. Factors are computed on their lower triangle and mirrored, so they are
exactly symmetric; so are the Newton-Schulz inverses.

Kernels: ``_kfac_factor_kernel`` (+ ``_kfac_factor_reduce_kernel`` when the rows are split over programs),
``_ns_inverse_kernel`` (the whole Newton-Schulz iteration for one matrix of order <= 128 per program) and
``_bmm_kernel``, a batched GEMM with fused epilogues used for the Kronecker steps and for Newton-Schulz on larger
matrices.

Each launcher is a ``torch.library.triton_op`` (``torch.ops.pycurv.<op>_triton``) calling
``torch.library.wrap_triton(kernel)[grid](...)`` (under ``TRITON_INTERPRET=1`` an opaque ``custom_op``); the public
names ``<op>_triton`` are plain functions over those ops. ``KERNELS`` lists every kernel with its argument types and
every configuration the launchers can pick, so that tests/test_triton_compile.py compiles all of them for Hopper.

Sources: Martens & Grosse 2015 (arXiv 1503.05671) for the factors and the Kronecker step; George et al. 2018
(arXiv 1806.03884) for the eigenbasis step; Schulz 1933 and Ben-Israel & Cohen 1966 for the Newton-Schulz
iteration. Unlike :func:`pycurv.reference.damped_inverse`, which starts from ``X_0 = M^T / (||M||_1 ||M||_inf)``
(convergent for any nonsingular M), the kernels start from ``X_0 = I / ||M||_inf``, which converges only for
positive definite M: faster on the matrices K-FAC inverts, and an indefinite matrix is reported instead of
inverted (see ``_ns_inverse_kernel``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pycurv.reference import newton_schulz_defaults

from . import _common
from ._common import (
    _INTERPRET,
    _TORCH_DTYPE,
    DTYPES,
    KernelRegistry,
    KernelSpec,
    _acc_name,
    _cast,
    _cfg,
    _define_op,
    _dt,
    _lowp,
    _mixed_prec,
    _mma,
    _num_sms,
    _prec,
    _scalar,
    _sig,
    _wrap,
)

__all__ = [
    "DTYPES",
    "KERNELS",
    "KernelSpec",
    "damped_inverse_triton",
    "kfac_factor_update_triton",
    "kron_precondition_eigen_triton",
    "kron_precondition_triton",
]

# Largest matrix order the fused Newton-Schulz kernel runs in one program per matrix (its three (d x d) work
# matrices stay in L2); larger matrices iterate with the batched GEMM kernel, many programs per product.
NS_FUSED_MAX = 128
# Row splits of a factor update write float32 (float64) partial factors; their total size stays below this
# fraction of the bytes of x, so that the extra traffic is small next to reading x.
_SPLIT_WS_FRACTION = 0.25


# ----------------------------------------------------------------------------------------------------------------
# Factor update
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tri_tile(p):
    """``(i, j)``, ``i >= j``, of the ``p``-th tile of a lower block triangle enumerated row by row."""
    i = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # the float square root may land one off near perfect squares
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)
    return i, p - i * (i + 1) // 2


@triton.jit
def _factor_store_cols(f_ptr, new, ci, c, D, decay):
    """``F[i, j] = decay * F[i, j] + new`` for rows ``ci`` and columns ``c`` where ``i >= j``; mirrored where
    ``i > j``."""
    valid = (ci < D)[:, None] & (c < D)[None, :]
    low = valid & (ci[:, None] >= c[None, :])
    p_low = f_ptr + (ci.to(tl.int64)[:, None] * D + c[None, :])
    old = tl.load(p_low, mask=low & (decay != 0), other=0.0)
    val = _scalar(decay, new.dtype) * old + new
    tl.store(p_low, val, mask=low)
    # the mirror is stored through the transposed tile, so that both stores run along rows of F
    p_up = f_ptr + (c.to(tl.int64)[:, None] * D + ci[None, :])
    tl.store(p_up, tl.trans(val), mask=tl.trans(valid & (ci[:, None] > c[None, :])))


@triton.jit
def _factor_store(f_ptr, new, ci, cj, D, decay):
    """``F[i, j] = decay * F[i, j] + new`` on the lower triangle of the tile (rows ``ci``, columns ``cj``), and the
    same values mirrored onto the upper triangle, so that F is exactly symmetric; ``decay == 0`` reads nothing.

    The tile is done in two halves (even and odd columns, a split that stays within each thread's registers for
    the tensor-core accumulator layout), which halves the address registers of the read-modify-write.
    """
    n_even, n_odd = tl.split(tl.reshape(new, (new.shape[0], new.shape[1] // 2, 2)))
    c_even, c_odd = tl.split(tl.reshape(cj, (cj.shape[0] // 2, 2)))
    _factor_store_cols(f_ptr, n_even, ci, c_even, D, decay)
    _factor_store_cols(f_ptr, n_odd, ci, c_odd, D, decay)


@triton.jit
def _gram_rows(
    pi, pj, mi, mj, ones_i, r_lo, r_hi, sa_r, acc, BR: tl.constexpr, DIAG: tl.constexpr, BIAS: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc += Xi^T Xj`` over rows ``r_lo <= r < r_hi`` in steps of BR, ``Xi = X[rows, ci]``, ``Xj = X[rows, cj]``
    (``pi``, ``pj``: the column pointers of row ``r_lo``). With BIAS, ``Xi`` gets ones in the columns ``ones_i`` on
    valid rows after the load (the loads themselves fill zeros, so they pipeline); ``Xj`` is ``Xi`` with DIAG."""
    rr = tl.arange(0, BR)
    step = rr.to(tl.int64)[:, None] * sa_r
    jump = tl.full((), BR, tl.int64) * sa_r
    for r0 in range(r_lo, r_hi, BR):
        mr = (r0 + rr < r_hi)[:, None]
        xi = tl.load(pi + step, mask=mr & mi, other=0.0)
        if BIAS:
            xi += (ones_i[None, :] & mr).to(tl.float32).to(xi.dtype)
        if DIAG:
            xj = xi
        else:
            xj = tl.load(pj + step, mask=mr & mj, other=0.0)
        acc = _mma(tl.trans(xi), xj, acc, PREC)
        pi += jump
        pj += jump
    return acc


@triton.jit(do_not_specialize=["has_bias", "n_split"])
def _kfac_factor_kernel(
    a_ptr,
    f_ptr,
    ws_ptr,
    R,
    DX,
    D,
    sa_b,
    sa_r,
    sa_d,
    has_bias,
    n_split,
    r_split,
    decay: tl.float64,
    BD: tl.constexpr,
    BR: tl.constexpr,
    PREC: tl.constexpr,
):
    """``F_b <- decay F_b + (1 - decay) ab_b^T ab_b / R`` with ``ab = [a, 1]`` (ones only with bias), ``a: (B, R, DX)``
    the rows (layer inputs or output gradients) whose second moment the factor averages.

    Tiling: grid (lower-triangle (BD x BD) tile of F, b, row split); a program streams its rows of ``a`` in
    (BR x BD) tiles of its two column blocks (one tile on a diagonal block) and accumulates their product. The
    virtual ones column DX is never read from memory: the tiles of the last block row (which holds row DX) set it
    in registers, so their products carry the column sums and the row count; the rest of the bias column is the
    mirror of that row. With one split the epilogue scales, averages and stores the tile and its mirror; with
    several, each split stores its raw tile to its own workspace slice, reduced in order by
    ``_kfac_factor_reduce_kernel`` (deterministic, no atomics).
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    ti, tj = _tri_tile(pid_t)
    acc_ty = f_ptr.dtype.element_ty
    ci = ti * BD + tl.arange(0, BD)
    cj = tj * BD + tl.arange(0, BD)
    r_lo = pid_s * r_split
    r_hi = tl.minimum(r_lo + r_split, R)
    a_b = a_ptr + pid_b.to(tl.int64) * sa_b + r_lo.to(tl.int64) * sa_r
    pi = a_b + ci.to(tl.int64)[None, :] * sa_d
    pj = a_b + cj.to(tl.int64)[None, :] * sa_d
    mi = (ci < DX)[None, :]
    mj = (cj < DX)[None, :]
    ones_i = ci == DX
    acc = tl.zeros((BD, BD), dtype=acc_ty)
    bias_row = (has_bias != 0) & (ti == (D - 1) // BD)
    if ti == tj:
        if bias_row:
            acc = _gram_rows(pi, pj, mi, mj, ones_i, r_lo, r_hi, sa_r, acc, BR, True, True, PREC)
        else:
            acc = _gram_rows(pi, pj, mi, mj, ones_i, r_lo, r_hi, sa_r, acc, BR, True, False, PREC)
    else:
        if bias_row:
            acc = _gram_rows(pi, pj, mi, mj, ones_i, r_lo, r_hi, sa_r, acc, BR, False, True, PREC)
        else:
            acc = _gram_rows(pi, pj, mi, mj, ones_i, r_lo, r_hi, sa_r, acc, BR, False, False, PREC)
    if n_split == 1:
        scale = ((1.0 - _scalar(decay, tl.float64)) / R).to(acc_ty)
        _factor_store(f_ptr + pid_b.to(tl.int64) * D * D, acc * scale, ci, cj, D, decay)
    else:
        w = ws_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_b) * D * D
        valid = (ci < D)[:, None] & (cj < D)[None, :]
        tl.store(w + (ci.to(tl.int64)[:, None] * D + cj[None, :]), acc, mask=valid)


@triton.jit(do_not_specialize=["n_split"])
def _kfac_factor_reduce_kernel(
    ws_ptr,
    f_ptr,
    R,
    D,
    n_split,
    decay: tl.float64,
    BD: tl.constexpr,
):
    """Epilogue of a row-split factor update: ``F_b <- decay F_b + (1 - decay) (sum_s W[s, b]) / R``.

    Tiling: grid (lower-triangle (BD x BD) tile, b); the splits are summed in order (deterministic). BD divides the
    update kernel's tile, so every lower tile here lies in a lower tile written there.
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    nb = tl.num_programs(1)
    ti, tj = _tri_tile(pid_t)
    acc_ty = f_ptr.dtype.element_ty
    ci = ti * BD + tl.arange(0, BD)
    cj = tj * BD + tl.arange(0, BD)
    low = (ci < D)[:, None] & (cj < D)[None, :] & (ci[:, None] >= cj[None, :])
    off = ci.to(tl.int64)[:, None] * D + cj[None, :]
    acc = tl.zeros((BD, BD), dtype=acc_ty)
    for s in range(0, n_split):
        acc += tl.load(ws_ptr + (s * nb + pid_b).to(tl.int64) * D * D + off, mask=low, other=0.0)
    scale = ((1.0 - _scalar(decay, tl.float64)) / R).to(acc_ty)
    _factor_store(f_ptr + pid_b.to(tl.int64) * D * D, acc * scale, ci, cj, D, decay)


# ----------------------------------------------------------------------------------------------------------------
# Newton-Schulz inverse, one matrix per program
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _damped_rows(m_ptr, r, c, D, damp):
    """Rows ``r`` (columns ``c``) of ``M = sym(m) + damp I`` padded with the identity, ``sym`` mirroring the lower
    triangle of ``m``."""
    inside = (r < D)[:, None] & (c < D)[None, :]
    eye = r[:, None] == c[None, :]
    lo = tl.maximum(r[:, None], c[None, :])
    hi = tl.minimum(r[:, None], c[None, :])
    v = tl.load(m_ptr + (lo * D + hi), mask=inside, other=0.0)
    one = eye.to(tl.float32).to(v.dtype)
    return tl.where(inside, v + one * damp, one)


@triton.jit
def _ns_product(
    a_ptr, b_ptr, out_ptr, D, DP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    UPDATE: tl.constexpr,
):
    """``out = A B`` for row-major (DP x DP) ``A``, ``B`` in row blocks of BM over K steps of BK; returns
    ``||A B - I||_F^2`` over the leading (D x D) block. With UPDATE, ``out = 2 A - A B`` written over ``A`` (each row
    block of A is read only by its own step, and all warps have read it before it is overwritten)."""
    rows = tl.arange(0, BM)
    cols = tl.arange(0, DP)
    kk = tl.arange(0, BK)
    acc_ty = out_ptr.dtype.element_ty
    res = tl.zeros((), dtype=acc_ty)
    for i0 in range(0, DP, BM):
        r = i0 + rows
        acc = tl.zeros((BM, DP), dtype=acc_ty)
        for k0 in range(0, DP, BK):
            k = k0 + kk
            x = tl.load(a_ptr + (r[:, None] * DP + k[None, :]))
            y = tl.load(b_ptr + (k[:, None] * DP + cols[None, :]))
            acc = _mma(x, y, acc, PREC)
        tile = r[:, None] * DP + cols[None, :]
        if UPDATE:
            acc = 2.0 * tl.load(a_ptr + tile) - acc
            tl.debug_barrier()
        else:
            inside = (r < D)[:, None] & (cols < D)[None, :]
            e = tl.where(inside, acc - (r[:, None] == cols[None, :]).to(acc_ty), 0.0)
            res += tl.sum(tl.sum(e * e, axis=1), axis=0)
        tl.store(out_ptr + tile, acc)
    return res


@triton.jit(do_not_specialize=["D"])
def _ns_inverse_kernel(
    m_ptr,
    damp_ptr,
    inv_ptr,
    info_ptr,
    ws_ptr,
    D,
    max_iter,
    tol: tl.float64,
    DP: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``X ~ (M + damping I)^{-1}`` by ``X <- X (2I - M X)`` from ``X_0 = I / ||M||_inf``, stopping as soon as
    ``||M X - I||_F / sqrt(D) <= tol`` or after ``max_iter`` updates (``info = 1``: not converged), then one more
    update, which takes a converged X from the tolerance down to rounding.

    The start: X stays a polynomial in the symmetric M, and each eigenvalue ``lambda`` of M evolves on its own,
    ``e <- e^2`` for ``e = 1 - lambda x``. From ``x_0 = 1 / ||M||_inf >= 1 / |lambda|_max``, ``0 <= e_0 < 1`` exactly
    when ``lambda > 0``: a positive definite M converges (in about ``log2(cond)`` steps, half of what a start at
    ``M^T / (||M||_1 ||M||_inf)`` would need; the reference starts here too), while for ``lambda <= 0`` the error
    grows, so an indefinite or singular M never converges and is flagged (``info = 1``), even where its inverse
    would have a positive diagonal. A diagonal entry <= 0 of X also sets ``info``, as in the reference.

    Tiling: one program per matrix runs the whole iteration. M (the lower triangle of the input mirrored, plus the
    damping: exactly symmetric, so ``M^T = M``), X and M X live in the program's own (3, DP, DP) slice of a
    workspace, DP the power of two padding D with the identity (M = X = I there, which the iteration keeps exactly
    and which adds nothing to the residual); at most 3 x 64 KiB (128 KiB for float64) per matrix, so it stays in L2.
    Each product runs over (BM x DP) row blocks and K steps of BK, with a CTA barrier between dependent products;
    the residual is reduced from the M X tiles as they are stored. The output is X's lower triangle, mirrored.
    """
    pid = tl.program_id(0)
    acc_ty = inv_ptr.dtype.element_ty
    m_b = m_ptr + pid.to(tl.int64) * D * D
    p_m = ws_ptr + pid.to(tl.int64) * 3 * DP * DP
    p_x = p_m + DP * DP
    p_mx = p_x + DP * DP
    rows = tl.arange(0, BM)
    cols = tl.arange(0, DP)
    damp = tl.load(damp_ptr + pid).to(acc_ty)
    norm_inf = tl.zeros((), dtype=acc_ty)
    for i0 in range(0, DP, BM):
        r = i0 + rows
        t = _damped_rows(m_b, r, cols, D, damp)
        tl.store(p_m + (r[:, None] * DP + cols[None, :]), t)
        a = tl.where((r < D)[:, None] & (cols < D)[None, :], tl.abs(t), 0.0)
        norm_inf = tl.maximum(norm_inf, tl.max(tl.sum(a, axis=1), axis=0))
    alpha = 1.0 / norm_inf
    for i0 in range(0, DP, BM):
        r = i0 + rows
        eye = r[:, None] == cols[None, :]
        x0 = tl.where(eye & (r < D)[:, None], alpha, eye.to(acc_ty))
        tl.store(p_x + (r[:, None] * DP + cols[None, :]), x0)
    tl.debug_barrier()
    tol_t = _scalar(tol, acc_ty)
    # tl.full, not D.to(): torch.compile passes an int argument equal to 1 as a constexpr
    rdim = tl.sqrt(tl.full((), D, acc_ty))
    res = tl.sqrt(_ns_product(p_m, p_x, p_mx, D, DP, BM, BK, PREC, False)) / rdim
    tl.debug_barrier()
    it = 0
    # a positive definite M keeps every eigen-error below 1, so the residual too: above 2 it has diverged
    while (res > tol_t) & (res <= 2.0) & (it < max_iter):
        _ns_product(p_x, p_mx, p_x, D, DP, BM, BK, PREC, True)
        tl.debug_barrier()
        res = tl.sqrt(_ns_product(p_m, p_x, p_mx, D, DP, BM, BK, PREC, False)) / rdim
        tl.debug_barrier()
        it += 1
    _ns_product(p_x, p_mx, p_x, D, DP, BM, BK, PREC, True)
    tl.debug_barrier()
    o_b = inv_ptr + pid.to(tl.int64) * D * D
    diag_min = tl.full((), float("inf"), acc_ty)
    for i0 in range(0, DP, BM):
        r = i0 + rows
        lo = tl.maximum(r[:, None], cols[None, :])
        hi = tl.minimum(r[:, None], cols[None, :])
        x = tl.load(p_x + (lo * DP + hi))
        inside = (r < D)[:, None] & (cols < D)[None, :]
        tl.store(o_b + (r[:, None] * D + cols[None, :]), x, mask=inside)
        diag_min = tl.minimum(diag_min, tl.min(tl.min(tl.where(inside & (lo == hi), x, float("inf")), axis=1), axis=0))
    # as in the reference, a diagonal entry <= 0 of X flags the matrix too
    tl.store(info_ptr + pid, ((~(res <= tol_t)) | (diag_min <= 0)).to(tl.int32))


# ----------------------------------------------------------------------------------------------------------------
# Batched GEMM with epilogues
# ----------------------------------------------------------------------------------------------------------------

# Epilogues of the batched GEMM: store the product; ``2 C - A B`` (a Newton-Schulz update); divide by
# ``v_i w_j + damping`` (the eigenbasis step); store the product and a per-tile ``||A B - I||_F^2``.
EPI_STORE = 0
EPI_NS_UPDATE = 1
EPI_EIGEN_DIV = 2
EPI_RESIDUAL = 3


@triton.jit
def _bmm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    out_ptr,
    v_ptr,
    w_ptr,
    damp_ptr,
    ws_ptr,
    M,
    N,
    K,
    sa_b,
    sa_m,
    sa_k,
    sb_b,
    sb_k,
    sb_n,
    so_b,
    so_m,
    so_n,
    EPI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``O_b = epi(A_b @ B_b)`` for ``A: (B, M, K)``, ``B: (B, K, N)`` of any strides (transposes are strides) and
    ``O: (B, M, N)``, accumulated in float32 (float64); ``C`` shares ``O``'s strides, ``v: (B, M)``, ``w: (B, N)``
    and ``damping: (B,)`` are contiguous, the residual workspace is ``(B, tiles)``.

    Tiling: grid (BM x BN output tile, b); each program runs over K in steps of BK and applies the epilogue.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    nbn = tl.cdiv(N, BN)
    rm = (pid // nbn) * BM + tl.arange(0, BM)
    rn = (pid % nbn) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    mm = (rm < M)[:, None]
    mn = (rn < N)[None, :]
    pa = a_ptr + pid_b * sa_b + rm.to(tl.int64)[:, None] * sa_m
    pb = b_ptr + pid_b * sb_b + rn.to(tl.int64)[None, :] * sb_n
    acc = tl.zeros((BM, BN), dtype=acc_ty)
    for k0 in range(0, K, BK):
        k = k0 + rk
        x = tl.load(pa + k.to(tl.int64)[None, :] * sa_k, mask=mm & (k < K)[None, :], other=0.0)
        y = tl.load(pb + k.to(tl.int64)[:, None] * sb_k, mask=(k < K)[:, None] & mn, other=0.0)
        acc = _mma(x, y, acc, PREC)
    valid = mm & mn
    off = pid_b * so_b + rm.to(tl.int64)[:, None] * so_m + rn.to(tl.int64)[None, :] * so_n
    if EPI == 1:
        c = tl.load(c_ptr + off, mask=valid, other=0.0).to(acc_ty)
        acc = 2.0 * c - acc
    elif EPI == 2:
        v = tl.load(v_ptr + pid_b * M + rm, mask=rm < M, other=1.0).to(acc_ty)
        w = tl.load(w_ptr + pid_b * N + rn, mask=rn < N, other=1.0).to(acc_ty)
        damp = tl.load(damp_ptr + pid_b).to(acc_ty)
        acc = acc / (v[:, None] * w[None, :] + damp)
    elif EPI == 3:
        r = tl.where(valid, acc - (rm[:, None] == rn[None, :]).to(acc_ty), 0.0)
        tl.store(ws_ptr + pid_b * tl.num_programs(0) + pid, tl.sum(tl.sum(r * r, axis=1), axis=0))
    tl.store(out_ptr + off, _cast(acc, out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# Registry: argument types and configurations of every kernel
# ----------------------------------------------------------------------------------------------------------------


def _factor_configs(dt: str) -> list:
    """Factor tiles (BD x BD) over rows in steps of BR; the launcher takes the smallest BD that covers d."""
    if dt == "fp64":
        return [_cfg(4, 2, BD=32, BR=16), _cfg(4, 2, BD=64, BR=16)]
    if dt == "fp32":
        return [_cfg(4, 3, BD=32, BR=32), _cfg(8, 3, BD=64, BR=32), _cfg(8, 3, BD=128, BR=16)]
    return [_cfg(4, 3, BD=32, BR=64), _cfg(4, 3, BD=64, BR=32), _cfg(8, 3, BD=128, BR=32)]


def _reduce_configs(dt: str) -> list:
    # the workspace and the factor are float32 for every 16-bit input: the float32 entry compiles that code
    if _lowp(dt):
        return []
    return [_cfg(4, 1, BD=32)]


def _ns_configs(dt: str) -> list:
    """One padded order DP per configuration (the smallest power of two >= max(32, d) is launched)."""
    if dt == "fp64":
        return [_cfg(4, 2, DP=32, BM=32, BK=16), _cfg(4, 2, DP=64, BM=32, BK=16), _cfg(8, 2, DP=128, BM=32, BK=16)]
    if dt == "fp32":
        return [_cfg(4, 2, DP=32, BM=32, BK=32), _cfg(4, 2, DP=64, BM=32, BK=32), _cfg(8, 2, DP=128, BM=32, BK=32)]
    return []


def _gemm_tiles(prec: str, acc: str) -> list:
    """(small, large) GEMM tiles; the launcher takes the large one when it still gives every SM a program."""
    if acc == "fp64":
        return [_cfg(4, 2, BM=32, BN=32, BK=16), _cfg(8, 2, BM=64, BN=64, BK=16)]
    if prec in ("tf32x3", "tf32"):
        return [_cfg(4, 3, BM=64, BN=64, BK=32), _cfg(8, 3, BM=128, BN=64, BK=32)]
    return [_cfg(4, 3, BM=64, BN=64, BK=32), _cfg(8, 3, BM=128, BN=128, BK=32)]


class _Gemm(NamedTuple):
    """A use of ``_bmm_kernel``: the dtypes of A, B and O in terms of the input dtype ``dt`` ("in" or "acc"), the
    epilogue, and the input dtypes it is launched for."""

    a: str
    b: str
    out: str
    epi: int
    dtypes: tuple[str, ...]

    def names(self, dt: str) -> dict[str, str]:
        pick = {"in": dt, "acc": _acc_name(dt)}
        return {"a_ptr": pick[self.a], "b_ptr": pick[self.b], "out_ptr": pick[self.out]}

    def prec(self, dt: str) -> str:
        n = self.names(dt)
        return _prec(dt) if n["a_ptr"] == n["b_ptr"] else _mixed_prec(dt)


_GEMMS: dict[str, _Gemm] = {
    # grad @ a_inv, grad @ q_a: inputs in, float32 (float64) intermediate out
    "_bmm_kernel": _Gemm("in", "in", "acc", EPI_STORE, DTYPES),
    # g_inv @ T, q_g @ T: back to the input dtype (the same code as the entry above for float32 / float64)
    "_bmm_kernel[to_in]": _Gemm("in", "acc", "in", EPI_STORE, ("fp16", "bf16")),
    # V @ q_a^T
    "_bmm_kernel[acc_in]": _Gemm("acc", "in", "acc", EPI_STORE, ("fp16", "bf16")),
    # (q_g^T T) / (d_g d_a^T + damping)
    "_bmm_kernel[div]": _Gemm("in", "acc", "acc", EPI_EIGEN_DIV, DTYPES),
    # Newton-Schulz beyond the fused kernel: M X with its residual, and 2 X - X (M X)
    "_bmm_kernel[resid]": _Gemm("acc", "acc", "acc", EPI_RESIDUAL, ("fp32", "fp64")),
    "_bmm_kernel[ns]": _Gemm("acc", "acc", "acc", EPI_NS_UPDATE, ("fp32", "fp64")),
}

_BMM_INTS = ("M", "N", "K", "sa_b", "sa_m", "sa_k", "sb_b", "sb_k", "sb_n", "so_b", "so_m", "so_n")


def _gemm_spec(use: _Gemm) -> KernelSpec:
    def signature(dt: str) -> dict:
        # pointers an epilogue does not read are passed as the output (as the launcher does)
        names = use.names(dt)
        o = names["out_ptr"]
        ptrs = dict(names, c_ptr=o, v_ptr=o, w_ptr=o, damp_ptr=o, ws_ptr=o)
        if use.epi == EPI_NS_UPDATE:
            ptrs["c_ptr"] = _acc_name(dt)
        elif use.epi == EPI_EIGEN_DIV:
            ptrs.update(v_ptr=dt, w_ptr=dt, damp_ptr="fp64")
        elif use.epi == EPI_RESIDUAL:
            ptrs["ws_ptr"] = _acc_name(dt)
        return _sig(ptrs=ptrs, ints=_BMM_INTS)

    def configs(dt: str) -> list:
        return _gemm_tiles(use.prec(dt), _acc_name(dt)) if dt in use.dtypes else []

    return KernelSpec(_bmm_kernel, signature, lambda dt: {"EPI": use.epi, "PREC": use.prec(dt)}, configs)


KERNELS = KernelRegistry(
    {
        "_kfac_factor_kernel": KernelSpec(
            _kfac_factor_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "f_ptr": _acc_name(dt), "ws_ptr": _acc_name(dt)},
                ints=("R", "DX", "D", "sa_b", "sa_r", "sa_d", "has_bias", "n_split", "r_split"),
                floats=("decay",),
            ),
            lambda dt: {"PREC": _prec(dt)},
            _factor_configs,
        ),
        "_kfac_factor_reduce_kernel": KernelSpec(
            _kfac_factor_reduce_kernel,
            lambda dt: _sig(
                ptrs={"ws_ptr": _acc_name(dt), "f_ptr": _acc_name(dt)}, ints=("R", "D", "n_split"), floats=("decay",)
            ),
            lambda dt: {},
            _reduce_configs,
        ),
        "_ns_inverse_kernel": KernelSpec(
            _ns_inverse_kernel,
            lambda dt: _sig(
                ptrs={"m_ptr": dt, "damp_ptr": "fp64", "inv_ptr": dt, "info_ptr": "i32", "ws_ptr": dt},
                ints=("D", "max_iter"),
                floats=("tol",),
            ),
            lambda dt: {"PREC": _prec(dt)},
            _ns_configs,
        ),
        **{name: _gemm_spec(use) for name, use in _GEMMS.items()},
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------


def _ntri(n: int) -> int:
    return n * (n + 1) // 2


def _factor_update(factor: torch.Tensor, x: torch.Tensor, decay: float, bias: bool, n_split: int | None = None):
    if not factor.is_contiguous():
        raise ValueError(f"factor must be contiguous (it is updated in place), got strides {factor.stride()}")
    b, d, _ = factor.shape
    r, dx = x.shape[1], x.shape[2]
    if b == 0:
        return
    dt = _dt(x)
    name = "_kfac_factor_kernel"
    sizes = sorted(c.kwargs["BD"] for c in KERNELS[name].configs(dt))
    bd = next((s for s in sizes if s >= d), sizes[-1])
    meta = KERNELS.fixed(name, dt, BD=bd)
    br = meta["BR"]
    tiles = b * _ntri(triton.cdiv(d, bd))
    if n_split is None:
        # few tiles (small factors, a small batch): split the rows so that the GPU fills, keeping every split at
        # least a few row steps long and the partial factors small next to x
        ws_cap = int(_SPLIT_WS_FRACTION * x.numel() * x.element_size()) // (b * d * d * factor.element_size())
        n_split = max(1, min(triton.cdiv(2 * _num_sms(x.device), tiles), r // (4 * br), ws_cap))
    r_split = triton.cdiv(triton.cdiv(r, n_split), br) * br
    n_split = max(1, triton.cdiv(r, r_split))
    # without a split the kernel writes factor only; ws is a distinct stand-in, never written (passing factor twice
    # would make torch.compile's functionalisation copy back an unwritten alias over the update)
    ws = factor.new_empty((n_split, b, d, d) if n_split > 1 else (1,))
    grid = (_ntri(triton.cdiv(d, bd)), b, n_split)
    _wrap(_kfac_factor_kernel)[grid](
        x, factor, ws, r, dx, d, *x.stride(), int(bias), n_split, r_split, float(decay), PREC=_prec(dt), **meta
    )
    if n_split > 1:
        red = KERNELS.fixed("_kfac_factor_reduce_kernel", _acc_name(dt))
        grid = (_ntri(triton.cdiv(d, red["BD"])), b)
        _wrap(_kfac_factor_reduce_kernel)[grid](ws, factor, r, d, n_split, float(decay), **red)


def _bmm(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    c: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    damping: torch.Tensor | None = None,
    dt: str,
    large: bool | None = None,
) -> torch.Tensor | None:
    """``out = epi(a @ b)`` through the ``_bmm_kernel`` use ``name`` (``a``, ``b`` and ``out`` are 3-d views);
    the residual epilogue returns its per-tile partial sums ``(B, tiles)``."""
    use = _GEMMS[name]
    nb, m, k = a.shape
    n = b.shape[2]
    small, big = _gemm_tiles(use.prec(dt), _acc_name(dt))
    if large is None:
        tiles = nb * triton.cdiv(m, big.kwargs["BM"]) * triton.cdiv(n, big.kwargs["BN"])
        # the interpreter's cost is per program and step: it takes the large tiles
        large = _INTERPRET or tiles >= _num_sms(a.device)
    cfg = big if large else small
    blocks = dict(cfg.kwargs)
    if _INTERPRET:
        # the interpreter's cost is per operation: dimensions past 128 are one block
        for key, dim in (("BM", m), ("BN", n), ("BK", k)):
            if dim > 128:
                blocks[key] = triton.next_power_of_2(dim)
    grid = (triton.cdiv(m, blocks["BM"]) * triton.cdiv(n, blocks["BN"]), nb)
    ws = out.new_empty((nb, grid[0])) if use.epi == EPI_RESIDUAL else None
    _wrap(_bmm_kernel)[grid](
        a,
        b,
        out if c is None else c,
        out,
        out if v is None else v,
        out if w is None else w,
        out if damping is None else damping,
        out if ws is None else ws,
        m,
        n,
        k,
        *a.stride(),
        *b.stride(),
        *out.stride(),
        EPI=use.epi,
        PREC=use.prec(dt),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **blocks,
    )
    return ws


def _bmm_tiles(m: int, n: int, dt: str, name: str, large: bool) -> int:
    cfg = _gemm_tiles(_GEMMS[name].prec(dt), _acc_name(dt))[int(large)]
    return triton.cdiv(m, cfg.kwargs["BM"]) * triton.cdiv(n, cfg.kwargs["BN"])


def _ns_fused(m: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, d, _ = m.shape
    dt = _dt(m)
    max_iter, tol = newton_schulz_defaults(m.dtype)
    inv = torch.empty_like(m, memory_format=torch.contiguous_format)
    info = torch.empty((b,), dtype=torch.int32, device=m.device)
    if b == 0:
        return inv, info
    m = m.contiguous()
    damping = damping.contiguous()
    dp = max(32, triton.next_power_of_2(d))
    meta = KERNELS.fixed("_ns_inverse_kernel", dt, DP=dp)
    if _INTERPRET:
        # one block per product: the interpreter's cost is per operation, not per element
        meta.update(BM=dp, BK=dp)
    ws = m.new_empty((b, 3, dp, dp))
    _wrap(_ns_inverse_kernel)[(b,)](m, damping, inv, info, ws, d, max_iter, tol, PREC=_prec(dt), **meta)
    return inv, info


def _ns_gemm(m: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton-Schulz with ``_bmm_kernel`` products for matrices too large for the fused kernel, in the schedule of
    :func:`pycurv.reference.damped_inverse` (convergence of the whole batch checked on the host every 8 steps)."""
    b, d, _ = m.shape
    dt = _dt(m)
    max_iter, tol = newton_schulz_defaults(m.dtype)
    low = m.tril()
    md = low + low.tril(-1).mT
    md.diagonal(dim1=1, dim2=2).add_(damping.to(m.dtype).unsqueeze(1))
    # the start of the fused kernel: X_0 = I / ||M||_inf (see _ns_inverse_kernel)
    x = torch.eye(d, dtype=md.dtype, device=md.device) / md.abs().sum(2).amax(1).reshape(b, 1, 1)
    mx = torch.empty_like(md)
    x_next = torch.empty_like(md)
    large = _INTERPRET or b * _bmm_tiles(d, d, dt, "_bmm_kernel[resid]", True) >= _num_sms(m.device)
    for it in range(max_iter):
        ws = _bmm("_bmm_kernel[resid]", md, x, mx, dt=dt, large=large)
        res = ws.sum(1).sqrt() / math.sqrt(d)
        # a matrix that is not positive definite diverges from this start (the residual of a positive definite one
        # stays below 1): once it is past 2, it is done
        if it % 8 == 0 and bool(((res <= tol) | ~(res <= 2.0)).all()):
            break
        _bmm("_bmm_kernel[ns]", x, mx, x_next, c=x, dt=dt, large=large)
        x, x_next = x_next, x
    ws = _bmm("_bmm_kernel[resid]", md, x, mx, dt=dt, large=large)
    # as in the reference, a diagonal entry <= 0 of X flags the matrix too
    info = (~(ws.sum(1).sqrt() / math.sqrt(d) <= tol) | (x.diagonal(dim1=1, dim2=2) <= 0).any(1)).to(torch.int32)
    low = x.tril()
    return low + low.tril(-1).mT, info


def _kron(grad: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    b, d_out, d_in = grad.shape
    dt = _dt(grad)
    out = torch.empty((b, d_out, d_in), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    t = torch.empty((b, d_out, d_in), dtype=_TORCH_DTYPE[_acc_name(dt)], device=grad.device)
    _bmm("_bmm_kernel", grad, a_inv, t, dt=dt)
    _bmm("_bmm_kernel[to_in]", g_inv, t, out, dt=dt)
    return out


def _kron_eigen(grad, q_g, q_a, d_g, d_a, damping) -> torch.Tensor:
    b, d_out, d_in = grad.shape
    dt = _dt(grad)
    out = torch.empty((b, d_out, d_in), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    acc = _TORCH_DTYPE[_acc_name(dt)]
    t = torch.empty((b, d_out, d_in), dtype=acc, device=grad.device)
    v = torch.empty((b, d_out, d_in), dtype=acc, device=grad.device)
    _bmm("_bmm_kernel", grad, q_a, t, dt=dt)
    _bmm(
        "_bmm_kernel[div]", q_g.mT, t, v, v=d_g.contiguous(), w=d_a.contiguous(), damping=damping.contiguous(), dt=dt
    )
    # the first product is dead now: its buffer takes V q_a^T
    _bmm("_bmm_kernel[acc_in]" if _lowp(dt) else "_bmm_kernel", v, q_a.mT, t, dt=dt)
    _bmm("_bmm_kernel[to_in]" if _lowp(dt) else "_bmm_kernel", q_g, t, out, dt=dt)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


@_define_op("pycurv::kfac_factor_update_triton", mutates_args=("factor",))
def _factor_update_op(factor: torch.Tensor, x: torch.Tensor, decay: float, bias: bool) -> None:
    _factor_update(factor, x, decay, bias)


@_define_op("pycurv::damped_inverse_triton")
def _ns_op(m: torch.Tensor, damping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if m.shape[-1] <= NS_FUSED_MAX:
        return _ns_fused(m, damping)
    return _ns_gemm(m, damping)


@_define_op("pycurv::kron_precondition_triton")
def _kron_op(grad: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    return _kron(grad, g_inv, a_inv)


@_define_op("pycurv::kron_precondition_eigen_triton")
def _kron_eigen_op(
    grad: torch.Tensor,
    q_g: torch.Tensor,
    q_a: torch.Tensor,
    d_g: torch.Tensor,
    d_a: torch.Tensor,
    damping: torch.Tensor,
) -> torch.Tensor:
    return _kron_eigen(grad, q_g, q_a, d_g, d_a, damping)


if _INTERPRET:

    @_factor_update_op.register_fake
    def _(factor, x, decay, bias):
        return None

    @_ns_op.register_fake
    def _(m, damping):
        inv = torch.empty_like(m, memory_format=torch.contiguous_format)
        return inv, m.new_empty((m.shape[0],), dtype=torch.int32)

    @_kron_op.register_fake
    def _(grad, g_inv, a_inv):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    @_kron_eigen_op.register_fake
    def _(grad, q_g, q_a, d_g, d_a, damping):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)


def kfac_factor_update_triton(factor: torch.Tensor, x: torch.Tensor, decay: float, bias: bool) -> None:
    """In place ``factor <- decay * factor + (1 - decay) * xb^T xb / R``, ``xb = [x, 1]`` (ones with ``bias``), for a
    validated contiguous ``factor: (B, d, d)`` (float32, or float64 with float64 ``x``) and ``x: (B, R, d - bias)``
    of any strides. Exactly symmetric; ``decay == 0`` does not read ``factor``."""
    torch.ops.pycurv.kfac_factor_update_triton(factor, x, float(decay), bool(bias))


def damped_inverse_triton(
    m: torch.Tensor, damping: torch.Tensor, method: str = "newton_schulz"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((m + damping I)^{-1}, info)`` by Newton-Schulz for validated ``m: (B, d, d)`` (float32 / float64, the
    lower triangle read) and ``damping: (B,)`` float64; ``info`` (int32) is 1 where the residual
    ``||M X - I||_F / sqrt(d)`` did not reach the tolerance of :func:`pycurv.reference.newton_schulz_defaults` or
    the inverse has a diagonal entry <= 0 (an indefinite matrix), as in :func:`pycurv.reference.damped_inverse`.

    ``d <= 128``: one fused kernel, a program per matrix, with early exit per matrix. Larger ``d``: the same
    iteration with the batched Triton GEMM ``_bmm_kernel`` (the residual fused into ``M X``, the update into
    ``X (M X)``; the symmetrised, damped start in torch), in the reference's schedule: the batch is checked on the
    host every 8 steps. That path is called here directly rather than through the registered op (which also takes
    it, for direct callers), so that torch.compile breaks the graph at those checks instead of failing to trace them.
    """
    if method != "newton_schulz":
        raise ValueError(f"method must be 'newton_schulz' (the only Triton inverse), got {method!r}")
    if m.shape[-1] <= NS_FUSED_MAX:
        return torch.ops.pycurv.damped_inverse_triton(m, damping)
    with _common._on_device(m):  # the registered op has the same guard
        return _ns_gemm(m, damping)


def kron_precondition_triton(grad: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """``g_inv @ grad @ a_inv`` for validated ``grad: (B, d_out, d_in)``, ``g_inv: (B, d_out, d_out)``,
    ``a_inv: (B, d_in, d_in)`` of one dtype: two batched GEMMs, the intermediate ``grad @ a_inv`` in float32
    (float64); ``grad``'s dtype."""
    return torch.ops.pycurv.kron_precondition_triton(grad, g_inv, a_inv)


def kron_precondition_eigen_triton(
    grad: torch.Tensor,
    q_g: torch.Tensor,
    q_a: torch.Tensor,
    d_g: torch.Tensor,
    d_a: torch.Tensor,
    damping: torch.Tensor,
) -> torch.Tensor:
    """``q_g [(q_g^T grad q_a) / (d_g d_a^T + damping)] q_a^T`` for validated ``grad: (B, d_out, d_in)``,
    ``q_g: (B, d_out, d_out)``, ``q_a: (B, d_in, d_in)``, ``d_g: (B, d_out)``, ``d_a: (B, d_in)`` of one dtype and
    ``damping: (B,)`` float64: four batched GEMMs with float32 (float64) intermediates, the division fused into the
    epilogue of the product ``q_g^T (grad q_a)``, transposes read through strides; ``grad``'s dtype."""
    return torch.ops.pycurv.kron_precondition_eigen_triton(grad, q_g, q_a, d_g, d_a, damping)
