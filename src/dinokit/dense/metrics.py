"""Dense metrics with the reference definitions.

Segmentation (mmsegmentation's `mean_iou` / `total_intersect_and_union`): intersections and unions per class are
summed over the whole evaluation set, then IoU_c = I_c / U_c; pixels labelled `ignore_index` are left out of
everything; a class absent from both the predictions and the labels has U_c = 0, IoU NaN, and drops out of the
mean (nanmean) — a class predicted but never labelled has IoU 0 and counts. Pixel accuracy ("aAcc") is
correct / labelled pixels over the set.

Depth (Monocular-Depth-Estimation-Toolbox `metrics.py`, the protocol of the DINOv2 depth evaluation): per image,
over pixels with min_depth < gt < max_depth: delta_k = mean(max(gt/pred, pred/gt) < 1.25^k), abs_rel =
mean(|gt - pred| / gt), sq_rel, rmse, rmse_log, log10 = mean(|log10 gt - log10 pred|), silog; then the mean over
images (images without a valid pixel are skipped).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class ConfusionMatrix:
    """Running (num_classes x num_classes) counts: rows = label, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction, label) -> None:
        prediction = np.asarray(prediction.cpu() if torch.is_tensor(prediction) else prediction).reshape(-1)
        label = np.asarray(label.cpu() if torch.is_tensor(label) else label).reshape(-1)
        if prediction.shape != label.shape:
            raise ValueError(f"prediction and label differ in size: {prediction.size} vs {label.size} pixels")
        keep = label != self.ignore_index
        prediction, label = prediction[keep].astype(np.int64), label[keep].astype(np.int64)
        if label.size and (label.max() >= self.num_classes or label.min() < 0):
            raise ValueError(f"label values must be in [0, {self.num_classes}) or {self.ignore_index}")
        self.counts += np.bincount(label * self.num_classes + prediction,
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def metrics(self, class_names: list[str] | None = None) -> dict:
        return segmentation_metrics(self.counts, class_names)


def segmentation_metrics(counts: np.ndarray, class_names: list[str] | None = None) -> dict:
    """mIoU, per-class IoU (None where the class is absent from labels and predictions), pixel accuracy."""
    counts = np.asarray(counts, dtype=np.float64)
    intersection = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
    present = union > 0
    labelled = counts.sum()
    names = class_names or [str(i) for i in range(len(counts))]
    return {
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "per_class_iou": {name: (float(v) if ok else None) for name, v, ok in zip(names, iou, present)},
        "pixel_accuracy": float(intersection.sum() / labelled) if labelled else float("nan"),
        "labelled_pixels": int(labelled),
    }


DEPTH_METRICS = ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_errors(pred, gt, min_depth: float = 1e-3, max_depth: float = 10.0) -> dict | None:
    """The toolbox's metrics of one image (None when it has no pixel with min_depth < gt < max_depth)."""
    pred = torch.as_tensor(pred, dtype=torch.float64).reshape(-1)
    gt = torch.as_tensor(gt, dtype=torch.float64).reshape(-1)
    valid = (gt > min_depth) & (gt < max_depth)
    if not bool(valid.any()):
        return None
    pred, gt = pred[valid].clamp(min=min_depth), gt[valid]  # a zero prediction would make the logs infinite
    thresh = torch.maximum(gt / pred, pred / gt)
    diff_log = torch.log(gt) - torch.log(pred)
    return {
        "a1": float((thresh < 1.25).double().mean()),
        "a2": float((thresh < 1.25 ** 2).double().mean()),
        "a3": float((thresh < 1.25 ** 3).double().mean()),
        "abs_rel": float(((gt - pred).abs() / gt).mean()),
        "sq_rel": float(((gt - pred) ** 2 / gt).mean()),
        "rmse": float(torch.sqrt(((gt - pred) ** 2).mean())),
        "rmse_log": float(torch.sqrt((diff_log ** 2).mean())),
        "log10": float((torch.log10(gt) - torch.log10(pred)).abs().mean()),
        "silog": float(torch.sqrt((diff_log ** 2).mean() - diff_log.mean() ** 2) * 100),
    }


def mean_depth_errors(per_image: list[dict | None]) -> dict:
    kept = [m for m in per_image if m is not None]
    out = {k: (float(np.mean([m[k] for m in kept])) if kept else math.nan) for k in DEPTH_METRICS}
    out["images"] = len(kept)
    return out
