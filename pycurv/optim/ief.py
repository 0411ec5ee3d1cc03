"""Exact iEF, EF and SF natural-gradient steps for any ``torch.optim`` optimizer (Wu, Yu, Zhang & Woodland 2024,
arXiv 2406.06420; MATH.md section 3).

Usage::

    pre = pycurv.optim.IEF(model)                       # or EF(model), SF(model, damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=50)    # the paper: constant lr 50-100, no momentum
    for x, y in data:
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)               # reduction="mean" (default) or "sum"
        loss.backward()                                 # SF: loss.backward(retain_graph=True)
        pre.step(y)                                     # rewrites p.grad of every handled layer
        opt.step()

The steps
---------
Let ``J`` be the ``(N, P)`` matrix of per-sample gradients of the loss the user backpropagated (``L = c sum_n l_n``
with ``c = 1`` for ``loss_reduction="sum"`` and ``c = 1/N_valid`` for ``"mean"``, ``N_valid`` the number of
targets that are not ``ignore_index``: ``F.cross_entropy``'s mean), so ``J = c [grad l_1; ...; grad l_N]`` and
``grad L = J^T 1``. Over the handled layers, with ``lambda = damping``:

* EF: ``p.grad <- J^T (J J^T + lambda I)^{-1} 1 = (J^T J + lambda I)^{-1} grad L``.
* iEF: ``p.grad <- J^T (J J^T + lambda I)^{-1} s``, ``s_n = ||grad_{z_n} (c l_n)||^2 = c^2 ||softmax(z_n) - e_{y_n}||^2``
  (summed over the positions of a sequence sample), so that to first order each sample's loss changes by
  ``-lr s_n``, as a Gauss-Newton step would give. With ``"mean"`` this is the paper's convention (its ``J`` and ``s``
  carry ``1/B`` and ``1/B^2``) and its learning rates (50-100) and damping (1e-12 to 1e-7) apply.
* SF: labels ``y^_n ~ softmax(z_n)`` are sampled from the model (positions whose target is ``ignore_index`` stay
  ignored), ``J^`` are the per-sample gradients of ``c sum_n l(z_n, y^_n)`` (one extra backward through the retained
  graph, done by :meth:`SF.step`) and ``p.grad <- (J^^T J^ + lambda I)^{-1} grad L
  = (1/lambda) [grad L - J^^T (J^ J^^T + lambda I)^{-1} J^ grad L]`` (Woodbury). ``grad L`` is the ``p.grad`` left
  by the user's backward. SF needs a real damping (default 1e-3).

``J J^T`` comes from :func:`pycurv.ops.per_sample_gram` summed over layers, ``s`` from
:func:`pycurv.ops.logit_grad_sqnorms`, the coefficients from :func:`pycurv.ops.ief_coefficients` (float64
Cholesky, near-duplicate samples dropped, the noise-floor directions of a singular ``J J^T`` left out) and every
layer's step from :func:`pycurv.ops.weighted_grad_sum`: no per-sample gradient is ever formed.

Layers and the other parameters
-------------------------------
Handled: ``nn.Linear`` (any leading dims: the dims between the first and the last are positions ``T`` of one
sample) and ``nn.Conv2d`` with ``groups=1`` and ``padding_mode="zeros"`` with a trainable weight; a trainable bias
belongs to its layer's per-sample gradient. ``layers=`` restricts the steps to the named layers. ``J`` is built
from the handled layers only. Every other trainable parameter (LayerNorm, embeddings, grouped convolutions, layers
left out by ``layers=``) follows ``unsupported``, reported once by a ``UserWarning`` naming them at construction:

* ``"grad"`` (default): its ``p.grad`` is left as the plain gradient (an SGD direction for those parameters);
* ``"zero"``: its ``p.grad`` is zeroed (the parameters are frozen; with weight decay they still decay);
* ``"raise"``: constructing the preconditioner raises ``ValueError``.

Logits and targets
------------------
``step(targets, logits=None)``: ``targets`` ``(N,)`` or ``(N, T)`` class indices; ``logits`` ``(N, C)`` or
``(N, T, C)`` (classes last), by default the tensor the model's last forward returned (a forward hook keeps it;
a model returning something else needs ``logits=``). EF needs neither (``step()``). One forward and one backward
per ``step()``: gradient accumulation over micro-batches is not supported (the per-sample gradients of the earlier
micro-batches are gone) and raises ``RuntimeError``, as does a ``step()`` without a recorded backward.

Numerics
--------
``J J^T`` and ``s`` are checked for NaN/inf (one host synchronisation, which the float64 solve needs anyway); a
non-finite value raises ``FloatingPointError`` naming the layers (or the logits) before any ``p.grad`` is
written. A singular (or numerically singular) ``J J^T + lambda I`` is solved by eigendecomposition with the
directions at the Gram's noise floor left out, which for ``lambda -> 0`` is the minimum-norm step (see
:func:`pycurv.ops.ief_coefficients`); the damping is never changed behind the user's back. ``last_info`` holds what
the last step did: the samples kept, the damping and the rank of the system solved.

State
-----
The preconditioners keep no curvature between steps. ``state_dict()`` holds the hyper-parameters and the step
counter (SF: and the state of its random generator when one was given), ``load_state_dict()`` restores them.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .. import ops
from ..capture import Capture
from ..reference import acc_dtype

__all__ = ["IEF", "EF", "SF"]

_REDUCTIONS = ("mean", "sum")
_UNSUPPORTED = ("grad", "zero", "raise")


def _handled(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return m.weight.requires_grad
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and m.weight.requires_grad
    return False


class _DualStep:
    """Shared machinery of :class:`IEF`, :class:`EF` and :class:`SF` (see the module docstring)."""

    _name = "IEF"
    _keep_outputs = False

    def __init__(
        self,
        model: nn.Module,
        damping: float,
        *,
        loss_reduction: str = "mean",
        layers: Iterable[str | nn.Module] | None = None,
        unsupported: str = "grad",
        dedup_threshold: float | None = 0.99,
        ignore_index: int = -100,
        check_finite: bool = True,
        backend: str = "auto",
    ):
        name = self._name
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}")
        if unsupported not in _UNSUPPORTED:
            raise ValueError(f"{name}: unsupported must be one of {_UNSUPPORTED}, got {unsupported!r}")
        self.model = model
        self.damping = damping
        self.loss_reduction = loss_reduction
        self.dedup_threshold = dedup_threshold
        self.ignore_index = ignore_index
        self.check_finite = check_finite
        self.backend = backend
        self.unsupported = unsupported
        self.steps = 0
        self.last_info: dict = {}
        self._validate()

        selected = self._select(model, layers)
        self._modules = dict(selected)
        self._capture = Capture(model, [m for _, m in selected], loss_reduction="sum", keep_outputs=self._keep_outputs)
        self._capture.__enter__()
        handled_params = set()
        for _, m in selected:
            handled_params.add(id(m.weight))
            if m.bias is not None and m.bias.requires_grad:
                handled_params.add(id(m.bias))
        self._other = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in handled_params]
        if self._other:
            names = [n for n, _ in self._other]
            if unsupported == "raise":
                self._capture.remove_hooks()
                raise ValueError(
                    f"{name}: parameters {names} are not in any handled layer (nn.Linear, nn.Conv2d with groups=1 "
                    "and padding_mode='zeros'); pass unsupported='grad' or 'zero' to accept that"
                )
            what = "keep their plain gradient" if unsupported == "grad" else "get a zero gradient"
            warnings.warn(
                f"{name}: parameters {names} are not in any handled layer and {what} (unsupported={unsupported!r})",
                UserWarning,
                stacklevel=3,
            )
        self._logits: torch.Tensor | None = None
        self._passes = 0
        self._model_hook = model.register_forward_hook(self._model_forward_hook)

    # -- configuration ---------------------------------------------------------------------------------------

    def _validate(self) -> None:
        name = self._name
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0 or d == float("inf"):
            raise ValueError(f"{name}: damping must be a finite number >= 0, got {d!r}")
        if self.loss_reduction not in _REDUCTIONS:
            raise ValueError(f"{name}: loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        t = self.dedup_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
            raise ValueError(f"{name}: dedup_threshold must be in (0, 1] or None, got {t!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"{name}: ignore_index must be an int, got {self.ignore_index!r}")
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"{name}: check_finite must be a bool, got {self.check_finite!r}")
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"{name}: backend must be one of {ops.BACKENDS}, got {self.backend!r}")

    def _select(self, model: nn.Module, layers) -> list[tuple[str, nn.Module]]:
        named = list(model.named_modules())
        if layers is None:
            return [(n, m) for n, m in named if _handled(m)]
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        by_name, by_id = dict(named), {id(m): n for n, m in named}
        out = []
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"{self._name}: layers names {item!r}, which is not a submodule of model")
                n, m = item, by_name[item]
            elif isinstance(item, nn.Module) and id(item) in by_id:
                n, m = by_id[id(item)], item
            else:
                raise ValueError(f"{self._name}: layers must hold submodule names or submodules of model, got {item!r}")
            if not _handled(m):
                raise ValueError(
                    f"{self._name}: layer {n!r} ({type(m).__name__}) cannot be handled (nn.Linear, or nn.Conv2d with "
                    "groups=1 and padding_mode='zeros', with a trainable weight)"
                )
            if (n, m) not in out:
                out.append((n, m))
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(damping={self.damping}, loss_reduction={self.loss_reduction!r}, "
            f"layers={len(self._modules)}, unsupported={self.unsupported!r})"
        )

    # -- hooks -----------------------------------------------------------------------------------------------

    def _model_forward_hook(self, module, args, output):
        if not torch.is_grad_enabled() or module is not self.model:  # a deep copy carries this hook along
            return
        self._passes += 1
        if not isinstance(output, torch.Tensor):
            self._logits = None
        else:  # SF backpropagates through the logits again; the others only read them
            self._logits = output if self._keep_outputs else output.detach()

    def remove(self) -> None:
        """Removes every hook; the preconditioner cannot step afterwards."""
        self._capture.remove_hooks()
        self._capture.clear()
        self._model_hook.remove()
        self._logits = None

    # -- step ------------------------------------------------------------------------------------------------

    def _recorded(self) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
        if self._passes > 1:
            passes, self._passes = self._passes, 0
            raise RuntimeError(
                f"{self._name}.step: the model ran {passes} forward passes since the last step; one forward "
                "and one backward per step (gradient accumulation over micro-batches is not supported)"
            )
        layers = self._capture.layers
        if not layers:
            raise RuntimeError(f"{self._name}.step: no output gradient was recorded; call loss.backward() first")
        got = [(n, m, a, g) for n, (m, a, g) in layers.items()]
        ns = {a.shape[0] for _, _, a, _ in got}
        if len(ns) != 1:
            raise ValueError(f"{self._name}.step: handled layers saw different batch sizes {sorted(ns)}")
        return got

    def _scale(self, targets: torch.Tensor | None, positions: int, device) -> torch.Tensor | float:
        """``c`` of the loss ``L = c sum_n l_n`` (``positions``: the number of targets when ``targets`` is None)."""
        if self.loss_reduction == "sum":
            return 1.0
        if targets is None:
            return 1.0 / positions
        valid = (targets != self.ignore_index).sum()
        return 1.0 / valid.clamp_min(1).to(device=device, dtype=torch.float64)

    def _logits_for(self, logits, n: int) -> torch.Tensor:
        if logits is None:
            logits = self._logits
            if logits is None:
                raise RuntimeError(
                    f"{self._name}.step: the model's last forward did not return a tensor; pass logits= explicitly"
                )
        if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{self._name}.step: logits must be (N, C) or (N, T, C), got {shape}")
        if logits.shape[0] != n:
            raise ValueError(
                f"{self._name}.step: logits hold {logits.shape[0]} samples but the handled layers saw {n}"
            )
        return logits

    def _gram(self, got, g_of=None) -> torch.Tensor:
        n, device = got[0][2].shape[0], got[0][2].device
        dt = torch.float64 if any(acc_dtype(a.dtype) == torch.float64 for _, _, a, _ in got) else torch.float32
        k = torch.zeros((n, n), dtype=dt, device=device)
        for name, m, a, g in got:
            g = g if g_of is None else g_of[name]
            if acc_dtype(a.dtype) == dt:
                ops.per_sample_gram(a, g, self._has_bias(m), out=k, backend=self.backend)
            else:
                k += ops.per_sample_gram(a, g, self._has_bias(m), backend=self.backend).to(dt)
        return k

    @staticmethod
    def _has_bias(m: nn.Module) -> bool:
        return m.bias is not None and m.bias.requires_grad

    def _solve(self, got, k: torch.Tensor, rhs: torch.Tensor, what: str, g_of=None):
        # ief_coefficients checks both inputs in the synchronisation its solve needs anyway; a failure is named
        # here in the step's terms (the layers are looked at only then)
        try:
            return ops.ief_coefficients(
                k,
                rhs.to(k.dtype),
                float(self.damping),
                dedup_threshold=self.dedup_threshold if self._dedup else None,
                return_info=True,
            )
        except ValueError as exc:
            if not self.check_finite or "is not finite" not in str(exc):
                raise
            if str(exc).startswith("ief_coefficients: gram"):
                bad = [
                    name
                    for name, _, a, g in got
                    if not bool(torch.isfinite(a).all() & torch.isfinite(g if g_of is None else g_of[name]).all())
                ]
                raise FloatingPointError(
                    f"{self._name}.step: the per-sample gradients of layers {bad or '(overflow in the Gram)'} are "
                    "not finite; no gradient was changed"
                ) from exc
            raise FloatingPointError(f"{self._name}.step: {what} is not finite; no gradient was changed") from exc

    _dedup = True

    def _write(self, got, coef: torch.Tensor, g_of=None, combine=None) -> None:
        for name, m, a, g in got:
            g = g if g_of is None else g_of[name]
            bias = self._has_bias(m)
            u = ops.weighted_grad_sum(a, g, coef.to(acc_dtype(a.dtype)), bias, backend=self.backend)
            d_in = a.shape[2]
            w_step = u[:, :d_in].reshape(m.weight.shape)
            b_step = u[:, d_in] if bias else None
            if combine is not None:
                w_step, b_step = combine(m, w_step, b_step)
            self._set_grad(m.weight, w_step)
            if bias:
                self._set_grad(m.bias, b_step)
        if self.unsupported == "zero":
            for _, p in self._other:
                if p.grad is not None:
                    p.grad.zero_()

    @staticmethod
    def _set_grad(p: torch.Tensor, step: torch.Tensor) -> None:
        if p.grad is None or p.grad.shape != p.shape:
            p.grad = step.to(p.dtype).clone()
        else:
            p.grad.copy_(step)

    def _finish(self, info: dict) -> None:
        self.last_info = info
        self.steps += 1
        self._passes = 0
        self._logits = None
        self._capture.clear()  # the recorded inputs and gradients are spent: a second step() needs a new backward

    def _check_targets(self, targets, n: int) -> torch.Tensor:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{self._name}.step: targets must be a tensor of class indices, got {type(targets).__name__}")
        if targets.dim() == 0 or targets.shape[0] != n:
            raise ValueError(
                f"{self._name}.step: targets must hold {n} samples (dim 0), got shape {tuple(targets.shape)}"
            )
        return targets

    # -- state -----------------------------------------------------------------------------------------------

    _HYPER = ("damping", "loss_reduction", "dedup_threshold", "ignore_index", "check_finite", "backend", "unsupported")

    def state_dict(self) -> dict:
        """Hyper-parameters and the step counter."""
        sd = {k: getattr(self, k) for k in self._HYPER}
        sd["steps"] = self.steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what :meth:`state_dict` returned (hyper-parameters are validated)."""
        missing = [k for k in (*self._HYPER, "steps") if k not in state_dict]
        if missing:
            raise KeyError(f"{self._name}.load_state_dict: missing keys {missing}")
        old = {k: getattr(self, k) for k in self._HYPER}
        for k in self._HYPER:
            setattr(self, k, state_dict[k])
        try:
            self._validate()
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        self.steps = int(state_dict["steps"])


class IEF(_DualStep):
    """Improved empirical Fisher step ``p.grad <- J^T (J J^T + damping I)^{-1} s`` (see the module docstring).

    Args:
        model: the model; its handled layers are hooked at construction.
        damping: ``lambda >= 0`` added to ``J J^T`` (default 1e-12: essentially none, as in the paper).
        loss_reduction: ``"mean"`` (``F.cross_entropy``'s default) or ``"sum"``: how the backpropagated loss sums
            the per-sample losses; it sets the scale of ``s``.
        layers: ``None`` (every handled layer) or names / modules to restrict to.
        unsupported: ``"grad"``, ``"zero"`` or ``"raise"`` for parameters outside handled layers.
        dedup_threshold: samples whose gradients have ``|cos| >`` this with an earlier sample are dropped before the
            solve (``None``: keep all).
        ignore_index: target value of positions that do not count (as in ``F.cross_entropy``).
        check_finite: raise ``FloatingPointError`` on non-finite ``J J^T`` or ``s``.
        backend: passed to every :mod:`pycurv.ops` call.
    """

    _name = "IEF"

    def __init__(self, model: nn.Module, damping: float = 1e-12, **kwargs):
        super().__init__(model, damping, **kwargs)

    @torch.no_grad()
    def step(self, targets: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Rewrites ``p.grad`` of every handled layer with the iEF step of the last forward/backward pass."""
        got = self._recorded()
        n = got[0][2].shape[0]
        targets = self._check_targets(targets, n)
        z = self._logits_for(logits, n).detach()
        s = ops.logit_grad_sqnorms(z, targets, self.ignore_index, backend=self.backend)
        c = self._scale(targets, targets.numel(), s.device)
        s = s.double() * (c * c)
        k = self._gram(got)
        alpha, info = self._solve(got, k, s, "the logit-gradient norms s (logits)")
        self._write(got, alpha)
        self._finish(info)


class EF(_DualStep):
    """Empirical Fisher step ``p.grad <- J^T (J J^T + damping I)^{-1} 1 = (J^T J + damping I)^{-1} grad L`` (see
    the module docstring; arguments as :class:`IEF`, ``damping`` default 1e-12)."""

    _name = "EF"

    def __init__(self, model: nn.Module, damping: float = 1e-12, **kwargs):
        super().__init__(model, damping, **kwargs)

    @torch.no_grad()
    def step(self, targets: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        """Rewrites ``p.grad`` of every handled layer with the EF step of the last forward/backward pass
        (``targets`` and ``logits`` are not needed and only checked for their sample count)."""
        got = self._recorded()
        n = got[0][2].shape[0]
        if targets is not None:
            self._check_targets(targets, n)
        if logits is not None:
            self._logits_for(logits, n)
        k = self._gram(got)
        ones = torch.ones(n, dtype=torch.float64, device=k.device)
        alpha, info = self._solve(got, k, ones, "the right-hand side")
        self._write(got, alpha)
        self._finish(info)


class SF(_DualStep):
    """Sampled Fisher step ``p.grad <- (J^^T J^ + damping I)^{-1} grad L`` with labels sampled from the model (see
    the module docstring). The user's backward must keep the graph: ``loss.backward(retain_graph=True)``.

    Args as :class:`IEF` (``damping`` default 1e-3: the step divides by it; ``dedup_threshold`` is not used), plus
    ``generator``: a ``torch.Generator`` on the logits' device for the label sampling (its state is part of
    :meth:`state_dict`); ``None`` uses the global generator.
    """

    _name = "SF"
    _keep_outputs = True
    _dedup = False

    def __init__(self, model: nn.Module, damping: float = 1e-3, *, generator: torch.Generator | None = None, **kwargs):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"SF: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        super().__init__(model, damping, **kwargs)

    def _validate(self) -> None:
        super()._validate()
        if not self.damping > 0:
            raise ValueError(f"SF: damping must be > 0 (the step divides by it), got {self.damping!r}")

    def step(self, targets: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        """Samples labels, backpropagates their loss through the retained graph to the handled layers' outputs and
        rewrites ``p.grad`` of every handled layer with the SF step. ``targets`` only marks ignored positions."""
        got = self._recorded()
        n = got[0][2].shape[0]
        if targets is not None:
            self._check_targets(targets, n)
        z = self._logits_for(logits, n)
        if not z.requires_grad:
            raise RuntimeError("SF.step: logits carry no autograd graph; pass the model output itself")
        if targets is not None and tuple(targets.shape) != tuple(z.shape[:-1]):
            raise ValueError(f"SF.step: targets must have shape {tuple(z.shape[:-1])}, got {tuple(targets.shape)}")
        for name, m, _, _ in got:
            for p in (m.weight, m.bias if self._has_bias(m) else None):
                if p is not None and p.grad is None:
                    raise RuntimeError(f"SF.step: layer {name!r} has no gradient; call loss.backward() first")
        with torch.no_grad():
            if self.check_finite and not bool(torch.isfinite(z.detach()).all()):
                raise FloatingPointError("SF.step: the logits are not finite; no gradient was changed")
            probs = torch.softmax(z.detach().to(acc_dtype(z.dtype)), dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])
            sampled = torch.multinomial(flat, 1, generator=self.generator).reshape(z.shape[:-1])
            if targets is not None:
                sampled = torch.where(targets == self.ignore_index, torch.full_like(sampled, self.ignore_index), sampled)
        c = self._scale(targets, z.shape[:-1].numel(), z.device)
        loss = torch.nn.functional.cross_entropy(
            z.reshape(-1, z.shape[-1]), sampled.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
        ) * c
        g_hat = self._capture.output_grads(loss)
        with torch.no_grad():
            k = self._gram(got, g_hat)
            r = torch.zeros(n, dtype=k.dtype, device=k.device)
            grads = {}
            for name, m, a, _ in got:
                gw = m.weight.grad.reshape(m.weight.shape[0], -1)
                v = torch.cat([gw, m.bias.grad.reshape(-1, 1)], 1) if self._has_bias(m) else gw
                v = v.to(acc_dtype(a.dtype))
                grads[name] = v
                r += ops.per_sample_grad_dot(a, g_hat[name], v, self._has_bias(m), backend=self.backend).to(k.dtype)
            beta, info = self._solve(got, k, r, "J^ grad L (the gradient)", g_of=g_hat)
            lam = float(self.damping)
            names = {id(m): name for name, m, _, _ in got}

            def combine(m, w_step, b_step):
                v = grads[names[id(m)]]
                d_in = v.shape[1] - (1 if b_step is not None else 0)
                w = (v[:, :d_in].reshape(m.weight.shape) - w_step) / lam
                b = (v[:, d_in] - b_step) / lam if b_step is not None else None
                return w, b

            self._write(got, beta, g_of=g_hat, combine=combine)
        self._finish(info)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["generator_state"] = None if self.generator is None else self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        gs = state_dict.get("generator_state")
        if gs is not None and self.generator is None:
            raise ValueError("SF.load_state_dict: the state holds a generator state but this SF has no generator")
        super().load_state_dict(state_dict)
        if gs is not None:
            self.generator.set_state(gs)
