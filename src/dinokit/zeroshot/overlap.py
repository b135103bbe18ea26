"""Overlapping patches: a ViT's token sequence with the patch-embedding convolution run at a stride S below the
patch size p (Amir et al.'s dense descriptors, ../shared/spec/zeroshot.md §2.3), for a denser feature grid.

- Tokens per axis: 1 + (H - p) // S, token (i, j) centred at (i S + p/2, j S + p/2) input pixels. S must divide
  p (Amir's extractor requires it too): the tokens then tile the image evenly and S = p is the plain model.
- DINOv2 (learned positions): the trained position grid is resized to the token grid by the model's own rule
  (bicubic; DINO's +0.1 scale factor for models without registers, antialiased sizes for the others), which is
  what Amir's `_fix_pos_enc` does for DINO: each token gets the position interpolated at its place in the grid.
- DINOv3 (RoPE): no reference strides a RoPE model. dinokit places each token's rotary coordinates at its own
  centre (`rope.patch_coordinates(step=S/p)`), the continuous generalisation of the trained grid's coordinates.
- The rest is the model's own forward: CLS, registers, every block, the final norm. No model state is changed,
  so a model shared with other code (a server) is unaffected.

Whether strided features help a given model is an empirical question; Amir et al. report it for DINO ViT-S/8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinokit.layers.linear import linear
from dinokit.layers.rope import patch_coordinates, rope_tables


def vit_of(model, what: str = "--stride"):
    """The DinoVisionTransformer inside a dinokit ViT model, or one ValueError naming the model."""
    vit = getattr(model, "vit_module", None)
    if vit is None or not hasattr(vit, "patch_embed"):
        raise ValueError(f"{what} needs a ViT (a patch grid): {type(model).__name__} is not a dinokit ViT "
                         f"(DINOv3 ConvNeXt models have no patches)")
    return vit


def check_stride(stride, patch_size: int) -> int:
    """`stride` as an int that divides `patch_size`, or one ValueError with the values that do."""
    divisors = [d for d in range(1, patch_size + 1) if patch_size % d == 0]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in divisors:
        raise ValueError(f"--stride {stride} must divide the patch size {patch_size}: use one of "
                         f"{', '.join(map(str, divisors))} ({patch_size} = no overlap)")
    return stride


def grid_size(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Tokens per axis of an input of this size."""
    return 1 + (height - patch_size) // stride, 1 + (width - patch_size) // stride


@torch.no_grad()
def strided_sequence(model, pixels: torch.Tensor, stride: int, facet: str = "tokens") -> tuple[torch.Tensor, tuple]:
    """((B, N, C) last-block sequence [CLS, registers, patches], (h, w) grid) with tokens `stride` pixels apart.

    facet "tokens": the final-normed block output (transformers' last_hidden_state); "keys": the last block's
    attention keys (its qkv projection of its first norm's output, heads concatenated, before RoPE)."""
    vit = vit_of(model)
    p = vit.patch_size
    check_stride(stride, p)
    proj = vit.patch_embed.proj
    pixels = pixels.to(proj.weight.dtype)
    B, _, H, W = pixels.shape
    if H < p or W < p:
        raise ValueError(f"input of {H}x{W} pixels is smaller than one {p}x{p} patch")
    # Mirrors DinoVisionTransformer.prepare_tokens_with_masks with the convolution's stride changed; the tests pin
    # stride = p to the plain forward, bit for bit, so the two cannot drift apart.
    x = F.conv2d(pixels, proj.weight, proj.bias, stride=stride)
    grid_h, grid_w = x.shape[-2], x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((vit.cls_token.expand(B, -1, -1).to(x.dtype), x), dim=1)
    if vit.pos_embed is not None:
        x = x + vit.position_embedding(vit.pos_embed, grid_h, grid_w, H, W, vit.training).to(x.dtype)
    if vit.register_tokens is not None:
        x = torch.cat((x[:, :1], vit.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
    rope = None
    if vit.rope_embed is not None:
        periods = vit.rope_embed.periods
        coords = patch_coordinates(grid_h, grid_w, vit.rope_embed.normalize_coords, periods.device, step=stride / p)
        rope = rope_tables(coords, periods)
    for block in vit.blocks[:-1]:
        x = block(x, rope=rope)
    last = vit.blocks[-1]
    if facet == "keys":
        dim = last.attn.qkv.in_features
        return linear(last.norm1(x), last.attn.qkv)[..., dim:2 * dim], (grid_h, grid_w)
    return vit.norm(last(x, rope=rope)), (grid_h, grid_w)
