"""First-order preconditioning (FOP, Moskovitz et al. 2019, arXiv 1910.08461) and hypergradient descent (HD, Baydin
et al. 2018): preconditioners learned by gradient descent on the loss after the step (MATH.md section 4).

FOP
---
``FOP(params, base=torch.optim.SGD, lr=..., hyper_lr=..., **base_kwargs)`` is a ``torch.optim.Optimizer`` that
owns a ``base`` optimizer over the same parameter groups (one list of group dicts, so learning-rate schedulers and
``add_param_group`` act on both). Each ``step()``:

1. for every preconditioned parameter with a gradient ``G_t`` and a gradient ``G_{t-1}`` kept from its previous
   step, one hypergradient step on its factor ``M`` (:func:`pycurv.ops.fop_update`)::

       M <- M + lr * hyper_lr * (G_{t-1}^T G_t + G_t^T G_{t-1}) M

   (``-lr (G_{t-1}^T G_t + G_t^T G_{t-1}) M`` is the derivative of the loss at ``theta_t`` with respect to ``M``
   when ``theta_t = theta_{t-1} - lr G_{t-1} M M^T``; ``lr`` is the group's current learning rate);
2. ``p.grad <- G_t M M^T`` (:func:`pycurv.ops.fop_precondition`), and ``G_t`` is kept for the next step;
3. ``base.step()``: the base optimizer (SGD with momentum, Adam, AdamW, ...) receives the preconditioned
   gradient. With a base other than plain SGD the hypergradient above is the plain-SGD one: an approximation, as in
   the paper, where the preconditioned gradient is what the base optimizer consumes.

``M`` starts at the identity (so the first step is the base optimizer's own) and ``P = M M^T`` stays symmetric
positive semi-definite by construction.

Which dimension is preconditioned:

* 2-d weights ``(d_out, d_in)`` (``nn.Linear``): ``M`` is ``(d_in, d_in)``, acting on the input dimension, shared by
  all output rows. With ``output_side=True`` a second factor ``M_out (d_out, d_out)`` acts on the left,
  ``p.grad <- P_out G P``, each factor getting its own hypergradient with the other held fixed
  (``dJ/dP = -lr (P_out G_{t-1})^T G_t`` and ``dJ/dP_out = -lr G_t (G_{t-1} P)^T``), both from the factors of the
  previous step.
* Weights with 3 or more dims ``(c_out, c_in, *kernel)`` (convolutions): ``M`` is ``(K, K)`` with ``K`` the number
  of kernel taps (``kh * kw`` for ``nn.Conv2d``), shared by every ``(c_out, c_in)`` channel pair: the gradient is
  viewed as ``(c_out * c_in, K)``. (A 1x1 convolution gets a 1x1 ``M``: a learned per-layer step size.)
* 0-d and 1-d parameters (biases, norms) are passed to the base optimizer unchanged.
* ``exclude=`` (parameters, or a predicate on the parameter) leaves chosen parameters unpreconditioned.

Parameters of one shape and dtype are updated in one batched op call; their factors live in one stacked tensor.

Guard rails: after the update every factor's Frobenius norm is checked against ``max_norm * sqrt(k)`` (the
identity has norm ``sqrt(k)``), and for finiteness: one host synchronisation per step. A factor that fails keeps
its previous value and, with ``on_blowup="raise"`` (default), ``FloatingPointError`` names the parameters before
any gradient is changed; with ``"skip"`` a ``UserWarning`` names them and the step goes on with their old factors.
With ``check_finite=True`` (default) the gradients are checked in the same synchronisation: a non-finite gradient
raises ``FloatingPointError`` naming the parameters before any factor, gradient or parameter changes. A parameter
without a gradient is skipped (its factor and kept gradient wait for its next gradient).

``freeze()`` stops the factor updates (the learned preconditioner keeps being applied), ``unfreeze()`` resumes them;
``preconditioners()`` exports ``P = M M^T`` (and ``M``) per parameter for inspection. ``state_dict()`` holds the
base optimizer's state, the factors and kept gradients and the frozen flag; ``load_state_dict()`` into a new
``FOP`` over the same parameters makes the next step equal, bit for bit, to the step without the reload.

HD
--
``HD(params, base="sgd" | "adam", lr=1e-3, hyper_lr=None, ...)``: the scalar case ``P = alpha I`` with the learning
rate itself learned, per parameter group. SGD-HD: ``alpha <- alpha + hyper_lr <g_t, g_{t-1}>`` then
``theta <- theta - alpha g_t`` (with ``momentum``, the momentum buffer replaces ``g_t`` in the step, and the
hypergradient uses the previous step direction). Adam-HD: ``alpha <- alpha + hyper_lr <g_t, u_{t-1}>`` with
``u_{t-1} = m^_{t-1} / (sqrt(v^_{t-1}) + eps)`` the previous Adam direction, then the Adam step with ``alpha``.
Defaults ``hyper_lr`` 1e-3 for SGD and 1e-7 for Adam (the paper's); the inner products run over every parameter of
the group. ``group["lr"]`` holds the current ``alpha``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch

from .. import ops
from ..reference import acc_dtype

__all__ = ["FOP", "HD"]

_BLOWUP = ("raise", "skip")


def _fop_view(p: torch.Tensor) -> tuple[int, int] | None:
    """``(r, k)`` of the gradient view the factor acts on, or None for an unpreconditioned parameter."""
    if p.dim() == 2:
        return p.shape[0], p.shape[1]
    if p.dim() >= 3:
        k = math.prod(p.shape[2:])
        return p.shape[0] * p.shape[1], k
    return None


class _Group:
    """Same-shape, same-dtype preconditioned parameters: stacked factors and kept gradients."""

    def __init__(self, params: list[torch.Tensor], r: int, k: int, output_side: bool):
        self.params = params
        self.r, self.k = r, k
        p0 = params[0]
        self.dtype = acc_dtype(p0.dtype)
        b = len(params)
        eye = torch.eye(k, dtype=self.dtype, device=p0.device)
        self.m = eye.expand(b, k, k).clone()
        self.m_out = None
        if output_side:
            eye_o = torch.eye(r, dtype=self.dtype, device=p0.device)
            self.m_out = eye_o.expand(b, r, r).clone()
        self.prev: torch.Tensor | None = None  # (B, r, k) in the gradients' dtype
        self.has_prev = [False] * b  # which rows of prev hold a kept gradient
        self.group_index = 0  # the parameter group (position in param_groups) all of them belong to

    def grads(self, sel: list[int]) -> torch.Tensor:
        return torch.stack([self.params[j].grad.reshape(self.r, self.k) for j in sel])

    @staticmethod
    def rows(x: torch.Tensor, sel: list[int], full: bool) -> torch.Tensor:
        return x if full else x[sel]

    def keep(self, sel: list[int], cur: torch.Tensor) -> None:
        if len(sel) == len(self.params):
            self.prev = cur
        else:
            if self.prev is None:
                self.prev = cur.new_zeros((len(self.params), self.r, self.k))
            self.prev[sel] = cur
        for j in sel:
            self.has_prev[j] = True


class FOP(torch.optim.Optimizer):
    """First-order preconditioning around any ``torch.optim`` optimizer (see the module docstring).

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base: the base optimizer class (default ``torch.optim.SGD``).
        lr: the base learning rate (also the ``lr`` of the hypergradient).
        hyper_lr: the hyper-learning-rate ``rho`` of the factors (per group: ``group["hyper_lr"]``).
        output_side: also learn a factor on the output side of 2-d weights.
        exclude: parameters, or a predicate ``f(p) -> bool``, to leave unpreconditioned.
        max_norm: a factor whose Frobenius norm exceeds ``max_norm * sqrt(k)`` (or is not finite) is rejected.
        on_blowup: ``"raise"`` or ``"skip"`` for rejected factors.
        check_finite: raise ``FloatingPointError`` on a non-finite gradient before anything changes.
        backend: passed to the :mod:`pycurv.ops` calls.
        **base_kwargs: passed to ``base`` (``momentum``, ``betas``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        params,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        lr: float = 1e-3,
        hyper_lr: float = 1e-3,
        *,
        output_side: bool = False,
        exclude: Iterable[torch.Tensor] | Callable[[torch.Tensor], bool] | None = None,
        max_norm: float = 1e3,
        on_blowup: str = "raise",
        check_finite: bool = True,
        backend: str = "auto",
        **base_kwargs,
    ):
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
            raise TypeError(f"FOP: base must be a torch.optim.Optimizer class, got {base!r}")
        for name, v in (("lr", lr), ("hyper_lr", hyper_lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"FOP: {name} must be a finite number >= 0, got {v!r}")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 1:
            raise ValueError(f"FOP: max_norm must be a number > 1, got {max_norm!r}")
        if on_blowup not in _BLOWUP:
            raise ValueError(f"FOP: on_blowup must be one of {_BLOWUP}, got {on_blowup!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"FOP: check_finite must be a bool, got {check_finite!r}")
        if not isinstance(output_side, bool):
            raise TypeError(f"FOP: output_side must be a bool, got {output_side!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"FOP: backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.base = base(params, lr=lr, **base_kwargs)
        for group in self.base.param_groups:
            group.setdefault("hyper_lr", hyper_lr)
        defaults = dict(self.base.defaults, hyper_lr=hyper_lr)
        self._sharing = False
        # the same group dicts: schedulers, add_param_group and hyper-parameter edits reach both optimizers
        super().__init__(self.base.param_groups, defaults)
        self.param_groups = self.base.param_groups
        self._sharing = True
        self.output_side = output_side
        self.max_norm = float(max_norm)
        self.on_blowup = on_blowup
        self.check_finite = check_finite
        self.backend = backend
        self.frozen = False
        if exclude is None:
            self._excluded: Callable[[torch.Tensor], bool] = lambda p: False
        elif callable(exclude):
            self._excluded = exclude
        else:
            ids = {id(p) for p in exclude}
            self._excluded = lambda p: id(p) in ids
        self._groups: dict[tuple, _Group] = {}
        self._where: dict[int, tuple[tuple, int]] = {}
        self._build()

    # -- structure -------------------------------------------------------------------------------------------

    def _params(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _build(self) -> None:
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                view = _fop_view(p)
                if view is None or self._excluded(p) or id(p) in self._where:
                    continue
                key = (*view, p.dtype, p.device, gi)
                by_key.setdefault(key, []).append(p)
        for key, ps in by_key.items():
            grp = _Group(ps, key[0], key[1], self.output_side and ps[0].dim() == 2)
            grp.group_index = key[-1]
            self._groups[key] = grp
            for i, p in enumerate(ps):
                self._where[id(p)] = (key, i)

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_sharing", True):  # Optimizer.__init__ adopting the base's own group dicts
            torch.optim.Optimizer.add_param_group(self, param_group)
            return
        self.base.add_param_group(param_group)
        self.param_groups[-1].setdefault("hyper_lr", self.defaults["hyper_lr"])
        self._build()

    def _group_of(self, grp: _Group) -> dict:
        return self.param_groups[grp.group_index]

    # -- step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, rows with a gradient, all rows?, their gradients)
        for grp in self._groups.values():
            sel = [j for j, p in enumerate(grp.params) if p.grad is not None]
            if sel:
                work.append((grp, sel, len(sel) == len(grp.params), grp.grads(sel)))
        updates = []  # (group, rows updated, all rows?, new M, new M_out)
        for grp, sel, _, cur in work:
            group = self._group_of(grp)
            if self.frozen or group["hyper_lr"] == 0:
                continue
            pos = [i for i, j in enumerate(sel) if grp.has_prev[j]]
            if not pos:
                continue
            js = [sel[i] for i in pos]
            full = len(js) == len(grp.params)
            c = cur if len(pos) == len(sel) else cur[pos]
            m, prev = grp.rows(grp.m, js, full), grp.rows(grp.prev, js, full)
            lr, hyper = float(group["lr"]), float(group["hyper_lr"])
            new_m, new_out = m.clone(), None
            if grp.m_out is None:
                ops.fop_update(new_m, prev, c, lr, hyper, backend=self.backend)
            else:
                m_out = grp.rows(grp.m_out, js, full)
                p_out, p_in = m_out @ m_out.mT, m @ m.mT
                prev, c = prev.to(grp.dtype), c.to(grp.dtype)
                ops.fop_update(new_m, p_out @ prev, c, lr, hyper, backend=self.backend)
                new_out = m_out.clone()
                ops.fop_update(new_out, (prev @ p_in).mT, c.mT, lr, hyper, backend=self.backend)
            updates.append((grp, js, full, new_m, new_out))
        self._check_and_accept(work, updates)
        for grp, sel, full, cur in work:
            m = grp.rows(grp.m, sel, full)
            if grp.m_out is None:
                pg = ops.fop_precondition(m, cur, backend=self.backend)
            else:
                pg = ops.fop_precondition(m, cur.to(grp.dtype), backend=self.backend)
                pg = ops.fop_precondition(grp.rows(grp.m_out, sel, full), pg.mT.contiguous(), backend=self.backend).mT
            grp.keep(sel, cur)
            ps = [grp.params[j] for j in sel]
            torch._foreach_copy_([p.grad for p in ps], [x.reshape(p.shape) for x, p in zip(pg.unbind(0), ps)])
        self.base.step()
        return loss

    def _describe(self, grp: _Group, rows: list[int]) -> list[str]:
        order = {id(p): i for i, (p, _) in enumerate(self._params())}
        return [f"#{order[id(grp.params[j])]} {tuple(grp.params[j].shape)}" for j in rows]

    def _check_and_accept(self, work, updates) -> None:
        """One host synchronisation: the gradients must be finite (``check_finite``) and every new factor finite
        and within ``max_norm * sqrt(k)``; rejected factors keep their value (see the module docstring)."""
        mats = [m for *_, new_m, new_out in updates for m in (new_m, new_out) if m is not None]
        parts = [torch.linalg.matrix_norm(m).double().reshape(-1) for m in mats]
        if self.check_finite:
            parts += [cur.flatten(1).abs().sum(1).double() for *_, cur in work]
        if not parts:
            return
        vals = torch.cat([x.to(parts[0].device) for x in parts]).cpu().tolist()
        n_norm = sum(m.shape[0] for m in mats)
        norms, sums = vals[:n_norm], vals[n_norm:]
        if self.check_finite:
            bad, i = [], 0
            for grp, sel, _, _ in work:
                bad += self._describe(grp, [j for t, j in enumerate(sel) if not math.isfinite(sums[i + t])])
                i += len(sel)
            if bad:
                raise FloatingPointError(
                    f"FOP.step: the gradients of parameters {bad} (index in the optimizer, shape) are not finite; no "
                    "factor, gradient or parameter was changed"
                )
        i, verdicts, which = 0, [], []
        for grp, js, full, new_m, new_out in updates:
            ok = [True] * len(js)
            for m in (new_m, new_out):
                if m is None:
                    continue
                lim = self.max_norm * math.sqrt(m.shape[-1])
                for t in range(m.shape[0]):
                    if not (math.isfinite(norms[i]) and norms[i] <= lim):
                        ok[t] = False
                    i += 1
            verdicts.append(ok)
            which += self._describe(grp, [j for t, j in enumerate(js) if not ok[t]])
        if which and self.on_blowup == "raise":
            raise FloatingPointError(
                f"FOP.step: the preconditioner factors of parameters {which} (index in the optimizer, shape) blew up "
                f"(norm above max_norm * sqrt(k) = {self.max_norm:g} sqrt(k), or not finite): lower hyper_lr; the "
                "factors were kept and no gradient was changed"
            )
        for (grp, js, full, new_m, new_out), ok in zip(updates, verdicts):
            keep = torch.tensor(ok, device=new_m.device).reshape(-1, 1, 1)
            for attr, new in (("m", new_m), ("m_out", new_out)):
                if new is None:
                    continue
                old = getattr(grp, attr)
                merged = torch.where(keep, new, grp.rows(old, js, full))
                if full:
                    setattr(grp, attr, merged)
                else:
                    old[js] = merged
        if which:
            warnings.warn(
                f"FOP.step: the preconditioner factors of parameters {which} (index in the optimizer, shape) blew up "
                "and kept their previous value (lower hyper_lr)",
                UserWarning,
                stacklevel=3,
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # -- inspection ------------------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stops the factor updates; the learned preconditioners keep being applied."""
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def preconditioners(self, named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None) -> dict:
        """``{key: {"M": M, "P": M M^T[, "M_out", "P_out"]}}`` (copies) for every preconditioned parameter; ``key``
        is the parameter's name when ``named_parameters`` (e.g. ``model.named_parameters()``) is given, else its
        index in the optimizer's parameter order."""
        names = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        order = {id(p): i for i, (p, _) in enumerate(self._params())}
        out = {}
        for grp in self._groups.values():
            for j, p in enumerate(grp.params):
                m = grp.m[j].clone()
                entry = {"M": m, "P": m @ m.T}
                if grp.m_out is not None:
                    mo = grp.m_out[j].clone()
                    entry.update(M_out=mo, P_out=mo @ mo.T)
                out[names.get(id(p), order[id(p)])] = entry
        return out

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        order = {id(p): i for i, (p, _) in enumerate(self._params())}
        fop = {}
        for grp in self._groups.values():
            for j, p in enumerate(grp.params):
                fop[order[id(p)]] = {
                    "M": grp.m[j].clone(),
                    "M_out": None if grp.m_out is None else grp.m_out[j].clone(),
                    "prev": grp.prev[j].clone() if grp.has_prev[j] else None,
                }
        return {
            "base": self.base.state_dict(),
            "fop": fop,
            "frozen": self.frozen,
            "max_norm": self.max_norm,
            "on_blowup": self.on_blowup,
            "output_side": self.output_side,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict`; everything is checked before anything changes."""
        for k in ("base", "fop", "frozen", "output_side"):
            if k not in state_dict:
                raise KeyError(f"FOP.load_state_dict: missing key {k!r}")
        if state_dict["output_side"] != self.output_side:
            raise ValueError(
                f"FOP.load_state_dict: the state has output_side={state_dict['output_side']}, this FOP "
                f"{self.output_side}"
            )
        fop = state_dict["fop"]
        order = {id(p): i for i, (p, _) in enumerate(self._params())}
        want = {order[id(p)] for grp in self._groups.values() for p in grp.params}
        if set(fop) != want:
            raise ValueError(
                f"FOP.load_state_dict: the state has factors for parameters {sorted(fop)}, this FOP preconditions "
                f"{sorted(want)}"
            )
        staged = []
        for grp in self._groups.values():
            idx = [order[id(p)] for p in grp.params]
            for i in idx:
                e = fop[i]
                shapes = {"M": (grp.k, grp.k), "M_out": (grp.r, grp.r), "prev": (grp.r, grp.k)}
                for name, shape in shapes.items():
                    v = e.get(name)
                    if name == "M_out" and grp.m_out is None:
                        continue
                    if v is None and name != "prev":
                        raise ValueError(f"FOP.load_state_dict: parameter {i} has no {name}")
                    if v is not None and tuple(v.shape) != shape:
                        raise ValueError(
                            f"FOP.load_state_dict: {name} of parameter {i} has shape {tuple(v.shape)}, want {shape}"
                        )
            dev = grp.m.device
            m = torch.stack([fop[i]["M"] for i in idx]).to(device=dev, dtype=grp.dtype)
            m_out = None
            if grp.m_out is not None:
                m_out = torch.stack([fop[i]["M_out"] for i in idx]).to(device=dev, dtype=grp.dtype)
            has = [fop[i]["prev"] is not None for i in idx]
            prev = None
            if any(has):
                ref = next(fop[i]["prev"] for i in idx if fop[i]["prev"] is not None)
                prev = torch.stack([fop[i]["prev"] if h else torch.zeros_like(ref) for i, h in zip(idx, has)]).to(dev)
            staged.append((grp, m, m_out, prev, has))
        self.base.load_state_dict(state_dict["base"])
        # the base replaced its group dicts: share them again
        self.param_groups = self.base.param_groups
        for group in self.param_groups:
            group.setdefault("hyper_lr", self.defaults["hyper_lr"])
        for grp, m, m_out, prev, has in staged:
            grp.m, grp.prev, grp.has_prev = m, prev, has
            if m_out is not None:
                grp.m_out = m_out
        self.frozen = bool(state_dict["frozen"])
        self.max_norm = float(state_dict.get("max_norm", self.max_norm))
        self.on_blowup = state_dict.get("on_blowup", self.on_blowup)

    def __repr__(self) -> str:
        return (
            f"FOP(base={type(self.base).__name__}, preconditioned={sum(len(g.params) for g in self._groups.values())}, "
            f"output_side={self.output_side}, frozen={self.frozen})"
        )


class HD(torch.optim.Optimizer):
    """Hypergradient descent on the learning rate (Baydin et al. 2018) for SGD and Adam (see the module docstring).

    Args:
        params: parameters or groups.
        base: ``"sgd"`` or ``"adam"``.
        lr: the initial learning rate ``alpha_0`` (default 1e-3).
        hyper_lr: ``beta`` (default 1e-3 for SGD, 1e-7 for Adam).
        momentum: SGD momentum (default 0).
        betas, eps: Adam's (defaults (0.9, 0.999), 1e-8).
        weight_decay: L2 added to the gradient (default 0).
    """

    def __init__(
        self,
        params,
        base: str = "sgd",
        lr: float = 1e-3,
        hyper_lr: float | None = None,
        *,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if base not in ("sgd", "adam"):
            raise ValueError(f"HD: base must be 'sgd' or 'adam', got {base!r}")
        if hyper_lr is None:
            hyper_lr = 1e-3 if base == "sgd" else 1e-7
        for name, v in (("lr", lr), ("hyper_lr", hyper_lr), ("momentum", momentum), ("eps", eps), ("weight_decay", weight_decay)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"HD: {name} must be a finite number >= 0, got {v!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"HD: betas must be in [0, 1), got {betas!r}")
        self.kind = base
        defaults = dict(lr=lr, hyper_lr=hyper_lr, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            grads = []
            for p in ps:
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                grads.append(g)
            # hypergradient <g_t, u_{t-1}> over the group, u the previous step direction
            prev_dirs = [self.state[p].get("dir") for p in ps]
            if all(d is not None for d in prev_dirs):
                h = sum((g.double() * d.double()).sum() for g, d in zip(grads, prev_dirs))
                group["lr"] = float(group["lr"] + group["hyper_lr"] * float(h))
            lr = group["lr"]
            for p, g in zip(ps, grads):
                st = self.state[p]
                if self.kind == "sgd":
                    if group["momentum"]:
                        buf = st.get("momentum_buffer")
                        buf = g.clone() if buf is None else buf.mul_(group["momentum"]).add_(g)
                        st["momentum_buffer"] = buf
                        d = buf
                    else:
                        d = g
                else:
                    b1, b2 = group["betas"]
                    t = st.get("step", 0) + 1
                    st["step"] = t
                    m = st.get("exp_avg")
                    v = st.get("exp_avg_sq")
                    if m is None:
                        m = torch.zeros_like(p)
                        v = torch.zeros_like(p)
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    st["exp_avg"], st["exp_avg_sq"] = m, v
                    d = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                p.add_(d, alpha=-lr)
                st["dir"] = d.clone()
        return loss
