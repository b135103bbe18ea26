"""Bilinear resizing as matrices: `F.interpolate(mode="bilinear", align_corners=False)` is separable, each output
row a fixed blend of two input rows (and each column of two columns), so a resize of a (C, h, w) map is
`rows @ x @ cols.T` with a (H, h) and a (W, w) weight matrix that depend only on the sizes.

A dense head's loss resizes the same few map sizes thousands of times; building the matrices once turns that
into two small matmuls per image (and their backward into two more), instead of the general resampling kernel.
`to_image_weights` composes dense.features.to_image's three steps (upsample to the padded image, crop the
centre padding, resize to the output size) into one pair of matrices: the same numbers up to float rounding.
"""

from __future__ import annotations

import functools

import torch

from dinokit.dense.padding import center_padding


def bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (n_out, 2) int64, weight (n_out, 2) float64): output sample i of a linear resize along one axis is
    weight[i, 0] * x[index[i, 0]] + weight[i, 1] * x[index[i, 1]], PyTorch's rule for `align_corners=False`
    (source = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0, blended with the next sample, the last one
    repeated), no antialiasing."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize {n_in} samples to {n_out}: both sizes must be at least 1")
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = source - low
    return torch.stack([low, high], 1), torch.stack([1 - frac, frac], 1)


@functools.lru_cache(maxsize=256)
def bilinear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 matrix W with W @ x == F.interpolate(x, n_out, "linear", align_corners=False) along
    that axis (`bilinear_taps` as a matrix)."""
    index, weight = bilinear_taps(n_in, n_out)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights.scatter_add_(1, index, weight)
    return weights.float()


@functools.lru_cache(maxsize=256)
def _axis_to_image(n_maps: int, padded: int, pad_before: int, extent: int, n_out: int) -> torch.Tensor:
    upsample = bilinear_weights(n_maps, padded).double()[pad_before:pad_before + extent]
    if n_out == extent:
        return upsample.float()
    return (bilinear_weights(extent, n_out).double() @ upsample).float()


def to_image_weights(grid: tuple[int, int], resized: tuple[int, int], patch_size: int, out_size: tuple[int, int],
                     maps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (H, h'), cols (W, w')) with rows @ m @ cols.T == to_image(m, resized, patch_size, out_size, grid)
    for maps m of size `maps` (default: the patch grid itself) on a padded image whose patch grid is `grid`."""
    h, w = grid
    maps = maps or grid
    left, _, top, _ = center_padding(resized[0], resized[1], patch_size)
    return (_axis_to_image(maps[0], h * patch_size, top, resized[0], out_size[0]),
            _axis_to_image(maps[1], w * patch_size, left, resized[1], out_size[1]))


def resize_separable(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) as rows @ maps @ cols.T (differentiable; the matrices are constants), in the
    cheaper order: rows first costs H*h*w + H*w*W multiply-adds per map, columns first h*w*W + H*h*W (a x4
    upsampling of a 37 x 50 grid: 1.2x fewer with columns first)."""
    (H, h), (W, w) = rows.shape, cols.shape
    if H * h * w + H * w * W <= h * w * W + H * h * W:
        return (rows @ maps) @ cols.T
    return rows @ (maps @ cols.T)
