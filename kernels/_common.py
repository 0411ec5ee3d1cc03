"""Pieces shared by the Triton kernel families: the tensor-core product and rounding helpers, the dtype and
precision conventions, the kernel registry that tests/test_triton_compile.py compiles from, and the launch helpers.

Precision conventions (every family): ``tl.dot`` multiplies in the input dtype with float32 accumulation (float64
stays float64); float32 operands use ``tf32x3`` (three TF32 products, float32 accuracy, whatever
``torch.backends.cuda.matmul.allow_tf32`` says); a float32 intermediate multiplied by a 16-bit operand uses ``tf32``,
which rounds the intermediate no more than a 16-bit input is rounded already; float64 uses ``ieee``.

Ops: under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through the interpreter, which launches them
directly; there an op is an opaque ``torch.library.custom_op`` with a fake that states its output shapes. Otherwise
it is a ``torch.library.triton_op`` whose launches go through ``wrap_triton``, so torch.compile traces into them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter multiplies bfloat16 tiles as raw 16-bit integers; it gets float32 copies instead, and it
# truncates float32 to bfloat16, which ``_cast`` rounds first (compiled kernels never see these branches).
_UPCAST_BF16_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even; the interpreter truncates float32 to bfloat16, so there the
    rounding is done on the bits first (compiled kernels never see this branch)."""
    if _UPCAST_BF16_DOT and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(x, y, acc, PREC: tl.constexpr):
    """``acc + x @ y`` on the tensor cores, accumulating in ``acc``'s dtype; operands of different dtypes (a 16-bit
    input against a float32 intermediate) are both multiplied in the accumulation dtype."""
    if x.dtype != y.dtype:
        x = x.to(acc.dtype)
        y = y.to(acc.dtype)
    if _UPCAST_BF16_DOT and x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _scalar(v, dtype: tl.constexpr):
    """A float argument as a 0-d ``dtype`` value (the interpreter passes floats as Python floats, which would
    otherwise be rounded to float32 on first use)."""
    return tl.full((), v, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Dtypes and precisions
# ----------------------------------------------------------------------------------------------------------------

_TL_NAME = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPE = {v: k for k, v in _TL_NAME.items()}
DTYPES = ("fp32", "fp64", "fp16", "bf16")


def _acc_name(dt: str) -> str:
    """Accumulation (and result) dtype for inputs of dtype ``dt``."""
    return "fp64" if dt == "fp64" else "fp32"


def _lowp(dt: str) -> bool:
    return dt in ("fp16", "bf16")


def _prec(dt: str) -> str:
    """Input precision of tl.dot on two ``dt`` operands: float32 uses three TF32 products (float32 accuracy)."""
    return "tf32x3" if dt == "fp32" else "ieee"


def _mixed_prec(dt: str) -> str:
    """Input precision of a ``dt`` operand against a float32 (float64) intermediate: TF32 for 16-bit ``dt``, which
    rounds the intermediate no more than the 16-bit operand is rounded already."""
    return "tf32" if _lowp(dt) else _prec(dt)


def _dt(x: torch.Tensor) -> str:
    return _TL_NAME[x.dtype]


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The result dtype of an op on inputs like ``x``: float64 for float64, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Registry: argument types and configurations of every kernel
# ----------------------------------------------------------------------------------------------------------------


def _sig(*, ptrs: dict[str, str], ints: tuple[str, ...], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Runtime argument types: pointers to the named dtypes, 32-bit ints, float64 scalars."""
    sig = {k: "*" + v for k, v in ptrs.items()}
    sig.update({k: "i32" for k in ints})
    sig.update({k: "fp64" for k in floats})
    return sig


def _cfg(w: int, s: int, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=w, num_stages=s)


class KernelSpec(NamedTuple):
    """One Triton kernel: ``signature(dtype)`` gives the runtime argument types for inputs of ``dtype`` ("fp32",
    "fp64", "fp16", "bf16"), ``constants(dtype)`` the constexprs the launcher passes, ``configs(dtype)`` every
    configuration it can run with (the autotune list, or the specialisations the launcher chooses among; empty
    where the kernel is not launched for that dtype or where another dtype's entry compiles the same code)."""

    fn: object
    signature: Callable[[str], dict]
    constants: Callable[[str], dict]
    configs: Callable[[str], list]


class KernelRegistry(dict):
    """``{name: KernelSpec}`` for the kernels of one module, with the launchers' lookups of their configurations."""

    def fixed(self, name: str, dt: str, **match) -> dict:
        """The registered configuration of ``name`` whose constexprs contain ``match``, as launch keywords."""
        for cfg in self[name].configs(dt):
            if all(cfg.kwargs.get(k) == v for k, v in match.items()):
                return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        raise KeyError(f"{name}: no registered config with {match} for {dt}")

    def tuned(self, name: str, dt: str, key: tuple[str, ...], reset_to_zero: tuple[str, ...] = ()):
        """The kernel ``name`` autotuned over its configurations for input dtype ``dt`` (one config under the
        interpreter), keyed on the argument names ``key``; built once, so that its tuning results are kept.
        ``reset_to_zero``: output arguments the kernel accumulates into, or whose cells only some configurations
        write: zeroed before every timed run and before the real one (autotuning runs the kernel once per
        configuration on the same arguments)."""
        cache = self.__dict__.setdefault("_tuned", {})
        ck = (name, dt, key, reset_to_zero)
        if ck not in cache:
            configs = self[name].configs(dt)
            if _INTERPRET:
                configs = configs[:1]
            cache[ck] = triton.autotune(
                configs=configs, key=list(key), reset_to_zero=list(reset_to_zero) or None
            )(self[name].fn)
        return cache[ck]


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------------


def _wrap(kernel):
    """``wrap_triton(kernel)`` so torch.compile can trace the launch; the interpreter launches directly (older
    torch releases refuse interpreted kernels)."""
    if _INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _on_device(tensor):
    """A context in which ``tensor``'s GPU is the current device. Triton launches a kernel on the current device,
    whatever device its arguments live on: without this, tensors on ``cuda:1`` while ``cuda:0`` is current would be
    handed to a kernel running on ``cuda:0``. A no-op for CPU tensors (the interpreter) and for the current GPU."""
    device = tensor.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _define_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``triton_op`` (torch.compile traces the launcher and sees the kernels); under the interpreter, which
    launches kernels itself instead of through ``wrap_triton``, an opaque ``custom_op`` with stated shapes (its
    fake is registered beside it). The launcher runs with its first tensor argument's GPU current (``_on_device``);
    every tensor argument is on that device (the ops check it before they dispatch)."""
    define = torch.library.custom_op if _INTERPRET else torch.library.triton_op

    def decorate(launcher):
        @functools.wraps(launcher)
        def on_device(*args, **kwargs):
            first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
            with _on_device(first):
                return launcher(*args, **kwargs)

        return define(name, mutates_args=mutates_args)(on_device)

    return decorate
