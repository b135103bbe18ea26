"""Pre-norm transformer block with LayerScale and both stochastic-depth variants."""

from __future__ import annotations

import torch
from torch import nn

from dinokit.layers.attention import Attention
from dinokit.layers.drop_path import DropPath, drop_add_residual_stochastic_depth
from dinokit.layers.layer_scale import LayerScale
from dinokit.layers.linear import linear, linear_residual_
from dinokit.layers.mlp import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinokit.layers.position_embedding import is_tracing

# Above this rate, training drops a random subset of the batch instead of masking samples (training.md §5).
BATCH_SUBSET_DROP_PATH_ABOVE = 0.1

# CPU inference runs a block on sub-batches of at most this many tokens (whole images, at least one): the GEMMs
# stay in their cache-friendly regime (oneDNN fp32 on a 2-core EPYC: ~195 GFLOP/s at 2k rows, ~140 at 11k;
# ViT-S 224 x32: 10.0 -> 12.3 img/s). Rows are independent, so the result is the same function.
CPU_TOKENS_PER_CHUNK = 2800


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 init_values: float | None = None, ffn_layer: str = "mlp", norm_eps: float = 1e-6,
                 act_layer: type[nn.Module] = nn.GELU, ffn_hidden: int | None = None,
                 mask_k_bias: bool = False) -> None:
        """`ffn_hidden` sets the FFN width directly (DINOv3 configs carry it); else it follows `mlp_ratio`."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, ffn_hidden or int(dim * mlp_ratio), act_layer=act_layer, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, ffn_hidden or swiglu_hidden_features(dim, mlp_ratio), bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}: use 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attn_residual(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), rope=rope))

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, return_attention: bool = False, head_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`rope`: the (cos, sin) tables of a rotary position encoding (DINOv3), or None (DINOv2)."""
        if return_attention or head_mask is not None:
            out, attn = self.attn(self.norm1(x), return_attention=True, head_mask=head_mask, rope=rope)
            x = x + self.drop_path1(self.ls1(out))
            x = x + self.drop_path2(self.ffn_residual(x))
            return (x, attn) if return_attention else x
        if self.training and self.sample_drop_ratio > BATCH_SUBSET_DROP_PATH_ABOVE:
            x = drop_add_residual_stochastic_depth(x, lambda t: self.attn_residual(t, rope), self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, self.ffn_residual, self.sample_drop_ratio)
            return x
        if not torch.is_grad_enabled() and not is_tracing():  # traced/exported graphs keep the plain ops
            return self._inference_forward(x, rope)
        x = x + self.drop_path1(self.attn_residual(x, rope))
        x = x + self.drop_path2(self.ffn_residual(x))
        return x

    def _inference_forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, N, _ = x.shape
        per_chunk = max(1, CPU_TOKENS_PER_CHUNK // N)
        if x.device.type == "cpu" and B > per_chunk:
            return torch.cat([self._fused_forward(chunk, rope) for chunk in x.split(per_chunk)])
        return self._fused_forward(x, rope)

    def _fused_forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """The same block with the residual adds fused into the output projections (no grad, no drop path).

        `x + ls1(proj(attn))` is one GEMM accumulating into a fresh copy of the stream, and the FFN's
        `+ ls2(fc2(...))` accumulates into that copy in place; the caller's `x` is never modified.
        """
        y = linear_residual_(x, self.attn.mix(self.norm1(x), rope), self.attn.proj, _gain(self.ls1))
        if isinstance(self.mlp, Mlp):
            hidden = linear(self.norm2(y), self.mlp.fc1, self.mlp.act)
            return linear_residual_(y, hidden, self.mlp.fc2, _gain(self.ls2), inplace=True)
        return y.add_(self.ffn_residual(y))


def _gain(layer_scale: nn.Module) -> torch.Tensor | None:
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None
