"""Feed-forward networks: the classic GELU MLP (ViT-S/B/L) and the packed SwiGLU (ViT-g)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.layers.linear import linear


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(linear(self.drop(linear(x, self.fc1, self.act)), self.fc2))


def swiglu_hidden_features(dim: int, mlp_ratio: float, align: int = 8) -> int:
    """Meta's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of `align` (6144 -> 4096 for
    ViT-g; DINOv3: align 8, 7B align 64: 12288 -> 8192)."""
    hidden = int(int(dim * mlp_ratio) * 2 / 3)
    return hidden + (-hidden % align)


class SwiGLUFFN(nn.Module):
    """`w3(silu(x1) * x2)` with one fused input projection `w12`; the FIRST half of its output is the gate."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = linear(x, self.w12).chunk(2, dim=-1)
        return linear(F.silu(x1) * x2, self.w3)
