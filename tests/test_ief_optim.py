"""pycurv.optim.IEF / EF / SF: every step against a dense float64 construction from torch.func per-sample gradients
(tests/models.py ``per_sample_jacobian``, never the library), the first-order property of iEF and EF by finite
differences, unsupported parameters, misuse and non-finite values, near-duplicate samples, state_dict round trips,
float32 models and stepping with torch.optim optimizers.

Scaling convention (pycurv/optim/ief.py): the user's loss is ``L = c sum_n l_n`` with ``c = 1`` ("sum") or
``c = 1 / (number of targets != ignore_index)`` ("mean", ``F.cross_entropy``'s mean); the rows of ``J`` are the
gradients of ``c l_n`` and ``s_n = c^2 ||grad_{z_n} l_n||^2``.

The dense truth is always computed before the preconditioner is attached: ``per_sample_jacobian`` deep-copies the
model, and a deep copy of a hooked model carries hooks that still point at the preconditioner's capture.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pycurv.optim import EF, IEF, SF

from conftest import DEVICE, REL_TOL, rel_err
from models import CNN, MLP, LinearBlock, TransformerBlock, logit_grad_sqnorms_truth, per_sample_jacobian, split_blocks

F64 = torch.float64
IGNORE = -100
TOL64 = 1e-10  # float64 dense solves; the largest error seen here is about 1e-11


def ce_sum(out, y):
    """Sample n's own loss l_n (cross-entropy summed over its positions, ignored targets left out)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum", ignore_index=IGNORE)


def user_loss(out, y, reduction):
    """The loss a user backpropagates: F.cross_entropy with reduction "sum" or "mean" (mean over valid targets)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction, ignore_index=IGNORE)


def scale(y, reduction) -> float:
    return 1.0 if reduction == "sum" else 1.0 / int((y != IGNORE).sum())


class Seq4d(nn.Module):
    """Linear layers on (N, 2, 3, d) inputs (T = 6 positions per sample), logits reshaped to (N, 6, C)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).reshape(x.shape[0], -1, 3)


class Unsupported(nn.Module):
    """A grouped Conv2d and a reflect-padded Conv2d (both unsupported), then a Linear head: inputs (N, 2, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2)
        self.reflect = nn.Conv2d(4, 2, 1, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.reflect(torch.tanh(self.grouped(x)))).flatten(1))


def make_problem(kind: str, n: int = 6, dtype=F64, seed: int = 0):
    """(model, x, y); "block" and "seq4d" carry ignore_index positions, sample 2 of "block" has no valid target."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "mlp":
        model, x, y = MLP(), torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "mlp_nobias":
        model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(),
                              nn.Linear(4, 3, bias=False))
        x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "cnn":
        model, x, y = CNN(), torch.randn(n, 2, 9, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "block":
        model, x, y = LinearBlock(), torch.randn(n, 3, 4, generator=g), torch.randint(0, 3, (n, 3), generator=g)
        y[0, 1] = IGNORE
        y[2, :] = IGNORE
        y[n - 1, 0] = IGNORE
    elif kind == "seq4d":
        model, x, y = Seq4d(), torch.randn(n, 2, 3, 4, generator=g), torch.randint(0, 3, (n, 6), generator=g)
        y[1, 2:4] = IGNORE
    elif kind == "transformer":
        model, x, y = TransformerBlock(), torch.randn(n, 4, 6, generator=g), torch.randint(0, 4, (n, 4), generator=g)
    elif kind == "unsupported":
        model, x, y = Unsupported(), torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    else:
        raise AssertionError(kind)
    return model.to(DEVICE, dtype), x.to(DEVICE, dtype), y.to(DEVICE)


def grad_matrices(model, names):
    """{layer: (d_out, d_in [+1]) float64 p.grad}, bias as the last column (the layout of per_sample_jacobian)."""
    mods = dict(model.named_modules())
    out = {}
    for name in names:
        m = mods[name]
        gm = m.weight.grad.reshape(m.weight.shape[0], -1).double()
        if m.bias is not None and m.bias.requires_grad:
            gm = torch.cat([gm, m.bias.grad.double().unsqueeze(1)], dim=1)
        out[name] = gm.clone()
    return out


def grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_equal(model, saved, what):
    for n, p in model.named_parameters():
        if saved[n] is None:
            assert p.grad is None, f"{what}: {n} got a gradient"
        else:
            torch.testing.assert_close(p.grad, saved[n], rtol=0, atol=0, equal_nan=True, msg=f"{what}: {n} changed")


def backward(model, x, y, reduction, retain_graph=False):
    model.zero_grad(set_to_none=True)
    out = model(x)
    user_loss(out, y, reduction).backward(retain_graph=retain_graph)
    return out


def dense_truth(model, x, y, reduction, layer_names=None):
    """J (rows: gradients of c l_n over the handled layers), s (c^2 ||grad_z l_n||^2), the layer blocks and c."""
    c = scale(y, reduction)
    j, blocks = per_sample_jacobian(model, x, y, ce_sum, layer_names)
    with torch.no_grad():
        logits = model(x)
    s = logit_grad_sqnorms_truth(logits, y, IGNORE)
    return c * j, (c * c) * s, blocks, c


def dual_step(j, rhs, lam):
    eye = torch.eye(j.shape[0], dtype=F64, device=j.device)
    return j.T @ torch.linalg.solve(j @ j.T + lam * eye, rhs)


def sf_step(j_hat, grad, lam):
    eye = torch.eye(j_hat.shape[1], dtype=F64, device=j_hat.device)
    return torch.linalg.solve(j_hat.T @ j_hat + lam * eye, grad)


def sampled_labels(logits, y, seed):
    """SF's label draw, reproduced: torch.multinomial(softmax(logits) as (-1, C), 1, generator) with ignored
    positions kept ignored."""
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    probs = torch.softmax(logits.detach(), dim=-1)
    lab = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(logits.shape[:-1])
    return torch.where(y == IGNORE, torch.full_like(lab, IGNORE), lab)


def check_step(model, blocks, want_vec, tol, what):
    want = split_blocks(want_vec, blocks)
    got = grad_matrices(model, list(blocks))
    for name in blocks:
        err = rel_err(got[name], want[name])
        assert err <= tol, f"{what}: layer {name}: relative error {err:.3g} > {tol:.1g}"


def quiet(cls, model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(model, *args, **kw)


# -- 1. the steps against the dense float64 construction --------------------------------------------------------------

KINDS = ("mlp", "mlp_nobias", "cnn", "block", "seq4d")


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damping", (1e-12, 1e-3))
def test_ief_and_ef_match_dense_solve(kind, reduction, damping):
    model, x, y = make_problem(kind)
    j, s, blocks, c = dense_truth(model, x, y, reduction)
    n = x.shape[0]
    valid = (j.abs().sum(1) > 0).cpu()  # "block": sample 2 has no valid target, so a zero gradient
    ief = IEF(model, damping=damping, loss_reduction=reduction)
    backward(model, x, y, reduction)
    # the dense J is the right one: its column sum is the gradient of the user's loss
    check_step(model, blocks, j.sum(0), TOL64, f"{kind}/{reduction} J^T 1 vs p.grad")
    ief.step(y)
    assert torch.equal(ief.last_info["kept"].cpu(), valid), ief.last_info
    assert ief.steps == 1
    check_step(model, blocks, dual_step(j, s, damping), TOL64, f"iEF {kind}/{reduction}/{damping}")
    ief.remove()

    ef2 = EF(model, damping=damping, loss_reduction=reduction)
    backward(model, x, y, reduction)
    ef2.step()
    ones = torch.ones(n, dtype=F64, device=j.device)
    check_step(model, blocks, dual_step(j, ones, damping), TOL64, f"EF {kind}/{reduction}/{damping}")
    # EF is (J^T J + lambda I)^{-1} grad L, the primal form of the same step
    eye = torch.eye(j.shape[1], dtype=F64, device=j.device)
    if damping > 1e-6:
        check_step(model, blocks, torch.linalg.solve(j.T @ j + damping * eye, j.sum(0)), TOL64, "EF primal")
    # iEF and EF differ, and the damping matters: the comparisons above can fail
    assert rel_err(dual_step(j, s, damping), dual_step(j, ones, damping)) > 1e-2
    assert rel_err(dual_step(j, s, damping), dual_step(j, s, damping * 10 + 1e-2 * float(c * c))) > 1e-6


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("kind", KINDS)
def test_sf_matches_dense_solve(kind, reduction):
    model, x, y = make_problem(kind)
    lam = 1e-3 if reduction == "mean" else 1e-1
    j, _, blocks, c = dense_truth(model, x, y, reduction)
    with torch.no_grad():
        logits = model(x)
    y_hat = sampled_labels(logits, y, seed=5)
    assert not torch.equal(y_hat, y)  # the sampled labels are not the targets
    j_hat_raw, _ = per_sample_jacobian(model, x, y_hat, ce_sum)
    want = sf_step(c * j_hat_raw, j.sum(0), lam)
    pre = SF(model, damping=lam, loss_reduction=reduction, generator=torch.Generator(device=DEVICE).manual_seed(5))
    backward(model, x, y, reduction, retain_graph=True)
    pre.step(y)
    check_step(model, blocks, want, TOL64, f"SF {kind}/{reduction}")
    assert pre.steps == 1
    # with the targets as labels the step would be EF's, and another draw gives another step
    assert rel_err(want, sf_step(j, j.sum(0), lam)) > 1e-3
    other, _ = per_sample_jacobian(model, x, sampled_labels(logits, y, seed=6), ce_sum)
    assert rel_err(want, sf_step(c * other, j.sum(0), lam)) > 1e-3


def test_sf_without_targets_uses_every_position():
    model, x, y = make_problem("seq4d")
    y_all = y.clamp_min(0)  # no ignored position: targets=None must then give the same step
    j, _, blocks, c = dense_truth(model, x, y_all, "mean")
    with torch.no_grad():
        logits = model(x)
    j_hat, _ = per_sample_jacobian(model, x, sampled_labels(logits, y_all, seed=1), ce_sum)
    pre = SF(model, damping=1e-3, generator=torch.Generator(device=DEVICE).manual_seed(1))
    backward(model, x, y_all, "mean", retain_graph=True)
    pre.step()
    check_step(model, blocks, sf_step(c * j_hat, j.sum(0), 1e-3), TOL64, "SF without targets")


# -- 2. first-order property -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("mlp", "block"))
@pytest.mark.parametrize("cls", (IEF, EF))
def test_first_order_change_of_each_sample_loss(cls, kind):
    model, x, y = make_problem(kind)
    c = scale(y, "mean")
    with torch.no_grad():
        s = (c * c) * logit_grad_sqnorms_truth(model(x), y, IGNORE)
    pre = cls(model)
    backward(model, x, y, "mean")
    pre.step(y)
    kept = pre.last_info["kept"].to(F64)
    step = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}

    def scaled_losses(h):
        out = torch.func.functional_call(model, {n: params[n] - h * step[n] for n in params}, (x,))
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none", ignore_index=IGNORE)
        return c * per.reshape(x.shape[0], -1).sum(1)

    h = 1e-5
    with torch.no_grad():
        change = (scaled_losses(h) - scaled_losses(-h)) / 2  # l_n(theta - h step) - l_n(theta), to O(h^3)
    want = -h * (s if cls is IEF else kept)  # a sample without a valid target cannot change
    torch.testing.assert_close(change, want, rtol=1e-6, atol=1e-14 * h)
    other = -h * (kept if cls is IEF else s)
    assert rel_err(change, other) > 0.1


# -- 3. unsupported parameters and layers= ---------------------------------------------------------------------------


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


LN = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")


@pytest.mark.parametrize("mode", ("grad", "zero"))
def test_layernorm_follows_unsupported(mode):
    model, x, y = make_problem("transformer", 5)
    j, s, blocks, _ = dense_truth(model, x, y, "mean")  # LayerNorm parameters held fixed: J over Linear layers
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pre = IEF(model, damping=1e-4, unsupported=mode)
        for _ in range(2):
            backward(model, x, y, "mean")
            plain = grads(model)
            pre.step(y)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert all(f"'{n}'" in msgs[0] for n in LN), msgs[0]
    assert not any(f"'{name}." in msgs[0] for name in blocks), msgs[0]
    for n in LN:
        p = dict(model.named_parameters())[n]
        if mode == "grad":
            assert torch.equal(p.grad, plain[n]), n
        else:
            assert torch.count_nonzero(p.grad) == 0 and torch.count_nonzero(plain[n]) > 0, n
    check_step(model, blocks, dual_step(j, s, 1e-4), TOL64, f"transformer handled layers ({mode})")


def test_unsupported_raise_at_construction():
    model, _, _ = make_problem("transformer", 3)
    hooks = _n_hooks(model)
    for cls in (IEF, EF, SF):
        with pytest.raises(ValueError, match=r"'ln1\.weight'.*'ln2\.bias'.*unsupported"):
            cls(model, unsupported="raise")
    assert _n_hooks(model) == hooks  # nothing left attached
    plain, _, _ = make_problem("mlp", 3)
    IEF(plain, unsupported="raise").remove()  # every parameter handled: nothing to raise about


@pytest.mark.parametrize("mode", ("grad", "zero"))
def test_layers_restricts_and_others_follow_unsupported(mode):
    model, x, y = make_problem("mlp")
    j, s, blocks, _ = dense_truth(model, x, y, "sum", layer_names=["fc1", "head"])
    with pytest.warns(UserWarning, match=r"\['fc2\.weight', 'fc2\.bias'\]"):
        pre = IEF(model, damping=1e-6, loss_reduction="sum", layers=["fc1", model.head], unsupported=mode)
    backward(model, x, y, "sum")
    plain = grads(model)
    pre.step(y)
    assert list(blocks) == ["fc1", "head"]
    check_step(model, blocks, dual_step(j, s, 1e-6), TOL64, "layers=['fc1', head]")
    for n in ("fc2.weight", "fc2.bias"):
        p = dict(model.named_parameters())[n]
        assert torch.equal(p.grad, plain[n] if mode == "grad" else torch.zeros_like(p)), n
    # a J over all three layers would give another step for fc1 and head
    j_all, _, blocks_all, _ = dense_truth(model, x, y, "sum")
    full = split_blocks(dual_step(j_all, s, 1e-6), blocks_all)
    assert rel_err(grad_matrices(model, ["fc1"])["fc1"], full["fc1"]) > 1e-3
    with pytest.raises(ValueError, match="'nope'"):
        IEF(model, layers=["nope"])
    with pytest.raises(ValueError, match="'ln1'.*LayerNorm"):
        IEF(TransformerBlock(), layers=["ln1"])


def test_grouped_and_reflect_conv_are_unsupported_not_errors():
    model, x, y = make_problem("unsupported")
    j, s, blocks, _ = dense_truth(model, x, y, "mean", layer_names=["fc"])
    with pytest.warns(UserWarning, match=r"'grouped\.weight', 'grouped\.bias', 'reflect\.weight', 'reflect\.bias'"):
        pre = IEF(model, damping=1e-6)
    backward(model, x, y, "mean")
    plain = grads(model)
    pre.step(y)
    for n in ("grouped.weight", "grouped.bias", "reflect.weight", "reflect.bias"):
        assert torch.equal(dict(model.named_parameters())[n].grad, plain[n]), n
    check_step(model, blocks, dual_step(j, s, 1e-6), TOL64, "fc after unsupported convolutions")


def test_frozen_parameters_are_ignored():
    model, x, y = make_problem("mlp")
    model.fc2.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)
    j, s, blocks, _ = dense_truth(model, x, y, "mean")
    assert list(blocks) == ["fc1", "head"] and blocks["fc1"].shape[-1] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frozen parameters are not "unsupported": no warning
        pre = IEF(model, damping=1e-6)
    backward(model, x, y, "mean")
    pre.step(y)
    assert model.fc1.bias.grad is None and model.fc2.weight.grad is None
    check_step(model, blocks, dual_step(j, s, 1e-6), TOL64, "frozen fc2 and fc1.bias")


# -- 4. misuse and non-finite values ---------------------------------------------------------------------------------


def test_two_forward_passes_raise():
    model, x, y = make_problem("mlp")
    for cls in (IEF, EF):
        pre = cls(model)
        model.zero_grad()
        user_loss(model(x[:3]), y[:3], "mean").backward()
        user_loss(model(x[3:]), y[3:], "mean").backward()
        saved = grads(model)
        with pytest.raises(RuntimeError, match="2 forward passes"):
            pre.step(y[3:])
        assert_grads_equal(model, saved, "after the accumulation error")
        backward(model, x, y, "mean")  # a clean pass afterwards works
        pre.step(y)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        pre.remove()


def test_deep_copy_of_the_model_is_ignored():
    """A deep copy carries the hooks along: its forward and backward passes must neither count as a pass nor
    overwrite what the original recorded."""
    model, x, y = make_problem("mlp")
    j, s, blocks, _ = dense_truth(model, x, y, "mean")
    pre = IEF(model, damping=1e-6)
    backward(model, x, y, "mean")
    twin = copy.deepcopy(model)
    user_loss(twin(2 * x + 1), y, "mean").backward()
    pre.step(y)
    check_step(model, blocks, dual_step(j, s, 1e-6), TOL64, "IEF after a pass through a deep copy")
    pre.remove()


def test_step_without_backward_raises():
    model, x, y = make_problem("mlp")
    pre = IEF(model)
    with pytest.raises(RuntimeError, match="backward"):
        pre.step(y)
    model(x)
    with pytest.raises(RuntimeError, match="backward"):
        pre.step(y)
    pre.remove()
    sf = SF(model)
    model(x)
    with pytest.raises(RuntimeError, match="backward"):
        sf.step(y)


def test_sf_without_retain_graph_raises():
    model, x, y = make_problem("mlp")
    pre = SF(model)
    backward(model, x, y, "mean", retain_graph=False)
    saved = grads(model)
    with pytest.raises(RuntimeError, match="retain_graph"):
        pre.step(y)
    assert_grads_equal(model, saved, "SF without retain_graph")


def test_bad_logits_and_targets_raise():
    model, x, y = make_problem("block")
    for cls in (IEF, EF, SF):
        pre = cls(model)
        out = backward(model, x, y, "mean", retain_graph=True)
        saved = grads(model)
        with pytest.raises(ValueError, match=r"logits hold 5 samples"):
            pre.step(y, logits=out[:5])
        with pytest.raises(ValueError, match=r"targets must .*\(5, 3\)|targets must hold 6 samples"):
            pre.step(y[:5])
        with pytest.raises(ValueError, match=r"logits must be \(N, C\) or \(N, T, C\)"):
            pre.step(y, logits=out.reshape(6, 1, 3, 3))
        if not isinstance(pre, EF):  # EF needs neither targets nor logits, only checks their sample count
            with pytest.raises(ValueError, match=r"targets must have shape \(6, 3\)"):
                pre.step(torch.cat([y, y[:, :1]], 1))
        assert_grads_equal(model, saved, f"{type(pre).__name__} after bad logits/targets")
        pre.remove()
    pre = IEF(model)
    backward(model, x, y, "mean")
    with pytest.raises(TypeError, match="targets"):
        pre.step(y.tolist())


def test_nan_in_input_raises_and_leaves_grads():
    model, x, y = make_problem("mlp")
    bad = x.clone()
    bad[2, 1] = float("nan")
    for cls in (IEF, EF, SF):
        pre = cls(model)
        backward(model, bad, y, "mean", retain_graph=True)
        saved = grads(model)
        # IEF and EF find the Gram first; SF may name the logits its labels are drawn from
        pattern = r"'fc1'.*'fc2'.*'head'" + (r"|logits" if cls is SF else "")
        with pytest.raises(FloatingPointError, match=pattern):
            pre.step(y)
        assert_grads_equal(model, saved, f"{type(pre).__name__} after NaN")
        assert pre.steps == 0
        pre.remove()
    pre = IEF(model)  # finite gradients but NaN logits: s is not finite
    out = backward(model, x, y, "mean")
    saved = grads(model)
    nan_logits = out.detach().clone()
    nan_logits[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="logits"):
        pre.step(y, logits=nan_logits)
    assert_grads_equal(model, saved, "IEF after NaN logits")


def test_bad_hyperparameters_raise():
    model, _, _ = make_problem("mlp")
    hooks = _n_hooks(model)
    cases = [
        (IEF, dict(damping=-1.0), ValueError, "damping"),
        (EF, dict(damping=float("nan")), ValueError, "damping"),
        (IEF, dict(damping=float("inf")), ValueError, "damping"),
        (SF, dict(damping=0.0), ValueError, r"damping must be > 0"),
        (IEF, dict(loss_reduction="none"), ValueError, "loss_reduction.*'none'"),
        (SF, dict(loss_reduction="batchmean"), ValueError, "loss_reduction"),
        (EF, dict(unsupported="keep"), ValueError, "unsupported.*'keep'"),
        (IEF, dict(dedup_threshold=1.5), ValueError, "dedup_threshold"),
        (IEF, dict(ignore_index=1.5), TypeError, "ignore_index"),
        (IEF, dict(backend="fortran"), ValueError, "backend.*'fortran'"),
        (SF, dict(generator=123), TypeError, "generator"),
    ]
    for cls, kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            cls(model, **kw)
    with pytest.raises(TypeError, match="model"):
        IEF(torch.zeros(3))
    assert _n_hooks(model) == hooks
    pre = IEF(model)
    assert _n_hooks(model) > hooks
    pre.remove()
    assert _n_hooks(model) == hooks


# -- 5. near-duplicate samples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", (1e-12, 1e-3))
@pytest.mark.parametrize("cls", (IEF, EF))
def test_near_duplicates_dropped(cls, damping):
    model, x, y = make_problem("mlp")
    x[4], y[4] = x[1], y[1]  # the same sample twice
    j, s, blocks, _ = dense_truth(model, x, y, "mean")
    pre = cls(model, damping=damping)
    backward(model, x, y, "mean")
    pre.step(y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    kept = pre.last_info["kept"].to(j.device)
    assert kept.tolist() == [True, True, True, True, False, True]
    rhs = s if cls is IEF else torch.ones_like(s)
    want = dual_step(j[kept], rhs[kept], damping)
    check_step(model, blocks, want, TOL64, f"{cls.__name__} on the kept subset")
    if damping > 1e-6:  # keeping both copies halves the damping's pull on that sample: another step
        assert rel_err(dual_step(j, rhs, damping), want) > 1e-4


@pytest.mark.parametrize("dtype", (F64, torch.float32), ids=("f64", "f32"))
def test_more_samples_than_gradient_directions(dtype):
    """Linear(3, 3) under softmax cross-entropy: the per-sample gradients span 2 x 4 = 8 directions (the logit
    gradient sums to zero), so with 12 samples J J^T has rank 8: without damping the step is the minimum-norm
    pinv(J) s, and last_info reports the rank."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3)).to(DEVICE, dtype)
    x, y = torch.randn(12, 3, generator=g).to(DEVICE, dtype), torch.randint(0, 3, (12,), generator=g).to(DEVICE)
    j, s, blocks, _ = dense_truth(model, x, y, "mean")
    assert torch.linalg.matrix_rank(j).item() == 8
    pre = IEF(model, damping=0.0)
    backward(model, x, y, "mean")
    pre.step(y)
    assert int(pre.last_info["rank"]) == 8 and bool(pre.last_info["kept"].all()), pre.last_info
    check_step(model, blocks, torch.linalg.pinv(j) @ s, TOL64 if dtype == F64 else 1e-4, f"iEF {dtype} rank 8")


# -- 6. state_dict ---------------------------------------------------------------------------------------------------


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_state_dict_round_trip_hyperparameters():
    model, x, y = make_problem("cnn")
    kw = dict(damping=1e-3, loss_reduction="sum", dedup_threshold=0.9, ignore_index=-1, check_finite=False)
    pre = IEF(model, **kw)
    backward(model, x, y, "sum")
    pre.step(y)
    sd = _roundtrip(pre.state_dict())
    assert sd["steps"] == 1 and all(sd[k] == v for k, v in kw.items())
    backward(model, x, y, "sum")
    pre.step(y)
    want = grads(model)
    pre.remove()
    fresh = IEF(model, damping=0.5)
    fresh.load_state_dict(sd)
    assert (fresh.damping, fresh.loss_reduction, fresh.dedup_threshold, fresh.ignore_index, fresh.steps) == (
        1e-3, "sum", 0.9, -1, 1)
    backward(model, x, y, "sum")
    fresh.step(y)
    assert_grads_equal(model, want, "IEF step after load_state_dict")
    assert fresh.steps == 2
    # invalid states are rejected and leave the preconditioner as it was
    with pytest.raises(ValueError, match="damping"):
        fresh.load_state_dict({**sd, "damping": -1.0})
    with pytest.raises(KeyError, match="damping"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "damping"})
    assert fresh.damping == 1e-3 and fresh.steps == 2
    with pytest.raises(ValueError, match="damping must be > 0"):
        SF(model).load_state_dict({**SF(model).state_dict(), "damping": 0.0})


def test_sf_state_dict_restores_generator():
    model, x, y = make_problem("block")
    x2 = torch.randn_like(x)
    pre = SF(model, damping=1e-3, generator=torch.Generator(device=DEVICE).manual_seed(11))
    backward(model, x, y, "mean", retain_graph=True)
    pre.step(y)
    sd = _roundtrip(pre.state_dict())
    assert sd["steps"] == 1 and sd["generator_state"] is not None
    backward(model, x2, y, "mean", retain_graph=True)
    pre.step(y)
    want = grads(model)
    pre.remove()

    fresh = SF(model, damping=0.5, loss_reduction="sum", generator=torch.Generator(device=DEVICE).manual_seed(99))
    fresh.load_state_dict(sd)
    assert (fresh.damping, fresh.loss_reduction, fresh.steps) == (1e-3, "mean", 1)
    backward(model, x2, y, "mean", retain_graph=True)
    fresh.step(y)
    assert_grads_equal(model, want, "SF step after load_state_dict")
    fresh.remove()
    # without the generator state the next draw, hence the step, differs
    other = SF(model, damping=1e-3, generator=torch.Generator(device=DEVICE).manual_seed(99))
    backward(model, x2, y, "mean", retain_graph=True)
    other.step(y)
    assert any(not torch.equal(p.grad, want[n]) for n, p in model.named_parameters())
    other.remove()
    no_gen = SF(model)
    assert no_gen.state_dict()["generator_state"] is None
    with pytest.raises(ValueError, match="generator"):
        no_gen.load_state_dict(sd)


def test_sf_failed_load_changes_nothing():
    """A state that cannot be loaded (it holds a generator state, this SF has no generator) leaves the
    preconditioner as it was, as an invalid hyper-parameter does."""
    model, _, _ = make_problem("mlp")
    sd = SF(model, damping=0.25, loss_reduction="sum", generator=torch.Generator(device=DEVICE)).state_dict()
    sd["steps"] = 7
    no_gen = SF(model)
    with pytest.raises(ValueError, match="generator"):
        no_gen.load_state_dict(sd)
    assert (no_gen.damping, no_gen.loss_reduction, no_gen.steps) == (1e-3, "mean", 0)


# -- 7. float32, logits from the hook, torch.optim --------------------------------------------------------------------


def test_float32_ief_close_to_float64_dense():
    """float32 J J^T carries a relative error of about eps32 = 1.2e-7 per entry, amplified by the condition number of
    J J^T + lambda I (below 1e3 for this damping, checked below): 1e-4 leaves a margin of about 10."""
    model, x, y = make_problem("cnn", dtype=torch.float32)
    lam = 1e-4
    j, s, blocks, _ = dense_truth(model, x, y, "mean")
    cond = torch.linalg.cond(j @ j.T + lam * torch.eye(j.shape[0], dtype=F64, device=j.device)).item()
    assert cond < 1e3, cond
    pre = IEF(model, damping=lam)
    backward(model, x, y, "mean")
    pre.step(y)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    check_step(model, blocks, dual_step(j, s, lam), 1e-4, "float32 IEF")
    assert rel_err(grad_matrices(model, ["c1"])["c1"], split_blocks(dual_step(j, s, lam), blocks)["c1"]) > REL_TOL[F64]


def test_hook_logits_equal_explicit_logits():
    model, x, y = make_problem("block", dtype=torch.float32)
    twin = copy.deepcopy(model)
    results = []
    for m, logits in ((model, None), (twin, "out"), (twin, "other")):
        pre = IEF(m, damping=1e-4)
        out = backward(m, x, y, "mean")
        pre.step(y, logits={None: None, "out": out, "other": out * 3}[logits])
        results.append(grads(m))
        pre.remove()
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n
    # the step reads the logits it is given: other logits, another step
    assert not torch.equal(results[2]["cls.weight"], results[1]["cls.weight"])


def test_model_returning_a_tuple_needs_logits():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x), x.sum()

    model = Pair().to(DEVICE, F64)
    x, y = torch.randn(4, 5, device=DEVICE, dtype=F64), torch.randint(0, 3, (4,), device=DEVICE)
    pre = IEF(model)
    out, _ = model(x)
    user_loss(out, y, "mean").backward()
    with pytest.raises(RuntimeError, match="logits="):
        pre.step(y)
    pre.step(y, logits=out)
    assert torch.isfinite(model.fc.weight.grad).all()


@pytest.mark.parametrize("name", ("sgd", "adam"))
@pytest.mark.parametrize("cls", (IEF, EF, SF))
def test_with_torch_optim(cls, name):
    model, x, y = make_problem("transformer", 5, dtype=torch.float32)
    pre = quiet(cls, model, damping=1e-3)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr) if name == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    opt.zero_grad()
    out = model(x)
    user_loss(out, y, "mean").backward(retain_graph=cls is SF)
    plain = grads(model)
    pre.step(y)
    step = grads(model)
    assert not torch.allclose(step["q.weight"], plain["q.weight"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        # SGD moves by -lr * step; Adam's first step by -lr * step / (|step| + eps), about -lr * sign(step)
        move = step[n] if name == "sgd" else step[n] / (step[n].abs() + 1e-8)
        torch.testing.assert_close(p.detach(), before[n] - lr * move, rtol=1e-5, atol=1e-6, msg=n)
