"""The DPT neck and the two DPT depth heads on ViT features: transformers' `DPTForDepthEstimation` (the head of
Meta's `*_dd` depthers, converted) and `DepthAnythingForDepthEstimation`.

Parameter names are transformers' (`neck.reassemble_stage...`, `neck.fusion_stage...`, `head...`), so a
transformers checkpoint loads with no renaming; Meta's DPT head files are renamed in `dense.layouts`.
The computation follows transformers' modeling_dpt.py / modeling_depth_anything.py step for step:
- reassemble: CLS readout (`project`: Linear(2D -> D) + GELU on [patch, CLS]; Depth Anything ignores the CLS),
  1x1 projection to `neck_hidden_sizes[i]`, resize by `reassemble_factors` (ConvTranspose k=s=4, 2; identity;
  3x3 conv stride 2);
- 3x3 convs (no bias) to `fusion_hidden_size`; fusion from the deepest level up, pre-activation residual units,
  x2 bilinear upsampling with align_corners=True (Depth Anything: to the next level's size, x2 at the end);
- DPT head: optional 3x3 projection + ReLU, conv F -> F/2, x2, conv -> 32, ReLU, conv -> 1, ReLU (+ Meta's
  `min_depth`, 0 for transformers checkpoints); Depth Anything head: conv F -> F/2, resize to the patch grid x
  patch size, conv -> `head_hidden_size`, ReLU, conv -> 1, ReLU (relative) or Sigmoid (metric), x `max_depth`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DPTSettings:
    """What the neck and head need from a transformers DPT / Depth Anything config."""

    kind: str  # "dpt" | "depth_anything"
    hidden_size: int  # backbone width
    patch_size: int = 14
    neck_hidden_sizes: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    reassemble_factors: list[float] = field(default_factory=lambda: [4, 2, 1, 0.5])
    fusion_hidden_size: int = 256
    readout_type: str = "project"  # dpt: project | add | ignore; depth_anything: always ignore
    fusion_residual_bias: bool = False
    add_projection: bool = True  # dpt only
    head_in_index: int = -1
    head_hidden_size: int = 32  # depth_anything only
    depth_estimation_type: str = "relative"  # depth_anything only: relative (ReLU) | metric (Sigmoid)
    max_depth: float = 1.0  # depth_anything only
    min_depth: float = 0.0  # dpt only: Meta's heads add it after the final ReLU; transformers' do not

    def __post_init__(self) -> None:
        if self.kind not in ("dpt", "depth_anything"):
            raise ValueError(f"unknown DPT kind {self.kind!r}: use dpt or depth_anything")
        if len(self.neck_hidden_sizes) != len(self.reassemble_factors):
            raise ValueError("neck_hidden_sizes and reassemble_factors must have one entry per backbone level")
        if self.kind == "dpt" and self.add_projection and self.fusion_hidden_size != 256:
            raise ValueError("DPT's head projection is 256 -> 256 in transformers: fusion_hidden_size must be 256")

    def to_dict(self) -> dict:
        return asdict(self)


class ReassembleLayer(nn.Module):
    def __init__(self, hidden_size: int, channels: int, factor: float):
        super().__init__()
        self.projection = nn.Conv2d(hidden_size, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = nn.Identity()
        else:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=int(1 / factor), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.projection(x))


class ReassembleStage(nn.Module):
    def __init__(self, s: DPTSettings):
        super().__init__()
        self.readout_type = "ignore" if s.kind == "depth_anything" else s.readout_type
        self.layers = nn.ModuleList(ReassembleLayer(s.hidden_size, c, f)
                                    for c, f in zip(s.neck_hidden_sizes, s.reassemble_factors))
        if self.readout_type == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * s.hidden_size, s.hidden_size), nn.GELU()) for _ in s.neck_hidden_sizes)

    def forward(self, levels: list[tuple[torch.Tensor, torch.Tensor]], grid: tuple[int, int]) -> list[torch.Tensor]:
        """levels: (patch tokens (B, N, D), CLS (B, D)) per backbone level -> maps (B, C_i, h_i, w_i)."""
        out = []
        for i, (tokens, cls) in enumerate(levels):
            if self.readout_type == "project":
                tokens = self.readout_projects[i](torch.cat([tokens, cls.unsqueeze(1).expand_as(tokens)], dim=-1))
            elif self.readout_type == "add":
                tokens = tokens + cls.unsqueeze(1)
            b, _, d = tokens.shape
            x = tokens.transpose(1, 2).reshape(b, d, *grid)
            out.append(self.layers[i](x))
        return out


class PreActResidualLayer(nn.Module):
    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.convolution1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=bias)
        self.convolution2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convolution2(F.relu(self.convolution1(F.relu(x))))


class FeatureFusionLayer(nn.Module):
    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)
        # The first (deepest) layer never uses residual_layer1; transformers still has it, so dinokit does too
        # (same state dict); Meta's files lack it and get zeros.
        self.residual_layer1 = PreActResidualLayer(channels, bias)
        self.residual_layer2 = PreActResidualLayer(channels, bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        if residual is not None:
            if residual.shape != x.shape:
                residual = F.interpolate(residual, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.residual_layer1(residual)
        x = self.residual_layer2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.projection(x)


class FeatureFusionStage(nn.Module):
    def __init__(self, s: DPTSettings):
        super().__init__()
        self.to_next_size = s.kind == "depth_anything"
        self.layers = nn.ModuleList(FeatureFusionLayer(s.fusion_hidden_size, s.fusion_residual_bias)
                                    for _ in s.neck_hidden_sizes)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        features = features[::-1]
        fused, out = None, []
        for i, (feature, layer) in enumerate(zip(features, self.layers)):
            size = tuple(features[i + 1].shape[2:]) if self.to_next_size and i + 1 < len(features) else None
            fused = layer(feature, size=size) if fused is None else layer(fused, feature, size=size)
            out.append(fused)
        return out


class DPTNeck(nn.Module):
    def __init__(self, s: DPTSettings):
        super().__init__()
        self.reassemble_stage = ReassembleStage(s)
        self.convs = nn.ModuleList(nn.Conv2d(c, s.fusion_hidden_size, kernel_size=3, padding=1, bias=False)
                                   for c in s.neck_hidden_sizes)
        self.fusion_stage = FeatureFusionStage(s)

    def forward(self, levels, grid: tuple[int, int]) -> list[torch.Tensor]:
        maps = self.reassemble_stage(levels, grid)
        return self.fusion_stage([conv(m) for conv, m in zip(self.convs, maps)])


class DPTDepthHead(nn.Module):
    def __init__(self, s: DPTSettings):
        super().__init__()
        self.head_in_index = s.head_in_index
        self.min_depth = s.min_depth
        self.projection = nn.Conv2d(256, 256, kernel_size=3, padding=1) if s.add_projection else None
        f = s.fusion_hidden_size
        self.head = nn.Sequential(
            nn.Conv2d(f, f // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(),
        )

    def forward(self, fused: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        x = fused[self.head_in_index]
        if self.projection is not None:
            x = F.relu(self.projection(x))
        depth = self.head(x).squeeze(1)
        return depth + self.min_depth if self.min_depth else depth


class DepthAnythingHead(nn.Module):
    def __init__(self, s: DPTSettings):
        super().__init__()
        self.head_in_index = s.head_in_index
        self.patch_size = s.patch_size
        self.max_depth = s.max_depth
        self.metric = s.depth_estimation_type == "metric"
        if s.depth_estimation_type not in ("relative", "metric"):
            raise ValueError(f"unknown depth_estimation_type {s.depth_estimation_type!r}: use relative or metric")
        f = s.fusion_hidden_size
        self.conv1 = nn.Conv2d(f, f // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(f // 2, s.head_hidden_size, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(s.head_hidden_size, 1, kernel_size=1)

    def forward(self, fused: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        x = self.conv1(fused[self.head_in_index])
        x = F.interpolate(x, size=(grid[0] * self.patch_size, grid[1] * self.patch_size), mode="bilinear",
                          align_corners=True)
        x = self.conv3(F.relu(self.conv2(x)))
        x = torch.sigmoid(x) if self.metric else F.relu(x)
        return (x * self.max_depth).squeeze(1)


def build_head(s: DPTSettings) -> nn.Module:
    return DPTDepthHead(s) if s.kind == "dpt" else DepthAnythingHead(s)
