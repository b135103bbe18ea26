"""`dinokit segment train|predict`: Meta's linear / ms segmentation head trained on frozen, cached patch features.

Training (dinokit's defaults, scaled from Meta's published config — AdamW lr 1e-3, weight decay 1e-4, linear
warm-up then poly(1) decay, batch 16, 40k iterations — to small data sets): AdamW lr 1e-3, wd 1e-4, 4% warm-up,
poly decay, batches of `batch_size` whole images for `epochs` passes over the training set (at most 40k steps),
stopping once the training loss has plateaued (`dense.head_training`); BatchNorm statistics over all the patches
of a batch; cross-entropy averaged over the labelled pixels (ignore index excluded), the logits resized to
`loss_resolution` label cells per patch side and the mask reduced to them by majority (`dense.pixel_loss`; the
patch size = the full resized image). No augmentation: features are computed once. Evaluation at each image's
original resolution with mmseg's mIoU (`dense.metrics`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit import atomic
from dinokit.dense import data
from dinokit.dense.features import (
    DenseFeatures,
    FeatureExtractor,
    SegmentationFeatures,
    check_processor,
    dense_processor,
    extract,
    preprocess,
    to_image,
)
from dinokit.dense.head_training import FitLog, HeadTrainConfig, fit
from dinokit.dense.metrics import ConfusionMatrix
from dinokit.dense.output import MARKER, staged_output, write_predictions
from dinokit.dense.padding import center_pad
from dinokit.dense.palette import index_png, overlay
from dinokit.dense.pixel_loss import DEFAULT_RESOLUTION, PixelCrossEntropy, check_resolution
from dinokit.dense.seg_head import BNSegHead
from dinokit.dense.segmentation import ARCHITECTURES, Dinov2ForSemanticSegmentation, segmentation_class


@dataclass
class SegTrainConfig(HeadTrainConfig):
    """HeadTrainConfig plus the label cells per patch side of the loss (None: the full-resolution F.interpolate
    path of earlier versions)."""

    loss_resolution: int | None = DEFAULT_RESOLUTION


@dataclass
class SegSplit:
    samples: list[data.DenseSample]
    masks: list[np.ndarray]


def load_split(root, num_classes: int | None, ignore_index: int, binarize: bool) -> SegSplit:
    """All pairs of `root`, every mask read and checked against its image before any feature is computed."""
    samples = data.list_pairs(root, "masks")
    masks = []
    for sample in samples:
        mask = data.read_mask(sample.target, binarize=binarize, ignore_index=ignore_index)
        data.check_mask(mask, sample.target, sample.image, num_classes, ignore_index)
        masks.append(mask)
    return SegSplit(samples, masks)


def infer_num_classes(splits: list[SegSplit], ignore_index: int) -> int:
    top = max(int(m[m != ignore_index].max(initial=0)) for s in splits for m in s.masks)
    return max(2, top + 1)


def fit_head(head: BNSegHead, features: DenseFeatures, masks: list[np.ndarray], patch_size: int,
             ignore_index: int, config: SegTrainConfig, progress: bool = False) -> FitLog:
    """Train `head` in place; returns the FitLog (steps, stop reason, losses)."""
    features = features.in_float32()
    criterion = PixelCrossEntropy(features, masks, patch_size, ignore_index,
                                  getattr(config, "loss_resolution", DEFAULT_RESOLUTION))

    def batch_loss(batch: list[int]) -> torch.Tensor:
        tokens = [features.tokens(i) for i in batch]
        logits = head.forward_flat(torch.cat(tokens)).split([len(t) for t in tokens])
        total, count = 0.0, 0
        for i, logit in zip(batch, logits):
            loss, labelled = criterion(i, logit)
            total, count = total + loss, count + labelled
        return total / max(count, 1)

    head.train()
    log = fit(head.parameters(), len(features), batch_loss, config, progress)
    head.eval()
    return log


@torch.no_grad()
def evaluate_head(head: BNSegHead, features: DenseFeatures, masks: list[np.ndarray], patch_size: int,
                  num_classes: int, ignore_index: int, class_names: list[str] | None = None) -> dict:
    head.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index)
    for i, mask in enumerate(masks):
        logits = head.forward_flat(features.tokens(i)).T.reshape(-1, *features.grid(i))
        prediction = to_image(logits, features.resized(i), patch_size, mask.shape).argmax(0)
        confusion.update(prediction, mask)
    return confusion.metrics(class_names)


def split_features(extractor: FeatureExtractor, split: SegSplit, processor, cache_dir, progress) -> DenseFeatures:
    return extract(extractor, [s.image for s in split.samples], [s.stem for s in split.samples], processor,
                   cache_dir=cache_dir, progress=progress)


def train_segmentation(model, train, val, output, *, num_classes: int | None = None, ignore_index: int = 255,
                       head: str = "linear", size: int = 518, binarize: bool = False,
                       config: SegTrainConfig = SegTrainConfig(), cache_dir="default", progress: bool = True) -> dict:
    """Train a segmentation head on the frozen `model` and write OUT (a Dinov2ForSemanticSegmentation folder
    with preprocessor_config.json, metrics.json and training_log.json). Returns the metrics."""
    import dinokit

    started = time.perf_counter()
    train_split = load_split(train, num_classes, ignore_index, binarize)
    val_split = load_split(val, num_classes, ignore_index, binarize)
    if num_classes is None:
        num_classes = infer_num_classes([train_split, val_split], ignore_index)
    torch.manual_seed(config.seed)  # a preset (random weights) is then the same model, and its features cached
    backbone = dinokit.load_model(model)
    names = ["background", "foreground"] if binarize and num_classes == 2 else None
    seg_config = backbone.config.copy(segmentation_head=head, num_labels=num_classes,
                                      semantic_loss_ignore_index=ignore_index)
    if names:
        seg_config.id2label = dict(enumerate(names))
        seg_config.label2id = {n: i for i, n in enumerate(names)}
    segmenter = segmentation_class(seg_config)(seg_config)
    seg_config.architectures = [type(segmenter).__name__]
    segmenter.dinov2.load_meta_state_dict(backbone.vit.state_dict(), None)
    segmenter.eval()
    processor = dense_processor(size, backbone)
    check_processor(processor, segmenter.config.patch_size)
    check_resolution(getattr(config, "loss_resolution", DEFAULT_RESOLUTION), segmenter.config.patch_size)
    with staged_output(Path(output), "dinokit segment train", ARCHITECTURES) as staging:
        extractor = SegmentationFeatures(segmenter)
        train_features = split_features(extractor, train_split, processor, cache_dir, progress)
        val_features = split_features(extractor, val_split, processor, cache_dir, progress)
        features_s = time.perf_counter() - started
        torch.manual_seed(config.seed)
        segmenter.decode_head = BNSegHead(segmenter.feature_channels, num_classes)
        fit_log = fit_head(segmenter.decode_head, train_features, train_split.masks, extractor.patch_size,
                          ignore_index, config, progress)
        train_s = time.perf_counter() - started - features_s
        class_names = [segmenter.config.id2label[i] for i in range(num_classes)]
        metrics = evaluate_head(segmenter.decode_head, val_features, val_split.masks, extractor.patch_size,
                                num_classes, ignore_index, class_names)
        metrics.update(train_images=len(train_split.samples), val_images=len(val_split.samples),
                       num_classes=num_classes, ignore_index=ignore_index, head=head, size=size,
                       seconds={"features": round(features_s, 2), "head": round(train_s, 2),
                                "total": round(time.perf_counter() - started, 2)},
                       features_from_cache=bool(train_features.from_cache and val_features.from_cache),
                       train_steps=fit_log.steps, stop_reason=fit_log.stop_reason)
        segmenter.save_pretrained(staging)
        processor.save_pretrained(staging)
        log = {"config": config.__dict__, **fit_log.summary()}
        atomic.write_text(staging / "training_log.json", json.dumps(log, indent=2))
        atomic.write_text(staging / MARKER, json.dumps(finite_or_none(metrics), indent=2))
    return metrics


def finite_or_none(value):
    """JSON has no NaN: undefined metrics (e.g. mIoU with no labelled pixel) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def load_segmenter(path):
    from dinokit.processing import Dinov2ImageProcessor

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a segmentation model folder (no config.json): pass the --output of "
                                f"`dinokit segment train`")
    return Dinov2ForSemanticSegmentation.from_pretrained(path), Dinov2ImageProcessor.from_pretrained(path)


@torch.no_grad()
def segment_image(segmenter, processor, image_path: Path) -> tuple[np.ndarray, Image.Image]:
    """(class-index mask at the image's resolution, the image)."""
    from dinokit.processing import load_image

    image = load_image(image_path)
    patch = segmenter.config.patch_size
    pixels = preprocess(image_path, processor, patch)
    logits = segmenter(center_pad(pixels, patch)).logits[0]
    mask = to_image(logits, tuple(pixels.shape[-2:]), patch, (image.height, image.width)).argmax(0)
    return mask.numpy().astype(np.uint8), image


def predict_segmentation(inputs, model, output, progress: bool = True) -> list[Path]:
    """Write PRED/<stem>.png (palette PNG of class indices) and PRED/<stem>_overlay.png for each image."""
    images = [p for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs) for p in data.list_images(item)]
    segmenter, processor = load_segmenter(model)
    check_processor(processor, segmenter.config.patch_size, None, str(model))

    def predict(path: Path):
        mask, image = segment_image(segmenter, processor, path)
        return [(f"{path.stem}.png", index_png(mask)), (f"{path.stem}_overlay.png", overlay(image, mask))]

    return write_predictions(images, Path(output).expanduser(), "dinokit segment predict", predict, progress)
