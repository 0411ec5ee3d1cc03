"""Triton kernels of the per-sample gradient family: squared norms, Gram matrix and empirical-Fisher diagonal.

Every kernel reads ``a: (N, T, d_in)`` and ``g: (N, T, d_out)`` through their strides (no copies), multiplies on the
tensor cores (``tl.dot``) in the input dtype with float32 accumulation (float64 stays float64; float32 inputs use
``tf32x3``, three TF32 products that keep float32 accuracy) and writes float32 (float64) results. The bias is the
virtual column of ones after the last input feature: ghost kernels add 1 to ``a_i . a_j``, materialising kernels
select 1.0 for column ``d_in`` while loading ``a``; the ones are never stored.

Each launcher is a ``torch.library.triton_op`` (``torch.ops.pycurv.<op>_triton``) calling
``torch.library.wrap_triton(kernel)[grid](...)``, so torch.compile traces through it (under ``TRITON_INTERPRET=1``
an opaque ``custom_op`` with stated output shapes); the public names ``<op>_triton`` are plain functions over those
ops. ``KERNELS`` lists every kernel with its argument types and every
configuration (autotune configs and the constexpr specialisations the launchers pick), so that
tests/test_triton_compile.py can compile all of them for Hopper.

Sources: Goodfellow 2015 (arXiv 1510.01799) and Li et al. 2022 (arXiv 2110.05679) for the ghost identity
``<G_i, G_j> = sum((A_i A_j^T) * (B_i B_j^T))``; Dangel, Kunstner & Hennig 2020 (BackPACK, arXiv 1912.10985) for the
second moment ``sum_n G_n * G_n``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _INTERPRET,
    DTYPES,
    KernelRegistry,
    KernelSpec,
    _acc_name,
    _cfg,
    _define_op,
    _dt,
    _mma,
    _num_sms,
    _out_dtype,
    _prec,
    _sig,
    _wrap,
)

__all__ = [
    "DTYPES",
    "KERNELS",
    "KernelSpec",
    "ef_diag_triton",
    "per_sample_grad_sqnorms_triton",
    "per_sample_gram_triton",
]

# Materialised Gram: the per-sample gradients of one (d_out, d_in) chunk live in a workspace of at most this many
# bytes, so that extra memory stays bounded for large layers and the chunk is re-read from L2 where it fits.
_GRAM_CHUNK_BYTES = 32 << 20
# True stores that workspace in bfloat16 for bfloat16 inputs (as a bfloat16 einsum rounds G: half the bytes);
# the default keeps float32 G for every 16-bit input, multiplied in TF32, which rounds it less than bfloat16.
_GRAM_WS_LOWP = False


# ----------------------------------------------------------------------------------------------------------------
# Ghost kernel (Gram and squared norms)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["has_bias"])
def _ghost_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    N,
    T,
    DI,
    DO,
    sa_n,
    sa_t,
    sa_d,
    sg_n,
    sg_t,
    sg_d,
    has_bias,
    BN: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    DIAG: tl.constexpr,
    PREC: tl.constexpr,
):
    """``K_ij = sum_{t,s} (a_it . a_js + bias)(g_it . g_js)``; with DIAG only ``K_ii`` (the squared norms).

    Tiling: program (I, J) owns a (BN x BN) block of sample pairs; rows of a tile are (sample, step) pairs
    ``(n, t) = (r // BT, r % BT)``, so that ``BN * BT = 64`` rows (32 for float64) feed ``tl.dot`` even when N or T
    is tiny; for each pair of step chunks it forms ``S_a = A_I A_J^T`` over d_in and ``S_b = B_I B_J^T`` over d_out
    and accumulates their product; the (BT x BT) step blocks are summed into sample pairs at the end. Diagonal
    blocks visit step chunks s >= t only and add the mirrored tile.
    """
    R: tl.constexpr = BN * BT
    pid_i = tl.program_id(0)
    if DIAG:
        pid_j = pid_i
    else:
        pid_j = tl.program_id(1)
    if pid_j >= pid_i:
        acc_ty = out_ptr.dtype.element_ty
        r = tl.arange(0, R)
        rn = r // BT
        rt = r % BT
        ni = pid_i * BN + rn
        nj = pid_j * BN + rn
        kk = tl.arange(0, BK)
        on_diag = pid_i == pid_j
        # (row, column) = ((sample, step), (sample, step)) products; reduced over steps once, after the loops
        acc = tl.zeros((R, R), dtype=acc_ty)
        # step-chunk pairs (s > t) of a diagonal block, whose transposes are added at the end
        upper = tl.zeros((R, R), dtype=acc_ty)
        for t0 in range(0, T, BT):
            ti = t0 + rt
            mi = (ni < N) & (ti < T)
            ai = a_ptr + ni.to(tl.int64) * sa_n + ti.to(tl.int64) * sa_t
            gi = g_ptr + ni.to(tl.int64) * sg_n + ti.to(tl.int64) * sg_t
            # on a diagonal block, the (s-chunk, t-chunk) tile is the transpose of the (t-chunk, s-chunk) one:
            # visit s >= t only
            s_lo = t0 * on_diag.to(tl.int32)
            for s0 in range(s_lo, T, BT):
                sj = s0 + rt
                mj = (nj < N) & (sj < T)
                aj = a_ptr + nj.to(tl.int64) * sa_n + sj.to(tl.int64) * sa_t
                gj = g_ptr + nj.to(tl.int64) * sg_n + sj.to(tl.int64) * sg_t
                s_a = tl.zeros((R, R), dtype=acc_ty)
                for k0 in range(0, DI, BK):
                    k = k0 + kk
                    off = k.to(tl.int64)[None, :] * sa_d
                    mk = (k < DI)[None, :]
                    x = tl.load(ai[:, None] + off, mask=mi[:, None] & mk, other=0.0)
                    y = tl.load(aj[:, None] + off, mask=mj[:, None] & mk, other=0.0)
                    s_a = _mma(x, tl.trans(y), s_a, PREC)
                s_b = tl.zeros((R, R), dtype=acc_ty)
                for k0 in range(0, DO, BK):
                    k = k0 + kk
                    off = k.to(tl.int64)[None, :] * sg_d
                    mk = (k < DO)[None, :]
                    x = tl.load(gi[:, None] + off, mask=mi[:, None] & mk, other=0.0)
                    y = tl.load(gj[:, None] + off, mask=mj[:, None] & mk, other=0.0)
                    s_b = _mma(x, tl.trans(y), s_b, PREC)
                # the bias is a ones column appended to a: a_i . a_j + 1 (padded rows have s_b == 0)
                m = (s_a + has_bias) * s_b
                mirror = (on_diag & (s0 > t0)).to(acc_ty)
                if DIAG:
                    # only the diagonal is kept, where the mirrored tile contributes the same again
                    acc += m * (1 + mirror)
                else:
                    acc += m
                    upper += m * mirror
        if not DIAG:
            acc += tl.trans(upper)
        if BT == 1:
            res = acc
        else:
            res = tl.sum(tl.sum(tl.reshape(acc, (BN, BT, BN, BT)), axis=3), axis=1)
        on = pid_i * BN + tl.arange(0, BN)
        om = pid_j * BN + tl.arange(0, BN)
        if DIAG:
            d = tl.sum(tl.where(on[:, None] == om[None, :], res, 0.0), axis=1)
            tl.store(out_ptr + on, d, mask=on < N)
        else:
            valid = (on[:, None] < N) & (om[None, :] < N)
            # upper triangle as computed, strict upper mirrored: K is exactly symmetric and no element is
            # written twice (two threads storing one address would race)
            tl.store(
                out_ptr + on.to(tl.int64)[:, None] * N + om[None, :], res, mask=valid & (on[:, None] <= om[None, :])
            )
            tl.store(
                out_ptr + om.to(tl.int64)[None, :] * N + on[:, None], res, mask=valid & (on[:, None] < om[None, :])
            )


def _ghost_shapes(dt: str) -> tuple[tuple[int, int], ...]:
    """(BN, BT) pairs with BN * BT = R rows per tile (R = 32 for float64, whose four R x R accumulators take
    twice the registers); the launcher picks the one that pads least."""
    r = 32 if dt == "fp64" else 64
    return tuple((r // bt, bt) for bt in (1, 4, 16, r))


def _ghost_shape(dt: str, n: int, t: int, diag: bool) -> tuple[int, int]:
    p = 1 if diag else 2
    return min(_ghost_shapes(dt), key=lambda s: triton.cdiv(n, s[0]) ** p * triton.cdiv(t, s[1]) ** 2)


@triton.jit(do_not_specialize=["has_bias"])
def _sqnorm_t1_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    N,
    DI,
    DO,
    sa_n,
    sa_d,
    sg_n,
    sg_d,
    has_bias,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``s_n = (||a_n||^2 + bias) ||g_n||^2`` for T = 1.

    Tiling: a program reduces BN samples, streaming (BN x BK) tiles of a and then of g.
    """
    acc_ty = out_ptr.dtype.element_ty
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = (n < N)[:, None]
    kk = tl.arange(0, BK)
    pa = a_ptr + n.to(tl.int64)[:, None] * sa_n
    pg = g_ptr + n.to(tl.int64)[:, None] * sg_n
    qa = tl.zeros((BN, BK), dtype=acc_ty)
    for k0 in range(0, DI, BK):
        k = k0 + kk
        x = tl.load(pa + k.to(tl.int64)[None, :] * sa_d, mask=mn & (k < DI)[None, :], other=0.0).to(acc_ty)
        qa += x * x
    qg = tl.zeros((BN, BK), dtype=acc_ty)
    for k0 in range(0, DO, BK):
        k = k0 + kk
        x = tl.load(pg + k.to(tl.int64)[None, :] * sg_d, mask=mn & (k < DO)[None, :], other=0.0).to(acc_ty)
        qg += x * x
    s = (tl.sum(qa, axis=1) + has_bias) * tl.sum(qg, axis=1)
    tl.store(out_ptr + n, s, mask=n < N)


# ----------------------------------------------------------------------------------------------------------------
# Materialising kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_tile(
    a_n,
    g_n,
    o,
    mo,
    i,
    T,
    DI,
    has_bias,
    sa_t,
    sa_d,
    sg_t,
    sg_d,
    acc,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc += G_n[o, i] = sum_t g[n, t, o] a[n, t, i]`` (one column ``i == DI`` of ones with bias)."""
    mi = (i < DI)[None, :]
    # the bias column i == DI reads as 1.0 through the masked load's fill value; rows past T read it too, but they
    # meet zero rows of g
    ones = ((i == DI) & (has_bias != 0)).to(tl.float32).to(a_n.dtype.element_ty)[None, :]
    tt = tl.arange(0, BT)
    po = o.to(tl.int64)[None, :] * sg_d
    pi = i.to(tl.int64)[None, :] * sa_d
    for t0 in range(0, T, BT):
        t = t0 + tt
        mt = (t < T)[:, None]
        tg = tl.load(g_n + t.to(tl.int64)[:, None] * sg_t + po, mask=mt & mo[None, :], other=0.0)
        ta = tl.load(a_n + t.to(tl.int64)[:, None] * sa_t + pi, mask=mt & mi, other=ones)
        acc = _mma(tl.trans(tg), ta, acc, PREC)
    return acc


@triton.jit(do_not_specialize=["has_bias"])
def _grad_chunk_kernel(
    a_ptr,
    g_ptr,
    j_ptr,
    N,
    T,
    DI,
    DO,
    sa_n,
    sa_t,
    sa_d,
    sg_n,
    sg_t,
    sg_d,
    has_bias,
    o0,
    o_len,
    i0,
    i_len,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``J[n, o - o0, i - i0] = G_n[o, i]`` for one chunk ``o0 <= o < o0 + o_len``, ``i0 <= i < i0 + i_len``.

    Tiling: one program per (sample, BO x BI tile), a batched GEMM over T; the chunk's tiles of one sample are
    neighbours in launch order, so its rows of a and g are reused from L2.
    """
    pid = tl.program_id(0)
    nob = tl.cdiv(o_len, BO)
    nib = tl.cdiv(i_len, BI)
    n = pid // (nob * nib)
    rest = pid % (nob * nib)
    ob = rest // nib
    ib = rest % nib
    lo = ob * BO + tl.arange(0, BO)
    li = ib * BI + tl.arange(0, BI)
    mo = lo < o_len
    acc = tl.zeros((BO, BI), dtype=tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32)
    acc = _grad_tile(
        a_ptr + n.to(tl.int64) * sa_n,
        g_ptr + n.to(tl.int64) * sg_n,
        o0 + lo,
        mo,
        i0 + li,
        T,
        DI,
        has_bias,
        sa_t,
        sa_d,
        sg_t,
        sg_d,
        acc,
        BT,
        PREC,
    )
    pj = j_ptr + n.to(tl.int64) * o_len * i_len + lo.to(tl.int64)[:, None] * i_len + li[None, :]
    tl.store(pj, acc.to(j_ptr.dtype.element_ty), mask=mo[:, None] & (li < i_len)[None, :])


@triton.jit
def _gram_acc_kernel(
    x_ptr,
    ws_ptr,
    N,
    L,
    l_split,
    first,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``W[s] (+)= X[:, cols_s] X[:, cols_s]^T`` for a row-major ``X: (N, L)`` and the s-th column range.

    Tiling: grid (split, I, J) with J >= I; each program streams its column range in (BN x BK) tiles (a diagonal
    block loads one tile per step and multiplies it by itself) and adds its block to its own slice of the
    (split, N, N) workspace, mirrored; deterministic, no atomics.
    """
    pid_s = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    if pid_j >= pid_i:
        acc_ty = ws_ptr.dtype.element_ty
        ni = pid_i * BN + tl.arange(0, BN)
        nj = pid_j * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        lo = pid_s * l_split
        hi = tl.minimum(lo + l_split, L)
        pi = x_ptr + ni.to(tl.int64)[:, None] * L
        pj = x_ptr + nj.to(tl.int64)[:, None] * L
        mi = (ni < N)[:, None]
        mj = (nj < N)[:, None]
        acc = tl.zeros((BN, BN), dtype=acc_ty)
        if pid_i == pid_j:
            for k0 in range(lo, hi, BK):
                k = k0 + kk
                x = tl.load(pi + k[None, :], mask=mi & (k < hi)[None, :], other=0.0)
                acc = _mma(x, tl.trans(x), acc, PREC)
        else:
            for k0 in range(lo, hi, BK):
                k = k0 + kk
                mk = (k < hi)[None, :]
                x = tl.load(pi + k[None, :], mask=mi & mk, other=0.0)
                y = tl.load(pj + k[None, :], mask=mj & mk, other=0.0)
                acc = _mma(x, tl.trans(y), acc, PREC)
        valid = (ni[:, None] < N) & (nj[None, :] < N)
        w = ws_ptr + pid_s.to(tl.int64) * N * N
        up = w + ni.to(tl.int64)[:, None] * N + nj[None, :]
        lw = w + nj.to(tl.int64)[None, :] * N + ni[:, None]
        m_up = valid & (ni[:, None] <= nj[None, :])
        m_lw = valid & (ni[:, None] < nj[None, :])
        keep = first == 0
        tl.store(up, acc + tl.load(up, mask=m_up & keep, other=0.0), mask=m_up)
        tl.store(lw, acc + tl.load(lw, mask=m_lw & keep, other=0.0), mask=m_lw)


@triton.jit(do_not_specialize=["has_bias"])
def _sqnorm_mat_kernel(
    a_ptr,
    g_ptr,
    ws_ptr,
    N,
    T,
    DI,
    DO,
    sa_n,
    sa_t,
    sa_d,
    sg_n,
    sg_t,
    sg_d,
    has_bias,
    ws_stride,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``W[n, ob] = sum_{o in ob, i} G_n[o, i]^2`` (bias column included); ``s_n = sum_ob W[n, ob]``.

    Tiling: one program per (sample, BO-row block of G_n), walking the BI-column tiles of that block, each a
    GEMM over T, squared and summed in registers; partial sums go to distinct slots, so no atomics.
    """
    pid = tl.program_id(0)
    nob = tl.cdiv(DO, BO)
    n = pid // nob
    ob = pid % nob
    o = ob * BO + tl.arange(0, BO)
    mo = o < DO
    acc_ty = ws_ptr.dtype.element_ty
    a_n = a_ptr + n.to(tl.int64) * sa_n
    g_n = g_ptr + n.to(tl.int64) * sg_n
    sq = tl.zeros((BO, BI), dtype=acc_ty)
    for i0 in range(0, DI + has_bias, BI):
        i = i0 + tl.arange(0, BI)
        gt = tl.zeros((BO, BI), dtype=acc_ty)
        gt = _grad_tile(a_n, g_n, o, mo, i, T, DI, has_bias, sa_t, sa_d, sg_t, sg_d, gt, BT, PREC)
        sq += gt * gt
    tl.store(ws_ptr + n.to(tl.int64) * ws_stride + ob, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit(do_not_specialize=["has_bias"])
def _ef_diag_kernel(
    a_ptr,
    g_ptr,
    ws_ptr,
    N,
    T,
    DI,
    DO,
    sa_n,
    sa_t,
    sa_d,
    sg_n,
    sg_t,
    sg_d,
    has_bias,
    n_split,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BT: tl.constexpr,
    PREC: tl.constexpr,
):
    """``W[s, o, i] = sum_{n in split s} G_n[o, i]^2`` over columns ``i < DI + bias``.

    Tiling: grid (BO x BI tile, sample split); each program loops over its samples, forms the G_n tile by a GEMM
    over T and accumulates its square in registers; splits of the sample range fill the GPU for small layers.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    DIB = DI + has_bias
    nib = tl.cdiv(DIB, BI)
    o = (pid // nib) * BO + tl.arange(0, BO)
    i = (pid % nib) * BI + tl.arange(0, BI)
    mo = o < DO
    acc_ty = ws_ptr.dtype.element_ty
    sq = tl.zeros((BO, BI), dtype=acc_ty)
    n_lo = pid_s * n_split
    n_hi = tl.minimum(n_lo + n_split, N)
    a_n = a_ptr + n_lo.to(tl.int64) * sa_n
    g_n = g_ptr + n_lo.to(tl.int64) * sg_n
    for _ in range(n_lo, n_hi):
        gt = tl.zeros((BO, BI), dtype=acc_ty)
        gt = _grad_tile(a_n, g_n, o, mo, i, T, DI, has_bias, sa_t, sa_d, sg_t, sg_d, gt, BT, PREC)
        sq += gt * gt
        a_n += sa_n
        g_n += sg_n
    w = ws_ptr + pid_s.to(tl.int64) * DO * DIB + o.to(tl.int64)[:, None] * DIB + i[None, :]
    tl.store(w, sq, mask=mo[:, None] & (i < DIB)[None, :])


@triton.jit(do_not_specialize=["has_bias"])
def _ef_diag_t1_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    N,
    DI,
    DO,
    sa_n,
    sa_d,
    sg_n,
    sg_d,
    has_bias,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BS: tl.constexpr,
    PREC: tl.constexpr,
):
    """``D[o, i] = sum_n g[n, o]^2 a[n, i]^2`` for T = 1, i.e. ``D = (g*g)^T (a*a)`` with a ones column for bias.

    Tiling: one program per (BO x BI) tile of D, a GEMM over the samples in steps of BS on squares formed in the
    accumulation dtype (tf32x3 keeps them float32-exact).
    """
    pid = tl.program_id(0)
    DIB = DI + has_bias
    nib = tl.cdiv(DIB, BI)
    o = (pid // nib) * BO + tl.arange(0, BO)
    i = (pid % nib) * BI + tl.arange(0, BI)
    mo = (o < DO)[None, :]
    mi = (i < DI)[None, :]
    ones = ((i == DI) & (has_bias != 0))[None, :]
    acc_ty = out_ptr.dtype.element_ty
    po = o.to(tl.int64)[None, :] * sg_d
    pi = i.to(tl.int64)[None, :] * sa_d
    ss = tl.arange(0, BS)
    acc = tl.zeros((BO, BI), dtype=acc_ty)
    for n0 in range(0, N, BS):
        n = n0 + ss
        mn = (n < N)[:, None]
        tg = tl.load(g_ptr + n.to(tl.int64)[:, None] * sg_n + po, mask=mn & mo, other=0.0).to(acc_ty)
        ta = tl.load(a_ptr + n.to(tl.int64)[:, None] * sa_n + pi, mask=mn & mi, other=0.0).to(acc_ty)
        ta = ta + (ones & mn).to(acc_ty)
        acc = _mma(tl.trans(tg * tg), ta * ta, acc, PREC)
    tl.store(out_ptr + o.to(tl.int64)[:, None] * DIB + i[None, :], acc, mask=(o < DO)[:, None] & (i < DIB)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Registry: argument types and configurations of every kernel
# ----------------------------------------------------------------------------------------------------------------


def _ws_name(dt: str) -> str:
    """Dtype of the materialised-Gram workspace for inputs of dtype ``dt``."""
    if dt == "bf16" and _GRAM_WS_LOWP:
        return "bf16"
    return _acc_name(dt)


def _ws_prec(dt: str) -> str:
    """Input precision of the workspace Gram: a float32 workspace from 16-bit inputs (float16 could overflow) is
    multiplied in TF32, which rounds G no worse than the input dtype would; from float32 inputs, in tf32x3."""
    if _ws_name(dt) != "fp32":
        return "ieee"
    return "tf32x3" if dt == "fp32" else "tf32"


_STRIDES = ("sa_n", "sa_t", "sa_d", "sg_n", "sg_t", "sg_d")


def _ghost_configs(dt: str) -> list:
    bk, stages = {"fp64": (16, 1), "fp32": (16, 3)}.get(dt, (32, 3))
    warps = 4 if dt == "fp64" else 8
    return [
        _cfg(warps, stages, BN=bn, BT=bt, BK=bk, DIAG=diag) for diag in (False, True) for bn, bt in _ghost_shapes(dt)
    ]


def _gemm_configs(dt: str) -> list:
    """Tiles of the per-sample-gradient GEMM (over T)."""
    if dt == "fp64":
        return [_cfg(4, 2, BO=32, BI=32, BT=16)]
    if dt == "fp32":
        return [_cfg(4, 3, BO=64, BI=64, BT=32), _cfg(8, 3, BO=128, BI=64, BT=32)]
    return [_cfg(4, 4, BO=64, BI=128, BT=64), _cfg(8, 3, BO=128, BI=128, BT=64), _cfg(8, 3, BO=64, BI=256, BT=64)]


def _sq_configs(dt: str) -> list:
    """Tiles of the kernels that keep two (BO x BI) accumulators (G tile and its running square)."""
    if dt == "fp64":
        return [_cfg(4, 2, BO=32, BI=32, BT=16)]
    if dt == "fp32":
        return [_cfg(8, 3, BO=64, BI=64, BT=16)]
    return [_cfg(4, 3, BO=64, BI=64, BT=64), _cfg(8, 3, BO=64, BI=128, BT=64), _cfg(8, 3, BO=128, BI=64, BT=64)]


def _sqnorm_mat_configs(dt: str) -> list:
    """One tile per dtype: the (BO x BI) tile sets how ||G_n||^2 is split into partial sums, so a choice made by
    timing would make the rounding of the result depend on the run; the other kernels' tiles only decide which
    program computes an output element, not the order of its sum."""
    return _sq_configs(dt)[:1]


def _ef_t1_configs(dt: str) -> list:
    if dt == "fp64":
        return [_cfg(4, 2, BO=32, BI=32, BS=16)]
    return [_cfg(4, 3, BO=64, BI=64, BS=32), _cfg(8, 3, BO=128, BI=64, BS=32)]


def _gram_acc_configs(dt: str) -> list:
    ws = _ws_name(dt)
    if ws == "bf16":
        return [_cfg(4, 3, BN=64, BK=64)]
    if ws == "fp64":
        return [_cfg(8, 2, BN=64, BK=16)]
    return [_cfg(8, 3, BN=64, BK=32)]


def _sqnorm_t1_configs(dt: str) -> list:
    return [_cfg(4, 2, BN=8, BK=128)]


_AG_INTS = ("N", "T", "DI", "DO") + _STRIDES + ("has_bias",)

KERNELS = KernelRegistry(
    {
        "_ghost_kernel": KernelSpec(
            _ghost_kernel,
            lambda dt: _sig(ptrs={"a_ptr": dt, "g_ptr": dt, "out_ptr": _acc_name(dt)}, ints=_AG_INTS),
            lambda dt: {"PREC": _prec(dt)},
            _ghost_configs,
        ),
        "_sqnorm_t1_kernel": KernelSpec(
            _sqnorm_t1_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "g_ptr": dt, "out_ptr": _acc_name(dt)},
                ints=("N", "DI", "DO", "sa_n", "sa_d", "sg_n", "sg_d", "has_bias"),
            ),
            lambda dt: {},
            _sqnorm_t1_configs,
        ),
        "_grad_chunk_kernel": KernelSpec(
            _grad_chunk_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "g_ptr": dt, "j_ptr": _ws_name(dt)}, ints=_AG_INTS + ("o0", "o_len", "i0", "i_len")
            ),
            lambda dt: {"PREC": _prec(dt)},
            _gemm_configs,
        ),
        "_gram_acc_kernel": KernelSpec(
            _gram_acc_kernel,
            lambda dt: _sig(ptrs={"x_ptr": _ws_name(dt), "ws_ptr": _acc_name(dt)}, ints=("N", "L", "l_split", "first")),
            lambda dt: {"PREC": _ws_prec(dt)},
            _gram_acc_configs,
        ),
        "_sqnorm_mat_kernel": KernelSpec(
            _sqnorm_mat_kernel,
            lambda dt: _sig(ptrs={"a_ptr": dt, "g_ptr": dt, "ws_ptr": _acc_name(dt)}, ints=_AG_INTS + ("ws_stride",)),
            lambda dt: {"PREC": _prec(dt)},
            _sqnorm_mat_configs,
        ),
        "_ef_diag_kernel": KernelSpec(
            _ef_diag_kernel,
            lambda dt: _sig(ptrs={"a_ptr": dt, "g_ptr": dt, "ws_ptr": _acc_name(dt)}, ints=_AG_INTS + ("n_split",)),
            lambda dt: {"PREC": _prec(dt)},
            _sq_configs,
        ),
        "_ef_diag_t1_kernel": KernelSpec(
            _ef_diag_t1_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "g_ptr": dt, "out_ptr": _acc_name(dt)},
                ints=("N", "DI", "DO", "sa_n", "sa_d", "sg_n", "sg_d", "has_bias"),
            ),
            # squares are formed in the accumulation dtype, so every input dtype multiplies float32 (float64)
            lambda dt: {"PREC": "ieee" if dt == "fp64" else "tf32x3"},
            _ef_t1_configs,
        ),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------


def _ag_args(a: torch.Tensor, g: torch.Tensor, has_bias: int) -> tuple:
    n, t, di = a.shape
    do = g.shape[2]
    return (n, t, di, do, *a.stride(), *g.stride(), has_bias)


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


def _ghost(a: torch.Tensor, g: torch.Tensor, bias: bool, diag: bool) -> torch.Tensor:
    n, t = a.shape[0], a.shape[1]
    dt = _dt(a)
    bn, bt = _ghost_shape(dt, n, t, diag)
    meta = KERNELS.fixed("_ghost_kernel", dt, BN=bn, BT=bt, DIAG=diag)
    nb = triton.cdiv(n, bn)
    out = torch.empty((n,) if diag else (n, n), device=a.device, dtype=_out_dtype(a))
    grid = (nb,) if diag else (nb, nb)
    _wrap(_ghost_kernel)[grid](a, g, out, *_ag_args(a, g, int(bias)), PREC=_prec(dt), **meta)
    return out


def _gram_materialize(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    n, _, di = a.shape
    do = g.shape[2]
    dt = _dt(a)
    dib = di + int(bias)
    ws_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[_ws_name(dt)]
    # chunk of (co x ci) gradient entries per sample: the whole layer if it fits, else square-ish blocks whose
    # sides are multiples of 128 (every tile size)
    cap = max(_GRAM_CHUNK_BYTES // (n * ws_dtype.itemsize), 128 * 128)
    if do * dib <= cap:
        co, ci = do, dib
    else:
        ci = min(dib, max(128, 1 << ((cap.bit_length() - 1) // 2)))
        co = min(do, max(128, cap // ci // 128 * 128))
    j = torch.empty(n * co * ci, device=a.device, dtype=ws_dtype)

    acc = KERNELS.fixed("_gram_acc_kernel", dt)
    nb = triton.cdiv(n, acc["BN"])
    pairs = nb * (nb + 1) // 2
    l_max = co * ci
    # one wave of programs: each re-reads and re-writes its (BN x BN) slice once per chunk
    n_split = max(1, min(triton.cdiv(_num_sms(a.device), pairs), triton.cdiv(l_max, 4 * acc["BK"])))
    ws = torch.empty((n_split, n, n), device=a.device, dtype=_out_dtype(a))

    chunk = _wrap(KERNELS.tuned("_grad_chunk_kernel", dt, ("T", "o_len", "i_len")))
    gram = _wrap(_gram_acc_kernel)
    args = _ag_args(a, g, int(bias))
    prec = _prec(dt)
    ws_prec = _ws_prec(dt)
    first = 1
    for o0 in range(0, do, co):
        o_len = min(co, do - o0)
        for i0 in range(0, dib, ci):
            i_len = min(ci, dib - i0)

            def grid(meta, o_len=o_len, i_len=i_len):
                return (n * triton.cdiv(o_len, meta["BO"]) * triton.cdiv(i_len, meta["BI"]),)

            chunk[grid](a, g, j, *args, o0, o_len, i0, i_len, PREC=prec)
            length = o_len * i_len
            l_split = triton.cdiv(triton.cdiv(length, n_split), acc["BK"]) * acc["BK"]
            gram[(n_split, nb, nb)](j, ws, n, length, l_split, first, PREC=ws_prec, **acc)
            first = 0
    return ws[0] if n_split == 1 else ws.sum(0)


def _sqnorms_materialize(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    n = a.shape[0]
    do = g.shape[2]
    dt = _dt(a)
    meta = KERNELS.fixed("_sqnorm_mat_kernel", dt)  # one tile per dtype: see _sqnorm_mat_configs
    nob = triton.cdiv(do, meta["BO"])
    ws = torch.empty((n, nob), device=a.device, dtype=_out_dtype(a))  # every slot is written
    _wrap(_sqnorm_mat_kernel)[(n * nob,)](a, g, ws, *_ag_args(a, g, int(bias)), nob, PREC=_prec(dt), **meta)
    return ws.sum(1)


def _ef_diag(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    n, t, di = a.shape
    do = g.shape[2]
    dt = _dt(a)
    dib = di + int(bias)
    if t == 1:
        kern = _wrap(KERNELS.tuned("_ef_diag_t1_kernel", dt, ("N", "DI", "DO")))
        out = torch.empty((do, dib), device=a.device, dtype=_out_dtype(a))
        kern[lambda meta: (triton.cdiv(do, meta["BO"]) * triton.cdiv(dib, meta["BI"]),)](
            a[:, 0],
            g[:, 0],
            out,
            n,
            di,
            do,
            a.stride(0),
            a.stride(2),
            g.stride(0),
            g.stride(2),
            int(bias),
            PREC="ieee" if dt == "fp64" else "tf32x3",
        )
        return out
    # split the samples so that the largest tiles still give every SM a couple of programs, workspace <= 4 slices
    big = max(KERNELS["_ef_diag_kernel"].configs(dt), key=lambda c: c.kwargs["BO"] * c.kwargs["BI"]).kwargs
    tiles = triton.cdiv(do, big["BO"]) * triton.cdiv(dib, big["BI"])
    splits = max(1, min(4, n, triton.cdiv(2 * _num_sms(a.device), tiles)))
    n_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, n_split)
    ws = torch.empty((splits, do, dib), device=a.device, dtype=_out_dtype(a))
    kern = _wrap(KERNELS.tuned("_ef_diag_kernel", dt, ("T", "DI", "DO", "n_split")))
    kern[lambda meta: (triton.cdiv(do, meta["BO"]) * triton.cdiv(dib, meta["BI"]), splits)](
        a, g, ws, *_ag_args(a, g, int(bias)), n_split, PREC=_prec(dt)
    )
    return ws[0] if splits == 1 else ws.sum(0)


def _sqnorm_t1(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    n, _, di = a.shape
    do = g.shape[2]
    meta = KERNELS.fixed("_sqnorm_t1_kernel", _dt(a))
    out = torch.empty((n,), device=a.device, dtype=_out_dtype(a))
    _wrap(_sqnorm_t1_kernel)[(triton.cdiv(n, meta["BN"]),)](
        a, g, out, n, di, do, a.stride(0), a.stride(2), g.stride(0), g.stride(2), int(bias), **meta
    )
    return out


@_define_op("pycurv::per_sample_grad_sqnorms_triton")
def _sqnorms_op(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    if method == "materialize":
        return _sqnorms_materialize(a, g, bias)
    if a.shape[1] == 1:
        return _sqnorm_t1(a, g, bias)
    return _ghost(a, g, bias, diag=True)


@_define_op("pycurv::per_sample_gram_triton")
def _gram_op(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    if method == "materialize":
        return _gram_materialize(a, g, bias)
    return _ghost(a, g, bias, diag=False)


@_define_op("pycurv::ef_diag_triton")
def _ef_diag_op(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    return _ef_diag(a, g, bias)


if _INTERPRET:

    @_sqnorms_op.register_fake
    def _(a, g, bias, method):
        return a.new_empty((a.shape[0],), dtype=_out_dtype(a))

    @_gram_op.register_fake
    def _(a, g, bias, method):
        return a.new_empty((a.shape[0], a.shape[0]), dtype=_out_dtype(a))

    @_ef_diag_op.register_fake
    def _(a, g, bias):
        return a.new_empty((g.shape[2], a.shape[2] + int(bias)), dtype=_out_dtype(a))


def _check_method(method: str) -> None:
    if method not in ("ghost", "materialize"):
        raise ValueError(f"method must be 'ghost' or 'materialize', got {method!r}")


def per_sample_grad_sqnorms_triton(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    """``||G_n||_F^2`` (+ ``||sum_t g[n, t]||^2``), shape (N,), for validated 3-d ``a``, ``g`` of one dtype."""
    _check_method(method)
    return torch.ops.pycurv.per_sample_grad_sqnorms_triton(a, g, bias, method)


def per_sample_gram_triton(a: torch.Tensor, g: torch.Tensor, bias: bool, method: str) -> torch.Tensor:
    """``K_ij = <G_i, G_j>_F`` (+ ``<sum_t g_i, sum_t g_j>``), shape (N, N), for validated 3-d ``a``, ``g``."""
    _check_method(method)
    return torch.ops.pycurv.per_sample_gram_triton(a, g, bias, method)


def ef_diag_triton(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """``sum_n G_n * G_n``, shape (d_out, d_in [+1]) with the bias column last, for validated 3-d ``a``, ``g``."""
    return torch.ops.pycurv.ef_diag_triton(a, g, bias)
