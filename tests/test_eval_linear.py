"""Linear probe (fast mode and the grid itself) and logistic regression on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinokit.eval.linear import (
    LINEAR_LEARNING_RATES,
    LinearHeadGrid,
    LinearProbeConfig,
    linear_input,
    linear_probe_features,
)
from dinokit.eval.logreg import C_VALUES, holdout_split, logreg_evaluate

NUM_CLASSES = 4


def separable_features(n: int, seed: int, dim: int = 8, margin: float = 1.0):
    """(cls_blocks (n, 4, dim), patch_mean (n, dim), labels), n / 4 per class: Gaussian features labelled by
    the argmax of a fixed linear map over all 5 x dim values, keeping only points at least `margin` from a class
    boundary (linearly separable, but only by heads that see all blocks and the patch token)."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(100).normal(size=(NUM_CLASSES, 5 * dim)) / np.sqrt(5 * dim)
    tokens = rng.normal(size=(20 * n, 5, dim))
    scores = tokens.reshape(len(tokens), -1) @ weights.T
    ranked = np.sort(scores, axis=1)
    labels = np.argmax(scores, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > margin
    keep = np.concatenate([np.flatnonzero(clear & (labels == c))[: n // NUM_CLASSES] for c in range(NUM_CLASSES)])
    keep = rng.permutation(keep)
    assert len(keep) == n // NUM_CLASSES * NUM_CLASSES
    return tokens[keep, :4].astype(np.float32), tokens[keep, 4].astype(np.float32), labels[keep]


FAST = LinearProbeConfig(iterations=300, batch_size=64)


def test_head_grid_follows_the_reference_layout():
    grid = LinearHeadGrid(feature_dim=16, num_classes=NUM_CLASSES, config=LinearProbeConfig(), batch_size=128)
    assert len(grid.specs) == 2 * 2 * 13 == 52
    assert [spec[3] for spec in grid.specs[:13]] == list(LINEAR_LEARNING_RATES)
    assert "classifier_4_blocks_avgpool_True_lr_0_05" in grid.heads  # 0.1 * 128 / 256
    assert grid.heads["classifier_1_blocks_avgpool_False_lr_0_000005"].in_features == 16
    assert grid.heads["classifier_4_blocks_avgpool_True_lr_0_000005"].in_features == 16 * 5
    group_lrs = [group["lr"] for group in grid.param_groups()]
    assert group_lrs[:13] == pytest.approx([lr * 0.5 for lr in LINEAR_LEARNING_RATES])
    weight = grid.heads["classifier_1_blocks_avgpool_True_lr_0_0005"].weight
    assert abs(weight.std().item() - 0.01) < 0.002


def test_linear_input_concatenates_last_blocks_then_mean_patch_token():
    cls_blocks = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    patch_mean = -torch.ones(2, 3)
    assert torch.equal(linear_input(cls_blocks, patch_mean, 1, False), cls_blocks[:, 3])
    both = linear_input(cls_blocks, patch_mean, 4, True)
    assert torch.equal(both, torch.cat([cls_blocks[:, 0], cls_blocks[:, 1], cls_blocks[:, 2], cls_blocks[:, 3],
                                        patch_mean], dim=1))


def test_grid_heads_train_independently_of_each_other():
    # The summed loss gives each head exactly the gradient of its own loss.
    config = LinearProbeConfig(learning_rates=(0.01, 0.1), n_last_blocks=(1,), avgpool=(False,))
    grid = LinearHeadGrid(8, 3, config, batch_size=256)
    x, labels = torch.randn(5, 1, 8), torch.tensor([0, 1, 2, 0, 1])
    grid.loss(x, None, labels).backward()
    for name, head in grid.heads.items():
        alone = head.weight.detach().clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(x[:, 0] @ alone.T + head.bias.detach(), labels).backward()
        assert torch.allclose(head.weight.grad, alone.grad, atol=1e-7), name


def test_fast_linear_probe_separates_linearly_separable_features():
    train, val = separable_features(800, seed=0), separable_features(400, seed=1)
    result = linear_probe_features(*train, *val, FAST)
    assert result["top1"] >= 99.0
    assert result["best_head"] in {row["name"] for row in result["heads"]}
    assert len(result["heads"]) == 52
    assert "no augmentation" in result["mode"]


# Chance level: with 128-dim tokens a random linear classifier scores 25% +- 1.6 on these validation sets; the
# best of 52 heads picked on validation sits a few points above that, far below any leak of the labels.
CHANCE_DIM = 128


def test_fast_linear_probe_is_at_chance_on_shuffled_labels():
    cls_blocks, patch_mean, labels = separable_features(800, seed=0, dim=CHANCE_DIM)
    shuffled = np.random.default_rng(7).permutation(labels)
    val = separable_features(1000, seed=1, dim=CHANCE_DIM)
    result = linear_probe_features(cls_blocks, patch_mean, shuffled, *val, FAST)
    assert abs(result["top1"] - 100.0 / NUM_CLASSES) < 8.0


def test_fast_linear_probe_rejects_features_with_too_few_blocks():
    cls_blocks, patch_mean, labels = separable_features(50, seed=0)
    with pytest.raises(ValueError, match="last 4"):
        linear_probe_features(cls_blocks[:, :1], patch_mean, labels, cls_blocks, patch_mean, labels, FAST)


def test_logreg_sweep_uses_the_reference_c_grid():
    assert len(C_VALUES) == 45
    assert C_VALUES[0] == pytest.approx(1e-6) and C_VALUES[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(C_VALUES)), 11 / 44)


def test_logreg_holdout_is_a_stratified_tenth():
    labels = np.repeat(np.arange(5), 40)
    fit, held = holdout_split(labels)
    assert len(held) == 20 and len(fit) == 180 and not set(fit) & set(held)
    assert np.bincount(labels[held]).tolist() == [4] * 5


def test_logreg_separates_linearly_separable_features():
    (train_cls, train_patch, train_labels) = separable_features(800, 0)
    (val_cls, val_patch, val_labels) = separable_features(400, 1)
    train = np.concatenate([train_cls.reshape(800, -1), train_patch], axis=1)
    val = np.concatenate([val_cls.reshape(400, -1), val_patch], axis=1)
    result = logreg_evaluate(train, train_labels, val, val_labels)
    assert result["top1"] >= 99.0
    assert result["best_C"] in C_VALUES
    assert len(result["sweep"]) == 45 and result["backend"] == "sklearn"


def test_logreg_is_at_chance_on_shuffled_labels():
    train_cls, _, train_labels = separable_features(800, 0, dim=CHANCE_DIM)
    val_cls, _, val_labels = separable_features(1000, 1, dim=CHANCE_DIM)
    shuffled = np.random.default_rng(7).permutation(train_labels)
    result = logreg_evaluate(train_cls[:, -1], shuffled, val_cls[:, -1], val_labels)
    assert abs(result["top1"] - 100.0 / NUM_CLASSES) < 8.0
