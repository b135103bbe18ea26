"""Fast paths for Linear layers on CPU: the faster GEMM library for this CPU, with bias/activation/residual fused.

Which library is faster depends on the CPU: on Intel (a 2-core Sapphire Rapids here), MKL's sgemm beats
oneDNN's matmul (2-25% by shape), by more than oneDNN's fused GELU epilogue saves (MKL + a GELU pass: 13.8 ms,
oneDNN fused: 14.3 ms at 2056x384->1536). On other CPUs (e.g. AMD), MKL takes a slow code path and oneDNN, with
bias and activation fused, is 2-3x faster. `linear()` picks per call; `linear_residual_()` (inference only)
adds a LayerScaled Linear into a residual stream in place: with MKL as one `addmm_` (beta=1, no new tensor),
with oneDNN as one call with a binary-add post-op. With autograd
(CPU training) the forward product and the input gradient go through oneDNN too; the weight gradient stays on
`torch.mm`, which is as fast for that layout and needs no transposed copies. Used on CPU in float32 only,
outside autocast and not while tracing/exporting. The summation order differs from MKL's, so results differ
from `F.linear` at float32 rounding level (~1e-6 relative); set `DINOKIT_ONEDNN_LINEAR=0` (or call
`set_fast_linear(False)`) to use plain `F.linear` everywhere.

At inference oneDNN gets its weights pre-packed (its blocked layout, LayerScale already folded in), made once per
layer and kept until the weight or gain changes: no reorder and no fold per call (same values; ViT-S/14 on a
2-core EPYC: 224 x8 1.12x, 518 x1 1.05x, median of 12 interleaved rounds). The packed copies cost memory (one
more copy of the blocks' linear weights: ~85 MB for ViT-S, ~340 MB for ViT-B); they are kept up to
`DINOKIT_PACKED_WEIGHTS_MB` in all (default 1024) and layers beyond it pack per call as before.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F

from dinokit.layers.position_embedding import is_tracing

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_enabled = os.environ.get("DINOKIT_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


def cpuinfo(field: str) -> str:
    """The value of `field` ("vendor_id", "flags", ...) for the first CPU in /proc/cpuinfo; "" where unreadable."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


ON_INTEL = cpuinfo("vendor_id") == "GenuineIntel"

# MKL is the faster plain GEMM on Intel CPUs (and only there); DINOKIT_GEMM=mkl|onednn overrides the choice.
_PLAIN_GEMM = os.environ.get("DINOKIT_GEMM") or (
    "mkl" if ON_INTEL and torch.backends.mkl.is_available() else "onednn")

# activation module class name -> (oneDNN post-op, its algorithm argument)
_POST_OPS = {"GELU:none": ("gelu", "none"), "GELU:tanh": ("gelu", "tanh"), "ReLU": ("relu", ""),
             "SiLU": ("swish", "")}


_REORDER = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
# layer -> (key, packed weight, bias, bytes): inference-only copies, never part of the state dict
_packed_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_packed_lock = threading.Lock()  # the model may run on several threads at once (e.g. `dinokit serve`'s lanes)
_PACKED_BUDGET = float(os.environ.get("DINOKIT_PACKED_WEIGHTS_MB", "1024")) * 2**20


def _identity(t: torch.Tensor | None):
    """What a cached copy of `t` depends on: the tensor object itself and its in-place version; None when that
    cannot be told (an inference tensor has no version counter)."""
    if t is None:
        return ()
    try:
        return weakref.ref(t), t._version
    except RuntimeError:
        return None


def _packed_weights(layer: torch.nn.Linear, gamma: torch.Tensor | None, rows: int):
    """(weight, bias) for oneDNN at inference: gamma folded in, the weight in oneDNN's blocked layout."""
    key = [_identity(layer.weight), _identity(layer.bias), _identity(gamma)]
    cached = _packed_cache.get(layer)
    if cached is not None and None not in key and _same(cached[0], key):
        return cached[1], cached[2]
    weight, bias = layer.weight, layer.bias
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = bias * gamma if bias is not None else None
    if _REORDER is not None:
        weight = _REORDER(weight.contiguous(), rows)
    size = layer.weight.numel() * layer.weight.element_size()
    with _packed_lock:
        _packed_cache.pop(layer, None)
        if None not in key and sum(entry[3] for entry in _packed_cache.values()) + size <= _PACKED_BUDGET:
            _packed_cache[layer] = (key, weight, bias, size)
    return weight, bias


def _same(old: list, new: list) -> bool:
    """Whether two `_identity` lists name the same live tensors at the same versions (() matches only ())."""
    for a, b in zip(old, new):
        if not a or not b:
            if a != b:
                return False
        elif not (a[0]() is b[0]() is not None and a[1] == b[1]):
            return False
    return True


def set_fast_linear(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled) and _OP is not None


def fast_linear_enabled() -> bool:
    return _enabled and _OP is not None


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_enabled and _OP is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not is_tracing() and not torch.is_autocast_enabled("cpu"))


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN for the forward product and the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _OP(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # oneDNN computes a @ w^T, so pass W^T (in, out) as its weight to get grad_out @ W.
            grad_x = _OP(grad_out, weight.t().contiguous(), None, "none", [], "")
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def post_op_name(act: torch.nn.Module | None) -> str | None:
    if act is None:
        return None
    key = type(act).__name__
    if key == "GELU":
        key = f"GELU:{act.approximate}"
    return key if key in _POST_OPS else None


def linear(x: torch.Tensor, layer: torch.nn.Module, act: torch.nn.Module | None = None) -> torch.Tensor:
    """`act(layer(x))`, fused on CPU at inference; `act` may be None. A layer that is not a float `nn.Linear`
    (e.g. an int8 dynamically quantised one) is simply called."""
    if not isinstance(layer, torch.nn.Linear):
        return _activate(layer(x), act)
    if _usable(x, layer.weight):
        if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
            y = _OneDnnLinear.apply(x, layer.weight, layer.bias)
            return act(y) if act is not None else y
        post = post_op_name(act)
        if _PLAIN_GEMM == "mkl":
            return _activate(F.linear(x, layer.weight, layer.bias), act)
        if act is None or post is not None:
            attr, algorithm = _POST_OPS[post] if post else ("none", "")
            weight, bias = _packed_weights(layer, None, x.numel() // x.shape[-1])
            return _OP(x, weight, bias, attr, [], algorithm)
    y = F.linear(x, layer.weight, layer.bias)
    return act(y) if act is not None else y


def _activate(y: torch.Tensor, act: torch.nn.Module | None) -> torch.Tensor:
    """`act(y)`; a GELU at inference runs in place on the fresh product (no second hidden-size tensor: on a
    2-core EPYC, GELU at ViT-S 224 x8 took 7.5 ms a block out of place, 1.6 ms in place)."""
    if isinstance(act, torch.nn.GELU) and not torch.is_grad_enabled() and not is_tracing():
        return torch.ops.aten.gelu_(y, approximate=act.approximate)
    return act(y) if act is not None else y


def linear_residual_(residual: torch.Tensor, x: torch.Tensor, layer: torch.nn.Module,
                     gamma: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """`residual + gamma * layer(x)` at inference; with `inplace`, `residual` may be overwritten with it.

    The LayerScale gain is folded into the weights (gamma * W, gamma * b: a pass over the small weight matrix
    instead of over the activations), so the residual branch costs no pass after the product.
    """
    if not isinstance(layer, torch.nn.Linear):  # e.g. int8: its own kernel, then one add
        y = layer(x) if gamma is None else layer(x).mul_(gamma)
        return residual.add_(y) if inplace else residual + y
    weight, bias = layer.weight, layer.bias
    fused = (not torch.is_grad_enabled() and _usable(x, weight) and residual.is_contiguous()
             and x.is_contiguous())
    if fused and _PLAIN_GEMM == "onednn":
        weight, bias = _packed_weights(layer, gamma, x.numel() // x.shape[-1])
        return _OP.binary(x, residual, weight, bias, "add")
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = bias * gamma if bias is not None else None
    if not fused:
        y = F.linear(x, weight, bias)
        return residual.add_(y) if inplace else residual + y
    if bias is not None:
        out = residual.add_(bias) if inplace else residual + bias
    else:
        out = residual if inplace else residual.clone()
    # beta=1 GEMM straight into the residual stream: no new tensor, no separate add
    out.view(-1, out.shape[-1]).addmm_(x.view(-1, x.shape[-1]), weight.t())
    return out
