"""The DINO Vision Transformer backbone (DINOv2 and DINOv3), with Meta's parameter names and methods.

Data path: patch conv -> (mask tokens) -> [CLS] + patches -> + position embeddings -> insert registers
-> pre-norm blocks -> final LayerNorm. See ../shared/spec/model.md §2.

The position encoding is the part the two families differ in (`pos_encoding`):
- "learned" (DINOv2): an absolute table added to CLS + patches, resampled to the grid (cached per grid);
- "rope" (DINOv3, dinov3.md §2): no table; every block's attention rotates q and k of the patch tokens by
  axial RoPE (tables cached per grid), prefix tokens untouched.
Blocks, attention, MLPs and the CPU fast paths are the same for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.nn.init import trunc_normal_

from dinokit.layers import Block, PatchEmbed, PositionEmbedding
from dinokit.layers.rope import RopePositionEmbedding

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 ffn_bias: bool = True, proj_bias: bool = True, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = True, init_values: float | None = 1.0, ffn_layer: str = "mlp",
                 act_layer: str = "gelu", num_register_tokens: int = 0, interpolate_offset: float = 0.1,
                 interpolate_antialias: bool = False, norm_eps: float = 1e-6, use_mask_token: bool = True,
                 block_chunks: int = 0, pos_encoding: str = "learned", rope_base: float | None = 100.0,
                 rope_min_period: float | None = None, rope_max_period: float | None = None,
                 rope_normalize_coords: str = "separate", rope_shift_coords: float | None = None,
                 rope_jitter_coords: float | None = None, rope_rescale_coords: float | None = None,
                 rope_periods_dtype: str = "fp32", ffn_hidden: int | None = None, mask_k_bias: bool = False,
                 untie_global_and_local_cls_norm: bool = False) -> None:
        super().__init__()
        del block_chunks  # accepted for Meta signature compatibility; chunked checkpoints are read flat
        if pos_encoding not in ("learned", "rope"):
            raise ValueError(f"pos_encoding must be 'learned' (DINOv2) or 'rope' (DINOv3), got {pos_encoding!r}")
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.num_tokens = 1

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        if pos_encoding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
            self.position_embedding = PositionEmbedding(interpolate_offset, interpolate_antialias)
            self.rope_embed = None
        else:
            self.pos_embed = None
            self.position_embedding = PositionEmbedding()  # nothing to cache; kept so callers can clear() it
            self.rope_embed = RopePositionEmbedding(
                embed_dim // num_heads, base=rope_base, min_period=rope_min_period, max_period=rope_max_period,
                normalize_coords=rope_normalize_coords, shift_coords=rope_shift_coords,
                jitter_coords=rope_jitter_coords, rescale_coords=rope_rescale_coords,
                periods_dtype=rope_periods_dtype)

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth).tolist()
        act = ACTIVATIONS[act_layer] if isinstance(act_layer, str) else act_layer
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  drop_path=rates[i], init_values=init_values, ffn_layer=ffn_layer, norm_eps=norm_eps,
                  act_layer=act, ffn_hidden=ffn_hidden, mask_k_bias=mask_k_bias)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # DINOv3 7B / SAT-L: a second final norm for the CLS and registers of local crops (training only).
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------- init
    def init_weights(self) -> None:
        """Meta's init: trunc-normal 0.02 for Linear and pos_embed, ~1e-6 tokens (DINOv3: 0.02), zero mask token.
        A masked key bias (DINOv3) starts and stays at zero."""
        token_std = 1e-6
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            token_std = 0.02
        nn.init.normal_(self.cls_token, std=token_std)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=token_std)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- embeddings
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Meta's signature (its `w` is the input's height): position table for the tokens of `x`."""
        if self.pos_embed is None:
            raise ValueError("this model encodes positions with RoPE: it has no position table to interpolate")
        grid_h, grid_w = w // self.patch_size, h // self.patch_size
        return self.position_embedding(self.pos_embed, grid_h, grid_w, w, h, self.training)

    def rope_for(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (cos, sin) RoPE tables for an input's patch grid, which every block takes; None for DINOv2."""
        if self.rope_embed is None:
            return None
        return self.rope_embed(pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)

    def _unmasked_bias_fixup(self) -> None:
        """Zero the key part of masked qkv biases (after loading weights that carry a value there)."""
        for blk in self.blocks:
            if getattr(blk.attn, "mask_k_bias", False):
                with torch.no_grad():
                    blk.attn.qkv.bias[self.embed_dim:2 * self.embed_dim] = 0

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        pixels = x
        x = self.patch_embed(x)  # validates the shape first
        B, _, H, W = pixels.shape
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token (use_mask_token=False); it cannot take masks")
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must have shape (batch, num_patches) = {tuple(x.shape[:2])}, "
                                 f"got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
        if self.pos_embed is not None:
            pos = self.position_embedding(self.pos_embed, grid_h, grid_w, H, W, self.training)
            x = x + pos.to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    # ---------------------------------------------------------------- Meta API
    def _split_normed(self, x: torch.Tensor, masks: torch.Tensor | None,
                      local_crops: bool = False) -> dict[str, torch.Tensor | None]:
        r = self.num_register_tokens
        x_norm = self.norm(x)
        if local_crops and self.local_cls_norm is not None:
            # DINOv3 7B / SAT-L training: the local crops' CLS and registers have their own norm.
            x_norm = torch.cat((self.local_cls_norm(x[:, :r + 1]), x_norm[:, r + 1:]), dim=1)
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1:],
            "x_prenorm": x,
            "masks": masks,
        }
        if self.rope_embed is not None:
            out["x_storage_tokens"] = out["x_norm_regtokens"]  # DINOv3's name for the (normed) registers
        return out

    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | None = None,
                         _local_crops: bool = False):
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        rope = self.rope_for(x)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self._split_normed(x, masks, _local_crops and self.training)

    def forward_features_list(self, x_list: list[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None):
        """Multi-crop forward: each crop size runs as its own batch (Meta fuses them with xFormers); in training,
        the second entry (the local crops) uses `local_cls_norm` where the model has one."""
        masks_list = masks_list if masks_list is not None else [None] * len(x_list)
        return [self.forward_features(x, m, _local_crops=i == 1) for i, (x, m) in enumerate(zip(x_list, masks_list))]

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        total = len(self.blocks)
        indices = list(range(total - n, total)) if isinstance(n, int) else [i % total for i in n]
        bad = [i for i in (n if not isinstance(n, int) else indices) if not -total <= i < total]
        if bad or (isinstance(n, int) and not 0 < n <= total):
            raise ValueError(f"block indices {n} out of range for a model with {total} blocks")
        return indices

    def _get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1) -> list[torch.Tensor]:
        wanted = set(self._block_indices(n))
        rope = self.rope_for(x)
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        last = max(wanted)
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x, rope=rope)
            if i in wanted:
                outputs.append(x)
        return outputs

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last `n` blocks (or of the listed 0-based blocks), registers dropped, as Meta's."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            gh, gw = H // self.patch_size, W // self.patch_size
            outputs = [out.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, x: torch.Tensor, *args, is_training: bool = False, **kwargs):
        out = self.forward_features(x, *args, **kwargs)
        return out if is_training else self.head(out["x_norm_clstoken"])


def _vit(embed_dim: int, depth: int, num_heads: int, **kwargs) -> DinoVisionTransformer:
    kwargs.setdefault("patch_size", 14)
    return DinoVisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def vit_tiny(**kwargs) -> DinoVisionTransformer:
    return _vit(192, 12, 3, **kwargs)


def vit_small(**kwargs) -> DinoVisionTransformer:
    return _vit(384, 12, 6, **kwargs)


def vit_base(**kwargs) -> DinoVisionTransformer:
    return _vit(768, 12, 12, **kwargs)


def vit_large(**kwargs) -> DinoVisionTransformer:
    return _vit(1024, 24, 16, **kwargs)


def vit_giant2(**kwargs) -> DinoVisionTransformer:
    kwargs.setdefault("ffn_layer", "swiglu")
    return _vit(1536, 40, 24, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DinoVisionTransformer", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2",
           "count_parameters"]
