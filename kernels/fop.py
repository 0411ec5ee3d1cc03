"""Triton kernels of the FOP family: the hypergradient step on a preconditioner factor ``M`` and the application of
the preconditioner ``P = M M^T`` to a gradient (MATH.md section 4).

``fop_update``: ``M <- M + c S M`` with ``c = lr * hyper_lr`` and ``S = G_p^T G_c + G_c^T G_p`` for gradients
``G_p``, ``G_c: (r, k)`` of a batch of same-shape layers (``k`` the kernel taps of a convolution, the input
features of a linear layer). Two stages. (i) ``S`` is computed on its lower block triangle, each tile as
``G_p[:, I]^T G_c[:, J] + G_c[:, I]^T G_p[:, J]`` (two products per step of rows; a diagonal tile takes one,
``C = G_p[:, I]^T G_c[:, I]``, and adds its transpose), and mirrored: ``S`` is exactly symmetric. When the batch
has too few tiles to fill the GPU (small ``k``, a few layers, many rows: a 3x3 convolution has ``k = 9`` and up to
``c_out c_in`` rows), the rows are split over programs that write partial ``S`` to a workspace, summed in a fixed
order (deterministic, no atomics). (ii) ``S M`` needs all of the old ``M``: for ``k <= 32`` one program per matrix
holds ``S`` and ``M`` on chip, takes the product and writes ``M + c S M`` over ``M`` after every thread of the
program has read it (with a single split this happens in the stage-(i) program itself: one launch); for larger
``k`` a batched GEMM writes ``M + c S M`` to a second workspace, copied back, the batch taken in chunks that bound
the workspaces. A zero ``c`` leaves ``M`` untouched and launches nothing.

``fop_precondition``: ``G M M^T``, computed as ``G + G D`` with ``D = M M^T - I``: ``M = I`` (every factor at its
start) gives ``G`` back bit for bit, and the rounding of the product scales with ``||M M^T - I||`` (small while
``M`` stays near the identity) rather than with ``||M M^T||``. For ``k <= 32`` one kernel: each program forms ``D``
on chip from ``M`` and streams row blocks of ``G``. For larger ``k``, ``D`` is formed once per matrix on its lower
block triangle (half the products of a full ``M M^T``) and mirrored, then a batched GEMM over ``(rows x k)`` tiles
adds the ``G`` tile in its epilogue.

Past ``k = 32``, a gradient with few rows takes thin forms that never build ``S`` or ``D``, on torch's batched
GEMMs (cuBLAS): ``S M = G_p^T (G_c M) + G_c^T (G_p M)`` when ``r < k / 3`` and ``(G M) M^T`` when ``r < k`` (a
classifier head or a down-projection: ``2 k^3`` multiply-adds saved); those products follow torch's float32 matmul
precision setting (full float32 unless TF32 was allowed).

Precision (``_common.py``): products of float32 operands use ``tf32x3`` (float32 accuracy), 16-bit gradients are
multiplied in their own dtype with float32 accumulation (``S``) or, against the float32 ``D``, in TF32, which
rounds ``D`` no more than the 16-bit gradient is rounded already; float64 is ``ieee``. ``S``, ``M`` and ``D`` are
float32 (float64 for float64 gradients). Gradients are read through their strides (transposes, slices and expanded
views need no copies); ``M`` and the results are contiguous.

Each launcher is a ``torch.library.triton_op`` (``torch.ops.pycurv.<op>_triton``; under ``TRITON_INTERPRET=1`` an
opaque ``custom_op`` with a fake); the public names ``<op>_triton`` are plain functions over those ops. ``KERNELS``
lists every kernel with its argument types and every configuration the launchers pick, so that
tests/test_triton_compile.py compiles all of them for Hopper.

Source: Moskovitz et al. 2019 (arXiv 1910.08461) for first-order preconditioning; the hypergradient is derived in
MATH.md section 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    "fop_precondition_triton",
    "fop_update_triton",
]

# Largest order of M that one program holds on chip (the fused update step and the fused preconditioning).
SMALL_K = 32
# Row splits of the update write float32 (float64) partial S; their total size stays below this fraction of the
# bytes of the two gradients, so that the extra traffic is small next to reading them.
_SPLIT_WS_FRACTION = 0.25
# Each row split runs at least this many steps of BR rows.
_SPLIT_MIN_STEPS = 4
# The two workspaces of the update for k > SMALL_K (S and the new M) take at most this many bytes per chunk of the
# batch (at least one matrix per chunk).
_UPDATE_WS_BYTES = 256 << 20
# Preconditioning with k <= SMALL_K: programs per matrix are chosen so that the batch gives every SM about this many
# programs (each re-forms D, so fewer, longer programs are cheaper than one per row block).
_PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _lower_tile(p):
    """``(i, j)``, ``i >= j``, of the ``p``-th tile of a lower block triangle enumerated row by row."""
    i = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # the float square root may land one off near perfect squares
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)
    return i, p - i * (i + 1) // 2


@triton.jit
def _store_sym(w, tile, ci, cj, K, mirror):
    """``W[ci, cj] = tile`` on a row-major (K x K) ``W`` and, with ``mirror``, ``W[cj, ci] = tile^T`` (stored through
    the transposed tile, so that both stores run along rows of W)."""
    valid = (ci < K)[:, None] & (cj < K)[None, :]
    tl.store(w + (ci[:, None] * K + cj[None, :]), tile, mask=valid)
    tl.store(w + (cj[:, None] * K + ci[None, :]), tl.trans(tile), mask=tl.trans(valid) & mirror)


@triton.jit
def _update_on_chip(m_b, s, K, c, KP: tl.constexpr, PREC: tl.constexpr):
    """``M <- M + c S M`` for one row-major (K x K) ``M`` at ``m_b``, ``S`` a (KP x KP) tile (zero outside K x K).
    Every thread of the program has read ``M`` before any of it is overwritten."""
    kk = tl.arange(0, KP)
    inside = (kk < K)[:, None] & (kk < K)[None, :]
    off = kk[:, None] * K + kk[None, :]
    m = tl.load(m_b + off, mask=inside, other=0.0)
    t = _mma(s.to(m.dtype), m, tl.zeros((KP, KP), dtype=m.dtype), PREC)
    new = m + _scalar(c, tl.float64).to(m.dtype) * t
    tl.debug_barrier()
    tl.store(m_b + off, new, mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Update, stage (i): S = G_p^T G_c + G_c^T G_p
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sym_rows(
    pa_i, pa_j, pg_i, pg_j, m_i, m_j, r_lo, r_hi, sa_r, sg_r, acc, BR: tl.constexpr, DIAG: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc += Gp_i^T Gc_j + Gc_i^T Gp_j`` (with DIAG only ``Gp_i^T Gc_i``) over rows ``r_lo <= r < r_hi`` in steps
    of BR; ``pa_*``, ``pg_*``: the (1 x BD) column pointers of row ``r_lo`` of G_p and G_c, ``m_*`` their masks."""
    rr = tl.arange(0, BR)
    step_a = rr.to(tl.int64)[:, None] * sa_r
    step_g = rr.to(tl.int64)[:, None] * sg_r
    jump_a = tl.full((), BR, tl.int64) * sa_r
    jump_g = tl.full((), BR, tl.int64) * sg_r
    for r0 in range(r_lo, r_hi, BR):
        mr = (r0 + rr < r_hi)[:, None]
        xp = tl.load(pa_i + step_a, mask=mr & m_i, other=0.0)
        xc = tl.load(pg_j + step_g, mask=mr & m_j, other=0.0)
        acc = _mma(tl.trans(xp), xc, acc, PREC)
        if not DIAG:
            yc = tl.load(pg_i + step_g, mask=mr & m_i, other=0.0)
            yp = tl.load(pa_j + step_a, mask=mr & m_j, other=0.0)
            acc = _mma(tl.trans(yc), yp, acc, PREC)
        pa_i += jump_a
        pa_j += jump_a
        pg_i += jump_g
        pg_j += jump_g
    return acc


@triton.jit(do_not_specialize=["n_split", "r_split"])
def _fop_sym_kernel(
    gp_ptr,
    gc_ptr,
    ws_ptr,
    m_ptr,
    R,
    K,
    sa_b,
    sa_r,
    sa_d,
    sg_b,
    sg_r,
    sg_d,
    n_split,
    r_split,
    c: tl.float64,
    BD: tl.constexpr,
    BR: tl.constexpr,
    FUSED: tl.constexpr,
    PREC: tl.constexpr,
    MPREC: tl.constexpr,
):
    """``S_b = G_p^T G_c + G_c^T G_p`` over the rows of split ``s``, for gradients ``(B, R, K)`` of any strides: stored
    to ``W[s, b]`` (row-major ``(splits, B, K, K)``); with FUSED (one split, ``K <= BD``, one tile per matrix) the
    program applies ``M_b <- M_b + c S_b M_b`` itself instead.

    Tiling: grid (lower-triangle (BD x BD) tile of S, b, row split); a program streams its rows in (BR x BD) tiles
    of its two column blocks of both gradients (two of them on a diagonal tile, which takes ``C + C^T`` of one
    product) and stores the tile and its mirror.
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    ti, tj = _lower_tile(pid_t)
    acc_ty = ws_ptr.dtype.element_ty
    ci = ti * BD + tl.arange(0, BD)
    cj = tj * BD + tl.arange(0, BD)
    r_lo = pid_s * r_split
    r_hi = tl.minimum(r_lo + r_split, R)
    a_b = gp_ptr + pid_b.to(tl.int64) * sa_b + r_lo.to(tl.int64) * sa_r
    g_b = gc_ptr + pid_b.to(tl.int64) * sg_b + r_lo.to(tl.int64) * sg_r
    pa_i = a_b + ci.to(tl.int64)[None, :] * sa_d
    pa_j = a_b + cj.to(tl.int64)[None, :] * sa_d
    pg_i = g_b + ci.to(tl.int64)[None, :] * sg_d
    pg_j = g_b + cj.to(tl.int64)[None, :] * sg_d
    m_i = (ci < K)[None, :]
    m_j = (cj < K)[None, :]
    acc = tl.zeros((BD, BD), dtype=acc_ty)
    if ti == tj:
        acc = _sym_rows(pa_i, pa_j, pg_i, pg_j, m_i, m_j, r_lo, r_hi, sa_r, sg_r, acc, BR, True, PREC)
        acc = acc + tl.trans(acc)
    else:
        acc = _sym_rows(pa_i, pa_j, pg_i, pg_j, m_i, m_j, r_lo, r_hi, sa_r, sg_r, acc, BR, False, PREC)
    if FUSED:
        _update_on_chip(m_ptr + pid_b.to(tl.int64) * K * K, acc, K, c, BD, MPREC)
    else:
        w = ws_ptr + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_b) * K * K
        _store_sym(w, acc, ci, cj, K, ti != tj)


# ----------------------------------------------------------------------------------------------------------------
# Update, stage (ii) for small k: sum the splits, M <- M + c S M on chip
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_split"])
def _fop_finish_kernel(
    ws_ptr,
    m_ptr,
    K,
    n_split,
    c: tl.float64,
    KP: tl.constexpr,
    PREC: tl.constexpr,
):
    """``M_b <- M_b + c (sum_s W[s, b]) M_b`` for ``K <= KP``, the row splits of ``_fop_sym_kernel`` summed in order.

    Tiling: one program per matrix holds S and M as (KP x KP) tiles.
    """
    pid_b = tl.program_id(0)
    nb = tl.num_programs(0)
    kk = tl.arange(0, KP)
    inside = (kk < K)[:, None] & (kk < K)[None, :]
    off = kk[:, None] * K + kk[None, :]
    s = tl.zeros((KP, KP), dtype=ws_ptr.dtype.element_ty)
    for sp in range(0, n_split):
        s += tl.load(ws_ptr + (sp * nb + pid_b).to(tl.int64) * K * K + off, mask=inside, other=0.0)
    _update_on_chip(m_ptr + pid_b.to(tl.int64) * K * K, s, K, c, KP, PREC)


# ----------------------------------------------------------------------------------------------------------------
# D = M M^T - I (preconditioning, k > SMALL_K)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _gram_cols(pi, pj, mi, mj, K, acc, BK: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr):
    """``acc += M[ci, :] M[cj, :]^T`` over the columns in steps of BK (``pi``, ``pj``: the (BD x 1) row pointers,
    ``mi``, ``mj`` their masks; with DIAG the rows are the same)."""
    kk = tl.arange(0, BK)
    for l0 in range(0, K, BK):
        ml = (l0 + kk < K)[None, :]
        xi = tl.load(pi + (l0 + kk)[None, :], mask=mi & ml, other=0.0)
        if DIAG:
            xj = xi
        else:
            xj = tl.load(pj + (l0 + kk)[None, :], mask=mj & ml, other=0.0)
        acc = _mma(xi, tl.trans(xj), acc, PREC)
    return acc


@triton.jit
def _fop_gram_kernel(
    m_ptr,
    d_ptr,
    K,
    BD: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``D_b = M_b M_b^T - I`` for row-major ``M: (B, K, K)``, into row-major ``D`` of the same shape.

    Tiling: grid (lower-triangle (BD x BD) tile of D, b); a program runs over the columns of its two row blocks of
    M in steps of BK (one block on a diagonal tile) and stores the tile and its mirror.
    """
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1)
    ti, tj = _lower_tile(pid_t)
    acc_ty = d_ptr.dtype.element_ty
    ci = ti * BD + tl.arange(0, BD)
    cj = tj * BD + tl.arange(0, BD)
    m_b = m_ptr + pid_b.to(tl.int64) * K * K
    pi = m_b + ci.to(tl.int64)[:, None] * K
    pj = m_b + cj.to(tl.int64)[:, None] * K
    mi = (ci < K)[:, None]
    mj = (cj < K)[:, None]
    acc = tl.zeros((BD, BD), dtype=acc_ty)
    if ti == tj:
        acc = _gram_cols(pi, pj, mi, mj, K, acc, BK, True, PREC)
    else:
        acc = _gram_cols(pi, pj, mi, mj, K, acc, BK, False, PREC)
    acc -= (ci[:, None] == cj[None, :]).to(acc_ty)
    _store_sym(d_ptr + pid_b.to(tl.int64) * K * K, acc, ci, cj, K, ti != tj)


# ----------------------------------------------------------------------------------------------------------------
# Batched GEMM with the two epilogues: G + G D (preconditioning), M + c S M (update)
# ----------------------------------------------------------------------------------------------------------------

# ``out = A + A B`` (needs N == K) and ``out = B + c A B`` (needs M == K)
EPI_ADD_A = 0
EPI_ADD_B = 1
# Row blocks of output tiles that run next to each other (they share the column blocks of B in L2).
_GROUP_M = tl.constexpr(8)


@triton.jit
def _fop_gemm_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    sa_b,
    sa_r,
    sa_d,
    c: tl.float64,
    EPI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``O_b = A_b + A_b B_b`` (EPI_ADD_A) or ``O_b = B_b + c A_b B_b`` (EPI_ADD_B) for ``A: (B, M, K)`` of any strides
    and row-major ``B: (B, K, N)``, ``O: (B, M, N)``, accumulated in float32 (float64), rounded once to O's dtype.

    Tiling: grid (BM x BN output tile, b), the tiles ordered in groups of _GROUP_M row blocks; each program runs
    over K in steps of BK, then adds the (BM x BN) tile of A or B at its own position.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    nbm = tl.cdiv(M, BM)
    nbn = tl.cdiv(N, BN)
    width = _GROUP_M * nbn
    first = (pid // width) * _GROUP_M
    size = tl.minimum(nbm - first, _GROUP_M)
    rm = (first + (pid % width) % size) * BM + tl.arange(0, BM)
    rn = ((pid % width) // size) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc_ty = tl.float64 if b_ptr.dtype.element_ty == tl.float64 else tl.float32
    mm = (rm < M)[:, None]
    mn = (rn < N)[None, :]
    pa = a_ptr + pid_b * sa_b + rm.to(tl.int64)[:, None] * sa_r
    b_b = b_ptr + pid_b * K * N
    pb = b_b + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=acc_ty)
    for k0 in range(0, K, BK):
        k = k0 + rk
        x = tl.load(pa + k.to(tl.int64)[None, :] * sa_d, mask=mm & (k < K)[None, :], other=0.0)
        y = tl.load(pb + k.to(tl.int64)[:, None] * N, mask=(k < K)[:, None] & mn, other=0.0)
        acc = _mma(x, y, acc, PREC)
    valid = mm & mn
    if EPI == 0:
        e = tl.load(pa + rn.to(tl.int64)[None, :] * sa_d, mask=valid, other=0.0).to(acc_ty)
        acc = e + acc
    else:
        e = tl.load(b_b + (rm.to(tl.int64)[:, None] * N + rn[None, :]), mask=valid, other=0.0).to(acc_ty)
        acc = e + _scalar(c, tl.float64).to(acc_ty) * acc
    off = pid_b * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out_ptr + off, _cast(acc, out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------------------
# Preconditioning for small k: D on chip
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["r_per"])
def _fop_precondition_small_kernel(
    m_ptr,
    g_ptr,
    out_ptr,
    R,
    K,
    sa_b,
    sa_r,
    sa_d,
    r_per,
    KP: tl.constexpr,
    BR: tl.constexpr,
    MPREC: tl.constexpr,
    PREC: tl.constexpr,
):
    """``O_b = G_b + G_b (M_b M_b^T - I)`` for ``K <= KP``, row-major ``M: (B, K, K)``, ``G: (B, R, K)`` of any
    strides and row-major ``O`` like G.

    Tiling: grid (row range of ``r_per`` rows, b); a program forms ``D = M M^T - I`` as a (KP x KP) tile (zero
    outside K x K) and streams its rows in (BR x KP) tiles, each multiplied by D onto itself and stored.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    acc_ty = m_ptr.dtype.element_ty
    kk = tl.arange(0, KP)
    mk = kk < K
    inside = mk[:, None] & mk[None, :]
    mt = tl.load(m_ptr + pid_b * K * K + (kk[:, None] * K + kk[None, :]), mask=inside, other=0.0)
    d = _mma(mt, tl.trans(mt), tl.zeros((KP, KP), dtype=acc_ty), MPREC)
    d -= ((kk[:, None] == kk[None, :]) & inside).to(acc_ty)
    r_lo = pid * r_per
    r_hi = tl.minimum(r_lo + r_per, R)
    rows = tl.arange(0, BR)
    pg = g_ptr + pid_b * sa_b + kk.to(tl.int64)[None, :] * sa_d
    po = out_ptr + pid_b * R * K + kk[None, :]
    for r0 in range(r_lo, r_hi, BR):
        r = (r0 + rows).to(tl.int64)
        mask = (r < r_hi)[:, None] & mk[None, :]
        x = tl.load(pg + r[:, None] * sa_r, mask=mask, other=0.0)
        acc = _mma(x, d, x.to(acc_ty), PREC)
        tl.store(po + r[:, None] * K, _cast(acc, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Registry: argument types and configurations of every kernel
# ----------------------------------------------------------------------------------------------------------------


def _sym_configs(dt: str) -> list:
    """S tiles (BD x BD) over rows in steps of BR. BD 16 and 32 come fused (the whole update in one program, for
    a single split) and unfused; larger BD only unfused. The launcher takes the smallest BD that covers k. Small
    tiles take short row steps for float32: a long reduction dimension of a 16-wide product is held by every warp,
    three times over for tf32x3, and spills."""
    if dt == "fp64":
        small = [(16, 64), (32, 32)]
        large = [_cfg(8, 2, BD=64, BR=16, FUSED=False)]
    elif dt == "fp32":
        small = [(16, 32), (32, 16)]
        large = [_cfg(4, 3, BD=64, BR=32, FUSED=False)]
    else:
        small = [(16, 64), (32, 64)]
        large = [_cfg(4, 3, BD=64, BR=32, FUSED=False), _cfg(8, 3, BD=128, BR=32, FUSED=False)]
    return [_cfg(4, 3, BD=bd, BR=br, FUSED=f) for bd, br in small for f in (True, False)] + large


def _gram_configs(dt: str) -> list:
    if _lowp(dt):
        return []
    if dt == "fp64":
        return [_cfg(4, 2, BD=32, BK=16), _cfg(4, 2, BD=64, BK=16)]
    return [_cfg(4, 3, BD=32, BK=32), _cfg(4, 3, BD=64, BK=32), _cfg(8, 3, BD=128, BK=16)]


def _gemm_tiles(acc: str) -> list:
    """(small, large) output tiles; the launcher takes the large one when it still gives every SM a program."""
    if acc == "fp64":
        return [_cfg(4, 2, BM=32, BN=32, BK=16), _cfg(8, 2, BM=64, BN=64, BK=16)]
    return [_cfg(4, 3, BM=64, BN=64, BK=32), _cfg(8, 3, BM=128, BN=64, BK=32)]


def _small_configs(dt: str) -> list:
    """(BR x KP) row tiles of the fused preconditioning; KP 16 or 32 covers k."""
    if dt == "fp64":
        return [_cfg(4, 2, KP=16, BR=64), _cfg(4, 2, KP=32, BR=32)]
    return [_cfg(4, 3, KP=16, BR=128), _cfg(4, 3, KP=32, BR=64)]


_GEMM_INTS = ("M", "N", "K", "sa_b", "sa_r", "sa_d")
_STRIDES = ("sa_b", "sa_r", "sa_d")

KERNELS = KernelRegistry(
    {
        "_fop_sym_kernel": KernelSpec(
            _fop_sym_kernel,
            lambda dt: _sig(
                ptrs={"gp_ptr": dt, "gc_ptr": dt, "ws_ptr": _acc_name(dt), "m_ptr": _acc_name(dt)},
                ints=("R", "K", *_STRIDES, "sg_b", "sg_r", "sg_d", "n_split", "r_split"),
                floats=("c",),
            ),
            lambda dt: {"PREC": _prec(dt), "MPREC": _prec(_acc_name(dt))},
            _sym_configs,
        ),
        "_fop_finish_kernel": KernelSpec(
            _fop_finish_kernel,
            lambda dt: _sig(ptrs={"ws_ptr": dt, "m_ptr": dt}, ints=("K", "n_split"), floats=("c",)),
            lambda dt: {"PREC": _prec(dt)},
            lambda dt: [] if _lowp(dt) else [_cfg(4, 1, KP=16), _cfg(4, 1, KP=32)],
        ),
        "_fop_gram_kernel": KernelSpec(
            _fop_gram_kernel,
            lambda dt: _sig(ptrs={"m_ptr": dt, "d_ptr": dt}, ints=("K",)),
            lambda dt: {"PREC": _prec(dt)},
            _gram_configs,
        ),
        "_fop_gemm_kernel[precondition]": KernelSpec(
            _fop_gemm_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "b_ptr": _acc_name(dt), "out_ptr": dt}, ints=_GEMM_INTS, floats=("c",)
            ),
            lambda dt: {"EPI": EPI_ADD_A, "PREC": _mixed_prec(dt)},
            lambda dt: _gemm_tiles(_acc_name(dt)),
        ),
        "_fop_gemm_kernel[update]": KernelSpec(
            _fop_gemm_kernel,
            lambda dt: _sig(ptrs={"a_ptr": dt, "b_ptr": dt, "out_ptr": dt}, ints=_GEMM_INTS, floats=("c",)),
            lambda dt: {"EPI": EPI_ADD_B, "PREC": _prec(dt)},
            lambda dt: [] if _lowp(dt) else _gemm_tiles(dt),
        ),
        "_fop_precondition_small_kernel": KernelSpec(
            _fop_precondition_small_kernel,
            lambda dt: _sig(
                ptrs={"m_ptr": _acc_name(dt), "g_ptr": dt, "out_ptr": dt},
                ints=("R", "K", *_STRIDES, "r_per"),
            ),
            lambda dt: {"MPREC": _prec(_acc_name(dt)), "PREC": _mixed_prec(dt)},
            _small_configs,
        ),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------


def _ntri(n: int) -> int:
    return n * (n + 1) // 2


def _sym_meta(dt: str, k: int, fused: bool) -> dict:
    """The S tile: the smallest BD that covers ``k`` (the largest for larger ``k``)."""
    sizes = sorted({c.kwargs["BD"] for c in KERNELS["_fop_sym_kernel"].configs(dt)})
    bd = next((s for s in sizes if s >= k), sizes[-1])
    return KERNELS.fixed("_fop_sym_kernel", dt, BD=bd, FUSED=fused)


def _row_splits(gp: torch.Tensor, tiles: int, br: int, s_bytes: int) -> int:
    """Row splits of S: enough programs for two per SM, every split at least _SPLIT_MIN_STEPS steps long, the
    partial results (``s_bytes`` per split) small next to the gradients."""
    r = gp.shape[1]
    ws_cap = int(_SPLIT_WS_FRACTION * 2 * gp.numel() * gp.element_size()) // max(1, s_bytes)
    return max(1, min(triton.cdiv(2 * _num_sms(gp.device), tiles), r // (_SPLIT_MIN_STEPS * br), ws_cap))


def _split_rows(r: int, n_split: int, br: int) -> tuple[int, int]:
    """``(splits, rows per split)`` for about ``n_split`` splits of ``r`` rows, each a whole number of BR steps and
    none empty."""
    r_split = triton.cdiv(triton.cdiv(r, max(1, n_split)), br) * br
    return triton.cdiv(r, r_split), r_split


def _launch_sym(gp, gc, ws, m, r_split: int, c: float, meta: dict, dt: str) -> None:
    b, r, k = gp.shape
    grid = (_ntri(triton.cdiv(k, meta["BD"])), b, triton.cdiv(r, r_split))
    _wrap(_fop_sym_kernel)[grid](
        gp, gc, ws, m, r, k, *gp.stride(), *gc.stride(), grid[2], r_split, c,
        PREC=_prec(dt), MPREC=_prec(_acc_name(dt)), **meta,
    )


def _check_m(m: torch.Tensor, grad: torch.Tensor) -> None:
    if not m.is_contiguous():
        raise ValueError(f"m must be contiguous (it is updated in place), got strides {m.stride()}")
    want = _TORCH_DTYPE[_acc_name(_dt(grad))]
    if m.dtype != want:
        raise TypeError(f"m must be {want} for {grad.dtype} gradients, got {m.dtype}")


def _update(
    m: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor, lr: float, hyper_lr: float, n_split: int | None = None
) -> None:
    """``m <- m + lr hyper_lr (gp^T gc + gc^T gp) m``; ``n_split`` forces the row splits of S (tests)."""
    _check_m(m, gp)
    b, r, k = gp.shape
    c = float(lr) * float(hyper_lr)
    if b == 0 or r == 0 or c == 0.0:
        return
    dt = _dt(gp)
    esize = m.element_size()
    if k <= SMALL_K:
        meta = _sym_meta(dt, k, fused=True)
        if n_split is None:
            n_split = _row_splits(gp, b, meta["BR"], b * k * k * esize)
        splits, r_split = _split_rows(r, n_split, meta["BR"])
        if splits == 1:
            _launch_sym(gp, gc, m, m, r_split, c, meta, dt)
            return
        meta = _sym_meta(dt, k, fused=False)
        ws = m.new_empty((splits, b, k, k))
        _launch_sym(gp, gc, ws, m, r_split, c, meta, dt)
        fin = KERNELS.fixed("_fop_finish_kernel", _acc_name(dt), KP=meta["BD"])
        _wrap(_fop_finish_kernel)[(b,)](ws, m, k, splits, c, PREC=_prec(_acc_name(dt)), **fin)
        return
    if 3 * r < k:
        # thin form: S M = G_p^T (G_c M) + G_c^T (G_p M), 8 r k^2 multiply-adds against the 2 r k^2 + 2 k^3 of
        # forming S; four batched library GEMMs (a 16-bit gradient converted whole: with r < k / 3 that copy is
        # smaller than M)
        p, q = gp.to(m.dtype), gc.to(m.dtype)
        m.add_(torch.baddbmm(torch.bmm(p.mT, torch.bmm(q, m)), q.mT, torch.bmm(p, m)), alpha=c)
        return
    meta = _sym_meta(dt, k, fused=False)
    chunk = max(1, min(b, _UPDATE_WS_BYTES // (2 * k * k * esize)))
    new = m.new_empty((chunk, k, k))
    for b0 in range(0, b, chunk):
        b1 = min(b, b0 + chunk)
        p, q, mc = gp[b0:b1], gc[b0:b1], m[b0:b1]
        want = n_split
        if want is None:
            tiles = (b1 - b0) * _ntri(triton.cdiv(k, meta["BD"]))
            want = _row_splits(p, tiles, meta["BR"], (b1 - b0) * k * k * esize)
        splits, r_split = _split_rows(r, want, meta["BR"])
        ws = m.new_empty((splits, b1 - b0, k, k))
        _launch_sym(p, q, ws, mc, r_split, c, meta, dt)
        s = ws[0] if splits == 1 else ws.sum(0)
        out = new[: b1 - b0]
        _gemm("_fop_gemm_kernel[update]", s, mc, out, c, _acc_name(dt))
        mc.copy_(out)


def _gemm(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, c: float, dt: str) -> None:
    """``out = a + a @ b`` or ``out = b + c a @ b`` (by the registry entry ``name``) for 3-d ``a`` of any strides,
    contiguous ``b`` and ``out``."""
    spec = KERNELS[name]
    nb, m, k = a.shape
    n = b.shape[2]
    small, big = spec.configs(dt)
    tiles = nb * triton.cdiv(m, big.kwargs["BM"]) * triton.cdiv(n, big.kwargs["BN"])
    # the interpreter's cost is per program and step: it takes the large tiles
    cfg = big if _INTERPRET or tiles >= _num_sms(a.device) else small
    blocks = dict(cfg.kwargs)
    grid = (triton.cdiv(m, blocks["BM"]) * triton.cdiv(n, blocks["BN"]), nb)
    _wrap(_fop_gemm_kernel)[grid](
        a, b, out, m, n, k, *a.stride(), c, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **spec.constants(dt), **blocks,
    )


def _precondition(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    b, r, k = grad.shape
    dt = _dt(grad)
    out = torch.empty((b, r, k), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    # a float64 m against a lower-precision gradient is used in float32, as the reference does
    m = m.to(_TORCH_DTYPE[_acc_name(dt)]).contiguous()
    if k <= SMALL_K:
        meta = KERNELS.fixed("_fop_precondition_small_kernel", dt, KP=16 if k <= 16 else 32)
        br = meta["BR"]
        blocks = triton.cdiv(r, br)
        per_matrix = max(1, min(blocks, triton.cdiv(_PROGRAMS_PER_SM * _num_sms(grad.device), b)))
        r_per = triton.cdiv(blocks, per_matrix) * br
        grid = (triton.cdiv(r, r_per), b)
        _wrap(_fop_precondition_small_kernel)[grid](
            m, grad, out, r, k, *grad.stride(), r_per,
            MPREC=_prec(_acc_name(dt)), PREC=_mixed_prec(dt), **meta,
        )
        return out
    if r < k:
        # thin form: (G M) M^T, 4 r k^2 multiply-adds against the 2 k^3 + 2 r k^2 of forming D; two batched library
        # GEMMs (M = I still returns G exactly: every product but one is an exact zero)
        out.copy_(torch.bmm(torch.bmm(grad.to(m.dtype), m), m.mT))
        return out
    d = torch.empty_like(m)
    acc = _acc_name(dt)
    sizes = sorted(c.kwargs["BD"] for c in KERNELS["_fop_gram_kernel"].configs(acc))
    bd = next((s for s in sizes if s >= k), sizes[-1])
    gram = KERNELS.fixed("_fop_gram_kernel", acc, BD=bd)
    _wrap(_fop_gram_kernel)[(_ntri(triton.cdiv(k, bd)), b)](m, d, k, PREC=_prec(acc), **gram)
    _gemm("_fop_gemm_kernel[precondition]", grad, d, out, 1.0, dt)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


@_define_op("pycurv::fop_update_triton", mutates_args=("m",))
def _update_op(m: torch.Tensor, grad_prev: torch.Tensor, grad_cur: torch.Tensor, lr: float, hyper_lr: float) -> None:
    _update(m, grad_prev, grad_cur, lr, hyper_lr)


@_define_op("pycurv::fop_precondition_triton")
def _precondition_op(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return _precondition(m, grad)


if _INTERPRET:

    @_update_op.register_fake
    def _(m, grad_prev, grad_cur, lr, hyper_lr):
        return None

    @_precondition_op.register_fake
    def _(m, grad):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)


def fop_update_triton(
    m: torch.Tensor, grad_prev: torch.Tensor, grad_cur: torch.Tensor, lr: float, hyper_lr: float
) -> None:
    """In place ``m <- m + lr * hyper_lr * (grad_prev^T grad_cur + grad_cur^T grad_prev) m`` for a validated
    contiguous ``m: (B, k, k)`` (float32, float64 for float64 gradients) and gradients ``(B, r, k)`` of one dtype and
    any strides; the product with the old ``m`` is taken before ``m`` is written. ``lr * hyper_lr == 0`` reads
    nothing and leaves ``m`` as it is."""
    torch.ops.pycurv.fop_update_triton(m, grad_prev, grad_cur, float(lr), float(hyper_lr))


def fop_precondition_triton(m: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad (m m^T)`` for validated ``m: (B, k, k)`` (float32 / float64, any strides) and ``grad: (B, r, k)`` of any
    float dtype and strides, computed as ``grad + grad (m m^T - I)`` (exact for ``m = I``) with float32 (float64)
    accumulation; contiguous, in ``grad``'s dtype."""
    return torch.ops.pycurv.fop_precondition_triton(m, grad)
