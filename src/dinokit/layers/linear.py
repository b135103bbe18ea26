"""Inference fast path for Linear layers on CPU: oneDNN's fused linear (+ bias + GELU in one kernel).

On CPUs where MKL's sgemm takes a slow code path (e.g. AMD), oneDNN's matmul is 2-3x faster and fuses the
bias add and the activation into the GEMM epilogue, saving whole passes over memory. Used only where it
cannot change training: CPU, float32, no autograd, not while tracing/exporting. The summation order differs
from MKL's, so results differ from `F.linear` at float32 rounding level (~1e-6 relative); set
`DINOKIT_ONEDNN_LINEAR=0` (or call `set_fast_linear(False)`) to use plain `F.linear` everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dinokit.layers.position_embedding import is_tracing

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_enabled = os.environ.get("DINOKIT_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()

# activation module class name -> (oneDNN post-op, its algorithm argument)
_POST_OPS = {"GELU:none": ("gelu", "none"), "GELU:tanh": ("gelu", "tanh"), "ReLU": ("relu", ""),
             "SiLU": ("swish", "")}


def set_fast_linear(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled) and _OP is not None


def fast_linear_enabled() -> bool:
    return _enabled and _OP is not None


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_enabled and _OP is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled() and not is_tracing())


def post_op_name(act: torch.nn.Module | None) -> str | None:
    if act is None:
        return None
    key = type(act).__name__
    if key == "GELU":
        key = f"GELU:{act.approximate}"
    return key if key in _POST_OPS else None


def linear(x: torch.Tensor, layer: torch.nn.Linear, act: torch.nn.Module | None = None) -> torch.Tensor:
    """`act(layer(x))`, fused on CPU at inference; `act` may be None."""
    if _usable(x, layer.weight):
        post = post_op_name(act)
        if act is None or post is not None:
            attr, algorithm = _POST_OPS[post] if post else ("none", "")
            return _OP(x, layer.weight, layer.bias, attr, [], algorithm)
    y = F.linear(x, layer.weight, layer.bias)
    return act(y) if act is not None else y
