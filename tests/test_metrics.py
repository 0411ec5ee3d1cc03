"""pycurv.metrics: GGN products and the approximation-quality indicator of Wu et al. 2024 against explicit dense
matrices in float64: ``F = J_z^T H_z J_z`` with ``J_z`` from torch.autograd.functional.jacobian of the model outputs
and ``H_z`` written out (softmax cross-entropy: ``c (diag(p) - p p^T)`` per sample; MSE: ``2 c I``), on a tiny MLP
and a tiny CNN with BatchNorm in train mode (batch statistics couple the samples; running statistics must survive
every call)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pycurv.metrics import flat_params, gamma, ggn_quadratic, ggn_vector_product, update_quality

from conftest import DEVICE

F64 = torch.float64
TOL = 1e-10


class BNCNN(nn.Module):
    """Conv2d, BatchNorm2d (train mode: batch statistics), Tanh, Linear: inputs (N, 1, 3, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def make(kind: str, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(n, 3)
    elif kind == "bncnn":
        model, x = BNCNN(), torch.randn(n, 1, 3, 3)
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.5, 0.5)
    else:
        raise AssertionError(kind)
    model = model.to(DEVICE, F64).train()
    return model, x.to(DEVICE, F64)


LOSSES = {
    "ce_mean": lambda o, t: F.cross_entropy(o, t),
    "ce_sum": lambda o, t: F.cross_entropy(o, t, reduction="sum"),
    "mse_mean": lambda o, t: F.mse_loss(o, t),
    "mse_sum": lambda o, t: F.mse_loss(o, t, reduction="sum"),
}


def targets(loss: str, out_shape, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if loss.startswith("ce"):
        return torch.randint(0, out_shape[1], (out_shape[0],), generator=g).to(DEVICE)
    return torch.randn(out_shape, generator=g, dtype=F64).to(DEVICE)


def dense(model, x, t, loss: str):
    """Explicit float64 ``F = J_z^T H_z J_z`` and ``grad L = J_z^T grad_z L`` over the trainable parameters in
    ``model.parameters()`` order, computed on copies of the buffers."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def f(th):
        ps, i = {}, 0
        for (n, _), sh in zip(named, shapes):
            ps[n] = th[i : i + sh.numel()].reshape(sh)
            i += sh.numel()
        bufs = {n: b.clone() for n, b in buffers.items()}
        return functional_call(model, {**ps, **bufs}, (x,))

    z = f(theta).detach()
    jz = torch.autograd.functional.jacobian(f, theta).reshape(z.numel(), -1)
    n, c = z.shape
    if loss.startswith("ce"):
        scale = 1.0 / n if loss == "ce_mean" else 1.0
        p = torch.softmax(z, dim=1)
        h = torch.block_diag(*[torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(n)]) * scale
        gz = (p - F.one_hot(t, c).to(F64)) * scale
    else:
        scale = 1.0 / z.numel() if loss == "mse_mean" else 1.0
        h = 2.0 * scale * torch.eye(z.numel(), dtype=F64, device=z.device)
        gz = 2.0 * scale * (z - t)
    return jz.T @ h @ jz, jz.T @ gz.reshape(-1)


def dense_gamma(fm, g, d):
    return math.sqrt(max((d @ fm @ d).item(), 0.0)) / abs((d @ g).item())


def dense_ratio(fm, g, d):
    return dense_gamma(fm, g, d) / dense_gamma(fm, g, g)


def flat_of(d: dict, model) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in flat_params(model)])


def buffers_of(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def assert_buffers_equal(model, saved, what):
    for n, b in model.named_buffers():
        assert torch.equal(b, saved[n]), f"{what}: buffer {n} changed"


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- GGN products against the dense matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss", tuple(LOSSES))
@pytest.mark.parametrize("kind", ("mlp", "bncnn"))
def test_ggn_products_match_dense(kind, loss):
    model, x = make(kind)
    t = targets(loss, (x.shape[0], 3))
    fm, _ = dense(model, x, t, loss)
    assert (fm - fm.T).abs().max() < 1e-12 and torch.linalg.eigvalsh(fm).min() > -1e-10  # F is symmetric PSD
    saved = buffers_of(model)
    names = flat_params(model)
    for seed in range(2):
        v = torch.randn(fm.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64).to(DEVICE)
        q = ggn_quadratic(model, LOSSES[loss], (x, t), v)
        assert q.dim() == 0
        want = v @ fm @ v
        assert abs(q.item() - want.item()) <= TOL * abs(want.item()), (q.item(), want.item())
        fv = ggn_vector_product(model, LOSSES[loss], (x, t), v)
        assert list(fv) == names
        assert rel(flat_of(fv, model), fm @ v) <= TOL
    assert_buffers_equal(model, saved, f"{kind}/{loss} after the GGN products")
    assert model.training
    if kind == "bncnn":
        model(x)  # the check above can fail: a train-mode forward moves the running statistics
        assert not torch.equal(model.bn.running_mean, saved["bn.running_mean"])


def test_ggn_mean_and_sum_scale_by_n():
    model, x = make("mlp", n=5)
    t = targets("ce", (5, 3))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64, device=DEVICE)
    q_mean = ggn_quadratic(model, LOSSES["ce_mean"], (x, t), v)
    q_sum = ggn_quadratic(model, LOSSES["ce_sum"], (x, t), v)
    assert abs(q_sum.item() - 5 * q_mean.item()) <= TOL * abs(q_sum.item())


def test_eval_mode_bn_uses_running_statistics():
    model, x = make("bncnn")
    model.eval()
    t = targets("ce", (x.shape[0], 3))
    fm, g = dense(model, x, t, "ce_sum")
    fm_train, _ = dense(model.train(), x, t, "ce_sum")
    model.eval()
    v = torch.randn(fm.shape[0], dtype=F64, device=DEVICE)
    assert rel(flat_of(ggn_vector_product(model, LOSSES["ce_sum"], (x, t), v), model), fm @ v) <= TOL
    assert rel(fm_train @ v, fm @ v) > 1e-3  # the mode matters
    assert not model.training


# -- update_quality ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ("ce_mean", "ce_sum", "mse_mean"))
@pytest.mark.parametrize("kind", ("mlp", "bncnn"))
def test_update_quality_matches_dense_ratio(kind, loss):
    model, x = make(kind)
    t = targets(loss, (x.shape[0], 3))
    fm, g = dense(model, x, t, loss)
    saved = buffers_of(model)
    for seed in range(3):
        d = torch.randn(fm.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64).to(DEVICE)
        want = dense_ratio(fm, g, d)
        got, parts = update_quality(model, LOSSES[loss], (x, t), d, return_parts=True)
        assert got == pytest.approx(want, rel=1e-9)
        assert parts["gamma_update"] == pytest.approx(dense_gamma(fm, g, d), rel=1e-9)
        assert parts["gamma_grad"] == pytest.approx(dense_gamma(fm, g, g), rel=1e-9)
        assert gamma(model, LOSSES[loss], (x, t), d) == pytest.approx(dense_gamma(fm, g, d), rel=1e-9)
    # the gradient itself scores exactly 1
    assert update_quality(model, LOSSES[loss], (x, t), g) == pytest.approx(1.0, rel=1e-12)
    assert_buffers_equal(model, saved, f"{kind}/{loss} after update_quality")


def _per_sample_grads(model, x, t):
    """Per-sample gradients of l_n = CE(model(x_n), t_n) (reduction sum) over all trainable parameters, (N, P)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xn, tn):
        out = functional_call(model, p, (xn.unsqueeze(0),))
        return F.cross_entropy(out, tn.unsqueeze(0), reduction="sum")

    gr = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, t)
    return torch.cat([gr[n].reshape(x.shape[0], -1) for n in params], dim=1)


def _block_diag_of(fm, model):
    """F restricted to its per-layer diagonal blocks (weight and bias of a layer together): the block-diagonal GGN
    that K-FAC approximates layer by layer."""
    sizes = {}
    for n, p in model.named_parameters():
        layer = n.rsplit(".", 1)[0]
        sizes[layer] = sizes.get(layer, 0) + p.numel()
    out, i = torch.zeros_like(fm), 0
    for size in sizes.values():
        out[i : i + size, i : i + size] = fm[i : i + size, i : i + size]
        i += size
    return out


def test_natural_gradient_scores_lowest():
    model, x = make("mlp", n=6)
    t = targets("ce", (6, 3))
    loss_fn = LOSSES["ce_mean"]
    fm, g = dense(model, x, t, "ce_mean")
    n, p_dim = x.shape[0], fm.shape[0]
    eye_p, eye_n = torch.eye(p_dim, dtype=F64, device=DEVICE), torch.eye(n, dtype=F64, device=DEVICE)
    # F has rank N (C - 1) = 12 < P = 31: the natural gradient is pinv(F) grad (grad lies in F's range)
    evals, evecs = torch.linalg.eigh(fm)
    pos = evals > 1e-10 * evals.max()
    assert int(pos.sum()) == n * 2
    ng = evecs[:, pos] @ ((evecs[:, pos].T @ g) / evals[pos])
    assert rel(fm @ ng, g) < 1e-8

    j = _per_sample_grads(model, x, t) / n  # rows: gradients of the scaled losses l_n / N
    assert rel(j.sum(0), g) < 1e-12
    p = torch.softmax(model(x).detach(), 1)
    s = ((p - F.one_hot(t, 3).to(F64)) ** 2).sum(1) / n**2
    lab = torch.multinomial(p.cpu(), 1, generator=torch.Generator().manual_seed(0)).squeeze(1).to(DEVICE)
    j_hat = _per_sample_grads(model, x, lab) / n
    lam = 1e-4
    candidates = {
        "sgd": g,
        "ef": j.T @ torch.linalg.solve(j @ j.T + 1e-12 * eye_n, torch.ones(n, dtype=F64, device=DEVICE)),
        "ief": j.T @ torch.linalg.solve(j @ j.T + 1e-12 * eye_n, s),
        "sf": torch.linalg.solve(j_hat.T @ j_hat + lam * eye_p, g),
        "kfac_like": torch.linalg.solve(_block_diag_of(fm, model) + lam * eye_p, g),
        "damped_ng": torch.linalg.solve(fm + 1e-2 * eye_p, g),
    }
    gen = torch.Generator().manual_seed(3)
    for i in range(4):
        candidates[f"random{i}"] = torch.randn(p_dim, generator=gen, dtype=F64).to(DEVICE)
    ratios = {k: update_quality(model, loss_fn, (x, t), d) for k, d in candidates.items()}
    r_ng = update_quality(model, loss_fn, (x, t), ng)
    # Cauchy-Schwarz in the F inner product: gamma(ng) = 1 / sqrt(grad^T pinv(F) grad)
    want = (1.0 / math.sqrt((g @ ng).item())) / dense_gamma(fm, g, g)
    assert r_ng == pytest.approx(want, rel=1e-8)
    assert ratios["sgd"] == pytest.approx(1.0, rel=1e-12)
    for k, r in ratios.items():
        assert r == pytest.approx(dense_ratio(fm, g, candidates[k]), rel=1e-8), k
        assert r_ng < r * (1 - 1e-6), (k, r_ng, r)
    assert r_ng < 1.0


def test_scale_sign_and_loss_scale_invariance():
    model, x = make("mlp")
    t = targets("ce", (x.shape[0], 3))
    d = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64, device=DEVICE)
    base = update_quality(model, LOSSES["ce_mean"], (x, t), d)
    for factor in (-1.0, 3.7, -1e-3, 1e4):
        assert update_quality(model, LOSSES["ce_mean"], (x, t), factor * d) == pytest.approx(base, rel=1e-10), factor
    assert update_quality(model, lambda o, y: 7.0 * F.cross_entropy(o, y), (x, t), d) == pytest.approx(base, rel=1e-10)
    other = update_quality(model, LOSSES["ce_mean"], (x, t), d + 0.5 * d.flip(0))
    assert other != pytest.approx(base, rel=1e-3)  # a different direction scores differently


def test_update_formats_agree():
    model, x = make("mlp")
    t = targets("ce", (x.shape[0], 3))
    names = flat_params(model)
    params = dict(model.named_parameters())
    assert names == [n for n, _ in model.named_parameters()]
    d = {n: torch.randn_like(params[n]) for n in names}
    flat = torch.cat([d[n].reshape(-1) for n in names])
    r_dict = update_quality(model, LOSSES["ce_mean"], (x, t), d)
    r_list = update_quality(model, LOSSES["ce_mean"], (x, t), [d[n] for n in names])
    r_tuple = update_quality(model, LOSSES["ce_mean"], (x, t), tuple(d[n] for n in names))
    r_flat = update_quality(model, LOSSES["ce_mean"], (x, t), flat)
    assert r_dict == pytest.approx(r_flat, rel=1e-13) and r_list == pytest.approx(r_flat, rel=1e-13)
    assert r_tuple == pytest.approx(r_flat, rel=1e-13)
    # a name missing from a dict counts as zero
    partial = {n: d[n] for n in names if not n.startswith("0.")}
    zeroed = torch.cat([(torch.zeros_like(d[n]) if n.startswith("0.") else d[n]).reshape(-1) for n in names])
    r_partial = update_quality(model, LOSSES["ce_mean"], (x, t), partial)
    assert r_partial == pytest.approx(update_quality(model, LOSSES["ce_mean"], (x, t), zeroed), rel=1e-13)
    assert r_partial != pytest.approx(r_flat, rel=1e-3)
    # the three formats of ggn_vector_product agree too
    fv = [flat_of(ggn_vector_product(model, LOSSES["ce_mean"], (x, t), u), model) for u in (d, flat, list(d.values()))]
    assert torch.allclose(fv[0], fv[1], rtol=1e-13, atol=0) and torch.allclose(fv[2], fv[1], rtol=1e-13, atol=0)
    # inputs given as a tuple of model arguments
    assert update_quality(model, LOSSES["ce_mean"], ((x,), t), flat) == pytest.approx(r_flat, rel=1e-13)


def test_frozen_parameters_are_not_part_of_updates():
    model, x = make("mlp")
    model[0].bias.requires_grad_(False)
    t = targets("ce", (x.shape[0], 3))
    assert flat_params(model) == ["0.weight", "2.weight", "2.bias"]
    fm, g = dense(model, x, t, "ce_mean")
    assert fm.shape == (12 + 12 + 3, 12 + 12 + 3)
    d = torch.randn(fm.shape[0], dtype=F64, device=DEVICE)
    assert update_quality(model, LOSSES["ce_mean"], (x, t), d) == pytest.approx(dense_ratio(fm, g, d), rel=1e-9)
    with pytest.raises(ValueError, match="'0.bias'"):
        update_quality(model, LOSSES["ce_mean"], (x, t), {"0.bias": torch.zeros(4, dtype=F64, device=DEVICE)})


def test_zero_update_scores_inf():
    model, x = make("mlp")
    t = targets("ce", (x.shape[0], 3))
    assert update_quality(model, LOSSES["ce_mean"], (x, t), {}) == math.inf
    assert gamma(model, LOSSES["ce_mean"], (x, t), torch.zeros(31, dtype=F64, device=DEVICE)) == math.inf


def test_bad_updates_and_batches_raise():
    model, x = make("mlp")
    t = targets("ce", (x.shape[0], 3))
    batch = (x, t)
    loss_fn = LOSSES["ce_mean"]
    w = model[0].weight
    cases = [
        ({"0.weight": w, "nope": w}, ValueError, r"names \['nope'\] are not trainable"),
        ({"0.weight": w.T}, ValueError, r"'0.weight' must have shape \(4, 3\), got \(3, 4\)"),
        (torch.zeros(30, dtype=F64, device=DEVICE), ValueError, r"must have 31 elements.*got 30"),
        ([w, w], ValueError, r"must have 4 tensors.*got 2"),
        ([w, w, w, w], ValueError, r"entry for '0.bias' must have shape \(4,\), got \(4, 3\)"),
        ([w, "x", w, w], ValueError, r"entry for '0.bias' must have shape \(4,\), got str"),
        (torch.zeros(31, 1, dtype=F64, device=DEVICE), TypeError, "a list/tuple of tensors or a flat 1-d tensor"),
        ("sgd", TypeError, "got str"),
    ]
    for update, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            update_quality(model, loss_fn, batch, update)
    with pytest.raises(ValueError, match=r"ggn_quadratic: a flat update must have 31"):
        ggn_quadratic(model, loss_fn, batch, torch.zeros(5, dtype=F64, device=DEVICE))
    with pytest.raises(ValueError, match=r"ggn_vector_product: names \['x'\]"):
        ggn_vector_product(model, loss_fn, batch, {"x": w})
    for bad in (x, (x, t, t), [x]):
        with pytest.raises(TypeError, match=r"batch must be a pair \(inputs, targets\)"):
            update_quality(model, loss_fn, bad, torch.zeros(31, dtype=F64, device=DEVICE))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x), x

    pair = Pair().to(DEVICE, F64)
    with pytest.raises(TypeError, match="must return one tensor"):
        ggn_quadratic(pair, lambda o, y: F.cross_entropy(o[0], y), batch, torch.zeros(12, dtype=F64, device=DEVICE))
