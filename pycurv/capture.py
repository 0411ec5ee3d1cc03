"""Module hooks that collect, from one ordinary forward and backward pass, what the per-sample ops take.

For every captured layer ``W: (d_out, d_in)`` a forward hook keeps the layer input and a hook on the layer output
keeps the gradient arriving there, turned into ``a: (N, T, d_in)`` and ``g: (N, T, d_out)``; the per-sample gradient
of sample ``n`` is then ``G_n = g_n^T a_n`` (plus ``sum_t g[n, t]`` for the bias), so per-sample gradient norms,
the per-sample gradient Gram ``K = J J^T`` and the empirical-Fisher diagonal follow from :mod:`pycurv.ops` without
any per-sample gradient being formed (MATH.md section 1; Goodfellow 2015, Li et al. 2022 for sequences,
Rochette et al. 2019 for convolutions through unfolded patches).

Supported layers:

* ``nn.Linear`` on inputs ``(N, d_in)`` (``T = 1``) or ``(N, ..., d_in)``: every dimension between the first and the
  last is flattened into ``T``.
* ``nn.Conv2d`` with ``groups=1`` and ``padding_mode="zeros"`` on inputs ``(N, c_in, H, W)``: ``a`` holds the input
  patches, ``(N, T, c_in*kh*kw)`` with ``T = H_out*W_out`` (``torch.nn.functional.unfold`` honouring stride,
  padding -- int, tuple, ``"same"``, ``"valid"`` -- and dilation), ``g`` is ``(N, T, c_out)``. Patch columns follow
  ``weight.view(c_out, -1)``. A grouped convolution or another padding mode raises ``ValueError`` naming the layer.

Conventions:

* ``loss_reduction="sum"`` (default): the loss is ``L = sum_n l_n``, so the recorded output gradient of sample ``n``
  already is the gradient of its own loss ``l_n``.
* ``loss_reduction="mean"``: the loss is ``L = (1/N) sum_n l_n`` with ``N`` the batch size (dim 0 of the layer's
  input). The gradient recorded at the output is then ``(1/N) grad l_n``; it is multiplied by ``N`` when recorded,
  so ``cap.layers`` and every helper give the per-sample quantities of the per-sample losses ``l_n`` in both cases.
  (A loss averaged over tokens, ``1/(N T)``, is not this convention: use ``"sum"`` on ``L * N * T`` or rescale.)
  In float16/bfloat16 the multiplication by ``N`` rounds unless ``N`` is a power of two.
* One pass per context at a time: every forward call of a captured layer (with autograd recording) is kept, and
  calls in the same pass are concatenated along ``T`` (a layer applied twice shares its weight, so its per-sample
  gradient is the sum over both calls). The first forward call after any output gradient has been recorded starts
  a new pass and drops everything recorded before (overwrite). Running backward a second time through the same
  recorded forward (``retain_graph=True``) would accumulate two gradients and raises ``RuntimeError``.
  Forward calls without autograd (``torch.no_grad()``, or a graph that needs no gradient) and forward calls
  re-run inside backward (activation checkpointing) are ignored.
* Layers whose weight has ``requires_grad=False`` are not captured; a bias with ``requires_grad=False`` is left out of
  the per-sample gradient. Layers that were not called, or whose output got no gradient, are absent from
  ``cap.layers``. Layers used functionally (e.g. ``nn.MultiheadAttention.out_proj``, whose ``forward`` never runs)
  are not seen by the hooks.
* Exiting the context removes every hook; the recorded tensors stay (the helpers are meant to be called after the
  ``with`` block) until :meth:`Capture.clear` or the next pass.

Memory: ``a`` and ``g`` are stored detached. A linear layer's input is the tensor autograd saves for backward
anyway, but the capture keeps it alive after backward frees the graph; each ``g`` is an extra activation-sized
tensor. Conv2d patches are ``c_in*kh*kw*H_out*W_out`` values per sample, about ``kh*kw / (stride_h*stride_w)``
times the layer input: the capture keeps the raw input and unfolds it on the first access of ``cap.layers`` (or a
helper), then keeps the patches until the next pass or :meth:`Capture.clear`.

Example::

    with Capture(model) as cap:
        loss_fn(model(x), y).backward()          # loss with reduction="sum"
    sq = cap.per_sample_grad_sqnorms()           # (N,)
    K = cap.per_sample_gram()                    # (N, N), summed over captured layers
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .reference import acc_dtype

__all__ = ["Capture", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)
_REDUCTIONS = ("sum", "mean")


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _check_conv(name: str, m: nn.Conv2d) -> None:
    if m.groups != 1:
        raise ValueError(f"Capture: layer {name!r} is a Conv2d with groups={m.groups}; only groups=1 is supported")
    if m.padding_mode != "zeros":
        raise ValueError(
            f"Capture: layer {name!r} is a Conv2d with padding_mode={m.padding_mode!r}; only 'zeros' is supported"
        )


def _conv_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches ``(N, H_out*W_out, c_in*kh*kw)`` of ``x: (N, c_in, H, W)``, columns ordered like
    ``weight.view(c_out, -1)``."""
    kh, kw = m.kernel_size
    if isinstance(m.padding, str):
        if m.padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): total padding dilation*(k-1), the odd one on the right/bottom as conv2d does
            tot_h, tot_w = m.dilation[0] * (kh - 1), m.dilation[1] * (kw - 1)
            if tot_h % 2 or tot_w % 2:
                x = F.pad(x, (tot_w // 2, tot_w - tot_w // 2, tot_h // 2, tot_h - tot_h // 2))
                padding = (0, 0)
            else:
                padding = (tot_h // 2, tot_w // 2)
    else:
        padding = m.padding
    p = F.unfold(x, (kh, kw), dilation=m.dilation, padding=padding, stride=m.stride)
    return p.transpose(1, 2)


def _as_rows(m: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A layer's output gradient as ``(N, T, d_out)`` rows (Conv2d: ``(N, c_out, H, W)`` -> ``(N, H W, c_out)``)."""
    if isinstance(m, nn.Conv2d):
        return grad.flatten(2).transpose(1, 2)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1])


class _Layer:
    """What one captured module recorded in the current pass: one ``[input, output grad]`` slot per call."""

    __slots__ = ("module", "bias", "calls", "cache")

    def __init__(self, module: nn.Module, bias: bool):
        self.module = module
        self.bias = bias
        self.calls: list[list[torch.Tensor | None]] = []
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None


class Capture:
    """Context manager collecting per-layer inputs ``a`` and output gradients ``g`` of ``model``.

    Args:
        model: the module whose ``nn.Linear`` / ``nn.Conv2d`` submodules are captured.
        layers: ``None`` for every supported submodule with a trainable weight, or an iterable of submodule names
            (as in ``model.named_modules()``) or submodules; each must be an ``nn.Linear`` or ``nn.Conv2d``.
        loss_reduction: ``"sum"`` (``L = sum_n l_n``) or ``"mean"`` (``L = (1/N) sum_n l_n``; the recorded output
            gradients are multiplied by ``N``). See the module docstring.
        keep_outputs: also keep every captured layer output (with its autograd graph) until the next pass,
            :meth:`drop_outputs` or :meth:`clear`, so that :meth:`output_grads` can take the gradients of a second
            loss of the same forward pass (the sampled Fisher needs this).

    After a backward pass inside the context, :attr:`layers` maps each layer name to ``(module, a, g)`` and the
    helpers return per-sample quantities of the per-sample losses over all captured weights and biases.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | nn.Module] | None = None,
        loss_reduction: str = "sum",
        keep_outputs: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Capture: model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"Capture: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        if not isinstance(keep_outputs, bool):
            raise TypeError(f"Capture: keep_outputs must be a bool, got {type(keep_outputs).__name__}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.keep_outputs = keep_outputs
        self._suspended = False
        self._layers: dict[str, _Layer] = {}
        for name, m in self._select(model, layers):
            if not m.weight.requires_grad:
                continue
            if isinstance(m, nn.Conv2d):
                _check_conv(name, m)
            self._layers[name] = _Layer(m, m.bias is not None and m.bias.requires_grad)
        self._handles: list = []
        self._grad_handles: list = []
        self._active = False
        self._grad_seen = False

    @staticmethod
    def _select(model: nn.Module, layers) -> list[tuple[str, nn.Module]]:
        named = list(model.named_modules())
        if layers is None:
            return [(n, m) for n, m in named if isinstance(m, SUPPORTED_LAYERS)]
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        by_name = dict(named)
        by_id = {id(m): n for n, m in named}
        out, seen = [], set()
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"Capture: layers names {item!r}, which is not a submodule of model")
                name, m = item, by_name[item]
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"Capture: layers holds a {type(item).__name__} that is not part of model")
                name, m = by_id[id(item)], item
            else:
                raise TypeError(f"Capture: layers must hold names or modules, got {type(item).__name__}")
            if not isinstance(m, SUPPORTED_LAYERS):
                raise ValueError(
                    f"Capture: layer {name!r} is a {type(m).__name__}; supported are nn.Linear and nn.Conv2d"
                )
            if name not in seen:
                seen.add(name)
                out.append((name, m))
        return out

    # -- context -----------------------------------------------------------------------------------------------

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("Capture: this context is already active")
        self.clear()
        for name, rec in self._layers.items():
            self._handles.append(rec.module.register_forward_hook(self._forward_hook(name)))
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Removes every module and tensor hook; recorded tensors stay."""
        for h in self._handles + self._grad_handles:
            h.remove()
        self._handles.clear()
        self._grad_handles.clear()
        self._active = False

    def clear(self) -> None:
        """Drops everything recorded (inputs, gradients, cached patches)."""
        self.drop_outputs()
        for rec in self._layers.values():
            rec.calls = []
            rec.cache = None
        for h in self._grad_handles:
            h.remove()
        self._grad_handles.clear()
        self._grad_seen = False

    # -- hooks -------------------------------------------------------------------------------------------------

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not self._active or not torch.is_grad_enabled() or _in_backward():
                return
            if module is not self._layers[name].module:  # a deep copy of the model carries this hook along
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            if self._grad_seen:  # a new pass: the previous one is overwritten
                self.clear()
            x = inputs[0]
            rec = self._layers[name]
            if isinstance(module, nn.Conv2d) and x.dim() != 4:
                raise ValueError(
                    f"Capture: layer {name!r} (Conv2d) needs a batched (N, C, H, W) input, got shape {tuple(x.shape)}"
                )
            if isinstance(module, nn.Linear) and x.dim() < 2:
                raise ValueError(
                    f"Capture: layer {name!r} (Linear) needs a batched (N, ..., d_in) input, got shape {tuple(x.shape)}"
                )
            slot: list[torch.Tensor | None] = [x.detach(), None, output if self.keep_outputs else None]
            rec.calls.append(slot)
            rec.cache = None
            self._grad_handles.append(output.register_hook(self._grad_hook(name, slot)))

        return hook

    def _grad_hook(self, name: str, slot: list):
        def hook(grad: torch.Tensor):
            if not self._active or self._suspended:
                return None
            if slot[1] is not None:
                raise RuntimeError(
                    f"Capture: layer {name!r} received a second output gradient for the same forward call; "
                    "accumulating several backward passes in one context is not supported (run forward again)"
                )
            grad = grad.detach()
            if self.loss_reduction == "mean":
                grad = grad * grad.shape[0]
            slot[1] = grad
            self._layers[name].cache = None
            self._grad_seen = True
            return None

        return hook

    # -- results -----------------------------------------------------------------------------------------------

    def _assemble(self, rec: _Layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        if rec.cache is not None:
            return rec.cache
        done = [(x, gr) for x, gr, _ in rec.calls if gr is not None]
        if not done:
            return None
        m = rec.module
        a_parts, g_parts = [], []
        for x, gr in done:
            n = x.shape[0]
            if isinstance(m, nn.Conv2d):
                a_parts.append(_conv_patches(m, x))
            else:
                a_parts.append(x.reshape(n, -1, x.shape[-1]))
            g_parts.append(_as_rows(m, gr))
        ns = {p.shape[0] for p in a_parts}
        if len(ns) != 1:
            raise ValueError(f"Capture: the calls of one layer saw different batch sizes {sorted(ns)}")
        if len(a_parts) == 1:
            rec.cache = (a_parts[0], g_parts[0])
        else:
            rec.cache = (torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1))
        return rec.cache

    def drop_outputs(self) -> None:
        """Forgets the layer outputs kept with ``keep_outputs=True`` (which keep their autograd graph alive)."""
        for rec in self._layers.values():
            for slot in rec.calls:
                slot[2] = None

    def output_grads(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample output gradients of another scalar ``loss`` of the same forward pass, ``{name: g}``, laid out
        (and, for ``loss_reduction="mean"``, rescaled) exactly like the ``g`` of :attr:`layers`, for the layers in
        :attr:`layers`. Needs ``keep_outputs=True`` and a graph that is still alive (the first backward run with
        ``retain_graph=True``); nothing is recorded and no ``.grad`` is touched. Used for the sampled-label
        gradients of the sampled Fisher."""
        if not self.keep_outputs:
            raise RuntimeError("Capture.output_grads needs a Capture made with keep_outputs=True")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise ValueError("Capture.output_grads: loss must be a scalar tensor that requires grad")
        names, outs, mods = [], [], []
        for name, rec in self._layers.items():
            done = [slot for slot in rec.calls if slot[1] is not None]
            if not done:
                continue
            if any(slot[2] is None for slot in done):
                raise RuntimeError(
                    f"Capture.output_grads: the output of layer {name!r} was not kept (recorded before "
                    "keep_outputs took effect, or dropped)"
                )
            names.append(name)
            mods.append(rec.module)
            outs.append([slot[2] for slot in done])
        flat = [o for group in outs for o in group]
        if not flat:
            raise RuntimeError("Capture.output_grads: no output gradient was recorded in this pass")
        self._suspended = True
        try:
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise RuntimeError(
                    "Capture.output_grads: the autograd graph of this forward pass was already freed; run the "
                    "first backward with loss.backward(retain_graph=True)"
                ) from exc
            raise
        finally:
            self._suspended = False
        result, i = {}, 0
        for name, m, group in zip(names, mods, outs):
            parts = []
            for o in group:
                gr = grads[i]
                i += 1
                gr = torch.zeros_like(o) if gr is None else gr.detach()
                if self.loss_reduction == "mean":
                    gr = gr * gr.shape[0]
                parts.append(_as_rows(m, gr))
            result[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return result

    @property
    def layers(self) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
        """``{name: (module, a, g)}`` for every captured layer with a recorded output gradient: ``a: (N, T, d_in)``
        (Conv2d: patches, ``d_in = c_in*kh*kw``), ``g: (N, T, d_out)``, detached, exactly as :mod:`pycurv.ops`
        takes them (``g`` already rescaled for ``loss_reduction="mean"``)."""
        out = {}
        for name, rec in self._layers.items():
            ag = self._assemble(rec)
            if ag is not None:
                out[name] = (rec.module, ag[0], ag[1])
        return out

    def _recorded(self, what: str) -> list[tuple[str, _Layer, torch.Tensor, torch.Tensor]]:
        if not self._layers:
            raise RuntimeError(
                f"Capture.{what}: the model has no captured layer (supported: nn.Linear and nn.Conv2d with a "
                "trainable weight)"
            )
        got = []
        for name, rec in self._layers.items():
            ag = self._assemble(rec)
            if ag is not None:
                got.append((name, rec, ag[0], ag[1]))
        if not got:
            raise RuntimeError(
                f"Capture.{what}: no output gradient was recorded; run the forward and backward pass inside the context"
            )
        ns = {a.shape[0] for _, _, a, _ in got}
        if len(ns) != 1:
            raise ValueError(f"Capture.{what}: captured layers saw different batch sizes {sorted(ns)}")
        return got

    def per_sample_grad_sqnorms(self, backend: str = "auto", method: str = "auto") -> torch.Tensor:
        """``s_n = ||grad l_n||^2`` over all captured weights and biases, shape ``(N,)``: the sum over layers of
        :func:`pycurv.ops.per_sample_grad_sqnorms` (float32, float64 when any layer is float64)."""
        total = None
        for _, rec, a, g in self._recorded("per_sample_grad_sqnorms"):
            s = ops.per_sample_grad_sqnorms(a, g, rec.bias, backend=backend, method=method)
            total = s if total is None else total + s
        return total

    def per_sample_gram(self, backend: str = "auto", method: str = "auto") -> torch.Tensor:
        """``K_ij = <grad l_i, grad l_j>`` over all captured weights and biases, shape ``(N, N)``: every layer's
        :func:`pycurv.ops.per_sample_gram` accumulated into one output (``out=``), float32, or float64 when any
        layer is float64."""
        got = self._recorded("per_sample_gram")
        n, device = got[0][2].shape[0], got[0][2].device
        outs: dict[torch.dtype, torch.Tensor] = {}
        for _, rec, a, g in got:
            dt = acc_dtype(a.dtype)
            if dt not in outs:
                outs[dt] = torch.zeros((n, n), dtype=dt, device=device)
            ops.per_sample_gram(a, g, rec.bias, out=outs[dt], backend=backend, method=method)
        if len(outs) == 1:
            return next(iter(outs.values()))
        return outs[torch.float64] + outs[torch.float32]

    def ef_diag(self, backend: str = "auto") -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Empirical-Fisher diagonal per layer, ``sum_n G_n * G_n``: ``{name: (weight_diag, bias_diag | None)}``,
        ``weight_diag`` shaped like the layer's weight (Conv2d: ``(c_out, c_in, kh, kw)``), ``bias_diag`` like its
        bias, ``None`` when the layer has no (trainable) bias."""
        out = {}
        for name, rec, a, g in self._recorded("ef_diag"):
            d = ops.ef_diag(a, g, rec.bias, backend=backend)
            w = rec.module.weight
            if rec.bias:
                out[name] = (d[:, :-1].reshape(w.shape), d[:, -1])
            else:
                out[name] = (d.reshape(w.shape), None)
        return out
