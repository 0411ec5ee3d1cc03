"""pycurv.optim.KFAC: factors against their definition, the step against a dense damped Kronecker solve, exactness
against the torch.func empirical Fisher and GGN blocks of a deep linear network on one datum, gradient accumulation,
state_dict round trips, unsupported layers, non-finite values, KL-clip, bf16 parameters and training with
torch.optim optimizers.

Ground truths are built independently of the preconditioner: the layer inputs and per-sample output gradients come
from pycurv.capture.Capture (itself checked against torch.func in test_capture.py), the factors from their
definition in float64, the steps from dense ``torch.kron`` matrices and ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pycurv
from pycurv import ops
from pycurv.capture import Capture
from pycurv.ops import DampingRaisedWarning
from pycurv.optim import KFAC

from conftest import DEVICE, REL_TOL, assert_rel_close, rel_err
from models import CNN, MLP, TransformerBlock, per_sample_jacobian

F64 = torch.float64


def ce_sum(out, y):
    """Cross-entropy summed over every leading position: l_n for one sample, sum_n l_n for a batch."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def loss_of(model, x, y, reduction):
    loss = ce_sum(model(x), y)
    return loss / x.shape[0] if reduction == "mean" else loss


class DeepLinear3d(nn.Module):
    """Linear layers on (N, 2, 3, d) inputs: the middle dims are the T = 6 positions of each sample."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def make_problem(kind: str, n: int, dtype=F64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model, x, y = MLP(), torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    elif kind == "linear3d":
        model, x, y = DeepLinear3d(), torch.randn(n, 2, 3, 5, generator=g), torch.randint(0, 3, (n, 2, 3), generator=g)
    elif kind == "transformer":
        model, x, y = TransformerBlock(), torch.randn(n, 4, 6, generator=g), torch.randint(0, 4, (n, 4), generator=g)
    elif kind == "cnn":
        model, x, y = CNN(), torch.randn(n, 2, 9, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    else:
        raise AssertionError(kind)
    return model.to(DEVICE, dtype), x.to(DEVICE, dtype), y.to(DEVICE)


def factor_definition(model, x, y, reduction):
    """{name: (A, G)} in float64 from their definition: A = (1/N) sum_{n,t} ā ā^T, G = (1/(N T)) sum_{n,t} g g^T,
    g the gradient of sample n's own loss. Runs in eval mode, where the preconditioner's hooks do not record."""
    was = model.training
    model.eval()
    with Capture(model, loss_reduction=reduction) as cap:
        loss_of(model, x, y, reduction).backward()
    model.zero_grad(set_to_none=True)
    model.train(was)
    out = {}
    for name, (m, a, g) in cap.layers.items():
        a64, g64 = a.double(), g.double()
        n, t = a64.shape[:2]
        if m.bias is not None and m.bias.requires_grad:
            a64 = torch.cat([a64, torch.ones_like(a64[..., :1])], dim=-1)
        out[name] = (torch.einsum("nti,ntj->ij", a64, a64) / n, torch.einsum("nti,ntj->ij", g64, g64) / (n * t))
    return out


def grad_matrices(model, names):
    """{name: (d_out, d_in [+1]) float64 gradient}, bias as the last column."""
    mods = dict(model.named_modules())
    out = {}
    for name in names:
        m = mods[name]
        gm = m.weight.grad.reshape(m.weight.shape[0], -1).double()
        if m.bias is not None and m.bias.requires_grad:
            gm = torch.cat([gm, m.bias.grad.double().unsqueeze(1)], dim=1)
        out[name] = gm.clone()
    return out


def run_step(pre, model, x, y, reduction):
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y, reduction).backward()
    before = grad_matrices(model, pre.layers)
    pre.step()
    return before, grad_matrices(model, pre.layers)


def dense_step(A, G, grad, damping, method, damping_mode="pi"):
    """The K-FAC step from dense matrices. vec is row-major over (d_out, d_in), so the Fisher block A ⊗ G
    (column-major vec) is kron(G, A) here."""
    da, dg = A.shape[0], G.shape[0]
    ia, ig = torch.eye(da, dtype=F64, device=A.device), torch.eye(dg, dtype=F64, device=A.device)
    if method == "eigen":
        m = torch.kron(G, A) + damping * torch.eye(da * dg, dtype=F64, device=A.device)
    else:
        pi = math.sqrt((A.trace() / da / (G.trace() / dg)).item()) if damping_mode == "pi" else 1.0
        sq = math.sqrt(damping)
        m = torch.kron(G + sq / pi * ig, A + pi * sq * ia)
    return torch.linalg.solve(m, grad.reshape(-1)).reshape(grad.shape)


# -- 1. factors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("kind", ("mlp", "linear3d", "cnn"))
def test_factors_match_definition(kind, reduction):
    model, x, y = make_problem(kind, 5)
    _, x2, y2 = make_problem(kind, 4, seed=1)
    pre = KFAC(model, kl_clip=None, factor_decay=0.95, loss_reduction=reduction)
    run_step(pre, model, x, y, reduction)
    want1 = factor_definition(model, x, y, reduction)
    assert set(pre.layers) == set(want1)
    for name, (a, g) in want1.items():
        lay = pre.layers[name]
        assert lay.A.dtype == lay.G.dtype == F64
        assert_rel_close(lay.A, a, F64, f"{kind} A[{name}]")
        assert_rel_close(lay.G, g, F64, f"{kind} G[{name}]")
    # second step: the running average of the first estimate and the new batch
    run_step(pre, model, x2, y2, reduction)
    want2 = factor_definition(model, x2, y2, reduction)
    for name, lay in pre.layers.items():
        assert_rel_close(lay.A, 0.95 * want1[name][0] + 0.05 * want2[name][0], F64, f"{kind} A2[{name}]")
        assert_rel_close(lay.G, 0.95 * want1[name][1] + 0.05 * want2[name][1], F64, f"{kind} G2[{name}]")


def test_factor_conventions():
    # T sits in A: a bias layer's A has corner T; mean and sum give the same factors (per-sample gradients)
    model, x, y = make_problem("linear3d", 3)
    pre_sum = KFAC(model, kl_clip=None, loss_reduction="sum")
    run_step(pre_sum, model, x, y, "sum")
    pre_sum.remove()
    assert pre_sum.layers["a"].A[-1, -1].item() == pytest.approx(6.0, rel=1e-14)
    pre_mean = KFAC(model, kl_clip=None, loss_reduction="mean")
    run_step(pre_mean, model, x, y, "mean")
    for name in ("a", "b"):
        assert_rel_close(pre_mean.layers[name].G, pre_sum.layers[name].G, F64, f"G[{name}] mean vs sum")
    # reading the mean loss as a sum would make G N² too small: the comparison above can fail
    pre_wrong = KFAC(model, kl_clip=None, loss_reduction="sum")
    pre_mean.remove()
    run_step(pre_wrong, model, x, y, "mean")
    assert rel_err(pre_wrong.layers["b"].G, pre_sum.layers["b"].G) > 0.5


def test_frozen_and_bias_handling():
    model, x, y = make_problem("mlp", 4)
    model.fc2.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)
    pre = KFAC(model, kl_clip=None)
    assert list(pre.layers) == ["fc1", "head"]
    assert pre.layers["fc1"].d_in == 5 and not pre.layers["fc1"].bias
    model.zero_grad()
    loss_of(model, x, y, "mean").backward()
    assert model.fc1.bias.grad is None and model.fc2.weight.grad is None
    pre.step()
    assert model.fc1.bias.grad is None  # a frozen bias stays out of the step
    want = factor_definition(model, x, y, "mean")
    assert_rel_close(pre.layers["fc1"].A, want["fc1"][0], F64, "A without bias column")


# -- 2. the step against a dense solve -------------------------------------------------------------------------------

STEP_CASES = [("eigen", "pi", "cholesky"), ("inverse", "pi", "cholesky"), ("inverse", "tikhonov", "cholesky"),
              ("inverse", "pi", "eigh"), ("inverse", "pi", "newton_schulz")]


@pytest.mark.parametrize("method, mode, inv", STEP_CASES, ids=["-".join(c) for c in STEP_CASES])
@pytest.mark.parametrize("kind", ("mlp", "transformer", "cnn"))
def test_step_matches_dense_solve(kind, method, mode, inv):
    model, x, y = make_problem(kind, 6)
    damping = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the transformer's LayerNorms
        pre = KFAC(model, damping=damping, kl_clip=None, method=method, damping_mode=mode, inverse_method=inv)
    before, after = run_step(pre, model, x, y, "mean")
    tol = 1e-8 if inv == "newton_schulz" else REL_TOL[F64]
    for name, lay in pre.layers.items():
        want = dense_step(lay.A.double(), lay.G.double(), before[name], damping, method, mode)
        err = rel_err(after[name], want)
        assert err <= tol, f"{kind}/{method}/{mode}/{inv} layer {name}: relative error {err:.3g}"
    # the damping terms matter: without them the answer differs
    name = next(iter(pre.layers))
    lay = pre.layers[name]
    other = dense_step(lay.A, lay.G, before[name], damping, method, "tikhonov" if mode == "pi" else "pi")
    if method == "inverse":
        assert rel_err(after[name], other) > 1e-6


def test_float32_step_close_to_float64():
    model, x, y = make_problem("cnn", 6, torch.float32)
    pre = KFAC(model, damping=1e-2, kl_clip=None)
    before, after = run_step(pre, model, x, y, "mean")
    for name, lay in pre.layers.items():
        assert lay.A.dtype == torch.float32
        want = dense_step(lay.A.double(), lay.G.double(), before[name], 1e-2, "eigen")
        assert rel_err(after[name], want) < 1e-4, name


# -- 3. exactness on a deep linear network with one datum -------------------------------------------------------------


def deep_linear(bias: bool):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Linear(5, 3, bias=bias), nn.Linear(3, 2, bias=bias)).to(
        DEVICE, F64
    )


def mse_sum(out, t):
    return 0.5 * (out - t).square().sum()


@pytest.mark.parametrize("bias", (False, True))
def test_exact_empirical_fisher_block(bias):
    model = deep_linear(bias)
    x = torch.randn(1, 4, device=DEVICE, dtype=F64)
    t = torch.randn(1, 2, device=DEVICE, dtype=F64)
    lam = 1e-3
    pre = KFAC(model, damping=lam, kl_clip=None, factor_decay=0.0, loss_reduction="sum", method="eigen")
    mse_sum(model(x), t).backward()
    before = grad_matrices(model, pre.layers)
    pre.step()
    after = grad_matrices(model, pre.layers)
    _, blocks = per_sample_jacobian(model, x, t, mse_sum, list(pre.layers))
    for name, lay in pre.layers.items():
        v = blocks[name][0].reshape(-1)
        ef = torch.outer(v, v)
        assert_rel_close(torch.kron(lay.G, lay.A), ef, F64, f"EF block {name}")
        assert_rel_close(before[name].reshape(-1), v, F64, f"gradient {name}")
        want = torch.linalg.solve(ef + lam * torch.eye(v.numel(), dtype=F64, device=DEVICE), v)
        assert_rel_close(after[name].reshape(-1), want, F64, f"step {name}")


@pytest.mark.parametrize("bias", (False, True))
def test_exact_ggn_block(bias):
    """G from the output-space identity: one backward per output dimension k of sqrt(K) * out[0, k] through one
    forward (K = 2); each backward folds in as its own batch, so G = sum_k J_k^T J_k = B^T B and A ⊗ G is the exact
    GGN block J^T J of the MSE loss. The step is then applied to the true gradient written into p.grad."""
    model = deep_linear(bias)
    x = torch.randn(1, 4, device=DEVICE, dtype=F64)
    t = torch.randn(1, 2, device=DEVICE, dtype=F64)
    lam = 1e-3
    pre = KFAC(model, damping=lam, kl_clip=None, factor_decay=0.0, loss_reduction="sum", method="eigen")
    out = model(x)
    k_out = out.shape[1]
    for k in range(k_out):
        (math.sqrt(k_out) * out[0, k]).backward(retain_graph=k < k_out - 1)
    names = list(pre.layers)
    mods = dict(model.named_modules())
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p):
        return torch.func.functional_call(model, p, (x,))[0]

    jac = torch.func.jacrev(f)(params)
    blocks, grads = {}, {}
    r = (model(x) - t).detach()[0]
    for name in names:
        j = jac[f"{name}.weight"].reshape(k_out, mods[name].weight.shape[0], -1)
        if bias:
            j = torch.cat([j, jac[f"{name}.bias"].unsqueeze(2)], dim=2)
        j = j.reshape(k_out, -1)
        blocks[name] = j.T @ j
        grads[name] = j.T @ r
    # the true MSE gradient into p.grad, as the optimizer would see it
    model.zero_grad(set_to_none=True)
    model.eval()
    mse_sum(model(x), t).backward()
    model.train()
    for name in names:
        assert_rel_close(grad_matrices(model, [name])[name].reshape(-1), grads[name], F64, f"gradient {name}")
    pre.step()
    after = grad_matrices(model, names)
    for name, lay in pre.layers.items():
        assert_rel_close(torch.kron(lay.G, lay.A), blocks[name], F64, f"GGN block {name}")
        eye = torch.eye(blocks[name].shape[0], dtype=F64, device=DEVICE)
        want = torch.linalg.solve(blocks[name] + lam * eye, grads[name])
        assert_rel_close(after[name].reshape(-1), want, F64, f"step {name}")


# -- 4. gradient accumulation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("mlp", "cnn"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_gradient_accumulation_equals_big_batch(kind, reduction):
    model, x, y = make_problem(kind, 7)
    twin = copy.deepcopy(model)
    pre_big = KFAC(model, kl_clip=None, loss_reduction=reduction)
    pre_acc = KFAC(twin, kl_clip=None, loss_reduction=reduction)
    loss_of(model, x, y, reduction).backward()
    pre_big.step()
    for sl in (slice(0, 3), slice(3, 7)):  # unequal micro-batches: the fold weights by samples and rows
        loss = loss_of(twin, x[sl], y[sl], "sum")
        if reduction == "mean":
            loss = loss / x[sl].shape[0]  # each micro-batch's own mean: g * N_micro are the per-sample gradients
        loss.backward()
    pre_acc.step()
    for name, lay in pre_big.layers.items():
        assert_rel_close(pre_acc.layers[name].A, lay.A, F64, f"{kind} A[{name}]")
        assert_rel_close(pre_acc.layers[name].G, lay.G, F64, f"{kind} G[{name}]")
    if reduction == "sum":
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert_rel_close(q.grad, p.grad, F64, f"{kind} step {name}")


def test_accumulation_with_varying_positions():
    # micro-batches of different sequence lengths: A = (1/N) sum over all rows, G = mean over all rows
    lin = nn.Linear(3, 2).to(DEVICE, F64)
    pre = KFAC(lin, kl_clip=None, loss_reduction="sum")
    xs = [torch.randn(2, 4, 3, device=DEVICE, dtype=F64), torch.randn(3, 1, 3, device=DEVICE, dtype=F64)]
    ws = [torch.randn(2, 4, 2, device=DEVICE, dtype=F64), torch.randn(3, 1, 2, device=DEVICE, dtype=F64)]
    for xx, w in zip(xs, ws):
        (lin(xx) * w).sum().backward()  # the output gradient of sample n is w[n]
    pre.step()
    a = torch.cat([torch.cat([xx, torch.ones_like(xx[..., :1])], -1).reshape(-1, 4) for xx in xs])
    g = torch.cat([w.reshape(-1, 2) for w in ws])
    assert_rel_close(pre.layers[""].A, a.T @ a / 5, F64, "A")
    assert_rel_close(pre.layers[""].G, g.T @ g / g.shape[0], F64, "G")


# -- schedules, batching, hyper-parameters ----------------------------------------------------------------------------


def test_update_schedules_and_cached_inverses():
    model, x, y = make_problem("mlp", 5)
    pre = KFAC(model, kl_clip=None, factor_update_steps=2, inv_update_steps=3, method="inverse")
    snaps = []
    for i in range(5):
        _, xi, yi = make_problem("mlp", 5, seed=i)
        run_step(pre, model, xi, yi, "mean")
        lay = pre.layers["fc1"]
        snaps.append((lay.A.clone(), lay.a_inv.clone()))
    same = [(torch.equal(snaps[i][0], snaps[i - 1][0]), torch.equal(snaps[i][1], snaps[i - 1][1])) for i in range(1, 5)]
    # factors change at steps 2, 4; inverses at step 3 only
    assert same == [(True, True), (False, True), (True, False), (False, True)]
    # a damping change recomputes the inverses at once
    pre.damping = 0.5
    run_step(pre, model, x, y, "mean")
    assert not torch.equal(pre.layers["fc1"].a_inv, snaps[-1][1])
    assert pre.layers["fc1"].inv_key[-1] == 0.5


def test_equal_sizes_inverted_in_one_batched_call(monkeypatch):
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)], nn.Linear(6, 2)).to(DEVICE, F64)
    x = torch.randn(8, 6, device=DEVICE, dtype=F64)
    y = torch.randint(0, 2, (8,), device=DEVICE)
    calls = {"sym_eig": [], "damped_inverse": [], "kron_precondition": [], "kron_precondition_eigen": []}
    for name in calls:
        real = getattr(ops, name)

        def wrapped(*args, _real=real, _name=name, **kw):
            calls[_name].append(tuple(args[0].shape))
            return _real(*args, **kw)

        monkeypatch.setattr(ops, name, wrapped)
    pre = KFAC(model, kl_clip=None, method="eigen")
    run_step(pre, model, x, y, "mean")
    # A: 7x7 (five layers), G: 6x6 (four layers), 2x2 (head)
    assert sorted(calls["sym_eig"]) == [(1, 2, 2), (4, 6, 6), (5, 7, 7)]
    assert sorted(calls["kron_precondition_eigen"]) == [(1, 2, 7), (4, 6, 7)]
    pre.method = "inverse"
    run_step(pre, model, x, y, "mean")
    assert sorted(calls["damped_inverse"]) == [(1, 2, 2), (4, 6, 6), (5, 7, 7)]
    assert sorted(calls["kron_precondition"]) == [(1, 2, 7), (4, 6, 7)]


def test_hyperparameters_checked():
    model, x, y = make_problem("mlp", 3)
    with pytest.raises(ValueError, match="lr"):
        KFAC(model)  # kl_clip is on by default and needs the optimizer's lr
    pre = KFAC(model, lr=0.1)
    for attr, bad in (("damping", -1.0), ("lr", 0.0), ("factor_decay", 1.5), ("inv_update_steps", 0),
                      ("kl_clip", float("nan")), ("method", "newton"), ("damping_mode", "x"),
                      ("loss_reduction", "none"), ("factor_update_steps", 1.5)):
        with pytest.raises(ValueError, match=attr):
            setattr(pre, attr, bad)
    pre.lr = 0.05
    pre.damping = 0.1
    assert (pre.lr, pre.damping) == (0.05, 0.1)
    pre.remove()


def test_layers_filter_and_remove():
    model, x, y = make_problem("mlp", 4)
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    pre = KFAC(model, kl_clip=None, layers=["fc1", model.head])
    assert list(pre.layers) == ["fc1", "head"]
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks + 2
    loss_of(model, x, y, "mean").backward()
    fc2 = model.fc2.weight.grad.clone()
    pre.step()
    assert torch.equal(model.fc2.weight.grad, fc2)
    pre.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
    a = pre.layers["fc1"].A.clone()
    run_step(pre, model, x.flip(0), y.flip(0), "mean")  # no hooks: preconditions with the factors it has
    assert torch.equal(pre.layers["fc1"].A, a)
    with pytest.raises(ValueError, match="'nope'"):
        KFAC(model, kl_clip=None, layers=["nope"])
    tr = TransformerBlock()
    with pytest.raises(ValueError, match="'ln1' is a LayerNorm"):
        KFAC(tr, kl_clip=None, layers=["ln1"])


def test_no_recording_in_eval_or_no_grad():
    model, x, y = make_problem("mlp", 4)
    pre = KFAC(model, kl_clip=None)
    with torch.no_grad():
        model(x)
    model.eval()
    loss_of(model, x, y, "mean").backward()
    model.train()
    assert all(not lay.has_statistics() for lay in pre.layers.values())
    with pytest.warns(UserWarning, match="no K-FAC statistics"):
        pre.step()  # gradients but never any statistics: reported, left alone
    assert all(lay.A is None for lay in pre.layers.values())


# -- 5. state_dict -------------------------------------------------------------------------------------------------


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("method, inv_steps", [("eigen", 10), ("inverse", 10), ("inverse", 3)])
def test_state_dict_round_trip(method, inv_steps):
    kw = dict(lr=0.05, kl_clip=1e-2, inv_update_steps=inv_steps, method=method, damping=1e-2)
    model, _, _ = make_problem("cnn", 5, torch.float32)
    batches = [make_problem("cnn", 5, torch.float32, seed=i)[1:] for i in range(4)]
    pre = KFAC(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def train_step(m, p, o, xb, yb):
        o.zero_grad()
        loss_of(m, xb, yb, "mean").backward()
        p.step()
        o.step()

    for xb, yb in batches[:3]:
        train_step(model, pre, opt, xb, yb)
    saved = _roundtrip({"model": model.state_dict(), "pre": pre.state_dict(), "opt": opt.state_dict()})
    train_step(model, pre, opt, *batches[3])

    torch.manual_seed(123)
    fresh, _, _ = make_problem("cnn", 5, torch.float32, seed=7)
    fresh.load_state_dict(saved["model"])
    pre2 = KFAC(fresh, lr=1.0, kl_clip=None, method="eigen" if method == "inverse" else "inverse")
    pre2.load_state_dict(saved["pre"])
    assert (pre2.lr, pre2.kl_clip, pre2.method, pre2.steps) == (0.05, 1e-2, method, 3)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    train_step(fresh, pre2, opt2, *batches[3])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{method}/{inv_steps}: parameter {name} differs after the reload"
    for name, lay in pre.layers.items():
        assert torch.equal(lay.A, pre2.layers[name].A) and torch.equal(lay.G, pre2.layers[name].G)


def test_load_state_dict_rejects_other_layers():
    model, x, y = make_problem("mlp", 4)
    pre = KFAC(model, kl_clip=None)
    run_step(pre, model, x, y, "mean")
    sd = pre.state_dict()
    other = nn.Sequential(nn.Linear(5, 7)).to(DEVICE, F64)
    with pytest.raises(ValueError, match=r"other layers.*'0'.*'fc1'"):
        KFAC(other, kl_clip=None).load_state_dict(sd)
    resized = MLP(hidden=8).to(DEVICE, F64)
    fresh = KFAC(resized, kl_clip=None)
    with pytest.raises(ValueError, match="'fc1' has d_out=8"):
        fresh.load_state_dict(sd)
    assert fresh.steps == 0 and fresh.layers["fc1"].A is None  # nothing loaded on failure
    # the saved state is a copy: later steps do not change it
    a = sd["layers"]["fc1"]["A"].clone()
    run_step(pre, model, x.flip(0), y.flip(0), "mean")
    assert torch.equal(sd["layers"]["fc1"]["A"], a)


# -- 6. unsupported and unused layers --------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.ln = nn.LayerNorm(6)
        self.grouped = nn.Conv2d(2, 2, 1, groups=2)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 6)

    def forward(self, tokens):
        h = self.ln(self.emb(tokens))
        h, _ = self.attn(h, h, h, need_weights=False)
        h = self.grouped(h.reshape(h.shape[0], 2, -1, 3)).reshape(h.shape)
        return self.fc(h)


def test_unsupported_layers_reported_once_and_left_alone():
    model = Mixed().to(DEVICE, F64)
    tokens = torch.randint(0, 10, (4, 5), device=DEVICE)
    y = torch.randint(0, 3, (4, 5), device=DEVICE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pre = KFAC(model, kl_clip=None)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss_of(model, tokens, y, "mean").backward()
            untouched = {
                n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and not n.startswith("fc.")
            }
            pre.step()
            for n, p in model.named_parameters():
                if n in untouched:
                    assert torch.equal(p.grad, untouched[n]), n
            assert model.unused.weight.grad is None
    msgs = [str(w.message) for w in rec]
    unsupported = [m for m in msgs if "not supported" in m]
    assert len(unsupported) == 1 and all(f"'{n}'" in unsupported[0] for n in ("emb", "ln", "grouped", "attn"))
    functional = [m for m in msgs if "no K-FAC statistics" in m]
    assert len(functional) == 1 and "'attn.out_proj'" in functional[0]
    assert set(pre.layers) == {"attn.out_proj", "fc", "unused"}
    assert pre.layers["fc"].A is not None and pre.layers["unused"].A is None
    assert len(msgs) == 2, msgs


# -- 7. non-finite values and damping raises --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ("eigen", "inverse"))
def test_nan_input_raises_naming_layer(method):
    model, x, y = make_problem("mlp", 4)
    pre = KFAC(model, kl_clip=None, method=method)
    run_step(pre, model, x, y, "mean")
    factors = {n: (lay.A.clone(), lay.G.clone()) for n, lay in pre.layers.items()}
    bad = x.clone()
    bad[1, 2] = float("nan")
    model.zero_grad()
    loss_of(model, bad, y, "mean").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"'fc1'.*'fc2'.*'head'"):
        pre.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, equal_nan=True)
    for n, lay in pre.layers.items():  # the bad statistics did not enter the factors
        assert torch.equal(lay.A, factors[n][0]) and torch.equal(lay.G, factors[n][1])
    _, after = run_step(pre, model, x.flip(0), y.flip(0), "mean")
    assert all(torch.isfinite(g).all() for g in after.values())


def test_nan_gradient_raises_and_unchecked_nan_reported_at_inverse_time():
    model, x, y = make_problem("mlp", 4)
    pre = KFAC(model, kl_clip=None)
    model.zero_grad()
    loss_of(model, x, y, "mean").backward()
    model.fc2.weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"preconditioned gradients of layers \['fc2'\]"):
        pre.step()
    assert torch.isinf(model.fc2.weight.grad[0, 0]) and torch.isfinite(model.head.weight.grad).all()
    pre_unchecked = KFAC(model, kl_clip=None, check_finite=False)
    pre.remove()
    bad = x.clone()
    bad[0, 0] = float("nan")
    model.zero_grad()
    loss_of(model, bad, y, "mean").backward()
    with pytest.raises(FloatingPointError, match="A of 'fc1'"):
        pre_unchecked.step()


@pytest.mark.parametrize("method", ("inverse", "eigen"))
def test_singular_factor_raises_damping(method):
    model, x, y = make_problem("mlp", 3)
    x[:, 0] = 0.0  # A of fc1 has an exactly zero row and column: singular without damping
    pre = KFAC(model, damping=0.0, kl_clip=None, method=method)
    with pytest.warns(DampingRaisedWarning, match="'fc1'"):
        _, after = run_step(pre, model, x, y, "mean")
    assert all(torch.isfinite(g).all() for g in after.values())
    lay = pre.layers["fc1"]
    used = lay.a_damping if method == "inverse" else lay.eig_damping
    assert used.dtype == F64 and used.item() > 0


# -- 8. KL-clip and factor_decay=0 -----------------------------------------------------------------------------------


def test_kl_clip_against_hand_computation():
    model, x, y = make_problem("cnn", 5)
    lr = 0.3
    twins = [copy.deepcopy(model) for _ in range(3)]
    pre_none = KFAC(twins[0], kl_clip=None, damping=1e-2)
    grads, steps = run_step(pre_none, twins[0], x, y, "mean")
    vg = sum((steps[n] * grads[n]).sum() for n in steps).item()
    assert vg > 0
    for twin, kappa in ((twins[1], 0.1 * lr * lr * vg), (twins[2], 10 * lr * lr * vg)):
        pre = KFAC(twin, kl_clip=kappa, lr=lr, damping=1e-2)
        _, clipped = run_step(pre, twin, x, y, "mean")
        nu = min(1.0, math.sqrt(kappa / (lr * lr * vg)))
        assert nu == pytest.approx(math.sqrt(0.1)) if kappa < lr * lr * vg else nu == 1.0
        for n in steps:
            assert_rel_close(clipped[n], nu * steps[n], F64, f"kl-clip {n}")


def test_factor_decay_zero_uses_last_batch():
    model, x, y = make_problem("mlp", 5)
    _, x2, y2 = make_problem("mlp", 6, seed=2)
    pre = KFAC(model, kl_clip=None, factor_decay=0.0)
    run_step(pre, model, x, y, "mean")
    run_step(pre, model, x2, y2, "mean")
    for name, (a, g) in factor_definition(model, x2, y2, "mean").items():
        assert_rel_close(pre.layers[name].A, a, F64, f"A[{name}]")
        assert_rel_close(pre.layers[name].G, g, F64, f"G[{name}]")


# -- 9. bf16 parameters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ("eigen", "inverse"))
def test_bf16_parameters(method):
    model, x, y = make_problem("mlp", 16, torch.bfloat16)
    ref = copy.deepcopy(model).float()
    pre = KFAC(model, kl_clip=None, damping=1e-1, method=method)
    pre_ref = KFAC(ref, kl_clip=None, damping=1e-1, method=method)
    run_step(pre, model, x, y, "mean")
    run_step(pre_ref, ref, x.float(), y, "mean")
    for name, lay in pre.layers.items():
        assert lay.A.dtype == lay.G.dtype == torch.float32
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.bfloat16
        err = rel_err(p.grad, q.grad)
        assert err < 5e-2, f"{method} {name}: bf16 step differs from the float32 step by {err:.3g}"


# -- 10. training with torch.optim -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ("eigen", "inverse"))
@pytest.mark.parametrize("opt_name", ("sgd", "adam"))
def test_training_decreases_loss(opt_name, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(DEVICE)
    x = torch.randn(64, 4, device=DEVICE)
    t = (x @ torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEVICE)).unsqueeze(1) + 0.3 * x[:, :1].square()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    pre = KFAC(model, lr=opt.param_groups[0]["lr"], damping=0.1, kl_clip=1e-2, inv_update_steps=5, method=method)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x), t)
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses


# -- 11. steps between inverse updates --------------------------------------------------------------------------------


def _same_shape_stack():
    """Three equal Linear layers with bias (one group), one without bias (a group of one) and a head."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
        nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3),
    ).to(DEVICE, F64)
    x = torch.randn(8, 6, device=DEVICE, dtype=F64)
    y = torch.randint(0, 3, (8,), device=DEVICE)
    return model, x, y


@pytest.mark.parametrize("method", ("eigen", "inverse"))
def test_stacks_built_once_per_inverse_update(monkeypatch, method):
    model, x, y = _same_shape_stack()
    op = "kron_precondition_eigen" if method == "eigen" else "kron_precondition"
    seen = []
    real = getattr(ops, op)

    def wrapped(grad, *mats, **kw):
        seen.append((tuple(grad.shape), [m.data_ptr() for m in mats]))
        return real(grad, *mats, **kw)

    monkeypatch.setattr(ops, op, wrapped)
    pre = KFAC(model, kl_clip=None, method=method, inv_update_steps=3)
    per_step = []
    for i in range(4):
        seen.clear()
        run_step(pre, model, x.roll(i, 0), y.roll(i, 0), "mean")
        per_step.append(dict(seen))
    assert sorted(per_step[0]) == [(1, 3, 6), (1, 5, 6), (3, 6, 7)]
    # the same stacked tensors on the steps between inverse updates, new ones after the update at step 3
    assert per_step[1] == per_step[0] and per_step[2] == per_step[0]
    assert all(per_step[3][k] != per_step[0][k] for k in per_step[0])
    # the per-layer tensors are views into the group's stacks; the saved state holds compact copies
    name = "0"
    lay = pre.layers[name]
    mine = lay.q_a if method == "eigen" else lay.a_inv
    others = pre.layers["4"].q_a if method == "eigen" else pre.layers["4"].a_inv
    assert mine.untyped_storage().data_ptr() == others.untyped_storage().data_ptr()
    saved = pre.state_dict()["layers"][name]["q_a" if method == "eigen" else "a_inv"]
    assert torch.equal(saved, mine) and saved.untyped_storage().nbytes() == saved.numel() * saved.element_size()
    # a damping change restacks (eigen: the damping of every layer) and changes the step
    before = per_step[3]
    pre.damping = 0.5
    seen.clear()
    run_step(pre, model, x, y, "mean")
    assert dict(seen) != before


@pytest.mark.parametrize("method", ("eigen", "inverse"))
def test_layers_without_gradient_in_a_group(method):
    # a group member without a weight gradient is skipped and keeps no gradient; one without a bias gradient is
    # preconditioned with a zero bias column; the others' steps equal those of a run where every layer has gradients
    model, x, y = _same_shape_stack()
    twin = copy.deepcopy(model)
    pre = KFAC(model, damping=1e-2, kl_clip=None, method=method, inv_update_steps=2)
    pre_twin = KFAC(twin, damping=1e-2, kl_clip=None, method=method, inv_update_steps=2)
    for i in range(3):
        xi, yi = x.roll(i, 0), y.roll(i, 0)
        full = run_step(pre_twin, twin, xi, yi, "mean")[1]
        model.zero_grad(set_to_none=True)
        loss_of(model, xi, yi, "mean").backward()
        model[2].weight.grad = model[2].bias.grad = None
        model[4].bias.grad = None
        gw4 = model[4].weight.grad.clone()
        pre.step()
        assert model[2].weight.grad is None and model[2].bias.grad is None
        got = grad_matrices(model, ["0", "4", "6", "8"])
        for name in ("0", "6", "8"):
            assert_rel_close(got[name], full[name], F64, f"{method} step {i} layer {name}")
        lay = pre.layers["4"]
        want = dense_step(lay.A, lay.G, torch.cat([gw4, gw4.new_zeros(gw4.shape[0], 1)], dim=1), 1e-2, method)
        assert_rel_close(got["4"], want, F64, f"{method} step {i} layer 4 without bias gradient")


def test_host_synchronisations_per_step(monkeypatch):
    """check_finite costs one host synchronisation per step between inverse updates (statistics and preconditioned
    gradients together), none without it."""
    model, x, y = _same_shape_stack()
    count = [0]
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, **kw):
            count[0] += 1
            return _real(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    pre = KFAC(model, lr=0.1, kl_clip=1e-2, inv_update_steps=4)
    syncs = []
    for i in range(6):
        model.zero_grad(set_to_none=True)
        loss_of(model, x.roll(i, 0), y.roll(i, 0), "mean").backward()
        count[0] = 0
        pre.step()
        syncs.append(count[0])
    # inverse updates at steps 0 and 4 add the statistics and factor checks (eigen, damping > 0)
    assert syncs == [3, 1, 1, 1, 3, 1], syncs
    pre.check_finite = False
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y, "mean").backward()
    count[0] = 0
    pre.step()
    assert count[0] == 0


def test_finiteness_from_abs_sums():
    from pycurv.optim.kfac import _abs_sums, _finite

    big = torch.full((4,), 3e38, dtype=torch.float32, device=DEVICE)  # finite, but its sum overflows
    nan = torch.tensor([1.0, float("nan")], device=DEVICE)
    inf = torch.tensor([-float("inf"), 2.0], dtype=F64, device=DEVICE)
    fine = torch.randn(3, 3, device=DEVICE)
    tensors = [big, nan, inf, fine]
    sums = _abs_sums(tensors, DEVICE)
    assert not math.isfinite(sums[0].item())
    assert _finite(sums.tolist(), tensors) == [True, False, False, True]


def test_package_exports_optim():
    assert pycurv.optim.KFAC is KFAC
