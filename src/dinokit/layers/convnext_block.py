"""The ConvNeXt block (Liu et al. 2022) as DINOv3's ConvNeXt uses it, and the channels-first LayerNorm of its stem
and downsampling layers.

Block: depthwise 7x7 conv -> channels last -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> per-channel
gain `gamma` -> channels first -> drop path -> residual. Parameter names are Meta's (`dwconv`, `norm`, `pwconv1`,
`pwconv2`, `gamma`), so a Meta state dict loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from dinokit.layers.drop_path import DropPath


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map.

    Computed as transformers and timm do (permute, `F.layer_norm`, permute back), which makes the two bit-identical
    to each other; Meta's hand-written mean/variance differs from them by ~1e-5 (spec dinov3.md §0.7)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 norm_eps: float = 1e-6, mlp_ratio: int = 4, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)  # 1x1 convs as Linear layers on the channels-last map
        self.act = act_layer()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value))) \
            if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        # Plain nn.Linear, not dinokit's oneDNN `linear`: bit-identical to transformers and timm (oneDNN's
        # summation order drifts to 1.5e-5 over ConvNeXt-T's 18 blocks) and no slower here (8x224, 2-core EPYC).
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))
