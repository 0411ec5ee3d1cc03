"""Triton launches a kernel on the current CUDA device, not on its arguments' device: every Triton op must make its
tensors' GPU current before it launches (``kernels._common._on_device``)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import pycurv
from conftest import DEVICE, need_backend


def _common():
    need_backend("per_sample_gram", "triton")
    from pycurv.kernels import _common

    return _common


def _calls(dev: torch.device) -> dict:
    """One small call of every op with a Triton kernel, by op name."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    a, g = r(3, 2, 5), r(3, 2, 4)
    spd = r(2, 6, 6)
    spd = spd @ spd.mT + torch.eye(6, device=dev)
    return {
        "per_sample_grad_sqnorms": lambda b: pycurv.ops.per_sample_grad_sqnorms(a, g, backend=b),
        "per_sample_gram": lambda b: pycurv.ops.per_sample_gram(a, g, backend=b),
        "ef_diag": lambda b: pycurv.ops.ef_diag(a, g, backend=b),
        "kfac_factor_update": lambda b: pycurv.ops.kfac_factor_update(torch.eye(5, device=dev), a, 0.9, backend=b),
        "damped_inverse": lambda b: pycurv.ops.damped_inverse(spd, 0.1, method="newton_schulz", backend=b),
        # past the fused kernel's size: the batched-GEMM iteration, launched outside the registered op
        "damped_inverse[gemm]": lambda b: pycurv.ops.damped_inverse(
            torch.eye(pycurv.ops._triton("kfac").NS_FUSED_MAX + 1, device=dev)[None], 0.1, method="newton_schulz", backend=b
        ),
        "kron_precondition": lambda b: pycurv.ops.kron_precondition(r(4, 5), spd[0, :4, :4], spd[1, :5, :5], backend=b),
        "kron_precondition_eigen": lambda b: pycurv.ops.kron_precondition_eigen(
            r(4, 5), torch.eye(4, device=dev), torch.eye(5, device=dev), r(4).abs(), r(5).abs(), 0.1, backend=b
        ),
        "weighted_grad_sum": lambda b: pycurv.ops.weighted_grad_sum(a, g, r(3), backend=b),
        "logit_grad_sqnorms": lambda b: pycurv.ops.logit_grad_sqnorms(
            r(3, 7), torch.tensor([0, 6, 2], device=dev), backend=b
        ),
        "fop_update": lambda b: pycurv.ops.fop_update(torch.eye(5, device=dev), r(4, 5), r(4, 5), 0.1, 0.01, backend=b),
        "fop_precondition": lambda b: pycurv.ops.fop_precondition(torch.eye(5, device=dev), r(4, 5), backend=b),
    }


def test_every_triton_op_is_covered():
    """The table above names every op that has a Triton kernel, so the next test sees them all."""
    _common()
    for family in ("per_sample", "kfac", "ief", "fop"):
        pycurv.ops._triton(family)
    triton_ops = {name[: -len("_triton")] for name in dir(torch.ops.pycurv) if name.endswith("_triton")}
    assert triton_ops == {op.split("[")[0] for op in _calls(DEVICE)}


@pytest.mark.parametrize("op", sorted(_calls(torch.device("cpu"))))
def test_triton_op_launches_on_its_tensors_device(op, monkeypatch):
    common = _common()
    seen = []
    real = common._on_device

    def record(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(common, "_on_device", record)
    _calls(DEVICE)[op]("triton")
    assert seen and all(d == DEVICE for d in seen), f"{op}: launched under {seen}"


def test_on_device_makes_the_tensors_gpu_current(monkeypatch):
    """Without a second GPU: torch.cuda's current device and its device context stand in."""
    common = _common()
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())

    def on(device):
        with common._on_device(types.SimpleNamespace(device=torch.device(device))):
            pass

    on("cuda:1")
    assert entered == [torch.device("cuda:1")]
    for same in ("cuda:0", "cpu"):
        on(same)
    assert entered == [torch.device("cuda:1")]
