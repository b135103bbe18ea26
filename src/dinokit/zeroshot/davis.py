"""DAVIS-2017 semi-supervised scores, J (region IoU) and F (boundary F-measure), by davis2017-evaluation's
definitions (../shared/spec/zeroshot.md §1.3).

- Objects are the ids of the first frame's ground truth (DAVIS: 1..max, all present in frame 0); void (255)
  counts as background. Each id of a prediction is a binary mask; an id the ground truth does not have is an error.
- The first and the last frame are excluded from the scores.
- J = |P & G| / |P | G|, 1 when the union is empty.
- F: one-pixel boundaries (a pixel differs from its right, bottom or bottom-right neighbour; `_seg2bmap`), each
  dilated by a disk of radius r = ceil(0.008 * ||(H, W)||) (skimage `disk(r)`: x^2 + y^2 <= r^2); precision =
  predicted boundary pixels within r of the true boundary, recall the converse, F = 2PR / (P + R) (0 when both are
  0). An empty predicted boundary gives P=1, R=0; an empty true one P=0, R=1; both empty P=R=1.
- Per object: Mean = nanmean over frames; Recall = fraction of frames scoring > 0.5; Decay = mean of the first
  quarter-bin minus mean of the last, bins at round(linspace(1, T, 5) + 1e-10) - 1 (davis2017-evaluation stores
  these indices as uint8, which wraps past 255 frames; here they are plain integers).
- Global: the mean over all objects of every sequence of each statistic; J&F-Mean = (J-Mean + F-Mean) / 2.

Frames are added one at a time (`SequenceScores.add`), so a long video is scored without holding its masks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

BOUND_TH = 0.008
VOID = 255


def region_similarity(predicted: np.ndarray, truth: np.ndarray) -> float:
    """J of two binary masks."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    union = np.logical_or(predicted, truth).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, truth).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """davis2017-evaluation's `_seg2bmap`: pixels that differ from their right, bottom or bottom-right neighbour
    (the last row compares to the right only, the last column to the bottom only, the corner is never boundary)."""
    seg = mask.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """Tolerance in pixels: bound_th itself when >= 1, else ceil(bound_th * diagonal) (8 at 480 x 854)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(height, width)))


def disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk: the (2r+1)^2 square's cells with x^2 + y^2 <= r^2."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y) <= radius * radius


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by `disk(radius)` with nothing outside the image (cv2.dilate's default border).

    The disk is a stack of horizontal runs (row dy spans |dx| <= isqrt(r^2 - dy^2)), so the dilation is the OR
    over dy of the mask dilated along rows by that half-width (a sliding window count) and shifted by dy."""
    mask = mask.astype(bool)
    if radius == 0 or not mask.any():
        return mask
    H, W = mask.shape
    counts = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(mask, axis=1, dtype=np.int64)], axis=1)
    columns = np.arange(W)
    along_rows = {}
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        k = math.isqrt(radius * radius - dy * dy)
        if k not in along_rows:
            hi, lo = np.minimum(columns + k + 1, W), np.maximum(columns - k, 0)
            along_rows[k] = (counts[:, hi] - counts[:, lo]) > 0
        rows = along_rows[k]
        if dy >= 0:  # output row y takes input row y + dy
            out[: H - dy] |= rows[dy:]
        else:
            out[-dy:] |= rows[: H + dy]
    return out


def boundary_measure(predicted: np.ndarray, truth: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of two binary masks."""
    r = boundary_radius(*predicted.shape[:2], bound_th)
    fg, gt = boundary_map(predicted), boundary_map(truth)
    n_fg, n_gt = int(fg.sum()), int(gt.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(np.logical_and(fg, dilate(gt, r)).sum() / n_fg)
        recall = float(np.logical_and(gt, dilate(fg, r)).sum() / n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def statistics(values) -> dict[str, float]:
    """Mean, Recall and Decay of one object's per-frame scores (davis2017-evaluation `db_statistics`)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"mean": float("nan"), "recall": float("nan"), "decay": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return {"mean": mean, "recall": recall, "decay": decay}


@dataclass
class SequenceScores:
    """Per-frame J and F of each object of one sequence, frames added in order; `objects` from frame 0's truth."""

    objects: list[int]
    bound_th: float = BOUND_TH
    j: dict[int, list[float]] = field(default_factory=dict)
    f: dict[int, list[float]] = field(default_factory=dict)
    frames: int = 0

    @classmethod
    def from_first_truth(cls, truth: np.ndarray, **kwargs) -> SequenceScores:
        ids = np.unique(np.where(truth == VOID, 0, truth))
        return cls(objects=[int(i) for i in ids if i != 0], **kwargs)

    def add(self, predicted: np.ndarray, truth: np.ndarray, name: str = "") -> None:
        """Score one frame (the caller adds every frame, first and last included; they are dropped at the end)."""
        where = f" (frame {name})" if name else ""
        if predicted.shape != truth.shape:
            raise ValueError(f"the prediction is {predicted.shape[1]} x {predicted.shape[0]} but the ground truth "
                             f"is {truth.shape[1]} x {truth.shape[0]}{where}")
        truth = np.where(truth == VOID, 0, truth)
        extra = sorted(set(np.unique(predicted).tolist()) - {0, *self.objects})
        if extra:
            raise ValueError(f"the prediction has ids {extra} that the first frame's ground truth does not have "
                             f"(objects {self.objects}){where}")
        unknown = sorted(set(np.unique(truth).tolist()) - {0, *self.objects})
        if unknown:
            raise ValueError(f"the ground truth has ids {unknown} that its first frame does not have (objects "
                             f"{self.objects}){where}: DAVIS scores only the first frame's objects")
        for obj in self.objects:
            p, g = predicted == obj, truth == obj
            self.j.setdefault(obj, []).append(region_similarity(p, g))
            self.f.setdefault(obj, []).append(boundary_measure(p, g, self.bound_th))
        self.frames += 1

    def per_object(self) -> dict[int, dict[str, dict[str, float]]]:
        """{object: {"J": stats, "F": stats}} over the frames without the first and the last."""
        return {obj: {"J": statistics(self.j.get(obj, [])[1:-1]), "F": statistics(self.f.get(obj, [])[1:-1])}
                for obj in self.objects}


def summarize(sequences: dict[str, SequenceScores]) -> dict:
    """davis2017-evaluation's global and per-object tables: {"global": {"J&F-Mean", "J-Mean", ...},
    "per_object": {"<seq>_<obj>": {"J&F-Mean", "J-Mean", "F-Mean"}}, "frames_scored": n}."""
    rows = {}
    stats = {("J", k): [] for k in ("mean", "recall", "decay")} | {("F", k): [] for k in ("mean", "recall", "decay")}
    scored = 0
    for name, scores in sequences.items():
        scored += max(0, scores.frames - 2)
        for obj, values in scores.per_object().items():
            for measure in ("J", "F"):
                for key, value in values[measure].items():
                    stats[measure, key].append(value)
            rows[f"{name}_{obj}"] = {"J&F-Mean": (values["J"]["mean"] + values["F"]["mean"]) / 2,
                                     "J-Mean": values["J"]["mean"], "F-Mean": values["F"]["mean"]}
    mean = {key: float(np.mean(v)) if v else float("nan") for key, v in stats.items()}
    summary = {"J&F-Mean": (mean["J", "mean"] + mean["F", "mean"]) / 2,
               "J-Mean": mean["J", "mean"], "J-Recall": mean["J", "recall"], "J-Decay": mean["J", "decay"],
               "F-Mean": mean["F", "mean"], "F-Recall": mean["F", "recall"], "F-Decay": mean["F", "decay"]}
    return {"global": summary, "per_object": rows, "frames_scored": scored}


def finite_or_none(value):
    """`summarize`'s output with NaN / inf as None: JSON has no NaN (statistics of zero frames are written null)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
