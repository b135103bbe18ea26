"""The head training loop on features that do carry the label: it must reach a high mIoU, which it only can when
features, logits, padding crop and masks are aligned pixel for pixel (a shifted crop or a transposed grid fails)."""

from __future__ import annotations

import numpy as np
import torch

from dinokit.dense.features import DenseFeatures
from dinokit.dense.padding import center_padding
from dinokit.dense.seg_head import BNSegHead
from dinokit.dense.segment import SegTrainConfig, evaluate_head, fit_head


def _separable_set(n=6, patch=14, seed=0):
    """Images of 5 x 7 patches (resized 60 x 90: padded to 70 x 98); class 1 fills whole patches of the padded
    grid; the features say which patch is class 1 (plus noise), so a linear head can be exact."""
    rng = np.random.default_rng(seed)
    resized, grid = (60, 90), (5, 7)
    left, _, top, _ = center_padding(*resized, patch)
    tokens, masks = [], []
    for _ in range(n):
        on = rng.random(grid) < 0.4
        full = np.kron(on, np.ones((patch, patch)))[top:top + resized[0], left:left + resized[1]]
        masks.append(full.astype(np.int64))
        feature = np.stack([on.astype(np.float32) * 2 - 1, rng.normal(size=grid).astype(np.float32)], axis=-1)
        tokens.append(feature.reshape(-1, 2) + 0.05 * rng.normal(size=(grid[0] * grid[1], 2)).astype(np.float32))
    grids = np.array([[*grid, *resized]] * n)
    return DenseFeatures(np.concatenate(tokens).astype(np.float16), grids, [f"s{i}" for i in range(n)]), masks


def test_linear_head_learns_patch_aligned_labels_to_high_miou():
    features, masks = _separable_set()
    torch.manual_seed(0)
    head = BNSegHead(2, 2)
    losses = fit_head(head, features, masks, 14, 255, SegTrainConfig(iterations=150, batch_size=3, lr=1e-2)).losses
    assert losses[-1] < losses[0]
    metrics = evaluate_head(head, features, masks, 14, 2, 255)
    # bilinear upsampling blurs patch borders: well above chance (~0.4), below 1
    assert metrics["miou"] > 0.85, metrics
