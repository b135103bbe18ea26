"""Patch embedding: a strided convolution, flattened row-major over the (h, w) grid."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H//p, W//p); like transformers, a remainder of H or W is dropped by the conv."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected pixel_values of shape (batch, {self.in_chans}, height, width), got {tuple(x.shape)}. "
                f"Pass images through the image processor (channels first), or convert greyscale/RGBA to RGB.")
        p = self.patch_size[0]
        if x.shape[2] < p or x.shape[3] < p:
            raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} pixels is smaller than one {p}x{p} patch")
        return self.proj(x)
