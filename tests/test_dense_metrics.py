"""Dense metric definitions on hand-computed cases: mmseg's mIoU (whole-set sums, ignore pixels out, classes
absent from prediction and truth out of the mean), the depth toolbox's errors, Meta's SigLoss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinokit.dense.losses import sigloss
from dinokit.dense.metrics import ConfusionMatrix, depth_errors, mean_depth_errors


def test_miou_sums_over_the_set_and_leaves_ignore_pixels_out():
    confusion = ConfusionMatrix(num_classes=3, ignore_index=255)
    # image 1: label [0 0 1 255], prediction [0 1 1 2]; the ignored pixel's prediction (2) must not count
    confusion.update(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 255]))
    # image 2: label [1 1], prediction [1 0]
    confusion.update(np.array([1, 0]), np.array([1, 1]))
    m = confusion.metrics()
    # set totals: class 0: I=1, pred 2 + label 2 - I = 3 -> 1/3; class 1: I=2, pred 3 + label 3 - 2 = 4 -> 1/2
    # class 2: never labelled, only predicted on the ignored pixel -> absent from both -> None, not in the mean
    assert m["per_class_iou"] == {"0": pytest.approx(1 / 3), "1": pytest.approx(0.5), "2": None}
    assert m["miou"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)  # 5 labelled pixels, 3 correct
    assert m["labelled_pixels"] == 5


def test_a_class_predicted_but_never_labelled_counts_as_zero():
    confusion = ConfusionMatrix(num_classes=3)
    confusion.update(np.array([0, 2]), np.array([0, 0]))
    m = confusion.metrics()
    assert m["per_class_iou"]["2"] == 0.0 and m["per_class_iou"]["1"] is None
    assert m["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_per_image_mean_is_not_the_definition():
    # per-class sums over the set: one big image dominates (a per-image mean would give (1 + 0) / 2 for class 1)
    confusion = ConfusionMatrix(num_classes=2)
    confusion.update(np.ones(9, dtype=int), np.ones(9, dtype=int))
    confusion.update(np.zeros(1, dtype=int), np.ones(1, dtype=int))
    assert confusion.metrics()["per_class_iou"]["1"] == pytest.approx(9 / 10)


def test_label_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ConfusionMatrix(2).update(np.array([0]), np.array([5]))


def test_depth_errors_match_hand_computed_values_on_valid_pixels_only():
    gt = torch.tensor([1.0, 2.0, 4.0, 0.0, 20.0])  # 0: no measurement; 20 > max_depth 10: out
    pred = torch.tensor([1.0, 2.5, 2.0, 7.0, 1.0])
    e = depth_errors(pred, gt, min_depth=1e-3, max_depth=10.0)
    g, p = np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.5, 2.0])
    ratio = np.maximum(g / p, p / g)  # 1, 1.25, 2
    assert e["a1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert e["a2"] == pytest.approx(2 / 3) and e["a3"] == pytest.approx(2 / 3)
    assert ratio[1] == pytest.approx(1.25)
    assert e["abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g))
    assert e["rmse"] == pytest.approx(math.sqrt(np.mean((g - p) ** 2)))
    assert e["log10"] == pytest.approx(np.mean(np.abs(np.log10(g) - np.log10(p))))
    d = np.log(g) - np.log(p)
    assert e["silog"] == pytest.approx(math.sqrt(np.mean(d ** 2) - np.mean(d) ** 2) * 100)


def test_depth_means_are_over_images_and_skip_images_without_valid_pixels():
    one = depth_errors(torch.tensor([1.0]), torch.tensor([1.0]))
    two = depth_errors(torch.tensor([1.0]), torch.tensor([2.0]))
    none = depth_errors(torch.tensor([1.0]), torch.tensor([0.0]))
    assert none is None
    mean = mean_depth_errors([one, two, none])
    assert mean["images"] == 2 and mean["abs_rel"] == pytest.approx((0.0 + 0.5) / 2)


def test_sigloss_is_metas_formula_over_labelled_pixels():
    pred = torch.tensor([1.0, 2.0, 3.0, 5.0])
    gt = torch.tensor([1.5, 2.0, 0.0, 4.0])  # the 0 is unlabelled
    g = torch.log(pred[[0, 1, 3]] + 1e-3) - torch.log(gt[[0, 1, 3]] + 1e-3)
    expected = torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)
    assert float(sigloss(pred, gt)) == pytest.approx(float(expected))
