"""Anomaly evaluation on MVTec-AD-layout folders: image AUROC, pixel AUROC and AU-PRO up to FPR 0.3.

Layout (MVTec AD): `<object>/train/good/*`, `<object>/test/<defect>/*` with `good` the normal test images, and
`<object>/ground_truth/<defect>/<stem>_mask.png` (non-zero = anomalous pixel) for every test image outside good.

- Image AUROC: scikit-learn's ROC AUC of the image scores, label 1 for every image outside `good`.
- Pixel AUROC: the same over every pixel of every test image (good images' pixels all 0), on the heat maps.
- AU-PRO (the MVTec AD definition, as in its evaluation code and AnomalyDINO's `post_eval.py`): ground-truth
  regions are the 8-connected components of each mask; at a threshold, PRO is the mean over all regions of the
  fraction of the region's pixels at or above it, FPR the fraction of all anomaly-free pixels (of all images)
  at or above it; the (FPR, PRO) curve, one point per distinct score, from (0, 0) to (1, 1), is integrated by the
  trapezoid rule up to FPR 0.3 (interpolating the last segment) and divided by 0.3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRO_LIMIT = 0.3
NORMAL = "good"


def image_auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError("image AUROC needs both normal and anomalous test images")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(masks, maps) -> float:
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([np.asarray(m, bool).ravel() for m in masks])
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in maps])
    if truth.all() or not truth.any():
        raise ValueError("pixel AUROC needs both normal and anomalous pixels")
    return float(roc_auc_score(truth, values))


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points over all thresholds (one per distinct score), from (0, 0) to (1, 1)."""
    from scipy import ndimage

    fp_steps, pro_steps, values = [], [], []
    ok_pixels, regions = 0, 0
    for anomaly_map, mask in zip(maps, masks):
        mask = np.asarray(mask, bool)
        anomaly_map = np.asarray(anomaly_map, np.float64)
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"a heat map of shape {anomaly_map.shape} against a mask of shape {mask.shape}")
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), int))
        ok_pixels += int((labels == 0).sum())
        regions += count
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
        pro = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
        fp_steps.append((labels == 0).ravel().astype(np.float64))
        pro_steps.append(pro.ravel())
        values.append(anomaly_map.ravel())
    if regions == 0 or ok_pixels == 0:
        raise ValueError("AU-PRO needs at least one anomalous region and one anomaly-free pixel")
    values = np.concatenate(values)
    order = np.argsort(-values, kind="stable")
    fpr = np.cumsum(np.concatenate(fp_steps)[order]) / ok_pixels
    pro = np.cumsum(np.concatenate(pro_steps)[order]) / regions
    last_of_ties = np.append(np.diff(values[order]) != 0, True)  # one point per threshold, after all its pixels
    fpr, pro = np.minimum(fpr[last_of_ties], 1.0), np.minimum(pro[last_of_ties], 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) (x ascending) from x[0] to `limit`, the last segment interpolated."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = float(np.sum(0.5 * (y[1:inside] + y[:inside - 1]) * np.diff(x[:inside])))
    if x[inside - 1] < limit and inside < len(x):
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_limit) * (limit - x0)
    return area


def au_pro(maps, masks, limit: float = PRO_LIMIT) -> float:
    """Normalised area under the PRO curve up to FPR `limit` (1.0 = perfect)."""
    fpr, pro = pro_curve(maps, masks)
    return float(area_up_to(fpr, pro, limit) / limit)


# ------------------------------------------------------------------------------------------ MVTec layout
@dataclass
class TestImage:
    path: Path
    defect: str  # the test sub-folder: "good" or a defect type
    mask: Path | None  # ground-truth mask (None for good images, or when the folder has no ground truth)

    @property
    def anomalous(self) -> bool:
        return self.defect != NORMAL


def is_mvtec_test_folder(folder) -> bool:
    """A folder of test sub-folders, one of them `good` and at least one other (a defect type)."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / NORMAL).is_dir():
        return False
    return any(p.is_dir() and p.name != NORMAL and not p.name.startswith(".") for p in folder.iterdir())


def mvtec_test_images(folder, ground_truth=None) -> list[TestImage]:
    """The test images of an MVTec-layout test folder with their masks (from `ground_truth`, by default the
    `ground_truth` folder beside it; without one, only image AUROC can be computed)."""
    from dinokit.data.images import find_image_files

    folder = Path(folder)
    truth = Path(ground_truth) if ground_truth is not None else folder.parent / "ground_truth"
    has_truth = truth.is_dir()
    if ground_truth is not None and not has_truth:
        raise FileNotFoundError(f"ground-truth folder {truth} does not exist")
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in find_image_files(sub):
            mask = None
            if has_truth and sub.name != NORMAL:
                mask = truth / sub.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"no ground-truth mask for {path}: expected {mask} (MVTec layout: "
                                            f"ground_truth/<defect>/<stem>_mask.png)")
            items.append(TestImage(path, sub.name, mask))
    return items


def check_mask_sizes(items: list[TestImage]) -> None:
    """Refuse, before any scoring, a mask whose size differs from its image's (headers only)."""
    from PIL import Image, UnidentifiedImageError

    for item in items:
        if item.mask is None:
            continue
        try:
            with Image.open(item.mask) as m:
                mask_size = m.size
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read ground-truth mask {item.mask} ({exc}): fix or replace it") from None
        try:
            with Image.open(item.path) as im:
                image_size = im.size
        except (OSError, UnidentifiedImageError):
            continue  # the image itself is unreadable: scoring skips and reports it
        if mask_size != image_size:
            raise ValueError(f"ground-truth mask {item.mask} is {mask_size[0]} x {mask_size[1]} pixels but its "
                             f"image {item.path} is {image_size[0]} x {image_size[1]}: give masks at the image size")


def read_defect_mask(path, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask (non-zero = anomalous), refusing another size than the image's (H, W)."""
    from PIL import Image

    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != tuple(size):
        raise ValueError(f"ground-truth mask {path} is {mask.shape[1]} x {mask.shape[0]} pixels but its image is "
                         f"{size[1]} x {size[0]}: give masks at the image size")
    return mask


def evaluate(items: list[TestImage], scores, heat_maps, limit: float = PRO_LIMIT) -> dict:
    """Metrics of scored test images (`scores[i]`, `heat_maps[i]` belong to `items[i]`)."""
    labels = [int(item.anomalous) for item in items]
    report = {"images": len(items), "anomalous": int(sum(labels)), "image_auroc": image_auroc(labels, scores)}
    if all(item.mask is not None for item in items if item.anomalous):
        masks = [read_defect_mask(item.mask, heat.shape) if item.mask is not None else np.zeros(heat.shape, bool)
                 for item, heat in zip(items, heat_maps)]
        report["pixel_auroc"] = pixel_auroc(masks, heat_maps)
        report["au_pro"] = au_pro(heat_maps, masks, limit)
        report["pro_fpr_limit"] = limit
    return report
