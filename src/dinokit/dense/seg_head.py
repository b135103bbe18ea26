"""Meta's segmentation heads (dinov2/eval/segmentation/models/decode_heads/linear_head.py, `BNHead`), as the
released `*_{ade20k,voc2012}_{linear,ms}_config.py` files build them:

- backbone: `get_intermediate_layers(n=[L-4 .. L-1], reshape=True)`: the last 4 blocks, through the final norm,
  no CLS token, centre-padded to a multiple of the patch size;
- `linear`: `in_index=[3]` (the last block only), channels D; `ms`: `in_index=[0, 1, 2, 3]`, the 4 maps resized
  to the first one's size (bilinear, align_corners=False; same grid, so a no-op) and concatenated, channels 4D;
- BatchNorm over the channels (SyncBN in Meta's configs), dropout 0, 1x1 conv `conv_seg` to the class logits at
  output stride 14 (one logit vector per patch); the segmentor upsamples them bilinearly to the image size.

The "ms" of the paper is also multi-scale test-time augmentation (ratios 1.0-3.0 and flips, Meta's configs);
that is an inference option (`multiscale_logits`), not part of the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Blocks counted from the end (the config's `out_indices` is always the last 4 blocks).
HEAD_BLOCKS = {"linear": 1, "ms": 4}


class BNSegHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)  # mmseg's BaseDecodeHead.init_weights
        nn.init.zeros_(self.conv_seg.bias)

    @staticmethod
    def concat(maps: list[torch.Tensor]) -> torch.Tensor:
        """Meta's resize_concat: every map resized to the first one's size, then channel-concatenated."""
        size = maps[0].shape[2:]
        return torch.cat([m if m.shape[2:] == size else
                          F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) concatenated features -> (B, K, h, w) logits."""
        return self.conv_seg(self.dropout(self.bn(features)))

    def forward_flat(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, C) patch features pooled over many images -> (N, K): the same BatchNorm (batch statistics over
        all the pixels given, as BatchNorm2d over a batch) and 1x1 conv, without building (B, C, h, w)."""
        bn = self.bn
        x = F.batch_norm(tokens, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         self.training, bn.momentum if bn.momentum is not None else 0.1, bn.eps)
        if self.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return F.linear(x, self.conv_seg.weight.flatten(1), self.conv_seg.bias)
