"""Shared fixtures: device, seeds, backends and the per-dtype tolerance table.

Without a CUDA device the Triton kernels run under the interpreter on CPU tensors; TRITON_INTERPRET must be set
before triton is imported, so it is set here, before pycurv (which imports triton lazily) is loaded.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pycurv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Relative Frobenius error allowed against a float64 ground truth computed from the same (already rounded)
# inputs. Low-precision inputs are rounded before the kernel sees them, so only the float32 accumulation (and,
# on tensor cores, the products' rounding) remains; the table holds per output dtype-of-input.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref||_F / ||ref||_F`` in float64 (``||x - ref||`` when ``ref`` is 0); NaN anywhere gives inf."""
    x64, r64 = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x64).all():
        return float("inf")
    den = r64.norm().item()
    num = (x64 - r64).norm().item()
    return num / den if den > 0 else num


def assert_rel_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    err = rel_err(x, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.1g} ({dtype})"


def op_backends(op: str, device: torch.device = DEVICE) -> list[str]:
    """Every backend that can run ``op`` on ``device`` here (torch, cpu / cuda, triton)."""
    return pycurv.ops.available_backends(device, op)


def need_backend(op: str, backend: str) -> None:
    """Skips the test when ``backend`` cannot run ``op`` on DEVICE here, with the reason."""
    why = pycurv.ops._backend_status(backend, DEVICE, op)
    if why is not None:
        pytest.skip(f"{op}: backend {backend!r} is not available: {why}")


def registered(op: str, key: str) -> bool:
    """Whether the compiled extension registers a ``key`` (CPU / CUDA) kernel for ``torch.ops.pycurv.<op>``."""
    if pycurv._extension.LOAD_ERROR is not None:
        return False
    try:
        getattr(torch.ops.pycurv, op)
    except (AttributeError, RuntimeError):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pycurv::{op}", key)


def need_registered(op: str, key: str) -> None:
    if pycurv._extension.LOAD_ERROR is not None:
        pytest.skip(f"pycurv._C did not load: {pycurv._extension.LOAD_ERROR}")
    if not registered(op, key):
        pytest.skip(f"torch.ops.pycurv.{op} has no {key} kernel registered")


def native_offered(op: str, native: str) -> list[str]:
    """When the extension registers a kernel for ``op`` on DEVICE, pycurv.ops must offer its backend ``native``;
    returns the backends offered (skips when nothing is registered)."""
    key = DEVICE.type.upper()
    need_registered(op, key)
    live = pycurv.ops.available_backends(DEVICE, op)
    assert native in live, (
        f"torch.ops.pycurv.{op} has a {key} kernel, but pycurv.ops does not offer backend {native!r} for it: "
        f"{pycurv.ops._backend_status(native, DEVICE, op)}"
    )
    return live


def raises_naming(op: str, exc, pattern: str, call) -> None:
    """``call()`` must raise ``exc`` with a message matching ``pattern`` that names ``op``."""
    with pytest.raises(exc, match=pattern) as info:
        call()
    assert op in str(info.value), f"message does not name the op: {info.value}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE
