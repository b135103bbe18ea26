"""Meta's `CenterPadding`: zero-pad H and W up to a multiple of the patch size, split evenly (extra on the
right / bottom), so that every pixel of the image falls in a patch (dinov2/hub/utils.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def center_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that makes (height, width) multiples of `multiple`."""

    def split(size: int) -> tuple[int, int]:
        pad = math.ceil(size / multiple) * multiple - size
        return pad // 2, pad - pad // 2

    left, right = split(width)
    top, bottom = split(height)
    return left, right, top, bottom


def center_pad(pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """`pixel_values` (B, C, H, W) centre-padded with zeros to multiples of `multiple` (unchanged if they are)."""
    pads = center_padding(pixel_values.shape[-2], pixel_values.shape[-1], multiple)
    return F.pad(pixel_values, pads) if any(pads) else pixel_values
