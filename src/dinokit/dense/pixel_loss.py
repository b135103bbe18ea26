"""The segmentation head's training loss: pixel cross-entropy of patch-grid logits against each image's mask.

Scoring every step at the resized image's full resolution (518 px short side: ~360k pixels per image, 14 x 14
per patch) costs far more than the head itself, yet the logits are a bilinear blend of one vector per patch: a
few samples per patch side carry nearly all of the signal. `resolution` K sets the label cells per patch side:
the logits are resized exactly as `to_image` would resize them to K/p of the resized image's size (one pair of
precomputed matrices, `dense.interpolation`), and each cell is scored against every labelled pixel it covers:
the loss is the full-resolution pixel cross-entropy with the logits held constant over each cell, computed from
per-cell class counts, sum_cells [n_cell * logsumexp(z) - sum_c n_cell,c * z_c]. So a cell split between two
classes counts both, by area (a majority vote would hand every tie to one class and shift boundaries), and the
normalisation stays the number of labelled pixels. K = p (14 for DINOv2, 16 for DINOv3) is the full resolution
itself, every cell one pixel; None is the original path through `F.interpolate` and `F.cross_entropy`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.dense.features import DenseFeatures, to_image
from dinokit.dense.interpolation import resize_separable, to_image_weights

DEFAULT_RESOLUTION = 7


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-index mask resized (nearest) to `size` (height, width), as the image was resized."""
    if mask.shape == tuple(size):
        return mask.astype(np.int64, copy=False)
    image = Image.fromarray(mask.astype(np.int32), mode="I")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)).astype(np.int64)


def label_cells(resized: tuple[int, int], patch_size: int, resolution: int) -> tuple[int, int]:
    """(rows, cols) of the label grid: `resolution` cells per patch side over the resized image."""
    return tuple(max(1, int(side * resolution / patch_size + 0.5)) for side in resized)


def cell_counts(mask: np.ndarray, cells: tuple[int, int], ignore_index: int) -> tuple[np.ndarray, ...]:
    """The labelled pixels of an (H, W) mask gathered into (rows, cols) cells (pixel r belongs to cell
    r * rows // H): (cell index, class, pixel count), one entry per class present in a cell."""
    height, width = mask.shape
    rows, cols = cells
    cell = (np.arange(height) * rows // height)[:, None] * cols + (np.arange(width) * cols // width)[None, :]
    labelled = mask != ignore_index
    classes = int(mask[labelled].max(initial=0)) + 1
    keys, counts = np.unique(cell[labelled] * classes + mask[labelled], return_counts=True)
    return keys // classes, keys % classes, counts


def check_resolution(resolution: int | None, patch_size: int) -> None:
    if resolution is not None and not 1 <= resolution <= patch_size:
        raise ValueError(f"--loss-resolution {resolution} is out of range: use 1 to the patch size ({patch_size}, "
                         f"= full resolution) label cells per patch side, or 'full'")


class PixelCrossEntropy:
    """`loss(i, logits)` for image i of `features`: (summed cross-entropy, labelled pixel count); logits are
    (h * w, K) per patch. Targets and resize matrices are prepared once, at construction."""

    def __init__(self, features: DenseFeatures, masks: list[np.ndarray], patch_size: int, ignore_index: int,
                 resolution: int | None = DEFAULT_RESOLUTION):
        check_resolution(resolution, patch_size)
        self.features, self.patch_size, self.ignore_index = features, patch_size, ignore_index
        self.resolution = resolution
        self.targets, self.weights, self.counts = [], [], []
        for i, mask in enumerate(masks):
            resized = features.resized(i)
            target = resize_mask(mask, resized)
            self.counts.append(int((target != ignore_index).sum()))
            if resolution is None:
                self.targets.append(torch.from_numpy(np.ascontiguousarray(target)))
                self.weights.append(None)
                continue
            cells = label_cells(resized, patch_size, resolution)
            rows, cols = to_image_weights(features.grid(i), resized, patch_size, cells)
            cell, label, count = cell_counts(target, cells, ignore_index)
            # sum_cells sum_c n_c * z_c with z = rows @ x @ cols.T is sum_c <rows.T @ n_c @ cols, x_c>: the class
            # counts are projected once onto the patch grid, so a step never gathers per-cell logits
            rows64, cols64 = rows.double(), cols.double()
            projected = torch.zeros(int(label.max(initial=0)) + 1, *features.grid(i), dtype=torch.float64)
            for c in np.unique(label):  # one class at a time: (classes x cells) at once is large for ADE's 150
                n_c = np.bincount(cell[label == c], weights=count[label == c], minlength=cells[0] * cells[1])
                projected[c] = rows64.T @ torch.from_numpy(n_c).reshape(cells) @ cols64
            labelled = np.bincount(cell, weights=count, minlength=cells[0] * cells[1]).reshape(cells)
            self.targets.append((torch.from_numpy(labelled).float(), projected.float()))
            self.weights.append((rows, cols))

    def __call__(self, i: int, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        maps = logits.T.reshape(-1, *self.features.grid(i))
        if self.weights[i] is None:
            resized = self.features.resized(i)
            upsampled = to_image(maps, resized, self.patch_size, resized)
            loss = F.cross_entropy(upsampled.unsqueeze(0), self.targets[i].unsqueeze(0),
                                   ignore_index=self.ignore_index, reduction="sum")
            return loss, self.counts[i]
        labelled, projected = self.targets[i]
        upsampled = resize_separable(maps, *self.weights[i])  # (K, cells)
        loss = (labelled * torch.logsumexp(upsampled, dim=0)).sum() - (projected * maps[:len(projected)]).sum()
        return loss, self.counts[i]
