"""pycurv.optim.FOP and pycurv.optim.HD (MATH.md section 4, the module docstring of pycurv/optim/fop.py).

- The derivation: in float64, for a Linear and a Conv2d weight (the factor on the ``kh * kw`` taps), the derivative of
  ``J(M) = loss(theta_{t-1} - lr G_{t-1} M M^T)`` by central finite differences and by autograd against
  ``-lr (G_{t-1}^T G_t + G_t^T G_{t-1}) M``, then one FOP step (SGD base) against ``M - hyper_lr dJ/dM``; the same for
  the output-side factor ``M_out`` of ``P_out G P``.
- Whole steps against a dense float64 rule written here per parameter in the ``dJ/dP`` form (:class:`DenseFOP`),
  feeding the plain torch.optim base optimizer: SGD, SGD with momentum, Adam, AdamW, param groups, output_side,
  exclude, parameters without gradients, freeze / unfreeze, learning-rate schedulers.
- state_dict round trips through torch.save / torch.load, mismatched states, guard rails against factors that blow
  up and non-finite gradients, the exported preconditioners.
- HD against a hand-written float64 loop of the docstring's formulas.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pycurv.optim import FOP, HD

from conftest import DEVICE, REL_TOL, need_backend, op_backends, rel_err

F64 = torch.float64
TOL64 = 1e-11  # float64 steps: a handful of small matmuls per step
TOL_FD = 1e-6  # central differences, h = 1e-5, in float64
_NATIVE = "cpu" if DEVICE.type == "cpu" else "cuda"


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def fop_view(t: torch.Tensor) -> torch.Tensor:
    """The ``(r, k)`` view a factor acts on: 2-d as is, ``(c_out, c_in, *kernel)`` as ``(c_out * c_in, taps)``."""
    return t if t.dim() == 2 else t.reshape(t.shape[0] * t.shape[1], -1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def fd_derivative(fn, m: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the scalar ``fn`` with respect to every entry of the matrix ``m``."""
    out = torch.empty_like(m)
    for i, j in itertools.product(range(m.shape[0]), range(m.shape[1])):
        e = torch.zeros_like(m)
        e[i, j] = h
        out[i, j] = (fn(m + e) - fn(m - e)) / (2 * h)
    return out


def sym(x: torch.Tensor) -> torch.Tensor:
    return x + x.mT


# ================================================================================================================
# 1. the derivation: the hypergradient against finite differences, and one FOP step against it
# ================================================================================================================


class OneLayer(nn.Module):
    """One Linear (inputs (N, 6), 4 classes) or one Conv2d 2 -> 3 channels, 3x3, padding 1 (inputs (N, 2, 5, 5),
    tanh, spatial mean as 3 logits)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.layer = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        out = self.layer(x)
        return out if self.kind == "linear" else torch.tanh(out).mean((2, 3))


def one_layer_problem(kind: str, steps: int = 4):
    torch.manual_seed(1)
    model = OneLayer(kind).to(DEVICE, F64)
    g = _gen(2)
    shape, classes = ((8, 6), 4) if kind == "linear" else ((8, 2, 5, 5), 3)
    batches = [
        (
            torch.randn(*shape, generator=g, dtype=F64).to(DEVICE),
            torch.randint(0, classes, (8,), generator=g).to(DEVICE),
        )
        for _ in range(steps)
    ]
    return model, batches


def loss_at(model, weight, bias, batch):
    x, y = batch
    return ce_sum(torch.func.functional_call(model, {"layer.weight": weight, "layer.bias": bias}, (x,)), y)


def weight_grad(model, weight, bias, batch) -> torch.Tensor:
    w = weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_at(model, w, bias.detach(), batch), w)
    return g


def stepped(w0, g_prev, m, lr, m_out=None):
    """``theta_{t-1} - lr P_out G_{t-1} M M^T`` on the factor's view (``P_out = I`` without ``m_out``)."""
    step = fop_view(g_prev) @ m @ m.mT
    if m_out is not None:
        step = m_out @ m_out.mT @ step
    return w0 - lr * step.reshape(w0.shape)


def _random_factor(k: int, seed: int) -> torch.Tensor:
    x = torch.randn(k, k, generator=_gen(seed), dtype=F64)
    return (torch.eye(k, dtype=F64) + 0.3 * x / math.sqrt(k)).to(DEVICE)


@pytest.mark.parametrize("kind", ("linear", "conv"))
def test_hypergradient_matches_finite_differences(kind):
    """At a random (non-identity) M: dJ/dM by central differences and by autograd against the closed form."""
    model, batches = one_layer_problem(kind)
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    lr = 0.3
    g_prev = weight_grad(model, w0, b0, batches[0])
    k = fop_view(w0).shape[1]
    assert k == (6 if kind == "linear" else 9)
    m = _random_factor(k, 3)

    def j_of(mm):
        return loss_at(model, stepped(w0, g_prev, mm, lr), b0, batches[1])

    fd = fd_derivative(j_of, m)
    m_req = m.clone().requires_grad_(True)
    (ag,) = torch.autograd.grad(j_of(m_req), m_req)
    g_t = fop_view(weight_grad(model, stepped(w0, g_prev, m, lr), b0, batches[1]))
    gp = fop_view(g_prev)
    formula = -lr * sym(gp.T @ g_t) @ m
    assert formula.abs().max() > 1e-2
    assert rel_err(fd, formula) < TOL_FD, f"{kind}: finite differences vs the closed form {rel_err(fd, formula):.3g}"
    assert rel_err(ag, formula) < TOL64, f"{kind}: autograd vs the closed form {rel_err(ag, formula):.3g}"
    # the derivative with respect to P alone (before the chain rule through M M^T) is -lr G_{t-1}^T G_t
    p_req = (m @ m.T).clone().requires_grad_(True)
    j_p = loss_at(model, w0 - lr * (gp @ p_req).reshape(w0.shape), b0, batches[1])
    (ag_p,) = torch.autograd.grad(j_p, p_req)
    assert rel_err(ag_p, -lr * gp.T @ g_t) < TOL64


def _run_recorded(model, opt, batches):
    """Steps ``opt`` over ``batches``; per step s: the weight and bias before it, the raw weight gradient, the bias
    and weight after it and the factors after it (those used in the step)."""
    rec = []
    for batch in batches:
        w_before, b_before = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
        opt.zero_grad()
        ce_sum(model(batch[0]), batch[1]).backward()
        g = model.layer.weight.grad.detach().clone()
        gb = model.layer.bias.grad.detach().clone()
        opt.step()
        pre = opt.preconditioners()[0]
        rec.append(
            dict(
                w_before=w_before,
                b_before=b_before,
                g=g,
                gb=gb,
                w_after=model.layer.weight.detach().clone(),
                b_after=model.layer.bias.detach().clone(),
                m=pre["M"].clone(),
                m_out=pre.get("M_out"),
            )
        )
    return rec


@pytest.mark.parametrize("kind", ("linear", "conv"))
def test_fop_step_is_hypergradient_descent(kind):
    """M after step s+1 is M^(s) - hyper_lr dJ_s/dM at M^(s), J_s(M) = loss_{s+1}(theta_{s-1} - lr g_s M M^T), the
    derivative taken by central differences; the parameters follow theta_s = theta_{s-1} - lr g_s M^(s) M^(s)T."""
    model, batches = one_layer_problem(kind)
    lr = 0.3
    hyper = 0.2 if kind == "linear" else 2.0
    opt = FOP(model.parameters(), lr=lr, hyper_lr=hyper)
    rec = _run_recorded(model, opt, batches)
    eye = torch.eye(rec[0]["m"].shape[0], dtype=F64, device=DEVICE)
    assert torch.equal(rec[0]["m"], eye), "the first step must not change M"
    for s in range(len(rec)):
        r = rec[s]
        want_w = stepped(r["w_before"], r["g"], r["m"], lr)
        assert rel_err(r["w_after"], want_w) < TOL64, f"{kind} step {s + 1}: parameter step"
        assert rel_err(r["b_after"], r["b_before"] - lr * r["gb"]) < TOL64, f"{kind} step {s + 1}: bias step"
    for s in range(len(rec) - 1):
        r, nxt = rec[s], rec[s + 1]

        def j_of(mm, r=r, nxt=nxt):
            return loss_at(model, stepped(r["w_before"], r["g"], mm, lr), nxt["b_before"], batches[s + 1])

        fd = fd_derivative(j_of, r["m"])
        g_t = fop_view(nxt["g"])
        formula = -lr * sym(fop_view(r["g"]).T @ g_t) @ r["m"]
        inc = nxt["m"] - r["m"]
        assert inc.norm() > 1e-2 * r["m"].norm(), f"{kind} step {s + 2}: M hardly moved, the check would be void"
        assert rel_err(inc, -hyper * fd) < TOL_FD, f"{kind} step {s + 2}: M - hyper_lr dJ/dM (finite differences)"
        assert rel_err(inc, -hyper * formula) < TOL64, f"{kind} step {s + 2}: M - hyper_lr dJ/dM (closed form)"


def test_output_side_hypergradients_match_finite_differences():
    """J(M, M_out) = loss(theta - lr P_out G P): dJ/dM and dJ/dM_out by central differences against the docstring's
    dJ/dP = -lr (P_out G_{t-1})^T G_t and dJ/dP_out = -lr G_t (G_{t-1} P)^T, each through M M^T."""
    model, batches = one_layer_problem("linear")
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    lr = 0.3
    g_prev = weight_grad(model, w0, b0, batches[0])
    m, m_out = _random_factor(6, 4), _random_factor(4, 5)
    w_t = stepped(w0, g_prev, m, lr, m_out)
    g_t = weight_grad(model, w_t, b0, batches[1])
    p_in, p_out = m @ m.T, m_out @ m_out.T
    d_p = -lr * (p_out @ g_prev).T @ g_t
    d_pout = -lr * g_t @ (g_prev @ p_in).T
    fd_m = fd_derivative(lambda mm: loss_at(model, stepped(w0, g_prev, mm, lr, m_out), b0, batches[1]), m)
    fd_out = fd_derivative(lambda mo: loss_at(model, stepped(w0, g_prev, m, lr, mo), b0, batches[1]), m_out)
    assert rel_err(fd_m, sym(d_p) @ m) < TOL_FD
    assert rel_err(fd_out, sym(d_pout) @ m_out) < TOL_FD
    # the one-sided formula (P_out ignored) is measurably different here
    assert rel_err(fd_m, -lr * sym(g_prev.T @ g_t) @ m) > 1e-2


def test_output_side_step_is_hypergradient_descent():
    model, batches = one_layer_problem("linear")
    lr, hyper = 0.3, 0.2
    opt = FOP(model.parameters(), lr=lr, hyper_lr=hyper, output_side=True)
    rec = _run_recorded(model, opt, batches)
    assert rec[0]["m_out"] is not None and rec[0]["m_out"].shape == (4, 4)
    for s in range(len(rec)):
        r = rec[s]
        want_w = stepped(r["w_before"], r["g"], r["m"], lr, r["m_out"])
        assert rel_err(r["w_after"], want_w) < TOL64, f"step {s + 1}: parameter step P_out G P"
    for s in range(len(rec) - 1):
        r, nxt = rec[s], rec[s + 1]

        def j_of(mm, mo, r=r, nxt=nxt):
            return loss_at(model, stepped(r["w_before"], r["g"], mm, lr, mo), nxt["b_before"], batches[s + 1])

        fd_m = fd_derivative(lambda mm: j_of(mm, r["m_out"]), r["m"])
        fd_out = fd_derivative(lambda mo: j_of(r["m"], mo), r["m_out"])
        for name, inc, fd in (("M", nxt["m"] - r["m"], fd_m), ("M_out", nxt["m_out"] - r["m_out"], fd_out)):
            assert inc.norm() > 1e-3, f"step {s + 2}: {name} hardly moved"
            assert rel_err(inc, -hyper * fd) < TOL_FD, f"step {s + 2}: {name} - hyper_lr dJ/d{name}"


# ================================================================================================================
# 2. whole steps against a dense float64 rule feeding the plain base optimizer
# ================================================================================================================


class Net(nn.Module):
    """Conv 3x3 (9 taps), conv 1x1 (1 tap), a pool, Linear 16 -> 6, three Linear 6 -> 6 (two with a bias, one
    without), a LayerNorm and a Linear head: inputs (N, 2, 5, 5), 3 classes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 6)
        self.fc4 = nn.Linear(6, 6, bias=False)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h))
        h = torch.tanh(self.fc3(h))
        return self.head(self.ln(self.fc4(h)))


def make_net(dtype=F64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DEVICE, dtype)


def batches_for(n_steps: int, dtype=F64, seed: int = 10):
    g = _gen(seed)
    return [
        (
            torch.randn(8, 2, 5, 5, generator=g, dtype=F64).to(DEVICE, dtype),
            torch.randint(0, 3, (8,), generator=g).to(DEVICE),
        )
        for _ in range(n_steps)
    ]


def net_groups(model: Net, lr0: float, h0: float, h1: float | None):
    """Two groups: convs, fc4 and the LayerNorm (own lr and hyper_lr); the rest (FOP's defaults unless h1 given).
    fc4 has the shape of fc2 / fc3 but sits in the other group."""
    g0 = [model.c1.weight, model.c1.bias, model.c2.weight, model.c2.bias, model.fc4.weight]
    g0 += [model.ln.weight, model.ln.bias]
    ids = {id(p) for p in g0}
    g1 = [p for p in model.parameters() if id(p) not in ids]
    second = {"params": g1}
    if h1 is not None:
        second["hyper_lr"] = h1
    return [{"params": g0, "lr": lr0, "hyper_lr": h0}, second]


class DenseFOP:
    """The FOP rule of the module docstring, per parameter, in float64, written with the derivatives with respect to
    P: ``dJ/dP = -lr (P_out G_{t-1})^T G_t``, ``dJ/dP_out = -lr G_t (G_{t-1} P)^T``, ``M <- M - hyper_lr (dJ/dP +
    dJ/dP^T) M`` (and the same for ``M_out``), then ``p.grad <- P_out G P``."""

    def __init__(self, params, output_side: bool = False, exclude=()):
        skip = {id(p) for p in exclude}
        self.state = {}
        for p in params:
            if p.dim() < 2 or id(p) in skip:
                continue
            r, k = fop_view(p).shape
            eye_r = torch.eye(r, dtype=F64, device=p.device)
            self.state[id(p)] = {
                "M": torch.eye(k, dtype=F64, device=p.device),
                "M_out": eye_r if output_side and p.dim() == 2 else None,
                "prev": None,
            }
        self.frozen = False

    def precondition(self, groups) -> None:
        """``groups``: ``[(params, lr, hyper_lr)]``; rewrites ``p.grad`` of the preconditioned parameters."""
        for params, lr, hyper in groups:
            for p in params:
                st = self.state.get(id(p))
                if st is None or p.grad is None:
                    continue
                g = fop_view(p.grad).double()
                if st["prev"] is not None and not self.frozen and hyper != 0:
                    self._hyper_step(st, g, lr, hyper)
                st["prev"] = g.clone()
                out = g @ st["M"] @ st["M"].T
                if st["M_out"] is not None:
                    out = st["M_out"] @ st["M_out"].T @ out
                p.grad.copy_(out.reshape(p.shape))

    @staticmethod
    def _hyper_step(st, g, lr, hyper) -> None:
        gp, m, mo = st["prev"], st["M"], st["M_out"]
        p_out = mo @ mo.T if mo is not None else torch.eye(g.shape[0], dtype=F64, device=g.device)
        d_p = -lr * (p_out @ gp).T @ g
        new_m = m - hyper * sym(d_p) @ m
        if mo is not None:
            d_pout = -lr * g @ (gp @ (m @ m.T)).T
            st["M_out"] = mo - hyper * sym(d_pout) @ mo
        st["M"] = new_m


BASES = {
    "sgd": (torch.optim.SGD, {}),
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov_wd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
}
LR = {"sgd": 0.05, "sgd_momentum": 0.02, "sgd_nesterov_wd": 0.02, "adam": 0.01, "adamw": 0.01}
# (hyper_lr of the first group, FOP's hyper_lr): the factors move by up to a few tenths in four steps
HYPER = {
    "sgd": (0.5, 0.3),
    "sgd_momentum": (0.5, 0.3),
    "sgd_nesterov_wd": (0.5, 0.3),
    "adam": (0.1, 0.3),
    "adamw": (0.1, 0.3),
}


def _fop_and_dense(base_name, output_side=False, backend="auto", exclude=(), h=None):
    """``(model, fop, ref_model, dense, base, rates)``: FOP over a Net, and over a copy of it the dense rule and the
    plain base optimizer with the same groups; ``rates`` holds ``(params, lr, hyper_lr)`` per group of the copy.
    ``exclude``: parameter names left unpreconditioned."""
    h = HYPER[base_name] if h is None else h
    cls, kw = BASES[base_name]
    lr = LR[base_name]
    model = make_net()
    ref_model = copy.deepcopy(model)
    ex = [p for n, p in model.named_parameters() if n in exclude]
    fop = FOP(
        net_groups(model, 2 * lr, h[0], None), base=cls, lr=lr, hyper_lr=h[1], output_side=output_side,
        backend=backend, exclude=ex or None, **kw,
    )
    ref_groups = net_groups(ref_model, 2 * lr, h[0], h[1])
    rates = [(g["params"], g.get("lr", lr), g["hyper_lr"]) for g in ref_groups]
    ref_ex = [p for n, p in ref_model.named_parameters() if n in exclude]
    dense = DenseFOP(ref_model.parameters(), output_side, ref_ex)
    base = cls([{"params": g["params"], "lr": r[1]} for g, r in zip(ref_groups, rates)], lr=lr, **kw)
    return model, fop, ref_model, dense, base, rates


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    ce_sum(model(batch[0]), batch[1]).backward()


def _grads_both(model, ref_model, batch):
    _grads(model, batch)
    _grads(ref_model, batch)


def _step_both(fop, dense, base, rates):
    """One FOP step and the dense rule's step on the reference model."""
    fop.step()
    dense.precondition(rates)
    base.step()


def compare_models(model, ref_model, tol, what):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        err = rel_err(p, q)
        assert err <= tol, f"{what}: parameter {name} differs from the dense rule by {err:.3g}"


def compare_factors(fop, model, dense, ref_model, tol, what):
    got = fop.preconditioners(model.named_parameters())
    want = {n: dense.state[id(p)] for n, p in ref_model.named_parameters() if id(p) in dense.state}
    assert set(got) == set(want), f"{what}: preconditioned parameters {sorted(got)} != {sorted(want)}"
    for i, st in want.items():
        assert rel_err(got[i]["M"], st["M"]) <= tol, f"{what}: factor M of {i}"
        if st["M_out"] is None:
            assert "M_out" not in got[i], f"{what}: {i} has an output-side factor"
        else:
            assert rel_err(got[i]["M_out"], st["M_out"]) <= tol, f"{what}: factor M_out of {i}"


def _moved(fop) -> float:
    """The largest relative distance of a factor from the identity."""
    out = 0.0
    for entry in fop.preconditioners().values():
        m = entry["M"]
        out = max(out, rel_err(m, torch.eye(m.shape[0], dtype=m.dtype, device=m.device)))
    return out


@pytest.mark.parametrize("output_side", (False, True), ids=("input_side", "output_side"))
@pytest.mark.parametrize("base_name", list(BASES))
def test_steps_match_dense_rule(base_name, output_side):
    model, fop, ref_model, dense, base, rates = _fop_and_dense(base_name, output_side)
    batches = batches_for(4)
    for s, batch in enumerate(batches):
        _grads_both(model, ref_model, batch)
        _step_both(fop, dense, base, rates)
        what = f"{base_name} output_side={output_side} step {s + 1}"
        if s == 0:
            # M = I: the first step is the base optimizer's own, bit for bit
            for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
                assert torch.equal(p, q), f"{what}: parameter {name} differs from the base optimizer's step"
        compare_models(model, ref_model, TOL64, what)
        compare_factors(fop, model, dense, ref_model, TOL64, what)
    assert _moved(fop) > 0.05, "the factors hardly moved: the comparison would not see the hypergradient"


def _fop_backends():
    live = [b for b in op_backends("fop_update") if b in op_backends("fop_precondition")]
    return live + [b for b in (_NATIVE, "triton") if b not in live]


@pytest.mark.parametrize("backend", _fop_backends())
def test_steps_match_dense_rule_per_backend(backend):
    for op in ("fop_update", "fop_precondition"):
        need_backend(op, backend)
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd_momentum", True, backend=backend)
    for s, batch in enumerate(batches_for(3)):
        _grads_both(model, ref_model, batch)
        _step_both(fop, dense, base, rates)
        compare_models(model, ref_model, TOL64, f"backend {backend} step {s + 1}")
    compare_factors(fop, model, dense, ref_model, TOL64, f"backend {backend}")


def test_param_groups_hyperparameters():
    """group["hyper_lr"] defaults to FOP's hyper_lr, groups keep their own; same-shape parameters in different groups
    use their own group's rates (fc4 beside fc2 / fc3), and editing a group's rates acts on the next step."""
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd", h=(0.5, 0.3))
    assert [g["hyper_lr"] for g in fop.param_groups] == [0.5, 0.3]
    assert [g["lr"] for g in fop.param_groups] == [2 * LR["sgd"], LR["sgd"]]
    assert fop.base.param_groups is fop.param_groups
    batches = batches_for(4)
    for s, batch in enumerate(batches):
        if s == 2:
            fop.param_groups[1]["hyper_lr"] = 1.0
            fop.param_groups[0]["lr"] = 0.03
            rates[1] = (rates[1][0], rates[1][1], 1.0)
            rates[0] = (rates[0][0], 0.03, rates[0][2])
            base.param_groups[0]["lr"] = 0.03
        _grads_both(model, ref_model, batch)
        _step_both(fop, dense, base, rates)
        compare_models(model, ref_model, TOL64, f"groups step {s + 1}")
        compare_factors(fop, model, dense, ref_model, TOL64, f"groups step {s + 1}")


def test_add_param_group_and_closure():
    """A group added after construction reaches the base optimizer, gets FOP's default hyper_lr unless it brings its
    own, and its weights are preconditioned from then on; step(closure) returns the closure's loss."""
    model = make_net()
    first = [model.fc1.weight, model.fc1.bias]
    fop = FOP(first, lr=0.05, hyper_lr=0.3)
    fop.add_param_group({"params": [model.head.weight, model.head.bias], "hyper_lr": 0.7})
    fop.add_param_group({"params": [model.fc2.weight]})
    assert len(fop.base.param_groups) == 3 and fop.base.param_groups is fop.param_groups
    assert [g["hyper_lr"] for g in fop.param_groups] == [0.3, 0.7, 0.3]
    names = set(fop.preconditioners(model.named_parameters()))
    assert names == {"fc1.weight", "head.weight", "fc2.weight"}
    for batch in batches_for(2):
        def closure(batch=batch):
            _grads(model, batch)
            return ce_sum(model(batch[0]), batch[1]).detach()

        loss = fop.step(closure)
        assert loss is not None and loss.dim() == 0
    pre = fop.preconditioners(model.named_parameters())
    assert not torch.equal(pre["head.weight"]["M"], torch.eye(6, dtype=F64, device=DEVICE))


def test_hyper_lr_zero_group_keeps_identity():
    model = make_net()
    fop = FOP(net_groups(model, 0.1, 0.0, None), lr=0.05, hyper_lr=0.5)
    for batch in batches_for(3):
        _grads(model, batch)
        fop.step()
    pre = fop.preconditioners(model.named_parameters())
    for name in ("c1.weight", "c2.weight", "fc4.weight"):
        assert torch.equal(pre[name]["M"], torch.eye(pre[name]["M"].shape[0], dtype=F64, device=DEVICE)), name
    assert not torch.equal(pre["fc1.weight"]["M"], torch.eye(16, dtype=F64, device=DEVICE))


def test_one_dim_parameters_untouched():
    """Biases and LayerNorm parameters get their raw gradient: plain SGD moves them by -lr * grad."""
    model = make_net()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5)
    for batch in batches_for(3):
        _grads(model, batch)
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
        fop.step()
        for n, p in model.named_parameters():
            w, g = before[n]
            if p.dim() == 1:
                assert torch.equal(p.grad, g), f"{n}: gradient of a 1-d parameter changed"
                assert rel_err(p, w - 0.05 * g) < TOL64, f"{n}: 1-d parameter not stepped by its raw gradient"
    names = set(fop.preconditioners(model.named_parameters()))
    assert names == {n for n, p in model.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("how", ("list", "predicate"))
def test_exclude(how):
    model = make_net()
    excluded = [model.c1.weight, model.fc2.weight]
    ex = excluded if how == "list" else (lambda p: p is model.c1.weight or p is model.fc2.weight)
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5, exclude=ex)
    names = set(fop.preconditioners(model.named_parameters()))
    assert "c1.weight" not in names and "fc2.weight" not in names
    assert {"c2.weight", "fc1.weight", "fc3.weight", "fc4.weight", "head.weight"} <= names
    for s, batch in enumerate(batches_for(3)):
        _grads(model, batch)
        raw = {id(p): p.grad.clone() for p in model.parameters()}
        fop.step()
        for p in excluded:
            assert torch.equal(p.grad, raw[id(p)]), "an excluded parameter's gradient was changed"
        if s > 0:
            assert not torch.equal(model.fc3.weight.grad, raw[id(model.fc3.weight)]), "fc3 not preconditioned"


def test_exclude_matches_dense_rule():
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd_momentum", exclude=("fc3.weight", "c2.weight"))
    names = set(fop.preconditioners(model.named_parameters()))
    assert "fc3.weight" not in names and "c2.weight" not in names and "fc2.weight" in names
    for s, batch in enumerate(batches_for(3)):
        _grads_both(model, ref_model, batch)
        _step_both(fop, dense, base, rates)
        compare_models(model, ref_model, TOL64, f"exclude step {s + 1}")
        compare_factors(fop, model, dense, ref_model, TOL64, f"exclude step {s + 1}")


def test_parameters_without_gradient_skipped():
    """A layer that gets no gradient (here: not in the forward pass at all) is left alone, and its factor stays."""

    class WithUnused(Net):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(5, 7)

    torch.manual_seed(0)
    model = WithUnused().to(DEVICE, F64)
    w0 = model.unused.weight.detach().clone()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5, momentum=0.9)
    for batch in batches_for(3):
        _grads(model, batch)
        assert model.unused.weight.grad is None
        fop.step()
    assert torch.equal(model.unused.weight, w0)
    pre = fop.preconditioners(model.named_parameters())
    assert torch.equal(pre["unused.weight"]["M"], torch.eye(5, dtype=F64, device=DEVICE))
    assert not torch.equal(pre["fc1.weight"]["M"], torch.eye(16, dtype=F64, device=DEVICE))


def test_same_shape_parameter_without_gradient_skipped():
    """fc2 and fc3 share a shape (one stacked factor tensor); when only fc3 has no gradient in a step, FOP must skip
    fc3 alone, as torch.optim optimizers skip parameters without a gradient, and carry on with fc2."""
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd")
    for s, batch in enumerate(batches_for(4)):
        _grads_both(model, ref_model, batch)
        if s == 2:
            model.fc3.weight.grad = None
            ref_model.fc3.weight.grad = None
        _step_both(fop, dense, base, rates)
        compare_models(model, ref_model, TOL64, f"fc3 without gradient, step {s + 1}")
        compare_factors(fop, model, dense, ref_model, TOL64, f"fc3 without gradient, step {s + 1}")


# ================================================================================================================
# 3. state_dict
# ================================================================================================================


@pytest.mark.parametrize("output_side", (False, True), ids=("input_side", "output_side"))
@pytest.mark.parametrize("base_name", ("sgd_momentum", "adam"))
def test_state_dict_round_trip(base_name, output_side):
    cls, kw = BASES[base_name]
    lr = LR[base_name]
    model = make_net()
    h0, h1 = HYPER[base_name]
    fop = FOP(net_groups(model, 2 * lr, h0, None), base=cls, lr=lr, hyper_lr=h1, output_side=output_side, **kw)
    batches = batches_for(4)
    for batch in batches[:3]:
        _grads(model, batch)
        fop.step()
    saved = _roundtrip({"model": model.state_dict(), "fop": fop.state_dict()})
    _grads(model, batches[3])
    fop.step()

    fresh = make_net(seed=5)
    fresh.load_state_dict(saved["model"])
    fop2 = FOP(net_groups(fresh, 2 * lr, h0, None), base=cls, lr=lr, hyper_lr=h1, output_side=output_side,
               max_norm=50.0, **kw)
    fop2.load_state_dict(saved["fop"])
    assert fop2.max_norm == fop.max_norm
    _grads(fresh, batches[3])
    fop2.step()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{base_name}: parameter {name} differs after the reload"
    a, b = fop.preconditioners(), fop2.preconditioners()
    assert set(a) == set(b)
    for i in a:
        for key in a[i]:
            assert torch.equal(a[i][key], b[i][key]), f"{base_name}: factor {key} of #{i} differs after the reload"
    assert _moved(fop) > 0.05


def test_load_state_dict_restores_group_rates():
    """An FOP built with other rates takes the saved lr / hyper_lr of every group from the state, FOP and its base
    still share one list of group dicts afterwards (a scheduler attached after the reload reaches the base), and
    the next step equals the step without the reload."""
    model = make_net()
    fop = FOP(net_groups(model, 0.04, 0.5, None), lr=0.02, hyper_lr=0.3, momentum=0.9)
    batches = batches_for(4)
    for batch in batches[:3]:
        _grads(model, batch)
        fop.step()
    saved = _roundtrip({"model": model.state_dict(), "fop": fop.state_dict()})
    _grads(model, batches[3])
    fop.step()

    fresh = make_net(seed=5)
    fresh.load_state_dict(saved["model"])
    fop2 = FOP(net_groups(fresh, 1.0, 9.0, None), lr=1.0, hyper_lr=9.0, momentum=0.9)
    fop2.load_state_dict(saved["fop"])
    assert fop2.base.param_groups is fop2.param_groups, "FOP and its base optimizer no longer share their groups"
    assert [g["lr"] for g in fop2.param_groups] == [0.04, 0.02]
    assert [g["hyper_lr"] for g in fop2.param_groups] == [0.5, 0.3]
    _grads(fresh, batches[3])
    fop2.step()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs after the reload"
    sched = torch.optim.lr_scheduler.StepLR(fop2, step_size=1, gamma=0.5)
    sched.step()
    assert [g["lr"] for g in fop2.base.param_groups] == [0.02, 0.01]


def test_state_dict_keeps_frozen_flag_and_copies():
    model = make_net()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5)
    for batch in batches_for(2):
        _grads(model, batch)
        fop.step()
    fop.freeze()
    sd = fop.state_dict()
    assert sd["frozen"] is True
    m_before = fop.preconditioners()[0]["M"].clone()
    for entry in sd["fop"].values():
        entry["M"].add_(1.0)  # editing the exported state must not reach the optimizer
    assert torch.equal(fop.preconditioners()[0]["M"], m_before)
    fresh = make_net()
    fop2 = FOP(fresh.parameters(), lr=0.05, hyper_lr=0.5)
    fop2.load_state_dict(_roundtrip(fop.state_dict()))
    assert fop2.frozen


def test_load_state_dict_rejects_mismatched_state():
    model = make_net()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5)
    _grads(model, batches_for(1)[0])
    fop.step()
    sd = _roundtrip(fop.state_dict())
    with pytest.raises(ValueError, match=r"output_side"):
        FOP(make_net().parameters(), lr=0.05, output_side=True).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"factors for parameters"):
        FOP(make_net().parameters(), lr=0.05, exclude=lambda p: p.dim() == 4).load_state_dict(sd)
    other = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).to(DEVICE, F64)
    with pytest.raises(ValueError, match=r"factors for parameters"):
        FOP(other.parameters(), lr=0.05).load_state_dict(sd)
    for key in ("base", "fop", "frozen", "output_side"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(KeyError, match=key):
            FOP(make_net().parameters(), lr=0.05).load_state_dict(broken)


class TwoLinear(nn.Module):
    def __init__(self, d_in2: int):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(d_in2, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))[:, : self.b.in_features])


def test_failed_load_changes_nothing():
    """A state whose second factor has the wrong shape is rejected, and the optimizer is left as it was: the next
    step equals the step of an optimizer that never saw the bad state."""
    torch.manual_seed(0)
    src = TwoLinear(4).to(DEVICE, F64)
    x, y = torch.randn(8, 6, dtype=F64, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
    fop_src = FOP(src.parameters(), lr=0.1, hyper_lr=0.5)
    for _ in range(2):
        src.zero_grad()
        ce_sum(src(x), y).backward()
        fop_src.step()
    bad = _roundtrip(fop_src.state_dict())

    torch.manual_seed(1)
    dst = TwoLinear(5).to(DEVICE, F64)
    twin = copy.deepcopy(dst)
    fop_dst = FOP(dst.parameters(), lr=0.1, hyper_lr=0.5)
    fop_twin = FOP(twin.parameters(), lr=0.1, hyper_lr=0.5)
    for model, opt in ((dst, fop_dst), (twin, fop_twin)):
        model.zero_grad()
        ce_sum(model(x), y).backward()
        opt.step()
    with pytest.raises(ValueError, match=r"shape"):
        fop_dst.load_state_dict(bad)
    for model, opt in ((dst, fop_dst), (twin, fop_twin)):
        model.zero_grad()
        ce_sum(model(x), y).backward()
        opt.step()
    for (name, p), q in zip(dst.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), f"parameter {name}: the rejected state changed the optimizer"
    a, b = fop_dst.preconditioners(), fop_twin.preconditioners()
    for i in a:
        assert torch.equal(a[i]["M"], b[i]["M"]), f"factor #{i}: the rejected state changed the optimizer"


# ================================================================================================================
# 4. freeze, export
# ================================================================================================================


def test_freeze_and_unfreeze():
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd_momentum")
    batches = batches_for(6)
    history = []
    for s, batch in enumerate(batches):
        if s == 2:
            fop.freeze()
            dense.frozen = True
        if s == 4:
            fop.unfreeze()
            dense.frozen = False
        _grads_both(model, ref_model, batch)
        _step_both(fop, dense, base, rates)
        compare_models(model, ref_model, TOL64, f"freeze step {s + 1}")
        compare_factors(fop, model, dense, ref_model, TOL64, f"freeze step {s + 1}")
        history.append({i: e["M"] for i, e in fop.preconditioners().items()})
    for i in history[1]:
        assert not torch.equal(history[1][i], history[0][i]), f"factor #{i} did not move before the freeze"
        assert torch.equal(history[3][i], history[1][i]), f"factor #{i} changed while frozen"
        assert torch.equal(history[2][i], history[1][i]), f"factor #{i} changed while frozen"
        assert not torch.equal(history[4][i], history[3][i]), f"factor #{i} did not resume after unfreeze"
    # the frozen steps matched the dense rule with the learned (far from identity) factors applied
    assert _moved(fop) > 0.05


def test_preconditioners_export():
    model = make_net()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5, output_side=True)
    for batch in batches_for(3):
        _grads(model, batch)
        fop.step()
    named = fop.preconditioners(model.named_parameters())
    by_index = fop.preconditioners()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert set(named) == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(by_index) == {i for i, p in enumerate(params) if p.dim() >= 2}
    for i, p in enumerate(params):
        if p.dim() < 2:
            continue
        entry, other = named[names[i]], by_index[i]
        r, k = fop_view(p).shape
        assert entry["M"].shape == (k, k) and entry["P"].shape == (k, k)
        assert torch.equal(entry["M"], other["M"])
        pairs = [("M", "P")] + ([("M_out", "P_out")] if p.dim() == 2 else [])
        assert ("M_out" in entry) == (p.dim() == 2), f"{names[i]}: output-side factor only for 2-d weights"
        if p.dim() == 2:
            assert entry["M_out"].shape == (r, r) and entry["P_out"].shape == (r, r)
        for mk, pk in pairs:
            m, pm = entry[mk], entry[pk]
            assert rel_err(pm, m @ m.T) < TOL64, f"{names[i]}: {pk} != {mk} {mk}^T"
            assert rel_err(pm, pm.T) < 1e-14, f"{names[i]}: {pk} not symmetric"
            ev = torch.linalg.eigvalsh((pm + pm.T) / 2)
            assert ev.min() >= -1e-12 * ev.abs().max(), f"{names[i]}: {pk} not positive semi-definite"
    assert rel_err(named["c1.weight"]["M"], torch.eye(9, dtype=F64, device=DEVICE)) > 1e-6
    assert rel_err(named["head.weight"]["M_out"], torch.eye(3, dtype=F64, device=DEVICE)) > 1e-2
    # the export is a copy
    named["fc1.weight"]["M"].zero_()
    assert fop.preconditioners(model.named_parameters())["fc1.weight"]["M"].abs().sum() > 0


# ================================================================================================================
# 5. guard rails
# ================================================================================================================


def _snapshot(model, fop):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        {i: {k: v.clone() for k, v in e.items()} for i, e in fop.preconditioners().items()},
    )


def _assert_unchanged(model, fop, snap, what):
    params, grads, factors = snap
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), f"{what}: parameter {n} changed"
        g = grads[n]
        assert (p.grad is None) == (g is None), f"{what}: gradient of {n}"
        if g is not None:
            assert torch.allclose(p.grad, g, rtol=0, atol=0, equal_nan=True), f"{what}: gradient of {n} changed"
    now = fop.preconditioners()
    for i, e in factors.items():
        for k, v in e.items():
            assert torch.equal(now[i][k], v), f"{what}: factor {k} of #{i} changed"
            assert torch.isfinite(now[i][k]).all()


def test_huge_hyper_lr_raises_and_changes_nothing():
    model = make_net()
    rest = [p for n, p in model.named_parameters() if n != "fc1.weight"]
    groups = [{"params": [model.fc1.weight], "hyper_lr": 1e9}, {"params": rest}]
    fop = FOP(groups, lr=0.05, hyper_lr=0.5, momentum=0.9)
    batches = batches_for(3)
    _grads(model, batches[0])
    fop.step()
    _grads(model, batches[1])
    snap = _snapshot(model, fop)
    idx = next(i for i, p in enumerate(p for g in fop.param_groups for p in g["params"]) if p is model.fc1.weight)
    with pytest.raises(FloatingPointError, match=rf"#{idx} \(6, 16\)") as info:
        fop.step()
    msg = str(info.value)
    assert "hyper_lr" in msg
    for shape in ("(6, 6)", "(3, 2, 3, 3)", "(3, 6)"):
        assert shape not in msg, f"a parameter that did not blow up is named: {msg}"
    _assert_unchanged(model, fop, snap, "after the FloatingPointError")
    # with a sane rate the same step goes through, from the same kept gradient
    fop.param_groups[0]["hyper_lr"] = 0.5
    fop.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert not torch.equal(model.fc1.weight, snap[0]["fc1.weight"])


def test_huge_hyper_lr_skip_warns_and_keeps_old_factor():
    model = make_net()
    rest = [p for n, p in model.named_parameters() if n != "fc1.weight"]
    fop = FOP([{"params": [model.fc1.weight], "hyper_lr": 1e9}, {"params": rest}], lr=0.05, hyper_lr=0.5,
              on_blowup="skip")
    batches = batches_for(3)
    _grads(model, batches[0])
    fop.step()
    old = {i: e["M"].clone() for i, e in fop.preconditioners().items()}
    _grads(model, batches[1])
    w, g = model.fc1.weight.detach().clone(), model.fc1.weight.grad.clone()
    with pytest.warns(UserWarning, match=r"\(6, 16\)"):
        fop.step()
    now = fop.preconditioners()
    assert torch.equal(now[0]["M"], old[0]), "the blown-up factor was not kept"
    assert torch.equal(now[0]["M"], torch.eye(16, dtype=F64, device=DEVICE))
    changed = [i for i in now if i != 0 and not torch.equal(now[i]["M"], old[i])]
    assert changed, "the factors that did not blow up were not updated"
    # fc1 stepped with its kept factor (the identity): plain SGD on the raw gradient
    assert rel_err(model.fc1.weight, w - 0.05 * g) < TOL64
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


@pytest.mark.parametrize("bad", ("nan", "inf"))
def test_nonfinite_gradient_raises(bad):
    model = make_net()
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5, momentum=0.9)
    batches = batches_for(3)
    _grads(model, batches[0])
    fop.step()
    _grads(model, batches[1])
    model.fc3.weight.grad[2, 4] = float(bad)
    snap = _snapshot(model, fop)
    idx = next(i for i, (n, _) in enumerate(model.named_parameters()) if n == "fc3.weight")
    with pytest.raises(FloatingPointError, match=rf"#{idx} \(6, 6\)"):
        fop.step()
    _assert_unchanged(model, fop, snap, f"after a {bad} gradient")
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{bad} reached parameter {n}"
    # the next good gradient steps normally
    _grads(model, batches[2])
    fop.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_max_norm_threshold():
    """The norm check compares ||M||_F with max_norm * sqrt(k): a limit just below the updated norm rejects the
    update (M kept), one just above accepts it."""

    def run(max_norm):
        torch.manual_seed(0)
        model = nn.Linear(4, 3).to(DEVICE, F64)
        g = _gen(4)
        fop = FOP([model.weight], lr=0.5, hyper_lr=2.0, max_norm=max_norm, on_blowup="skip")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model.zero_grad()
                x = torch.randn(8, 4, generator=g, dtype=F64).to(DEVICE)
                ce_sum(model(x), torch.arange(8, device=DEVICE) % 3).backward()
                fop.step()
        blown = any(issubclass(w.category, UserWarning) and "blew up" in str(w.message) for w in caught)
        return blown, fop.preconditioners()[0]["M"]

    blown, m = run(1e3)
    norm = m.norm().item()
    assert not blown and norm > 2.5, f"the update must move M well beyond the identity's norm 2, got {norm}"
    blown, m_below = run(norm / 2 * (1 - 1e-9))
    assert blown and torch.equal(m_below, torch.eye(4, dtype=F64, device=DEVICE)), "a norm above the limit was kept"
    blown, m_above = run(norm / 2 * (1 + 1e-9))
    assert not blown and torch.equal(m_above, m), "a norm below the limit was rejected"


# ================================================================================================================
# 6. learning-rate schedulers
# ================================================================================================================


def test_step_lr_scheduler_reaches_base_and_hypergradient():
    model, fop, ref_model, dense, base, rates = _fop_and_dense("sgd_momentum")
    sched = torch.optim.lr_scheduler.StepLR(fop, step_size=1, gamma=0.5)
    lr0 = [g["lr"] for g in fop.param_groups]
    for s, batch in enumerate(batches_for(4)):
        assert [g["lr"] for g in fop.param_groups] == [v * 0.5**s for v in lr0]
        assert [g["lr"] for g in fop.base.param_groups] == [v * 0.5**s for v in lr0]
        cur = [(p, lr * 0.5**s, h) for (p, lr, h) in rates]
        for bg, (_, lr, _) in zip(base.param_groups, cur):
            bg["lr"] = lr
        _grads_both(model, ref_model, batch)
        fop.step()
        dense.precondition(cur)
        base.step()
        sched.step()
        compare_models(model, ref_model, TOL64, f"StepLR step {s + 1}")
        compare_factors(fop, model, dense, ref_model, TOL64, f"StepLR step {s + 1}")


# ================================================================================================================
# 7. misuse, low precision
# ================================================================================================================


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"base": "sgd"}, TypeError, r"\bbase must be a torch.optim.Optimizer class"),
        ({"base": torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)}, TypeError, r"\bbase must be"),
        ({"lr": -0.1}, ValueError, r"\blr must be .*-0\.1"),
        ({"lr": float("nan")}, ValueError, r"\blr must be"),
        ({"hyper_lr": float("inf")}, ValueError, r"\bhyper_lr must be"),
        ({"hyper_lr": True}, ValueError, r"\bhyper_lr must be"),
        ({"max_norm": 1.0}, ValueError, r"\bmax_norm must be"),
        ({"on_blowup": "ignore"}, ValueError, r"\bon_blowup must be one of"),
        ({"output_side": 1}, TypeError, r"\boutput_side must be a bool"),
        ({"backend": "numpy"}, ValueError, r"\bbackend must be one of"),
    ],
)
def test_fop_bad_arguments(kwargs, exc, pattern):
    model = make_net()
    with pytest.raises(exc, match=pattern):
        FOP(model.parameters(), **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
def test_low_precision_parameters(dtype):
    """float32 factors for float32 and bfloat16 weights; the factor update and the preconditioned gradient against
    float64 from the same rounded gradients."""
    model = make_net(dtype=dtype)
    fop = FOP(model.parameters(), lr=0.05, hyper_lr=0.5)
    batches = batches_for(2, dtype=dtype)
    _grads(model, batches[0])
    raw0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    fop.step()
    _grads(model, batches[1])
    raw1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    fop.step()
    pre = fop.preconditioners(model.named_parameters())
    for n, p in model.named_parameters():
        assert p.dtype == dtype and p.grad.dtype == dtype
        if p.dim() < 2:
            continue
        m = pre[n]["M"]
        assert m.dtype == torch.float32, f"{n}: factor dtype {m.dtype}"
        gp, gc = fop_view(raw0[n]).double(), fop_view(raw1[n]).double()
        k = gp.shape[1]
        want_m = torch.eye(k, dtype=F64, device=DEVICE) + 0.05 * 0.5 * sym(gp.T @ gc)
        assert rel_err(m, want_m) <= REL_TOL[torch.float32], f"{n}: factor update"
        want_g = gc @ (m.double() @ m.double().T)
        assert rel_err(fop_view(p.grad), want_g) <= REL_TOL[dtype], f"{n}: preconditioned gradient"


# ================================================================================================================
# 8. HD
# ================================================================================================================


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def hd_problem(n_steps: int):
    torch.manual_seed(0)
    model = Small().to(DEVICE, F64)
    g = _gen(3)
    batches = [
        (torch.randn(10, 5, generator=g, dtype=F64).to(DEVICE), torch.randint(0, 3, (10,), generator=g).to(DEVICE))
        for _ in range(n_steps)
    ]
    return model, batches


def hd_reference(model, batches, groups, kind, momentum=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """The docstring's HD formulas as a float64 loop over plain tensors. ``groups``: ``[(names, alpha0, beta)]``.
    Returns the parameters after every step and the alphas."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {} for n in theta}
    alphas = [a for _, a, _ in groups]
    traj = []

    def loss_fn(params, batch):
        return ce_sum(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    for t, batch in enumerate(batches, start=1):
        grads = torch.func.grad(loss_fn)(theta, batch)
        for gi, (names, _, beta) in enumerate(groups):
            g = {n: grads[n] + weight_decay * theta[n] for n in names}
            if t > 1:
                h = sum(float((g[n] * state[n]["u"]).sum()) for n in names)
                alphas[gi] = alphas[gi] + beta * h
            for n in names:
                st = state[n]
                if kind == "sgd":
                    if momentum:
                        st["buf"] = g[n].clone() if t == 1 else momentum * st["buf"] + g[n]
                        u = st["buf"]
                    else:
                        u = g[n]
                else:
                    b1, b2 = betas
                    st["m"] = (1 - b1) * g[n] + (b1 * st["m"] if t > 1 else 0)
                    st["v"] = (1 - b2) * g[n] ** 2 + (b2 * st["v"] if t > 1 else 0)
                    u = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)
                theta[n] = theta[n] - alphas[gi] * u
                st["u"] = u
        traj.append(({n: v.clone() for n, v in theta.items()}, list(alphas)))
    return traj


HD_CASES = [
    ("sgd", 0.0, 0.0),
    ("sgd", 0.9, 0.0),
    ("sgd", 0.0, 1e-2),
    ("sgd", 0.9, 1e-2),
    ("adam", 0.0, 0.0),
    ("adam", 0.0, 1e-2),
]


@pytest.mark.parametrize("kind, momentum, weight_decay", HD_CASES)
def test_hd_matches_hand_written_loop(kind, momentum, weight_decay):
    model, batches = hd_problem(6)
    fc1 = ["fc1.weight", "fc1.bias"]
    fc2 = ["fc2.weight", "fc2.bias"]
    if kind == "sgd":
        a0, a1, b0, b1 = 0.02, 0.01, 2e-4, 5e-4
    else:
        a0, a1, b0, b1 = 0.01, 0.02, 2e-4, 5e-4
    ref = hd_reference(model, batches, [(fc1, a0, b0), (fc2, a1, b1)], kind, momentum, weight_decay)
    params = dict(model.named_parameters())
    opt = HD(
        [
            {"params": [params[n] for n in fc1], "lr": a0, "hyper_lr": b0},
            {"params": [params[n] for n in fc2], "hyper_lr": b1},
        ],
        base=kind, lr=a1, momentum=momentum, weight_decay=weight_decay,
    )
    for s, batch in enumerate(batches):
        opt.zero_grad()
        ce_sum(model(batch[0]), batch[1]).backward()
        opt.step()
        want, alphas = ref[s]
        for n, p in model.named_parameters():
            assert rel_err(p, want[n]) < TOL64, f"HD-{kind} step {s + 1}: parameter {n}"
        for gi, group in enumerate(opt.param_groups):
            err = abs(group["lr"] - alphas[gi])
            assert err <= 1e-12 * abs(alphas[gi]), f"HD-{kind} step {s + 1}: alpha of group {gi}"
    moved = [abs(ref[-1][1][0] / a0 - 1), abs(ref[-1][1][1] / a1 - 1)]
    assert min(moved) > 0.02, f"alpha hardly moved ({moved}): the check would not see the hypergradient"


def test_hd_defaults():
    model, _ = hd_problem(1)
    sgd, adam = HD(model.parameters()), HD(model.parameters(), base="adam")
    assert sgd.param_groups[0]["lr"] == 1e-3 and sgd.param_groups[0]["hyper_lr"] == 1e-3
    assert adam.param_groups[0]["lr"] == 1e-3 and adam.param_groups[0]["hyper_lr"] == 1e-7


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"base": "rmsprop"}, r"\bbase must be 'sgd' or 'adam'"),
        ({"lr": -1.0}, r"\blr must be"),
        ({"hyper_lr": float("nan")}, r"\bhyper_lr must be"),
        ({"momentum": -0.5}, r"\bmomentum must be"),
        ({"weight_decay": True}, r"\bweight_decay must be"),
        ({"betas": (1.0, 0.999)}, r"\bbetas must be"),
    ],
)
def test_hd_bad_arguments(kwargs, pattern):
    model, _ = hd_problem(1)
    with pytest.raises(ValueError, match=pattern):
        HD(model.parameters(), **kwargs)


@pytest.mark.parametrize("kind, momentum", [("sgd", 0.9), ("adam", 0.0)])
def test_hd_state_dict_round_trip(kind, momentum):
    model, batches = hd_problem(5)
    beta = 2e-4
    opt = HD(model.parameters(), base=kind, lr=0.01, hyper_lr=beta, momentum=momentum)

    def step(m, o, batch):
        o.zero_grad()
        ce_sum(m(batch[0]), batch[1]).backward()
        o.step()

    for batch in batches[:4]:
        step(model, opt, batch)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    step(model, opt, batches[4])
    fresh, _ = hd_problem(1)
    fresh.load_state_dict(saved["model"])
    opt2 = HD(fresh.parameters(), base=kind, lr=0.5, hyper_lr=beta, momentum=momentum)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] != 0.5
    step(fresh, opt2, batches[4])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] != 0.01
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"HD-{kind}: parameter {name} differs after the reload"
