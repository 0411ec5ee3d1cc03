"""Triton kernels of the iEF / EF / SF family: the coefficient-weighted sum of per-sample gradients (the update
``J^T alpha`` of one layer) and the squared norms of the softmax cross-entropy gradient with respect to the logits
(the right-hand side ``s`` of the iEF system).

``_weighted_grad_sum_kernel``: ``W = sum_{n,t} coef_n g[n,t] a[n,t]^T`` is one GEMM ``g_flat^T diag(coef) a_flat``
over the ``K = N T`` rows of ``a: (N, T, d_in)`` and ``g: (N, T, d_out)``, read through their strides (row
``k = n T + t``); the bias column ``sum_{n,t} coef_n g[n,t]`` comes from the same loads. No per-sample gradient is
formed. Precision: the coefficient varies along the reduced dimension, so it scales the loaded rows of ``g`` (in
float32, float64 for float64 inputs) before the product rather than the accumulator after it. For 16-bit inputs
that scaled tile stays float32 and is multiplied against ``a`` in TF32 (``a``'s 16-bit values are exact in TF32):
``coef_n g`` is rounded to 11 significant bits (a relative error of at most 2^-11, no more than a 16-bit input is
rounded already) and keeps float32's range. The alternative, rounding ``coef_n g`` back to the input dtype for 16-bit
tensor-core products (twice TF32's peak rate), overflows or loses all precision in float16 when ``coef`` is large or
small, and iEF coefficients span many orders of magnitude (``alpha_n ~ s_n / ||G_n||^2`` for a nearly diagonal
Gram). float32 inputs use ``tf32x3``, float64 ``ieee``.

``_logit_grad_sqnorms_kernel``: ``s_nt = (S1o / S)^2 + S2o / S^2`` with ``e_c = exp(z_c - max z)``,
``S1o = sum_{c != y} e_c``, ``S2o = sum_{c != y} e_c^2``, ``S = S1o + e_y``: the same as
``(1 - p_y)^2 + sum_{c != y} p_c^2``, with ``1 - p_y`` summed directly so that nothing cancels when ``p_y`` is close
to 1. One pass over the classes with an online maximum kept per lane (see the kernel), float32 accumulation
(float64 for float64 logits); a second, deterministic reduction sums the steps of each sample.

Each launcher is a ``torch.library.triton_op`` (``torch.ops.pycurv.<op>_triton``; see ``_common.py``); the public
names ``<op>_triton`` are plain functions over those ops. ``KERNELS`` lists every kernel with its argument types and
configurations, so that tests/test_triton_compile.py compiles all of them for Hopper.

Sources: Wu, Yu, Zhang & Woodland 2024 (arXiv 2406.06420) for the iEF step; Milakov & Gimelshein 2018
(arXiv 1805.02867) for the online softmax normaliser.
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
    _mixed_prec,
    _mma,
    _num_sms,
    _out_dtype,
    _sig,
    _wrap,
)

__all__ = [
    "DTYPES",
    "KERNELS",
    "KernelSpec",
    "logit_grad_sqnorms_triton",
    "weighted_grad_sum_triton",
]

# Splits of the rows of a weighted sum write float32 (float64) partial results; their total size stays below this
# fraction of the bytes of a and g, so that the extra traffic is small next to reading them.
_SPLIT_WS_FRACTION = 0.25
# Each split of the rows runs at least this many steps of BK rows.
_SPLIT_MIN_STEPS = 4


# ----------------------------------------------------------------------------------------------------------------
# Weighted sum of per-sample gradients
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _weighted_rows(
    pa,
    pg,
    c_ptr,
    ma,
    mg,
    k_lo,
    k_hi,
    T,
    sa_n,
    sa_t,
    sg_n,
    sg_t,
    acc,
    bsum,
    BK: tl.constexpr,
    BIAS: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc += (coef * g[k, o])^T a[k, i]`` over rows ``k_lo <= k < k_hi`` in steps of BK (row ``k`` is sample
    ``k // T``, step ``k % T``; ``pa``, ``pg``: the (1 x BI), (1 x BO) column pointers of row 0 of a and g, ``ma``,
    ``mg`` their column masks); with BIAS also ``bsum += sum_k coef * g[k, o]``."""
    kk = tl.arange(0, BK)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + kk
        mk = (k < k_hi)[:, None]
        n = k // T
        t = k - n * T
        n64 = n.to(tl.int64)
        t64 = t.to(tl.int64)
        c = tl.load(c_ptr + n, mask=k < k_hi, other=0.0).to(acc.dtype)
        tg = tl.load(pg + (n64 * sg_n + t64 * sg_t)[:, None], mask=mk & mg, other=0.0)
        ta = tl.load(pa + (n64 * sa_n + t64 * sa_t)[:, None], mask=mk & ma, other=0.0)
        gs = tg.to(acc.dtype) * c[:, None]
        if BIAS:
            bsum += tl.sum(gs, axis=0)
        acc = _mma(tl.trans(gs), ta, acc, PREC)
    return acc, bsum


@triton.jit(do_not_specialize=["has_bias"])
def _weighted_grad_sum_kernel(
    a_ptr,
    g_ptr,
    c_ptr,
    out_ptr,
    K,
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
    k_split,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """``W[s, o, i] = sum_{k in split s} coef_{k // T} g[k, o] a[k, i]`` for ``i < DI``, and with bias
    ``W[s, o, DI] = sum_{k in split s} coef_{k // T} g[k, o]``; ``W`` is ``(splits, DO, DI + bias)``.

    Tiling: grid (BO x BI output tile, row split); each program streams its rows in (BK x BO) tiles of g, scaled by
    their coefficients in the accumulation dtype, and (BK x BI) tiles of a, and accumulates their product. The
    programs of the last column tile also sum the scaled g tiles into the bias column (the ones column of ``a`` is
    never formed). Row splits, taken when the output has too few tiles to fill the GPU, write separate slices that
    the launcher sums in order (deterministic, no atomics).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_ty = out_ptr.dtype.element_ty
    nib = tl.cdiv(DI, BI)
    ib = pid % nib
    o = (pid // nib) * BO + tl.arange(0, BO)
    i = ib * BI + tl.arange(0, BI)
    mo = o < DO
    mi = i < DI
    k_lo = pid_s * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros((BO, BI), dtype=acc_ty)
    bsum = tl.zeros((BO,), dtype=acc_ty)
    pa = a_ptr + i.to(tl.int64)[None, :] * sa_d
    pg = g_ptr + o.to(tl.int64)[None, :] * sg_d
    ma = mi[None, :]
    mg = mo[None, :]
    with_bias = (has_bias != 0) & (ib == nib - 1)
    if with_bias:
        acc, bsum = _weighted_rows(
            pa, pg, c_ptr, ma, mg, k_lo, k_hi, T, sa_n, sa_t, sg_n, sg_t, acc, bsum, BK, True, PREC
        )
    else:
        acc, bsum = _weighted_rows(
            pa, pg, c_ptr, ma, mg, k_lo, k_hi, T, sa_n, sa_t, sg_n, sg_t, acc, bsum, BK, False, PREC
        )
    DIB = DI + has_bias
    w = out_ptr + pid_s.to(tl.int64) * DO * DIB + o.to(tl.int64) * DIB
    tl.store(w[:, None] + i[None, :], acc, mask=mo[:, None] & mi[None, :])
    if with_bias:
        tl.store(w + DI, bsum, mask=mo)


# ----------------------------------------------------------------------------------------------------------------
# Squared norms of the logit gradients
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _logit_grad_sqnorms_kernel(
    z_ptr,
    y_ptr,
    out_ptr,
    R,
    T,
    C,
    sz_n,
    sz_t,
    sz_c,
    sy_n,
    sy_t,
    ignore_index,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """``out[r] = (S1o / S)^2 + S2o / S^2`` for the rows ``r = n T + t`` of ``z: (N, T, C)`` (0 where
    ``y[n, t] == ignore_index``), ``S1o``, ``S2o`` summed over the classes ``c != y``, ``S = S1o + e_y``.

    Tiling: one program per BR rows, streaming (BR x BC) tiles over the classes. Every lane keeps its own running
    maximum ``m`` and the sums ``s1``, ``s2`` of ``exp(z - m)`` and its square over the classes it has seen (the
    target class is loaded as ``-inf``, so it is left out). A new value either stays below ``m`` (it adds
    ``exp(z - m)``) or becomes the new maximum (the sums are rescaled by ``exp(m - z)`` and 1 is added): one
    exponential per element, and no reduction across lanes until the end, where the lanes are brought to the row's
    maximum (which includes ``z_y``, read once per row) and summed.
    """
    acc_ty = out_ptr.dtype.element_ty
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = r < R
    n = r // T
    t = r - n * T
    n64 = n.to(tl.int64)
    t64 = t.to(tl.int64)
    y = tl.load(y_ptr + n64 * sy_n + t64 * sy_t, mask=mr, other=0)
    # the target of an ignored row only reaches masked loads
    valid = mr & (y != ignore_index)
    z_row = z_ptr + n64 * sz_n + t64 * sz_t
    z_y = tl.load(z_row + y * sz_c, mask=valid, other=0.0).to(acc_ty)
    neg_inf = float("-inf")
    m = tl.full((BR, BC), neg_inf, acc_ty)
    s1 = tl.zeros((BR, BC), dtype=acc_ty)
    s2 = tl.zeros((BR, BC), dtype=acc_ty)
    cc = tl.arange(0, BC)
    rows = z_row[:, None]
    keep = valid[:, None]
    y2 = y[:, None]
    for c0 in range(0, C, BC):
        c = c0 + cc
        mask = keep & (c < C)[None, :] & (c[None, :] != y2)
        z = tl.load(rows + c.to(tl.int64)[None, :] * sz_c, mask=mask, other=neg_inf).to(acc_ty)
        up = z > m
        hi = tl.where(up, z, m)
        # exp(-|z - m|); a -inf value (masked, the target, or a -inf logit) adds exp(-inf) = 0, also where m is
        # still -inf (hence the 0 in place of hi, no -inf - -inf). A NaN logit stays NaN and reaches the result.
        ex = tl.exp(tl.where(up, m, z) - tl.where(hi == neg_inf, 0.0, hi))
        ex2 = ex * ex
        s1 = tl.where(up, s1 * ex + 1.0, s1 + ex)
        s2 = tl.where(up, s2 * ex2 + 1.0, s2 + ex2)
        m = tl.where(up, z, m)
    mx = tl.maximum(tl.max(m, axis=1), z_y)
    w = tl.exp(m - mx[:, None])
    s1o = tl.sum(s1 * w, axis=1)
    s2o = tl.sum(s2 * (w * w), axis=1)
    total = s1o + tl.exp(z_y - mx)
    q = s1o / total
    s = q * q + (s2o / total) / total
    tl.store(out_ptr + r, tl.where(valid, s, 0.0), mask=mr)


# ----------------------------------------------------------------------------------------------------------------
# Registry: argument types and configurations of every kernel
# ----------------------------------------------------------------------------------------------------------------


def _weighted_configs(dt: str) -> list:
    """Output tiles (BO x BI) over rows in steps of BK; operands of the products are float32 except for float64."""
    if dt == "fp64":
        return [_cfg(4, 2, BO=64, BI=32, BK=16), _cfg(8, 2, BO=64, BI=64, BK=16)]
    if dt == "fp32":
        return [_cfg(4, 3, BO=64, BI=64, BK=32), _cfg(8, 3, BO=128, BI=64, BK=32)]
    return [_cfg(4, 3, BO=64, BI=64, BK=32), _cfg(8, 3, BO=128, BI=64, BK=32), _cfg(8, 3, BO=64, BI=128, BK=32)]


def _logit_widths(dt: str) -> tuple[int, ...]:
    """Class-block widths BC: powers of two from 16 to E (E elements per tile, BR = E / BC rows), then 4 E."""
    e = 512 if dt == "fp64" else 1024
    return tuple(16 << j for j in range((e // 16).bit_length())) + (4 * e,)


def _logit_configs(dt: str) -> list:
    """(BR rows x BC classes) tiles, one per class-block width (see ``_logit_config``)."""
    widths = _logit_widths(dt)
    e = widths[-2]
    return [_cfg(4, 2, BR=e // bc, BC=bc) for bc in widths[:-1]] + [_cfg(8, 3, BR=1, BC=widths[-1])]


KERNELS = KernelRegistry(
    {
        "_weighted_grad_sum_kernel": KernelSpec(
            _weighted_grad_sum_kernel,
            lambda dt: _sig(
                ptrs={"a_ptr": dt, "g_ptr": dt, "c_ptr": _acc_name(dt), "out_ptr": _acc_name(dt)},
                ints=("K", "T", "DI", "DO", "sa_n", "sa_t", "sa_d", "sg_n", "sg_t", "sg_d", "has_bias", "k_split"),
            ),
            lambda dt: {"PREC": _mixed_prec(dt)},
            _weighted_configs,
        ),
        "_logit_grad_sqnorms_kernel": KernelSpec(
            _logit_grad_sqnorms_kernel,
            lambda dt: dict(
                _sig(
                    ptrs={"z_ptr": dt, "y_ptr": "i64", "out_ptr": _acc_name(dt)},
                    ints=("R", "T", "C", "sz_n", "sz_t", "sz_c", "sy_n", "sy_t"),
                ),
                ignore_index="i64",
            ),
            lambda dt: {},
            _logit_configs,
        ),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


def _weighted_grad_sum(
    a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bias: bool, splits: int | None = None
) -> torch.Tensor:
    n, t, di = a.shape
    do = g.shape[2]
    k = n * t
    dt = _dt(a)
    dib = di + int(bias)
    out_dtype = _out_dtype(a)
    name = "_weighted_grad_sum_kernel"
    configs = KERNELS[name].configs(dt)
    bk = max(c.kwargs["BK"] for c in configs)
    if splits is None:
        # few output tiles (small layers, many rows): split the rows so that the largest tiles still give every SM a
        # couple of programs, each split a few steps long and the partial results small next to a and g
        big = max(configs, key=lambda c: c.kwargs["BO"] * c.kwargs["BI"]).kwargs
        tiles = triton.cdiv(do, big["BO"]) * triton.cdiv(di, big["BI"])
        in_bytes = (a.numel() + g.numel()) * a.element_size()
        ws_cap = int(_SPLIT_WS_FRACTION * in_bytes) // (do * dib * out_dtype.itemsize)
        splits = min(triton.cdiv(2 * _num_sms(a.device), tiles), triton.cdiv(k, _SPLIT_MIN_STEPS * bk), ws_cap)
    k_split = triton.cdiv(triton.cdiv(k, max(1, splits)), bk) * bk
    splits = triton.cdiv(k, k_split)
    ws = torch.empty((splits, do, dib), device=a.device, dtype=out_dtype)
    kern = _wrap(KERNELS.tuned(name, dt, ("DI", "DO", "k_split")))
    kern[lambda meta: (triton.cdiv(do, meta["BO"]) * triton.cdiv(di, meta["BI"]), splits)](
        a, g, coef, ws, k, t, di, do, *a.stride(), *g.stride(), int(bias), k_split, PREC=_mixed_prec(dt)
    )
    return ws[0] if splits == 1 else ws.sum(0)


def _logit_config(dt: str, c: int) -> dict:
    """The widest class block that pads ``c`` classes by at most 1/8 (wide blocks read long runs of each row);
    failing that (small ``c``), the one that pads least."""
    padded = {bc: triton.cdiv(c, bc) * bc for bc in _logit_widths(dt)}
    fit = [bc for bc, p in padded.items() if 8 * p <= 9 * c]
    bc = max(fit) if fit else min(padded, key=lambda w: (padded[w], -w))
    return KERNELS.fixed("_logit_grad_sqnorms_kernel", dt, BC=bc)


def _logit_grad_sqnorms(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    n, t, c = logits.shape
    r = n * t
    out = torch.empty((r,), device=logits.device, dtype=_out_dtype(logits))
    meta = _logit_config(_dt(logits), c)
    _wrap(_logit_grad_sqnorms_kernel)[(triton.cdiv(r, meta["BR"]),)](
        logits, targets, out, r, t, c, *logits.stride(), *targets.stride(), ignore_index, **meta
    )
    if t == 1:
        return out
    return out.view(n, t).sum(1)


@_define_op("pycurv::weighted_grad_sum_triton")
def _weighted_grad_sum_op(a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bias: bool) -> torch.Tensor:
    return _weighted_grad_sum(a, g, coef, bias)


@_define_op("pycurv::logit_grad_sqnorms_triton")
def _logit_grad_sqnorms_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return _logit_grad_sqnorms(logits, targets, ignore_index)


if _INTERPRET:

    @_weighted_grad_sum_op.register_fake
    def _(a, g, coef, bias):
        return a.new_empty((g.shape[2], a.shape[2] + int(bias)), dtype=_out_dtype(a))

    @_logit_grad_sqnorms_op.register_fake
    def _(logits, targets, ignore_index):
        return logits.new_empty((logits.shape[0],), dtype=_out_dtype(logits))


def weighted_grad_sum_triton(a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, bias: bool) -> torch.Tensor:
    """``sum_n coef_n G_n`` (the bias column ``sum_{n,t} coef_n g[n, t]`` last with ``bias``), shape
    ``(d_out, d_in [+1])``, float32 (float64 for float64 inputs), for validated 3-d ``a``, ``g`` of one dtype and
    ``coef: (N,)`` in the result dtype on their device."""
    return torch.ops.pycurv.weighted_grad_sum_triton(a, g, coef, bias)


def logit_grad_sqnorms_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``s_n = sum_t ||softmax(z_nt) - e_{y_nt}||^2`` over the steps whose target is not ``ignore_index``, shape
    ``(N,)``, float32 (float64 for float64 logits), for validated ``logits: (N, T, C)`` of any strides and int64
    ``targets: (N, T)`` in ``[0, C)`` or equal to ``ignore_index``."""
    return torch.ops.pycurv.logit_grad_sqnorms_triton(logits, targets, int(ignore_index))
