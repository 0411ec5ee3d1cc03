"""K-FAC preconditioner for any ``torch.optim`` optimizer (Martens & Grosse 2015; Grosse & Martens 2016 for
convolutions; MATH.md section 2).

Usage::

    pre = pycurv.optim.KFAC(model, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()       # rewrites p.grad of every handled layer with its K-FAC step
        opt.step()

Layers
------
* ``nn.Linear`` on inputs ``(N, d_in)`` or ``(N, ..., d_in)``: the dimensions between the first and the last are
  ``T`` positions of each sample. An unbatched ``(d_in,)`` input counts as one sample.
* ``nn.Conv2d`` with ``groups=1`` and ``padding_mode="zeros"`` (any stride, padding, dilation): the layer input is
  unfolded into patches, ``T = H_out * W_out`` positions of ``c_in * kh * kw`` features; the weight is viewed as
  ``(c_out, c_in * kh * kw)``.
* With a trainable bias the bias gradient is the last column of the weight gradient and the layer input gets a
  virtual column of ones (the ``A`` factor is ``(d_in + 1, d_in + 1)``); weight and bias are preconditioned
  together. A bias with ``requires_grad=False`` is left out.
* Layers whose weight has ``requires_grad=False`` are skipped. Every other module with trainable parameters of its
  own (LayerNorm, Embedding, a grouped Conv2d, ...) is reported once, by one ``UserWarning`` at construction listing
  the names, and its gradients are left alone. A handled layer that has a gradient at ``step()`` but never had
  statistics recorded (used functionally, as ``nn.MultiheadAttention.out_proj``, or called only outside the
  recording conditions below) is reported once too and left alone; a layer that was not called is skipped.
* ``layers=`` (names as in ``model.named_modules()``, or modules) restricts K-FAC to those layers; nothing else
  is reported.

Factors
-------
For a layer with inputs ``a`` and per-sample output gradients ``g`` over ``N`` samples of ``T`` positions::

    A = (1/N) sum_{n,t} ā ā^T         (= T * the mean of ā ā^T over the N*T rows)
    G = (1/(N T)) sum_{n,t} g g^T     (the mean over the N*T rows)

so ``T`` sits in ``A`` (with plain Tikhonov damping its placement matters, with π-damping or the eigen method it
does not). ``g`` is the gradient of each sample's own loss: with ``loss_reduction="mean"`` (the default; the loss
is ``(1/N) sum_n l_n``, ``N`` = dim 0 of the layer input) the gradient arriving at the layer output is multiplied by
``N``; with ``"sum"`` (``sum_n l_n``) it is taken as is. A loss scaled by a constant ``c`` (a loss divided by the
number of accumulation steps, a ``GradScaler``) scales ``G`` by ``c²``.

Statistics are recorded only when the module is in training mode, autograd is recording (not under
``torch.no_grad()``, not a forward recomputed inside backward) and a factor update is due at the coming
``step()``. The forward hook reduces the layer input to ``ā^T ā / rows`` at once (through
:func:`pycurv.ops.kfac_factor_update`); a hook on the layer output does the same with ``g`` and folds both into
per-layer accumulators, weighted by samples (``A``) and rows (``G``), so that several forward/backward passes
before one ``step()`` (gradient accumulation) give exactly the factors of one batch holding all of them. Each call
of a layer (a layer applied twice, a backward run twice through one graph) counts as its own batch of samples.
No per-sample gradient and no layer input or output gradient is kept beyond the hooks.

At ``step()`` the accumulated estimate ``F_new`` enters the running average ``F <- decay F + (1 - decay) F_new``
(``factor_decay``; the first update sets ``F = F_new``; ``factor_decay=0`` keeps only the last batch). Factors are
float32 (float64 for a float64 layer) whatever the parameters' dtype.

Step
----
Factors are updated every ``factor_update_steps`` steps and inverses every ``inv_update_steps`` steps; the step
counter starts at 0, so the first ``step()`` does both. Inverses are also (re)computed for a layer that has none yet
and after ``method``, ``damping_mode``, ``inverse_method`` or, for ``method="inverse"``, ``damping`` changed. All
factors of equal size, dtype and device (``A``'s and ``G``'s of every layer together) are inverted or
eigendecomposed in one batched call. With ``λ = damping``:

* ``method="eigen"`` (default): ``A = Q_A diag(d_A) Q_A^T``, ``G = Q_G diag(d_G) Q_G^T`` from
  :func:`pycurv.ops.sym_eig` (eigenvalues clamped at 0) and the step
  ``Q_G [(Q_G^T ∇W Q_A) / (d_G d_A^T + λ)] Q_A^T``,
  the exact ``(A ⊗ G + λ I)^{-1} vec(∇W)``.
* ``method="inverse"``: factored Tikhonov damping, ``G_inv ∇W A_inv`` with ``A_inv = (A + π √λ I)^{-1}`` and
  ``G_inv = (G + √λ/π I)^{-1}`` (:func:`pycurv.ops.damped_inverse` with ``inverse_method``), where
  ``damping_mode="pi"`` uses ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (1 where that is not a positive number)
  and ``"tikhonov"`` uses ``π = 1``.

``p.grad`` is preconditioned as it is (so with ``loss_reduction="sum"`` the step is ``N`` times the ``"mean"`` one),
in the factors' precision, and written back in ``p.grad``'s dtype.

A damped factor that is not positive definite (``damping=0`` with a rank-deficient factor) gets more damping instead
of producing NaN: one :class:`pycurv.ops.DampingRaisedWarning` names the layers and the damping used, which is kept
until the next inverse update.

KL-clip (Ba, Grosse & Martens 2017): with ``kl_clip`` set, every preconditioned gradient is multiplied by
``ν = min(1, sqrt(kl_clip / |sum_layers lr² <step, ∇W>|))`` (:func:`pycurv.ops.kl_clip_scale`, no host
synchronisation); ``lr`` must be the learning rate of the optimizer that follows. ``kl_clip=None`` disables it.

Hyper-parameters are plain attributes, checked on assignment, and may change between steps (a schedule):
``pre.lr``, ``pre.damping``, ``pre.kl_clip``, ``pre.factor_decay``, ``pre.factor_update_steps``,
``pre.inv_update_steps``, ``pre.method``, ``pre.damping_mode``, ``pre.inverse_method``, ``pre.loss_reduction``,
``pre.check_finite``. A ``torch.optim.lr_scheduler`` does not see ``pre.lr``: copy the optimizer's learning rate,
``pre.lr = opt.param_groups[0]["lr"]``.

Non-finite values
-----------------
Factors holding NaN or inf when inverses are computed raise ``FloatingPointError`` naming the layers. With
``check_finite=True`` (default) the statistics of the step and the preconditioned gradients are checked too (one
host synchronisation per step for all of them; a step that updates inverses, which synchronises anyway, adds up to
three: the statistics before they enter the factors, the factors, the damping check): a non-finite value raises
``FloatingPointError`` naming the layers before any ``p.grad`` is written, and non-finite statistics are dropped
instead of entering the factors. With ``check_finite=False`` a non-finite batch enters the factors and
is reported at the next inverse update.

State
-----
One :class:`KFACLayer` per handled layer (``pre.layers[name]``) owns that layer's tensors (factors,
accumulators, inverses or eigenbases, the damping used). :meth:`KFAC.state_dict` holds the step counter, the
hyper-parameters and, keyed by module name, the factors and the inverses or eigenbases with their damping, as
copies; :meth:`KFAC.load_state_dict` into a fresh ``KFAC`` on a model with the same layers makes the next step
equal, bit for bit, to the step without the reload. Statistics accumulated for a ``step()`` that has not run yet
are not saved. :meth:`KFAC.remove` removes the hooks. Zeroing gradients is the optimizer's job.

Cost between inverse updates
----------------------------
The layers whose steps come from one batched op call (equal ``(d_out, d_in)``, dtype and device) form a group. When
inverses, eigenbases or the eigenbasis damping are (re)computed, or state is loaded, each group's inverses or
eigenbases are stacked once; the per-layer tensors become views into those stacks (a group of one layer is used
through ``unsqueeze(0)`` views), so treat them as read-only. A step then copies only the gradients: into a buffer
kept per group (the gradients' size in the factors' dtype, the bias as the last column), or not at all for a group
of one layer without bias whose gradient already has the factors' dtype. Finiteness is read from one ``sum |x|``
per tensor (finite exactly when every element is) in one host synchronisation; preconditioned gradients are
written back with one ``foreach`` copy.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from .. import ops
from ..capture import _conv_patches, _in_backward
from ..ops import DampingRaisedWarning
from ..reference import acc_dtype

__all__ = ["KFAC", "KFACLayer"]

METHODS = ("eigen", "inverse")
DAMPING_MODES = ("pi", "tikhonov")
INVERSE_METHODS = ("cholesky", "eigh", "newton_schulz")
LOSS_REDUCTIONS = ("mean", "sum")


def _functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` lives inside a torch.func transform (vmap, grad), whose calls are not training passes."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return check is not None and check(x)


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def _abs_sums(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sum |x|`` of each tensor, stacked on ``device``, without elementwise temporaries. A sum of magnitudes has
    no cancellation and NaN / inf propagate through it, so it is finite whenever every element is; it is non-finite
    for a non-finite element, or when huge finite values overflow it (which :func:`_finite` tells apart)."""
    return torch.stack([n.to(device) for n in torch._foreach_norm(tensors, 1)])


def _finite(sums: list[float], tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every element is finite, from its :func:`_abs_sums` value; a non-finite sum is confirmed
    elementwise (an extra synchronisation only on the way to an error)."""
    return [math.isfinite(v) or bool(t.isfinite().all()) for v, t in zip(sums, tensors)]


class _Group:
    """Layers whose steps come from one batched op call (equal ``(d_out, d_in)``, dtype and device), with their
    inverses or eigenbases stacked in the op's argument order (``mats``) and the buffer their gradients are
    assembled in (``buf``, with per-layer views ``w_dst`` of the weight part and ``b_dst`` of the bias column)."""

    __slots__ = ("layers", "mats", "buf", "w_dst", "b_dst")

    def __init__(self, layers: list["KFACLayer"], mats: list[torch.Tensor]):
        self.layers = layers
        self.mats = mats
        self.buf: torch.Tensor | None = None
        self.w_dst: list[torch.Tensor] = []
        self.b_dst: list[torch.Tensor] = []

    def gradients(self) -> torch.Tensor:
        """``(B, d_out, d_in)`` gradients in the factors' dtype, bias as the last column (zero for a bias without
        a gradient). A single layer without bias whose gradient has the factors' dtype is used in place; otherwise
        one foreach copy fills the buffer, which is allocated on first use and kept."""
        lays = self.layers
        first = lays[0]
        if len(lays) == 1 and not first.bias:
            gw = first.module.weight.grad
            if gw.dtype == first.dtype:
                return gw.reshape(first.d_out, first.k).unsqueeze(0)
        if self.buf is None:
            self.buf = torch.empty(
                (len(lays), first.d_out, first.d_in), dtype=first.dtype, device=first.module.weight.device
            )
            for i, lay in enumerate(lays):
                self.w_dst.append(self.buf[i, :, : lay.k].view(lay.module.weight.shape))
                if lay.bias:
                    self.b_dst.append(self.buf[i, :, lay.k])
        dst = list(self.w_dst)
        src = [lay.module.weight.grad for lay in lays]
        for lay, d in zip([lay for lay in lays if lay.bias], self.b_dst):
            gb = lay.module.bias.grad
            if gb is None:
                d.zero_()
            else:
                dst.append(d)
                src.append(gb)
        torch._foreach_copy_(dst, src)
        return self.buf


class KFACLayer:
    """K-FAC state of one layer, in plain tensors: the factors ``A: (d_in, d_in)`` and ``G: (d_out, d_out)``
    (``d_in`` counts the bias column), the accumulators of the coming factor update and, depending on the method,
    ``a_inv``, ``g_inv`` with the damping used for each (``a_damping``, ``g_damping``), or the eigenbases ``q_a``,
    ``q_g``, eigenvalues ``d_a``, ``d_g`` and the damping used (``eig_damping``). Damping values are 0-d float64
    tensors. The inverses, eigenbases, eigenvalues and ``eig_damping`` may be views into stacks shared with other
    layers of the same shape (see "Cost between inverse updates" in the module docstring): read-only."""

    _SAVED = ("A", "G", "a_inv", "g_inv", "a_damping", "g_damping", "q_a", "d_a", "q_g", "d_g", "eig_damping")

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.conv = isinstance(module, nn.Conv2d)
        self.bias = module.bias is not None and module.bias.requires_grad
        w = module.weight
        self.d_out = w.shape[0]
        self.k = w[0].numel()  # weight columns of the gradient matrix; the bias, if any, follows them
        self.d_in = self.k + int(self.bias)
        self.dtype = acc_dtype(w.dtype)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.acc_a: torch.Tensor | None = None
        self.acc_g: torch.Tensor | None = None
        self.acc_samples = 0
        self.acc_rows = 0
        self.a_inv = self.g_inv = self.a_damping = self.g_damping = None
        self.q_a = self.d_a = self.q_g = self.d_g = self.eig_damping = None
        self.inv_key: tuple | None = None
        self.eig_for: float | None = None

    def __repr__(self) -> str:
        kind = "Conv2d" if self.conv else "Linear"
        return f"KFACLayer({self.name!r}, {kind}, d_out={self.d_out}, d_in={self.d_in}, bias={self.bias})"

    # -- statistics -------------------------------------------------------------------------------------------

    def _unbatched(self, x: torch.Tensor) -> bool:
        return x.dim() == (3 if self.conv else 1)

    def _new(self, d: int, device: torch.device) -> torch.Tensor:
        return torch.empty((d, d), dtype=self.dtype, device=device)

    def input_statistics(self, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, int, int] | None:
        """``(ā^T ā / rows, samples, rows)`` of one forward call's input, or None for an empty batch."""
        x = x.detach()
        if self._unbatched(x):
            x = x.unsqueeze(0)
        if self.conv and x.dim() != 4:
            raise ValueError(
                f"KFAC: layer {self.name!r} (Conv2d) needs a (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        if x.numel() == 0:
            return None
        a = _conv_patches(self.module, x) if self.conv else x
        rows = a.numel() // a.shape[-1]
        stat = ops.kfac_factor_update(self._new(self.d_in, x.device), a, 0.0, self.bias, backend=backend)
        return stat, x.shape[0], rows

    def fold(self, pending: tuple[torch.Tensor, int, int], grad: torch.Tensor, mean: bool, backend: str) -> None:
        """Folds one call's input statistics and its output gradient into the accumulators (exact means)."""
        a_stat, n, rows_a = pending
        g = grad.detach()
        if self._unbatched(g):
            g = g.unsqueeze(0)
        if self.conv:
            g = g.movedim(1, -1)
        rows_g = g.numel() // g.shape[-1]
        scale = float(n * n) if mean else 1.0  # per-sample gradients: the statistic of (N g) is N² that of g
        t = rows_a / n
        if self.acc_samples == 0:
            self.acc_a = a_stat * t
        else:
            w = n / (self.acc_samples + n)
            self.acc_a.mul_(1.0 - w).add_(a_stat, alpha=w * t)
        if self.acc_rows == 0:
            self.acc_g = ops.kfac_factor_update(self._new(self.d_out, g.device), g, 0.0, backend=backend)
            if scale != 1.0:
                self.acc_g.mul_(scale)
        elif scale == 1.0:
            ops.kfac_factor_update(self.acc_g, g, self.acc_rows / (self.acc_rows + rows_g), backend=backend)
        else:
            new = ops.kfac_factor_update(self._new(self.d_out, g.device), g, 0.0, backend=backend)
            w = rows_g / (self.acc_rows + rows_g)
            self.acc_g.mul_(1.0 - w).add_(new, alpha=w * scale)
        self.acc_samples += n
        self.acc_rows += rows_g

    def has_statistics(self) -> bool:
        return self.acc_rows > 0

    def drop_statistics(self) -> None:
        self.acc_a = self.acc_g = None
        self.acc_samples = self.acc_rows = 0

    # -- gradients --------------------------------------------------------------------------------------------

    def grad_matrix(self) -> torch.Tensor | None:
        """``(d_out, d_in)`` gradient in the factors' dtype (bias as the last column), None without a weight grad."""
        w = self.module.weight
        if w.grad is None:
            return None
        gw = w.grad.reshape(self.d_out, -1).to(self.dtype)
        if not self.bias:
            return gw
        b = self.module.bias
        if b.grad is None:
            gb = torch.zeros(self.d_out, dtype=self.dtype, device=gw.device)
        else:
            gb = b.grad.to(self.dtype)
        return torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def write_grad(self, step: torch.Tensor) -> None:
        w = self.module.weight
        k = self.k
        w.grad.copy_(step[:, :k].reshape(w.grad.shape))
        if self.bias:
            b = self.module.bias
            if b.grad is None:
                b.grad = step[:, k].to(b.dtype).clone()
            else:
                b.grad.copy_(step[:, k])

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        out = {"d_out": self.d_out, "d_in": self.d_in, "bias": self.bias, "inv_key": self.inv_key,
               "eig_for": self.eig_for}
        for k in self._SAVED:
            v = getattr(self, k)
            out[k] = None if v is None else v.detach().clone()
        return out

    def check_state(self, sd: dict) -> None:
        """Raises unless ``sd`` (from :meth:`state_dict`) fits this layer."""
        if (sd["d_out"], sd["d_in"], sd["bias"]) != (self.d_out, self.d_in, self.bias):
            raise ValueError(
                f"KFAC.load_state_dict: layer {self.name!r} has d_out={self.d_out}, d_in={self.d_in} (bias={self.bias})"
                f", the state has d_out={sd['d_out']}, d_in={sd['d_in']} (bias={sd['bias']})"
            )
        for k in self._SAVED:
            v = sd[k]
            if v is not None:
                want = torch.float64 if k.endswith("damping") else self.dtype
                if not isinstance(v, torch.Tensor) or v.dtype != want:
                    got = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                    raise TypeError(
                        f"KFAC.load_state_dict: {k} of layer {self.name!r} must be a {want} tensor, got {got}"
                    )

    def load_state_dict(self, sd: dict) -> None:
        self.check_state(sd)
        device = self.module.weight.device
        for k in self._SAVED:
            v = sd[k]
            setattr(self, k, None if v is None else v.to(device, copy=True))
        self.inv_key = None if sd["inv_key"] is None else tuple(sd["inv_key"])
        self.eig_for = sd["eig_for"]
        self.drop_statistics()


# -- hyper-parameters ------------------------------------------------------------------------------------------


def _number(name, v, *, lo=0.0, lo_open=False, hi=None, optional=False):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"KFAC: {name} must be a finite number{' or None' if optional else ''}, got {v!r}")
    bad = (v <= lo) if lo_open else (v < lo)
    if bad or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"KFAC: {name} must be {rng}, got {v!r}")
    return float(v)


def _count(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"KFAC: {name} must be an int >= 1, got {v!r}")
    return v


def _choice(options):
    def check(name, v):
        if v not in options:
            raise ValueError(f"KFAC: {name} must be one of {options}, got {v!r}")
        return v

    return check


def _flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"KFAC: {name} must be a bool, got {type(v).__name__}")
    return v


class _Setting:
    """A hyper-parameter: a plain attribute checked on assignment."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._hp[self.name]

    def __set__(self, obj, value):
        obj._hp[self.name] = self.check(self.name, value)


class KFAC:
    """K-FAC preconditioner: :meth:`step` after ``loss.backward()`` rewrites ``p.grad`` of every handled
    ``nn.Linear`` / ``nn.Conv2d`` layer of ``model`` with its K-FAC step; then any ``torch.optim`` optimizer steps.
    Conventions, factors and damping: see the module docstring.

    Args:
        model: the module whose layers are preconditioned (hooks are registered on construction).
        damping: ``λ >= 0``.
        factor_decay: running-average weight of the old factors, in ``[0, 1]``.
        factor_update_steps: factors are updated at steps ``0, k, 2k, ...``.
        inv_update_steps: inverses / eigenbases are recomputed at steps ``0, k, 2k, ...``.
        kl_clip: KL-clip bound ``> 0``, or None for no clipping.
        lr: learning rate of the optimizer that follows (needed by the KL-clip).
        method: ``"eigen"`` or ``"inverse"``.
        damping_mode: ``"pi"`` or ``"tikhonov"`` (``method="inverse"`` only).
        inverse_method: ``"cholesky"``, ``"eigh"`` or ``"newton_schulz"`` for :func:`pycurv.ops.damped_inverse`.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss combines the samples of a batch.
        layers: None for every supported layer, or names / modules of the layers to precondition.
        check_finite: check statistics and preconditioned gradients for NaN / inf every step.
        backend: passed to every :mod:`pycurv.ops` call.
    """

    lr = _Setting(lambda n, v: _number(n, v, lo_open=True, optional=True))
    damping = _Setting(lambda n, v: _number(n, v))
    factor_decay = _Setting(lambda n, v: _number(n, v, hi=1.0))
    factor_update_steps = _Setting(_count)
    inv_update_steps = _Setting(_count)
    kl_clip = _Setting(lambda n, v: _number(n, v, lo_open=True, optional=True))
    method = _Setting(_choice(METHODS))
    damping_mode = _Setting(_choice(DAMPING_MODES))
    inverse_method = _Setting(_choice(INVERSE_METHODS))
    loss_reduction = _Setting(_choice(LOSS_REDUCTIONS))
    check_finite = _Setting(_flag)

    _HPARAMS = ("lr", "damping", "factor_decay", "factor_update_steps", "inv_update_steps", "kl_clip", "method",
                "damping_mode", "inverse_method", "loss_reduction", "check_finite")

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        kl_clip: float | None = 1e-3,
        lr: float | None = None,
        method: str = "eigen",
        *,
        damping_mode: str = "pi",
        inverse_method: str = "cholesky",
        loss_reduction: str = "mean",
        layers: Iterable[str | nn.Module] | None = None,
        check_finite: bool = True,
        backend: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC: model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"KFAC: backend must be one of {ops.BACKENDS}, got {backend!r}")
        self._hp: dict = {}
        for k, v in (("lr", lr), ("damping", damping), ("factor_decay", factor_decay),
                     ("factor_update_steps", factor_update_steps), ("inv_update_steps", inv_update_steps),
                     ("kl_clip", kl_clip), ("method", method), ("damping_mode", damping_mode),
                     ("inverse_method", inverse_method), ("loss_reduction", loss_reduction),
                     ("check_finite", check_finite)):
            setattr(self, k, v)
        self._check_lr()
        self.model = model
        self.backend = backend
        self.steps = 0
        self.layers: dict[str, KFACLayer] = {}
        unsupported = self._select(model, layers)
        if unsupported:
            warnings.warn(
                f"KFAC: layers {unsupported} have trainable parameters but are not supported (nn.Linear, and "
                "nn.Conv2d with groups=1 and padding_mode='zeros' are); their gradients are left alone",
                UserWarning,
                stacklevel=2,
            )
        self._reported: set[str] = set()
        self._plan: list[_Group] = []
        self._plan_size = 0
        self._plan_method: str | None = None
        self._plan_stale = True
        self._handles = [
            layer.module.register_forward_hook(self._forward_hook(layer), with_kwargs=True)
            for layer in self.layers.values()
        ]
        self._hooked = True

    def _select(self, model: nn.Module, layers) -> list[str]:
        """Fills ``self.layers``; returns the names of unsupported modules with trainable parameters."""
        named = list(model.named_modules())
        if layers is None:
            unsupported = []
            for name, m in named:
                if _supported(m):
                    if m.weight.requires_grad:
                        self.layers[name] = KFACLayer(name, m)
                elif any(p.requires_grad for p in m.parameters(recurse=False)):
                    unsupported.append(name)
            return unsupported
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        by_name = dict(named)
        by_id = {id(m): n for n, m in named}
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"KFAC: layers names {item!r}, which is not a submodule of model")
                name, m = item, by_name[item]
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"KFAC: layers holds a {type(item).__name__} that is not part of model")
                name, m = by_id[id(item)], item
            else:
                raise TypeError(f"KFAC: layers must hold names or modules, got {type(item).__name__}")
            if not _supported(m):
                raise ValueError(
                    f"KFAC: layer {name!r} is a {type(m).__name__}"
                    + (f" with groups={m.groups}, padding_mode={m.padding_mode!r}" if isinstance(m, nn.Conv2d) else "")
                    + "; supported are nn.Linear and nn.Conv2d with groups=1 and padding_mode='zeros'"
                )
            if m.weight.requires_grad and name not in self.layers:
                self.layers[name] = KFACLayer(name, m)
        return []

    def _check_lr(self) -> None:
        if self.kl_clip is not None and self.lr is None:
            raise ValueError(
                "KFAC: lr (the learning rate of the optimizer that follows) is needed for the KL-clip; pass lr=... "
                "or kl_clip=None"
            )

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={self._hp[k]!r}" for k in self._HPARAMS)
        return f"KFAC({len(self.layers)} layers, steps={self.steps}, {hp})"

    # -- hooks ------------------------------------------------------------------------------------------------

    def _recording(self, module: nn.Module) -> bool:
        return (
            self._hooked
            and module.training
            and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()
            and not _in_backward()
            and self.steps % self.factor_update_steps == 0
        )

    def _forward_hook(self, layer: KFACLayer):
        def hook(module, args, kwargs, output):
            # a deep copy of the model carries this hook along: only the module itself is recorded
            if module is not layer.module or not self._recording(module):
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or _functorch_wrapped(x) or _functorch_wrapped(output):
                return None
            pending = layer.input_statistics(x, self.backend)
            if pending is None:
                return None

            def grad_hook(grad):
                if self._hooked:
                    layer.fold(pending, grad, self.loss_reduction == "mean", self.backend)
                return None

            output.register_hook(grad_hook)
            return None

        return hook

    def remove(self) -> None:
        """Removes the hooks; ``step()`` still preconditions with the factors recorded so far."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = False

    # -- step -------------------------------------------------------------------------------------------------

    def _inv_key(self) -> tuple:
        if self.method == "eigen":
            return ("eigen",)
        return ("inverse", self.damping_mode, self.inverse_method, self.damping)

    @torch.no_grad()
    def step(self) -> None:
        """Updates factors and inverses when due, then replaces ``p.grad`` of every handled layer by its K-FAC step
        (KL-clipped when ``kl_clip`` is set). Call after ``loss.backward()`` and before the optimizer's step."""
        self._check_lr()
        layers = list(self.layers.values())
        fresh = [lay for lay in layers if lay.has_statistics()]
        stats: list[torch.Tensor] = [t for lay in fresh for t in (lay.acc_a, lay.acc_g)]
        stat_sums = _abs_sums(stats, stats[0].device) if self.check_finite and fresh else None
        key = self._inv_key()
        inv_due = self.steps % self.inv_update_steps == 0

        def needs_inverse(lay):
            return lay.A is not None and (inv_due or lay.inv_key != key)

        will_invert = any(needs_inverse(lay) for lay in layers) or any(lay.A is None for lay in fresh)
        committed = False
        if fresh and (will_invert or stat_sums is None):
            if stat_sums is not None:
                self._raise_bad_statistics(fresh, _finite(stat_sums.tolist(), stats))
            self._commit(fresh)
            committed = True

        handled, unseen = [], []
        for lay in layers:
            if lay.module.weight.grad is None:
                continue
            if lay.A is None:
                unseen.append(lay.name)
            else:
                handled.append(lay)
        self._report_unseen(unseen)

        todo = [lay for lay in layers if needs_inverse(lay)]
        if todo:
            self._update_inverses(todo, key)
        if self.method == "eigen":
            self._update_eigen_damping([lay for lay in layers if lay.A is not None and lay.eig_for != self.damping])

        batches = self._precondition(handled) if handled else []
        results = [res for _, _, res in batches]
        if batches and self.kl_clip is not None:
            nu = ops.kl_clip_scale(results, [g for _, g, _ in batches], self.lr, self.kl_clip)
            torch._foreach_mul_(results, nu)
        step_lays = [lay for lays, _, _ in batches for lay in lays]
        step_mats = [s for res in results for s in res.unbind(0)]

        check_stats = not committed and stat_sums is not None
        if self.check_finite and (step_mats or check_stats):
            parts = [stat_sums] if check_stats else []
            dev = parts[0].device if parts else results[0].device
            parts += [torch.linalg.vector_norm(res, 1, dim=(1, 2)) for res in results]
            got = torch.cat([p.to(dev) for p in parts]).tolist()
            if check_stats:
                n = len(stats)
                self._raise_bad_statistics(fresh, _finite(got[:n], stats))
                got = got[n:]
            bad = {id(lay) for lay, ok in zip(step_lays, _finite(got, step_mats)) if not ok}
            if bad:
                if not committed:
                    for lay in fresh:
                        lay.drop_statistics()
                raise FloatingPointError(
                    f"KFAC: the preconditioned gradients of layers {[lay.name for lay in handled if id(lay) in bad]} "
                    "hold NaN or inf (non-finite gradients); p.grad was left unchanged"
                )
        if not committed and fresh:
            self._commit(fresh)
        self._write_grads(step_lays, step_mats)
        self.steps += 1

    def _write_grads(self, lays: list[KFACLayer], steps: list[torch.Tensor]) -> None:
        """Copies each layer's ``(d_out, d_in)`` step into ``p.grad`` (in its dtype), all in one foreach copy."""
        dst, src = [], []
        for lay, s in zip(lays, steps):
            w = lay.module.weight
            dst.append(w.grad)
            if not lay.bias:
                src.append(s.reshape(w.shape))
                continue
            src.append(s[:, : lay.k].reshape(w.shape))
            b = lay.module.bias
            if b.grad is None:
                b.grad = s[:, lay.k].to(b.dtype).clone()
            else:
                dst.append(b.grad)
                src.append(s[:, lay.k])
        if dst:
            torch._foreach_copy_(dst, src)

    def _raise_bad_statistics(self, fresh: list[KFACLayer], ok: list[bool]) -> None:
        """Raises (dropping the step's statistics) unless both accumulators of every layer are finite; ``ok`` holds
        one flag per accumulator, ``A``'s and ``G``'s of each layer in turn."""
        bad = [lay.name for i, lay in enumerate(fresh) if not (ok[2 * i] and ok[2 * i + 1])]
        if not bad:
            return
        for lay in fresh:
            lay.drop_statistics()
        raise FloatingPointError(
            f"KFAC: the statistics recorded for layers {bad} in this step hold NaN or inf (non-finite layer inputs "
            "or output gradients); the factors were not updated and p.grad was left unchanged"
        )

    def _commit(self, fresh: list[KFACLayer]) -> None:
        """Running average of the factors with the accumulated estimates, one foreach launch per factor kind."""
        decay = self.factor_decay
        olds, news = [], []
        for lay in fresh:
            if lay.A is None or decay == 0.0:
                lay.A, lay.G = lay.acc_a, lay.acc_g
            else:
                olds += [lay.A, lay.G]
                news += [lay.acc_a, lay.acc_g]
            lay.acc_a = lay.acc_g = None
            lay.acc_samples = lay.acc_rows = 0
        if olds:
            torch._foreach_mul_(olds, decay)
            torch._foreach_add_(olds, news, alpha=1.0 - decay)

    def _report_unseen(self, names: list[str]) -> None:
        new = [n for n in names if n not in self._reported]
        if not new:
            return
        self._reported.update(new)
        warnings.warn(
            f"KFAC: layers {new} have gradients but no K-FAC statistics were recorded for them (used functionally, "
            "or never called in training mode with autograd recording); their gradients are left alone",
            UserWarning,
            stacklevel=3,
        )

    # -- inverses ---------------------------------------------------------------------------------------------

    @staticmethod
    def _groups(items, keyfn) -> dict:
        groups: dict = {}
        for it in items:
            groups.setdefault(keyfn(it), []).append(it)
        return groups

    def _update_inverses(self, todo: list[KFACLayer], key: tuple) -> None:
        mats = [(lay, "A", lay.A) for lay in todo] + [(lay, "G", lay.G) for lay in todo]
        factors = [m for _, _, m in mats]
        ok = _finite(_abs_sums(factors, factors[0].device).tolist(), factors)
        bad = [f"{which} of {lay.name!r}" for (lay, which, _), good in zip(mats, ok) if not good]
        if bad:
            raise FloatingPointError(
                f"KFAC: the K-FAC factors {', '.join(bad)} hold NaN or inf; check the layer inputs and the loss "
                "(check_finite=True stops non-finite statistics before they enter the factors)"
            )
        self._plan_stale = True
        if self.method == "eigen":
            self._eigendecompose(mats)
        else:
            self._invert(todo, mats)
        for lay in todo:
            lay.inv_key = key

    def _eigendecompose(self, mats) -> None:
        for group in self._groups(mats, lambda t: (t[2].shape[0], t[2].dtype, t[2].device)).values():
            vals, vecs = ops.sym_eig(torch.stack([m for _, _, m in group]), backend=self.backend)
            vals = vals.clamp_min(0)
            for i, (lay, which, _) in enumerate(group):
                if which == "A":
                    lay.d_a, lay.q_a = vals[i], vecs[i]
                else:
                    lay.d_g, lay.q_g = vals[i], vecs[i]
        for lay in {id(t[0]): t[0] for t in mats}.values():
            lay.a_inv = lay.g_inv = lay.a_damping = lay.g_damping = None
            lay.eig_for = None

    def _update_eigen_damping(self, todo: list[KFACLayer]) -> None:
        """Per-layer damping of the eigenbasis step: ``λ``, or with ``λ = 0`` and a (numerically) singular
        ``A ⊗ G``, the rounding level ``eps * d * max(d_G) max(d_A)``. A positive ``λ`` is used as is, without
        looking at the eigenvalues (no host synchronisation)."""
        if not todo:
            return
        self._plan_stale = True
        lam = self.damping
        if lam > 0:
            for lays in self._groups(todo, lambda lay: lay.d_a.device).values():
                used = torch.full((len(lays),), lam, dtype=torch.float64, device=lays[0].d_a.device)
                for lay, u in zip(lays, used):
                    lay.eig_damping, lay.eig_for = u, lam
            return
        dev = todo[0].d_a.device
        info = torch.stack([
            torch.stack([lay.d_g.amin() * lay.d_a.amin(), lay.d_g.amax() * lay.d_a.amax()]).double().to(dev)
            for lay in todo
        ]).tolist()
        raised = []
        for lay, (lo, hi) in zip(todo, info):
            # eigenvalue products at the rounding level of the largest count as zero
            noise = hi * torch.finfo(lay.dtype).eps * max(lay.d_in, lay.d_out)
            used = lam if lo > noise else max(noise, torch.finfo(lay.dtype).tiny)
            if used != lam:
                raised.append(f"{lay.name!r}: {used:.3g}")
            lay.eig_damping = torch.tensor(used, dtype=torch.float64, device=lay.d_a.device)
            lay.eig_for = lam
        if raised:
            warnings.warn(
                f"KFAC: A ⊗ G + damping is not positive definite for some layers (damping={lam}); their damping was "
                f"raised to {{{', '.join(raised)}}} until the next inverse update",
                DampingRaisedWarning,
                stacklevel=4,
            )

    def _invert(self, todo: list[KFACLayer], mats) -> None:
        """Damped inverses of the factors, one :func:`pycurv.ops.damped_inverse` call per group of equal size, with
        the π of every layer from batched traces and one host synchronisation for the damping check."""
        sq = math.sqrt(self.damping)
        groups = list(self._groups(mats, lambda t: (t[2].shape[0], t[2].dtype, t[2].device)).values())
        stacks = [torch.stack([m for _, _, m in group]) for group in groups]
        trace = {}
        if self.damping_mode == "pi":
            for group, st in zip(groups, stacks):
                tr = torch.diagonal(st, dim1=1, dim2=2).sum(-1).double() / st.shape[-1]
                for (lay, which, _), t in zip(group, tr):
                    trace[id(lay), which] = t
        damp = {}
        for lays in self._groups(todo, lambda lay: lay.A.device).values():
            if self.damping_mode == "pi":
                ta = torch.stack([trace[id(lay), "A"] for lay in lays])
                tg = torch.stack([trace[id(lay), "G"] for lay in lays])
                pi = torch.sqrt(ta / tg)
                pi = torch.where(pi.isfinite() & (pi > 0), pi, torch.ones_like(pi))
            else:
                pi = torch.ones(len(lays), dtype=torch.float64, device=lays[0].A.device)
            for lay, da, dg in zip(lays, pi * sq, sq / pi):
                damp[id(lay), "A"], damp[id(lay), "G"] = da, dg
        checks = []
        for group, st in zip(groups, stacks):
            want = torch.stack([damp[id(lay), which] for lay, which, _ in group])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DampingRaisedWarning)
                inv, used = ops.damped_inverse(
                    st, want, self.inverse_method, backend=self.backend, return_damping=True
                )
            for (lay, which, _), m, u in zip(group, inv, used):
                if which == "A":
                    lay.a_inv, lay.a_damping = m, u
                else:
                    lay.g_inv, lay.g_damping = m, u
            checks.append(torch.stack([used, want]))
        dev = checks[0].device
        used_all, want_all = torch.cat([c.to(dev) for c in checks], dim=1).tolist()
        labels = [(lay, which) for group in groups for lay, which, _ in group]
        raised = [
            f"{which} of {lay.name!r}: {u:.3g}" for (lay, which), u, w in zip(labels, used_all, want_all) if u > w
        ]
        for lay in todo:
            lay.q_a = lay.d_a = lay.q_g = lay.d_g = lay.eig_damping = None
            lay.eig_for = None
        if raised:
            warnings.warn(
                f"KFAC: damped K-FAC factors not positive definite (damping={self.damping}); their damping was "
                f"raised to {{{', '.join(raised)}}} until the next inverse update",
                DampingRaisedWarning,
                stacklevel=4,
            )

    def _build_plan(self) -> list[_Group]:
        """Groups every layer with inverses (or eigenbases) for the current method and stacks their matrices once;
        the per-layer attributes become views into the stacks. Gradient buffers of unchanged groups are kept."""
        eigen = self.method == "eigen"
        names = ("q_g", "q_a", "d_g", "d_a", "eig_damping") if eigen else ("g_inv", "a_inv")
        ready = [lay for lay in self.layers.values() if lay.A is not None]
        old = {tuple(map(id, g.layers)): g for g in self._plan}
        plan = []
        for lays in self._groups(ready, lambda lay: (lay.d_out, lay.d_in, lay.dtype, lay.A.device)).values():
            if len(lays) == 1:
                lay = lays[0]
                mats = []
                for n in names:
                    t = getattr(lay, n)
                    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                        # a view into a batch of other layers' results: a compact copy lets that batch go
                        t = t.clone()
                        setattr(lay, n, t)
                    mats.append(t.unsqueeze(0))
            else:
                mats = [torch.stack([getattr(lay, n) for lay in lays]) for n in names]
                for i, lay in enumerate(lays):
                    for n, m in zip(names, mats):
                        setattr(lay, n, m[i])
            grp = _Group(lays, mats)
            prev = old.get(tuple(map(id, lays)))
            if prev is not None:
                grp.buf, grp.w_dst, grp.b_dst = prev.buf, prev.w_dst, prev.b_dst
            plan.append(grp)
        self._plan, self._plan_size, self._plan_method, self._plan_stale = plan, len(ready), self.method, False
        return plan

    def _precondition(self, handled: list[KFACLayer]) -> list[tuple[list[KFACLayer], torch.Tensor, torch.Tensor]]:
        """``(layers, gradients, steps)`` per group of ``handled``, one batched op call per group. Groups in which
        every layer has a gradient (the usual case) use the stacks of :meth:`_build_plan`; the others stack the
        matrices of the layers present for this step only."""
        plan = self._plan if not self._plan_stale and self._plan_method == self.method else self._build_plan()
        present = None if len(handled) == self._plan_size else {id(lay) for lay in handled}
        out = []
        for grp in plan:
            lays, mats = grp.layers, grp.mats
            if present is None or all(id(lay) in present for lay in lays):
                g = grp.gradients()
            else:
                keep = [i for i, lay in enumerate(lays) if id(lay) in present]
                if not keep:
                    continue
                lays = [lays[i] for i in keep]
                mats = [torch.stack([m[i] for i in keep]) for m in mats]
                g = torch.stack([lay.grad_matrix() for lay in lays])
            if self.method == "eigen":
                res = ops.kron_precondition_eigen(g, *mats, backend=self.backend)
            else:
                res = ops.kron_precondition(g, *mats, backend=self.backend)
            out.append((lays, g, res))
        return out

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, hyper-parameters and, keyed by layer name, copies of each layer's factors, inverses or
        eigenbases and the damping used."""
        return {
            "steps": self.steps,
            "hparams": dict(self._hp),
            "layers": {name: lay.state_dict() for name, lay in self.layers.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict` into this preconditioner; its layers must carry the same names and shapes."""
        if not isinstance(state_dict, dict) or not {"steps", "hparams", "layers"} <= set(state_dict):
            raise ValueError("KFAC.load_state_dict: expected a dict from KFAC.state_dict() with steps, hparams, layers")
        saved = state_dict["layers"]
        missing = sorted(set(self.layers) - set(saved))
        extra = sorted(set(saved) - set(self.layers))
        if missing or extra:
            raise ValueError(
                f"KFAC.load_state_dict: the state is for other layers: layers of this model missing from it {missing}, "
                f"layers in it not handled here {extra}"
            )
        hp = state_dict["hparams"]
        unknown = sorted(set(hp) - set(self._HPARAMS))
        if unknown:
            raise ValueError(f"KFAC.load_state_dict: unknown hyper-parameters {unknown}")
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"KFAC.load_state_dict: steps must be an int >= 0, got {steps!r}")
        checked = {k: getattr(type(self), k).check(k, hp[k]) for k in self._HPARAMS if k in hp}
        if checked.get("kl_clip", self.kl_clip) is not None and checked.get("lr", self.lr) is None:
            raise ValueError("KFAC.load_state_dict: the state sets kl_clip without lr")
        for name, lay in self.layers.items():
            lay.check_state(saved[name])
        self._hp.update(checked)
        for name, lay in self.layers.items():
            lay.load_state_dict(saved[name])
        self._plan_stale = True
        self.steps = steps
