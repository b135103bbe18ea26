"""CorLoc and mask IoU for single-object discovery, and the ground-truth readers they need.

CorLoc (../shared/spec/zeroshot.md §3.4): one predicted box per image; the image counts as correct when the box
has IoU >= 0.5 with ANY ground-truth box. Boxes are (x0, y0, x1, y1), half-open, continuous areas.

Ground truth, per image stem, in one folder:
- `<stem>.xml`, a VOC annotation: every object, difficult and truncated included; a VOC box (1-based, inclusive)
  becomes [xmin − 1, ymin − 1, xmax, ymax], as LOST reads it;
- `<stem>.png` or `<stem>_mask.png`, an instance-id mask (Penn-Fudan: 0 background, 1..k one per object): one box
  per id, [min_x, min_y, max_x + 1, max_y + 1]; the mask's `> 0` is also the foreground for mask IoU.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinokit.zeroshot.masks import read_id_mask

THRESHOLD = 0.5


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with continuous areas."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_iou(box, truths) -> float:
    """The largest IoU of `box` with any of the ground-truth boxes (0 when there are none)."""
    return max((box_iou(box, t) for t in truths), default=0.0)


def corloc(boxes, truths, threshold: float = THRESHOLD) -> tuple[float, list[bool]]:
    """(CorLoc in %, per-image hit) of one predicted box per image against each image's ground-truth boxes."""
    if len(boxes) != len(truths):
        raise ValueError(f"{len(boxes)} predicted boxes for {len(truths)} images: give one box per image")
    if not boxes:
        raise ValueError("CorLoc of no images: give at least one")
    hits = [best_iou(b, t) >= threshold for b, t in zip(boxes, truths)]
    return 100.0 * sum(hits) / len(hits), hits


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (1 when both are empty)."""
    if predicted.shape != truth.shape:
        raise ValueError(f"mask of shape {predicted.shape} against ground truth of shape {truth.shape}")
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def mask_boxes(ids: np.ndarray) -> list[tuple[int, int, int, int]]:
    """One half-open box per instance id (> 0) of an id mask, in id order."""
    boxes = []
    for value in np.unique(ids):
        if value == 0:
            continue
        rows, cols = np.nonzero(ids == value)
        boxes.append((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
    return boxes


def read_voc_boxes(path) -> list[tuple[float, float, float, float]]:
    """Every object box of a VOC XML file as [xmin − 1, ymin − 1, xmax, ymax]."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not a readable VOC annotation ({exc}); fix or remove the file") from None
    boxes = []
    for node in root.iter("object"):
        bb = node.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{path}: an <object> without a numeric <bndbox> xmin/ymin/xmax/ymax") from None
        boxes.append((x0 - 1, y0 - 1, x1, y1))
    return boxes


@dataclass
class Truth:
    """One image's ground truth: its boxes and, when it came from a mask, the foreground."""

    boxes: list
    foreground: np.ndarray | None  # (H, W) bool, or None for box files
    source: str


def truth_file(folder, stem: str) -> Path:
    """The ground-truth file of image `stem` in `folder`, or a clear error naming what was looked for."""
    folder = Path(folder)
    names = [f"{stem}.xml", f"{stem}.png", f"{stem}_mask.png"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no ground truth for image '{stem}' in {folder}: expected one of {', '.join(names)}")


def read_truth(path, image_size: tuple[int, int] | None = None) -> Truth:
    """Boxes (and foreground, for a mask) of one ground-truth file; a mask of another size than the image
    (`image_size` = (H, W)) is refused."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return Truth(read_voc_boxes(path), None, str(path))
    ids, _ = read_id_mask(path, "ground-truth mask", max_id=None)
    if image_size is not None and ids.shape != tuple(image_size):
        raise ValueError(f"{path}: the mask is {ids.shape[1]} x {ids.shape[0]} pixels but its image is "
                         f"{image_size[1]} x {image_size[0]}: give the mask of this image, at its size")
    return Truth(mask_boxes(ids), ids > 0, str(path))
