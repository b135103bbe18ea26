"""Meta's linear depth head (`dinov2_vit*14_ld`: dinov2/hub/depthers.py + dinov2/hub/depth/decode_heads.py).

`BNHead(classify=True, n_bins=256, bins_strategy="UD", norm_strategy="linear", upsample=4,
input_transform="resize_concat")`: for each selected block, the (final-norm-free) patch map concatenated with its
CLS token broadcast over the grid (2D channels); every map bilinearly resized to 4x the first map's grid
(align_corners=False) and concatenated (2D x layers channels); a 1x1 conv `conv_depth` to 256 bin logits (the
BatchNorm of the name is commented out in Meta's code); per pixel p = relu(logits) + 0.1, normalised to sum 1;
depth = sum_k p_k * bins_k with bins = linspace(min_depth, max_depth, 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.dense.upsampled_bins import upsampled_bin_sums

N_BINS = 256
BIN_EPS = 0.1  # Meta's "linear" normalisation (after AdaBins): relu(logit) + 0.1


class LinearDepthHead(nn.Module):
    def __init__(self, embed_dim: int, n_layers: int, min_depth: float = 0.001, max_depth: float = 10.0,
                 n_bins: int = N_BINS, upsample: int = 4):
        super().__init__()
        self.n_layers, self.n_bins, self.upsample = n_layers, n_bins, upsample
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.conv_depth = nn.Conv2d(embed_dim * n_layers * 2, n_bins, kernel_size=1)

    def features(self, levels: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """levels: (patch map (B, D, h, w), CLS (B, D)) per block -> (B, 2D x layers, 4h, 4w)."""
        maps = [torch.cat([x, cls[:, :, None, None].expand_as(x)], dim=1) for x, cls in levels]
        size = [s * self.upsample for s in maps[0].shape[2:]]
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, dim=1)

    def bins(self, device=None) -> torch.Tensor:
        return torch.linspace(self.min_depth, self.max_depth, self.n_bins, device=device)

    def depth_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> depth (B, 1, H, W), before Meta's clamp to [min_depth, max_depth]."""
        return self.depth_from_logits(self.conv_depth(features))

    def depth_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, n_bins, H, W) bin logits (the conv's output) -> depth (B, 1, H, W)."""
        p = F.relu(logits) + BIN_EPS
        p = p / p.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", p, self.bins(logits.device).to(logits.dtype)).unsqueeze(1)

    def patch_and_cls_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of `features`' patch-map channels and of its broadcast-CLS channels (each level: D patch, D CLS)."""
        width = self.conv_depth.in_channels // (2 * self.n_layers)
        patch = (torch.arange(self.n_layers)[:, None] * 2 * width + torch.arange(width)).flatten()
        return patch, patch + width

    def grid_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(h*w, 2D x layers) tokens of one image, `features`' channels on the patch grid -> (h*w, n_bins) logits
        of `conv_depth`. The CLS half of each level is the same at every patch, so its product with the weights
        is computed once and added like the bias: half the multiply-adds of the conv, the same function."""
        weight = self.conv_depth.weight.flatten(1)
        patch, cls = self.patch_and_cls_channels()
        constant = F.linear(tokens[0, cls], weight[:, cls], self.conv_depth.bias)
        return torch.addmm(constant, tokens[:, patch], weight[:, patch].T)

    def depth_from_grid_logits(self, logits: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """`grid_logits` of several images stacked (sum h*w, n_bins) -> each image's depth (upsample*h,
        upsample*w): the bins' relu-and-sum of the upsampled logits, as sum_k bins_k (relu(l_k) + eps) /
        sum_j (relu(l_j) + eps) (`dense.upsampled_bins`; inference keeps Meta's order of operations)."""
        bins = self.bins(logits.device).to(logits.dtype)
        sums = upsampled_bin_sums(logits, grids, self.upsample, torch.stack([bins, torch.ones_like(bins)]))
        return [(s[..., 0] + BIN_EPS * bins.sum()) / (s[..., 1] + BIN_EPS * self.n_bins) for s in sums]

    def forward(self, levels) -> torch.Tensor:
        return self.depth_from_features(self.features(levels))
