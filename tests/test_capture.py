"""pycurv.capture.Capture: hooks on Linear/Conv2d layers, checked against per-sample gradients from torch.func
(tests/models.py) on an MLP, a transformer block on (N, T, d) inputs and a CNN with strided, padded and dilated
convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pycurv.capture import Capture

from conftest import DEVICE, INTERPRET, REL_TOL, assert_rel_close, op_backends, rel_err
from models import CNN, MLP, TransformerBlock, captured_layer_names, per_sample_jacobian


def ce_sum(out, y):
    """Cross-entropy summed over every leading position: l_n for a batch of one, L = sum_n l_n for a batch."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def make_problem(kind: str, n: int, dtype=torch.float64):
    if kind == "mlp":
        model, x, y = MLP(), torch.randn(n, 5), torch.randint(0, 3, (n,))
    elif kind == "transformer":
        model, x, y = TransformerBlock(), torch.randn(n, 4, 6), torch.randint(0, 4, (n, 4))
    elif kind == "cnn":
        model, x, y = CNN(), torch.randn(n, 2, 9, 8), torch.randint(0, 3, (n,))
    else:
        raise AssertionError(kind)
    return model.to(DEVICE, dtype), x.to(DEVICE, dtype), y.to(DEVICE)


def run_capture(model, x, y, loss_reduction="sum", **kw):
    with Capture(model, loss_reduction=loss_reduction, **kw) as cap:
        loss = ce_sum(model(x), y)
        if loss_reduction == "mean":
            loss = loss / x.shape[0]
        loss.backward()
    return cap


def check_against_jacobian(cap, model, x, y, dtype, what, backend="auto", method="auto", layer_names=None):
    j, blocks = per_sample_jacobian(model, x, y, ce_sum, layer_names)
    assert_rel_close(cap.per_sample_gram(backend=backend, method=method), j @ j.T, dtype, f"{what} gram")
    assert_rel_close(
        cap.per_sample_grad_sqnorms(backend=backend, method=method), j.square().sum(1), dtype, f"{what} sqnorms"
    )
    if backend == "auto" or backend in op_backends("ef_diag"):
        ef = cap.ef_diag(backend=backend)
        assert set(ef) == set(blocks), f"{what}: ef_diag layers {sorted(ef)} != {sorted(blocks)}"
        for name, (wd, bd) in ef.items():
            mod = dict(model.named_modules())[name]
            assert wd.shape == mod.weight.shape
            got = wd.reshape(wd.shape[0], -1)
            if bd is not None:
                assert bd.shape == mod.bias.shape
                got = torch.cat([got, bd.unsqueeze(1)], dim=1)
            assert_rel_close(got, blocks[name].square().sum(0), dtype, f"{what} ef_diag[{name}]")


def _model_cases():
    """(backend, model kind, loss reduction): the full grid, or a few cases for the interpreted Triton backend."""
    params = []
    for backend in op_backends("per_sample_gram"):
        if backend == "triton" and INTERPRET:
            combos = [("mlp", "sum"), ("transformer", "mean"), ("cnn", "sum")]
        else:
            combos = [(k, r) for k in ("mlp", "transformer", "cnn") for r in ("sum", "mean")]
        params += [pytest.param(backend, k, r, id=f"{backend}-{k}-{r}") for k, r in combos]
    return params


@pytest.mark.parametrize("backend, kind, reduction", _model_cases())
def test_capture_matches_torch_func(backend, kind, reduction):
    model, x, y = make_problem(kind, 5)
    cap = run_capture(model, x, y, reduction)
    assert list(cap.layers) == captured_layer_names(model)
    check_against_jacobian(cap, model, x, y, torch.float64, f"{kind}/{reduction}[{backend}]", backend=backend)


@pytest.mark.parametrize("method", ("ghost", "materialize"))
@pytest.mark.parametrize("kind", ("transformer", "cnn"))
def test_capture_methods(kind, method):
    model, x, y = make_problem(kind, 3)
    cap = run_capture(model, x, y)
    check_against_jacobian(cap, model, x, y, torch.float64, f"{kind}/{method}", backend="torch", method=method)
    check_against_jacobian(cap, model, x, y, torch.float64, f"{kind}/{method}", method=method)


@pytest.mark.parametrize("kind", ("transformer", "cnn"))
def test_capture_float32(kind):
    # float32 forward/backward against the float64 ground truth of the same parameters and inputs: the rounding
    # of the float32 pass itself (not of the kernels) dominates, hence 10x the float32 kernel tolerance.
    model, x, y = make_problem(kind, 4, torch.float32)
    cap = run_capture(model, x, y)
    for _, (_, a, g) in cap.layers.items():
        assert a.dtype == g.dtype == torch.float32
    k = cap.per_sample_gram()
    assert k.dtype == torch.float32
    j, _ = per_sample_jacobian(model, x, y, ce_sum)
    assert rel_err(k, j @ j.T) < 10 * REL_TOL[torch.float32]
    assert rel_err(cap.per_sample_grad_sqnorms(), j.square().sum(1)) < 10 * REL_TOL[torch.float32]


def test_capture_mean_rescales_g():
    model, x, y = make_problem("mlp", 6)
    cap_sum = run_capture(model, x, y, "sum")
    cap_mean = run_capture(model, x, y, "mean")
    for name, (_, a, g) in cap_sum.layers.items():
        _, a2, g2 = cap_mean.layers[name]
        assert torch.equal(a, a2)
        torch.testing.assert_close(g2, g, rtol=1e-10, atol=1e-14)
    # without the rescaling the Gram would be N^2 too small: the check above is what makes this fail
    with pytest.raises(ValueError, match="loss_reduction"):
        Capture(model, loss_reduction="none")


def test_deep_copy_does_not_feed_the_original_capture():
    """A deep copy of a hooked model carries the hooks along; its passes must not overwrite the original's record."""
    import copy

    model, x, y = make_problem("mlp", 5)
    with Capture(model) as cap:
        ce_sum(model(x), y).backward()
        want = cap.per_sample_gram().clone()
        twin = copy.deepcopy(model)
        ce_sum(twin(2 * x + 1), y).backward()
    assert torch.equal(cap.per_sample_gram(), want)
    j, _ = per_sample_jacobian(model, x, y, ce_sum)
    assert rel_err(want, j @ j.T) < REL_TOL[torch.float64]


# -- Conv2d ---------------------------------------------------------------------------------------------------------

CONVS = {
    "stride2": dict(kernel_size=3, stride=2),
    "padding1": dict(kernel_size=3, padding=1),
    "same_dil2": dict(kernel_size=3, padding="same", dilation=2),
    "same_even_kernel": dict(kernel_size=(2, 4), padding="same", dilation=(1, 3)),
    "valid": dict(kernel_size=(3, 2), padding="valid"),
    "nobias": dict(kernel_size=3, padding=1, bias=False),
    "tuples": dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
    "1x1": dict(kernel_size=1),
}


@pytest.mark.parametrize("variant", list(CONVS))
def test_conv2d_variants(variant):
    conv = nn.Conv2d(3, 4, **CONVS[variant]).to(DEVICE, torch.float64)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).to(DEVICE, torch.float64)
    x = torch.randn(4, 3, 7, 6, device=DEVICE, dtype=torch.float64)
    y = torch.randint(0, 2, (4,), device=DEVICE)
    model(x)  # materialise the lazy layer
    out = conv(x)
    cap = run_capture(model, x, y)
    _, a, g = cap.layers["0"]
    n, c_out, h, w = out.shape
    assert a.shape == (n, h * w, 3 * conv.kernel_size[0] * conv.kernel_size[1])
    assert g.shape == (n, h * w, c_out)
    # the patches reproduce the convolution: a @ W^T (+ b) is the layer output
    rebuilt = a @ conv.weight.reshape(c_out, -1).T
    if conv.bias is not None:
        rebuilt = rebuilt + conv.bias
    torch.testing.assert_close(rebuilt, out.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    check_against_jacobian(cap, model, x, y, torch.float64, f"conv {variant}")


@pytest.mark.parametrize(
    "conv, pattern",
    [
        (nn.Conv2d(4, 4, 3, groups=2), r"'body\.conv'.*groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"'body\.conv'.*padding_mode='reflect'"),
    ],
    ids=("groups2", "reflect"),
)
def test_conv2d_unsupported_raises(conv, pattern):
    model = nn.Sequential()
    model.add_module("body", nn.Sequential())
    model.body.add_module("conv", conv)
    with pytest.raises(ValueError, match=pattern):
        Capture(model)
    conv.weight.requires_grad_(False)  # a frozen unsupported layer is simply not captured
    if conv.bias is not None:
        conv.bias.requires_grad_(False)
    Capture(model)


def test_conv2d_unbatched_input_raises():
    conv = nn.Conv2d(2, 3, 3).to(DEVICE)
    with Capture(conv):
        with pytest.raises(ValueError, match="batched"):
            conv(torch.randn(2, 5, 5, device=DEVICE))


# -- hooks, passes, selection ---------------------------------------------------------------------------------------


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hooks_removed_after_exit():
    model, x, y = make_problem("cnn", 3)
    before = _n_hooks(model)
    with Capture(model) as cap:
        assert _n_hooks(model) == before + len(captured_layer_names(model))
        out = model(x)
    assert _n_hooks(model) == before
    ce_sum(out, y).backward()  # a backward after exit through a graph built inside: nothing is recorded
    assert cap.layers == {}
    with pytest.raises(RuntimeError, match="no output gradient"):
        cap.per_sample_gram()
    cap2 = run_capture(model, x, y)
    k = cap2.per_sample_gram()
    x2, y2 = x.flip(0), y.flip(0)
    ce_sum(model(x2), y2).backward()  # after exit: cap2 keeps the data of its own pass
    torch.testing.assert_close(cap2.per_sample_gram(), k, rtol=0, atol=0)


def test_frozen_layers_skipped():
    model, x, y = make_problem("mlp", 4)
    model.fc2.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)  # trainable weight, frozen bias: the bias is left out
    cap = run_capture(model, x, y)
    assert list(cap.layers) == ["fc1", "head"]
    check_against_jacobian(cap, model, x, y, torch.float64, "frozen")
    # the ground truth with fc2 included differs: the check above is not vacuous
    j_all, _ = per_sample_jacobian(model, x, y, ce_sum, ["fc1", "fc2", "head"])
    assert (cap.per_sample_grad_sqnorms() - j_all.square().sum(1)).abs().max() > 1e-6


def test_layer_shapes():
    n = 3
    mlp, x, y = make_problem("mlp", n)
    cap = run_capture(mlp, x, y)
    shapes = {k: (tuple(a.shape), tuple(g.shape)) for k, (_, a, g) in cap.layers.items()}
    assert shapes == {"fc1": ((n, 1, 5), (n, 1, 7)), "fc2": ((n, 1, 7), (n, 1, 7)), "head": ((n, 1, 7), (n, 1, 3))}
    tr, x, y = make_problem("transformer", n)
    cap = run_capture(tr, x, y)
    for name, (mod, a, g) in cap.layers.items():
        assert a.shape == (n, 4, mod.in_features) and g.shape == (n, 4, mod.out_features), name
        assert not a.requires_grad and not g.requires_grad
        assert mod is dict(tr.named_modules())[name]
    cnn, x, y = make_problem("cnn", n)
    cap = run_capture(cnn, x, y)
    shapes = {k: (tuple(a.shape), tuple(g.shape)) for k, (_, a, g) in cap.layers.items()}
    assert shapes == {
        "c1": ((n, 20, 18), (n, 20, 3)),
        "c2": ((n, 20, 27), (n, 20, 4)),
        "c3": ((n, 5, 24), (n, 5, 3)),
        "c4": ((n, 4, 6), (n, 4, 2)),
        "fc": ((n, 1, 8), (n, 1, 3)),
    }


def test_linear_many_leading_dims():
    lin = nn.Linear(5, 3).to(DEVICE, torch.float64)
    x = torch.randn(4, 2, 3, 5, device=DEVICE, dtype=torch.float64)
    with Capture(lin) as cap:
        (lin(x) ** 2).sum().backward()
    _, a, g = cap.layers[""]
    assert a.shape == (4, 6, 5) and g.shape == (4, 6, 3)

    def loss(out, _):
        return (out**2).sum()

    j, _ = per_sample_jacobian(lin, x, torch.zeros(4, device=DEVICE), loss)
    assert_rel_close(cap.per_sample_gram(), j @ j.T, torch.float64, "4-d input")


def test_new_pass_overwrites():
    model, x, y = make_problem("transformer", 5)
    x2, y2 = x[:3] * 2, y[:3].flip(1)
    with Capture(model) as cap:
        ce_sum(model(x), y).backward()
        ce_sum(model(x2), y2).backward()  # the second pass replaces the first
    assert cap.per_sample_gram().shape == (3, 3)
    check_against_jacobian(cap, model, x2, y2, torch.float64, "second pass")


def test_second_backward_through_same_graph_raises():
    model, x, y = make_problem("mlp", 3)
    with Capture(model):
        loss = ce_sum(model(x), y)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second output gradient"):
            loss.backward()


def test_no_grad_forward_keeps_pass():
    model, x, y = make_problem("mlp", 4)
    with Capture(model) as cap:
        ce_sum(model(x), y).backward()
        with torch.no_grad():
            model(x[:2] + 1)  # evaluation inside the context does not start a new pass
    check_against_jacobian(cap, model, x, y, torch.float64, "after no_grad forward")


def test_weight_sharing_concatenates_calls():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    model = Shared().to(DEVICE, torch.float64)
    x = torch.randn(5, 3, 4, device=DEVICE, dtype=torch.float64)
    y = torch.randint(0, 2, (5, 3), device=DEVICE)
    cap = run_capture(model, x, y)
    assert cap.layers["lin"][1].shape == (5, 6, 4)  # two calls of T = 3
    check_against_jacobian(cap, model, x, y, torch.float64, "shared weight")


def test_inplace_activation_and_checkpoint():
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 3)
            self.act = nn.ReLU(inplace=True)
            self.ckpt = True

        def forward(self, x):
            h = self.act(self.a(x))  # in place on a captured output
            if self.ckpt:  # b's forward runs again inside backward
                h = checkpoint(lambda z: torch.tanh(self.b(z)), h, use_reentrant=False)
            else:
                h = torch.tanh(self.b(h))
            return self.c(h)

    model = Net().to(DEVICE, torch.float64)
    x = torch.randn(4, 5, device=DEVICE, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), device=DEVICE)
    cap = run_capture(model, x, y)
    assert cap.layers["b"][1].shape == (4, 1, 6)
    model.ckpt = False  # torch.func does not support checkpoint's saved-tensor hooks; same function without it
    check_against_jacobian(cap, model, x, y, torch.float64, "inplace + checkpoint")


def test_layers_selection():
    model, x, y = make_problem("transformer", 3)
    cap = run_capture(model, x, y, layers=["q", model.up, "cls"])
    assert list(cap.layers) == ["q", "up", "cls"]
    check_against_jacobian(cap, model, x, y, torch.float64, "selection", layer_names=["q", "up", "cls"])
    with pytest.raises(ValueError, match="'ln1'.*LayerNorm"):
        Capture(model, layers=["ln1"])
    with pytest.raises(ValueError, match="'nope'"):
        Capture(model, layers=["nope"])
    with pytest.raises(ValueError, match="not part of model"):
        Capture(model, layers=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="model"):
        Capture(lambda x: x)


def test_no_supported_layer_raises():
    model = nn.Sequential(nn.Tanh(), nn.LayerNorm(3))
    with Capture(model) as cap:
        model(torch.randn(2, 3, requires_grad=True)).sum().backward()
    for helper in (cap.per_sample_gram, cap.per_sample_grad_sqnorms, cap.ef_diag):
        with pytest.raises(RuntimeError, match="no captured layer"):
            helper()


def test_no_backward_raises():
    model, x, _ = make_problem("mlp", 3)
    with Capture(model) as cap:
        model(x)
    with pytest.raises(RuntimeError, match="no output gradient"):
        cap.per_sample_grad_sqnorms()


def test_reentering_active_context_raises():
    model, _, _ = make_problem("mlp", 3)
    cap = Capture(model)
    with cap:
        with pytest.raises(RuntimeError, match="already active"):
            cap.__enter__()
