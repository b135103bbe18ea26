"""Patch features for the training-free jobs: final-normed output tokens or last-block attention keys.

The references (../shared/spec/zeroshot.md §0) read one of two facets of the last block:
- "tokens": the final-LayerNorm output of the patch tokens, CLS and registers dropped (Meta's
  `get_intermediate_layers(n=1, norm=True)`, = transformers' `last_hidden_state[:, 1 + registers:]`);
- "keys": the last block's attention keys, i.e. the key rows of its fused `qkv` projection applied to the block's
  first LayerNorm output, heads concatenated, bias included (LOST, TokenCut, Amir et al.). For DINOv3 these are the
  keys before RoPE: the rotation encodes position, not content, and the references that use keys predate RoPE.

Pixels come in already resized and normalised by the job (each reference has its own resize rule); sizes that are
not a multiple of the patch size are zero-padded right and bottom (LOST/TokenCut's rule) unless `pad` is False,
in which case they are refused. `stride` < patch size gives overlapping patches on a denser grid
(`dinokit.zeroshot.overlap`, Amir et al.'s trick); None is the model's own grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.layers.linear import linear

FACETS = ("tokens", "keys")


@dataclass
class PatchFeatures:
    """Features of a batch of images on their patch grid."""

    features: torch.Tensor  # (B, h, w, C) float32
    cls: torch.Tensor  # (B, C) float32: the CLS token of the same facet
    patch_size: int
    input_size: tuple[int, int]  # (H, W) of the pixels fed to the model, after padding
    stride: int | None = None  # pixels between token centres when patches overlap; None = patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    def normalized(self) -> torch.Tensor:
        """(B, h, w, C) L2-normalised per token (the cosine convention of every job but LOST)."""
        return F.normalize(self.features, dim=-1)

    def centers(self) -> torch.Tensor:
        """(h, w, 2) patch centres (y, x) in input pixels: (i s + p/2, j s + p/2), s the stride (p by default)."""
        h, w = self.grid
        ys = torch.arange(h, dtype=torch.float32) * self.step + self.patch_size / 2
        xs = torch.arange(w, dtype=torch.float32) * self.step + self.patch_size / 2
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def patch_size_of(model) -> int:
    return int(model.config.patch_size)


def num_prefix_tokens(model) -> int:
    """CLS plus registers: the tokens before the patch tokens in the sequence."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def pad_to_multiple(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) right and bottom to multiples of `patch_size` (after normalisation, as LOST does)."""
    H, W = pixels.shape[-2:]
    return F.pad(pixels, (0, -W % patch_size, 0, -H % patch_size))


def normalize_image(image: Image.Image, model) -> torch.Tensor:
    """(1, 3, H, W) float32 of an RGB PIL image, scaled to [0, 1] and normalised with the model's mean/std."""
    from dinokit.processing import model_normalization

    mean, std = model_normalization(model)
    x = torch.from_numpy(_rgb_array(image)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def _rgb_array(image: Image.Image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@torch.no_grad()
def extract(model, pixels: torch.Tensor, facet: str = "tokens", pad: bool = True,
            stride: int | None = None) -> PatchFeatures:
    """The `facet` ("tokens" or "keys") of the last block for normalised `pixels` (B, 3, H, W); with `stride`
    (a divisor of the patch size), of overlapping patches that many pixels apart."""
    if facet not in FACETS:
        raise ValueError(f"unknown facet {facet!r}: use one of {', '.join(FACETS)}")
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (batch, 3, height, width), got {tuple(pixels.shape)}")
    p = patch_size_of(model)
    if pixels.shape[-2] % p or pixels.shape[-1] % p:
        if not pad:
            raise ValueError(f"{tuple(pixels.shape[-2:])} is not a multiple of the patch size {p}: resize or pad it")
        pixels = pad_to_multiple(pixels, p)
    param = next(model.parameters())
    pixels = pixels.to(param.device, param.dtype)
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    prefix = num_prefix_tokens(model)
    if stride is not None:
        from dinokit.zeroshot.overlap import strided_sequence

        sequence, (h, w) = strided_sequence(model, pixels, stride, facet)
    elif facet == "tokens":
        sequence = model(pixel_values=pixels).last_hidden_state
    else:
        sequence = _last_block_keys(model, pixels)
    sequence = sequence.float()
    B, _, C = sequence.shape
    return PatchFeatures(features=sequence[:, prefix:].reshape(B, h, w, C), cls=sequence[:, 0],
                         patch_size=p, input_size=tuple(pixels.shape[-2:]), stride=stride)


def _last_block_keys(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, C) keys of the last block: a forward hook on its first LayerNorm, whose output is what the fused
    qkv projection reads on every forward path (plain, fused CPU inference, returned attentions)."""
    from dinokit.zeroshot.overlap import vit_of

    vit = vit_of(model, "the keys facet")
    block = vit.blocks[-1]
    captured = []
    handle = block.norm1.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        # The blocks up to the last are needed; the model's own forward runs them all (one extra block's cost).
        model(pixel_values=pixels)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the last block's norm1 was not called: this model's forward path is not supported")
    dim = block.attn.qkv.in_features
    return linear(captured[-1], block.attn.qkv)[..., dim:2 * dim]
