"""Meta's linear depth head from its bin logits on the patch grid to depth on the x4 map, for training, without
materialising the upsampled logits.

The head upsamples its 256 bin logits bilinearly (x4) and then, per pixel, takes
depth = sum_k bins_k (relu(l_k) + eps) / sum_j (relu(l_j) + eps). The relu stops the upsampling from commuting
with the bin sums, so every pixel needs all 256 of its upsampled logits: for a 37 x 50 grid that is 7.6 M values
per image, and their resize matrices, relu, sums and backward were most of a training step. Here each pixel's
logits are a 4-tap blend of grid logits (bilinear weights, `interpolation.bilinear_taps`), gathered by
`embedding_bag` for a band of ~2,000 pixels at a time that stays in cache, reduced to the two sums at once, and
recomputed in the backward pass instead of stored; the gradient flows back to the grid through the transposed
taps (again an `embedding_bag`, one bag per grid point). The same function as upsampling with
`F.interpolate(mode="bilinear", align_corners=False)` and summing, up to float rounding
(tests/test_dense_head_training.py, float64, gradient included). With it `depth train` on 48 images at 240 x 180
took 106-126 s instead of 221-231 s (2-core Zen 4; README, "Training time").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinokit.dense.interpolation import bilinear_taps

BAND_PIXELS = 2048  # 2,048 pixels x 256 bins x 4 bytes = 2 MB a band: fastest of 1-16 k measured (Zen 4)


@dataclass(frozen=True)
class Band:
    """Upsampled pixels [start, stop) of one image, and for the backward pass the grid points [lo, hi) they read:
    grid point lo + j gets the gradient of band pixels `pixels[offsets[j]:offsets[j + 1]]` times `weights`."""

    start: int
    stop: int
    lo: int
    hi: int
    pixels: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class UpsamplingTaps:
    """Bilinear upsampling of an (h, w) grid to `size`: pixel p (row-major) = sum_t weight[p, t] * grid[index[p, t]]."""

    grid: tuple[int, int]
    size: tuple[int, int]
    index: torch.Tensor  # (H * W, 4) int64, row-major grid points
    weight: torch.Tensor  # (H * W, 4) float64
    bands: tuple[Band, ...]


@functools.lru_cache(maxsize=64)
def upsampling_taps(h: int, w: int, factor: int, band_pixels: int = BAND_PIXELS) -> UpsamplingTaps:
    size = (h * factor, w * factor)
    (rows, row_weights), (cols, col_weights) = bilinear_taps(h, size[0]), bilinear_taps(w, size[1])
    index = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(-1, 4)
    weight = (row_weights[:, None, :, None] * col_weights[None, :, None, :]).reshape(-1, 4)
    bands = []
    for start in range(0, index.shape[0], band_pixels):
        taps = index[start:start + band_pixels].flatten()
        lo, hi = int(taps.min()), int(taps.max()) + 1
        order = torch.argsort(taps, stable=True)
        counts = torch.bincount(taps - lo, minlength=hi - lo)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        bands.append(Band(start, start + len(taps) // 4, lo, hi, order // 4, offsets,
                          weight[start:start + band_pixels].flatten()[order]))
    return UpsamplingTaps((h, w), size, index, weight, tuple(bands))


def _upsampled_bands(logits, images):
    """Per band of every image: (the band's rows in the stacked output, the image's slice of `logits`, the band,
    its upsampled logits (pixels, K)); the forward pass and the backward's recomputation read the same bands."""
    at = 0
    for offset, taps in images:
        grid = slice(offset, offset + taps.grid[0] * taps.grid[1])
        weight = taps.weight.to(logits.dtype)
        for band in taps.bands:
            up = F.embedding_bag(taps.index[band.start:band.stop], logits[grid], mode="sum",
                                 per_sample_weights=weight[band.start:band.stop])
            yield slice(at + band.start, at + band.stop), grid, band, up
        at += taps.index.shape[0]


class _UpsampledBinSums(torch.autograd.Function):
    """logits (sum h*w, K) of several images' grids -> (sum H*W, R): relu(upsampled logits) @ rows.T per pixel."""

    @staticmethod
    def forward(ctx, logits, rows, images):
        out = logits.new_empty(sum(t.index.shape[0] for _, t in images), rows.shape[0])
        for pixels, _, _, up in _upsampled_bands(logits, images):
            torch.mm(up.relu_(), rows.T, out=out[pixels])
        ctx.save_for_backward(logits, rows)
        ctx.images = images
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for pixels, grid, band, up in _upsampled_bands(logits, ctx.images):
            up_grad = torch.ops.aten.threshold_backward(grad_out[pixels] @ rows, up, 0.0)
            grad[grid][band.lo:band.hi] += F.embedding_bag(band.pixels, up_grad, band.offsets, mode="sum",
                                                           per_sample_weights=band.weights.to(logits.dtype))
        return grad, None, None


def upsampled_bin_sums(logits: torch.Tensor, grids: list[tuple[int, int]], factor: int, rows: torch.Tensor,
                       band_pixels: int = BAND_PIXELS) -> list[torch.Tensor]:
    """logits: the (h*w, K) grid logits of each image in `grids`, stacked (sum h*w, K); rows: (R, K).
    -> per image the (H, W, R) map of relu(bilinear x`factor` upsampled logits) @ rows.T, differentiable in logits."""
    images, offset = [], 0
    for h, w in grids:
        images.append((offset, upsampling_taps(h, w, factor, band_pixels)))
        offset += h * w
    if offset != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} grid logits for grids {grids} ({offset} points)")
    sums = _UpsampledBinSums.apply(logits, rows.to(logits.dtype), tuple(images))
    sizes = [taps.size for _, taps in images]
    return [s.view(*size, -1) for s, size in zip(sums.split([h * w for h, w in sizes]), sizes)]
