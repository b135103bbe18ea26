"""Fast paths for Linear layers on CPU: the kernel this machine runs fastest, with bias/activation/residual fused.

Three kernels compute a Linear at inference, and which is fastest depends on the CPU and the shape, not on the
vendor (`dinokit.layers.kernel_choice` times them once per shape class and machine and keeps the fastest):
- "mkl": plain `F.linear` (MKL's or OpenBLAS's sgemm), GELU in place after it; for a residual, one `addmm_`
  (beta=1) straight into the residual stream;
- "onednn": oneDNN with pre-packed weights (its blocked layout, LayerScale folded in) and the bias, activation or
  residual add fused into the product;
- "mkl-packed": MKL with pre-packed weights (`torch.ops.mkl._mkl_linear`), GELU in place / one add after it.
With autograd (CPU training) the forward product and the input gradient go through oneDNN; the weight gradient
stays on `torch.mm`, which is as fast for that layout and needs no transposed copies. Used on CPU in float32 only,
outside autocast and not while tracing/exporting. The summation orders differ, so results differ from `F.linear`
at float32 rounding level (~1e-6 relative); `DINOKIT_ONEDNN_LINEAR=0` (or `set_fast_linear(False)`) uses plain
`F.linear` everywhere, `DINOKIT_GEMM=mkl|onednn|mkl-packed` (or `set_gemm`) pins one kernel.

Packed weights are made once per layer and kept until the weight or gain changes (ViT-S/14 on a 2-core EPYC
Zen 4: 224 x8 1.12x, 518 x1 1.05x over packing per call). They cost memory (one more copy of the blocks' linear
weights per packed library: ~85 MB for ViT-S, ~340 MB for ViT-B); they are kept up to `DINOKIT_PACKED_WEIGHTS_MB`
in all (default 1024) and layers beyond it pack per call.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F

from dinokit.layers.kernel_choice import cpuinfo, decision, pinned, rows_class
from dinokit.layers.position_embedding import is_tracing

__all__ = ["KERNELS", "cpuinfo", "linear", "linear_residual_", "set_fast_linear", "set_gemm"]

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_enabled = os.environ.get("DINOKIT_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


KERNELS = ("mkl", "onednn", "mkl-packed")
_pinned_gemm = pinned("DINOKIT_GEMM", KERNELS)

# activation module class name -> (oneDNN post-op, its algorithm argument)
_POST_OPS = {"GELU:none": ("gelu", "none"), "GELU:tanh": ("gelu", "tanh"), "ReLU": ("relu", ""),
             "SiLU": ("swish", "")}


_REORDER = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
_MKL_REORDER = getattr(getattr(torch.ops, "mkl", None), "_mkl_reorder_linear_weight", None)
_MKL_LINEAR = getattr(getattr(torch.ops, "mkl", None), "_mkl_linear", None)
# layer -> {library: (key, packed weight, bias, bytes, plain weight)}: inference-only copies, not in the state dict
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


def _packed_weights(layer: torch.nn.Linear, gamma: torch.Tensor | None, rows: int, library: str = "onednn"):
    """(packed weight, bias, plain weight) for `library` ("onednn" or "mkl") at inference, gamma folded in: the
    weight in that library's blocked layout, and the plain (out, in) one MKL falls back to at other row counts."""
    key = [_identity(layer.weight), _identity(layer.bias), _identity(gamma)]
    cached = _packed_cache.get(layer, {}).get(library)
    if cached is not None and None not in key and _same(cached[0], key):
        return cached[1], cached[2], cached[4]
    weight, bias = layer.weight, layer.bias
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = bias * gamma if bias is not None else None
    plain = weight.contiguous()
    reorder = _REORDER if library == "onednn" else _MKL_REORDER
    packed = reorder(plain, rows) if reorder is not None else plain
    size = packed.numel() * packed.element_size() + (plain.numel() * 4 if plain is not layer.weight else 0)
    with _packed_lock:
        entries = _packed_cache.setdefault(layer, {})
        entries.pop(library, None)
        used = sum(entry[3] for held in _packed_cache.values() for entry in held.values())
        if None not in key and used + size <= _PACKED_BUDGET:
            entries[library] = (key, packed, bias, size, plain)
        elif not entries:
            _packed_cache.pop(layer, None)
    return packed, bias, plain


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


def set_gemm(name: str | None) -> None:
    """Pin every linear to one kernel of `KERNELS` (None: choose by measurement, the default)."""
    global _pinned_gemm
    if name is not None and name not in KERNELS:
        raise ValueError(f"unknown GEMM kernel {name!r}: use one of {', '.join(KERNELS)} or None")
    _pinned_gemm = name


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


def _kernels(fusable: bool) -> list[str]:
    """The candidates for a product whose epilogue oneDNN can (`fusable`) or cannot fuse."""
    names = ["mkl"]
    if fusable:
        names.append("onednn")
    if _MKL_LINEAR is not None and _MKL_REORDER is not None and torch.backends.mkl.is_available():
        names.append("mkl-packed")
    return names


def _choose(kind: str, x: torch.Tensor, layer: torch.nn.Linear, epilogue: str, fusable: bool, run) -> str:
    names = _kernels(fusable)
    if _pinned_gemm is not None:
        return _pinned_gemm if _pinned_gemm in names else "mkl"
    shape = (rows_class(x.numel() // x.shape[-1]), layer.in_features, layer.out_features, epilogue)
    return decision(kind, shape, names, run, plain="mkl")


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
        epilogue = post or ("none" if act is None else type(act).__name__)
        name = _choose("linear", x, layer, epilogue, act is None or post is not None,
                       lambda kernel: _LINEAR[kernel](x, layer, act))
        return _LINEAR[name](x, layer, act)
    y = F.linear(x, layer.weight, layer.bias)
    return act(y) if act is not None else y


def _linear_mkl(x, layer, act):
    return _activate(F.linear(x, layer.weight, layer.bias), act)


def _linear_onednn(x, layer, act):
    post = post_op_name(act)
    attr, algorithm = _POST_OPS[post] if post else ("none", "")
    weight, bias, _ = _packed_weights(layer, None, x.numel() // x.shape[-1], "onednn")
    return _OP(x, weight, bias, attr, [], algorithm)


def _linear_mkl_packed(x, layer, act):
    rows = x.numel() // x.shape[-1]
    weight, bias, plain = _packed_weights(layer, None, rows, "mkl")
    return _activate(_MKL_LINEAR(x, weight, plain, bias, rows), act)


_LINEAR = {"mkl": _linear_mkl, "onednn": _linear_onednn, "mkl-packed": _linear_mkl_packed}


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
    fused = (not torch.is_grad_enabled() and _usable(x, layer.weight) and residual.is_contiguous()
             and x.is_contiguous())
    if not fused:
        weight, bias = layer.weight, layer.bias
        if gamma is not None:
            weight = weight * gamma[:, None]
            bias = bias * gamma if bias is not None else None
        y = F.linear(x, weight, bias)
        return residual.add_(y) if inplace else residual + y
    # Measuring runs each candidate on a copy of the residual, so the stream itself is written once.
    name = _choose("residual", x, layer, "add", True,
                   lambda kernel: _RESIDUAL[kernel](residual.clone(), x, layer, gamma, True))
    return _RESIDUAL[name](residual, x, layer, gamma, inplace)


def _residual_mkl(residual, x, layer, gamma, inplace):
    weight, bias = layer.weight, layer.bias
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = bias * gamma if bias is not None else None
    if bias is not None:
        out = residual.add_(bias) if inplace else residual + bias
    else:
        out = residual if inplace else residual.clone()
    # beta=1 GEMM straight into the residual stream: no new tensor, no separate add
    out.view(-1, out.shape[-1]).addmm_(x.view(-1, x.shape[-1]), weight.t())
    return out


def _residual_onednn(residual, x, layer, gamma, inplace):
    weight, bias, _ = _packed_weights(layer, gamma, x.numel() // x.shape[-1], "onednn")
    return _OP.binary(x, residual, weight, bias, "add")


def _residual_mkl_packed(residual, x, layer, gamma, inplace):
    rows = x.numel() // x.shape[-1]
    weight, bias, plain = _packed_weights(layer, gamma, rows, "mkl")
    y = _MKL_LINEAR(x, weight, plain, bias, rows)
    return residual.add_(y) if inplace else residual + y


_RESIDUAL = {"mkl": _residual_mkl, "onednn": _residual_onednn, "mkl-packed": _residual_mkl_packed}
