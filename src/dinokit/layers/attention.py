"""Multi-head self-attention on one fused qkv projection (Meta/timm layout: rows [q | k | v], head-major)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.layers.kernel_choice import decision, pinned, rows_class
from dinokit.layers.linear import linear
from dinokit.layers.position_embedding import is_tracing
from dinokit.layers.rope import apply_rope

# The CPU flash kernel reads q, k, v either as strided views of the fused qkv output or as contiguous heads after
# one copy. Which is faster depends on the machine (a Sapphire Rapids: the copy pays, ~20%; an EPYC Zen 4: the
# views, ViT-S 224 x8 9.3 vs 10.5 ms), so at inference it is measured per shape class (kernel_choice).
HEAD_LAYOUTS = ("strided", "contiguous")
_pinned_heads = pinned("DINOKIT_SDPA_HEADS", HEAD_LAYOUTS)


def set_head_layout(name: str | None) -> None:
    """Pin the SDPA head layout on CPU ("strided" or "contiguous"); None measures (the default)."""
    global _pinned_heads
    if name is not None and name not in HEAD_LAYOUTS:
        raise ValueError(f"unknown head layout {name!r}: use one of {', '.join(HEAD_LAYOUTS)} or None")
    _pinned_heads = name


def _attend(qkv: torch.Tensor, rope, contiguous: bool, dropout: float = 0.0) -> torch.Tensor:
    if contiguous:
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(0)
    if rope is not None:
        q, k = apply_rope(q, k, rope)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


def _head_layout(qkv: torch.Tensor, rope) -> str:
    if _pinned_heads is not None:
        return _pinned_heads
    _, B, heads, N, head_dim = qkv.shape
    return decision("sdpa-heads", (rows_class(B), heads, rows_class(N), head_dim), HEAD_LAYOUTS,
                    lambda name: _attend(qkv, rope, name == "contiguous"), plain="strided")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, mask_k_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_k_bias = mask_k_bias and qkv_bias
        if self.mask_k_bias:
            # DINOv3: the key bias is fixed at zero (transformers has none; Meta multiplies by a 1/0/1 mask), so
            # it gets no gradient and stays zero through training.
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0
            with torch.no_grad():
                self.qkv.bias[dim:2 * dim] = 0
            self.qkv.bias.register_hook(lambda grad, mask=mask: grad * mask.to(grad))

    def forward(self, x: torch.Tensor, return_attention: bool = False, head_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`rope`: (cos, sin) tables of the patch grid (DINOv3), applied to q and k of the patch tokens."""
        if not (return_attention or head_mask is not None):
            return self.proj_drop(linear(self.mix(x, rope), self.proj))
        B, N, C = x.shape
        q, k, v = self._qkv(x).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        # Explicit path, only when the attention weights themselves are wanted (SDPA does not return them).
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        if head_mask is not None:
            attn = attn * head_mask
        weights = attn
        if self.training and self.attn_drop:
            attn = F.dropout(attn, self.attn_drop)
        x = attn @ v
        x = self.proj_drop(linear(x.transpose(1, 2).reshape(B, N, C), self.proj))
        return (x, weights) if return_attention else x

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return linear(x, self.qkv).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def mix(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The attention output before the output projection, (B, N, C), with SDPA."""
        B, N, C = x.shape
        qkv = self._qkv(x)
        # The copy only at inference on CPU: not under autograd (it would keep the copy alive), nor in traced
        # graphs (grad mode differs between torch.jit.trace's invocations).
        contiguous = (not torch.is_grad_enabled() and x.device.type == "cpu" and not is_tracing()
                      and _head_layout(qkv, rope) == "contiguous")
        x = _attend(qkv, rope, contiguous, dropout=self.attn_drop if self.training else 0.0)
        return x.transpose(1, 2).reshape(B, N, C)
