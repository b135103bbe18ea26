"""`dinokit depth train|predict`: Meta's linear depth head (256 "UD" bins, "linear" normalisation, 1 or 4
blocks with CLS) trained on frozen, cached features with Meta's SigLoss; metrics of the depth toolbox.

Training (dinokit's defaults; Meta's depth configs are not in its repository): AdamW lr 3e-3, wd 1e-4, 4%
warm-up then poly decay, batches of `batch_size` images for `epochs` passes with a plateau stop (or exactly
`iterations` steps; `dense.head_training`); the predicted map (4x the patch grid) is upsampled to the padded
image, cropped and resized to the depth map's resolution before the loss, as Meta's head resizes its prediction
to the ground truth.

The 1x1 conv runs on the patch grid before the x4 upsampling (both are linear and the bilinear weights sum to 1,
so the order does not change the result; the conv then sees 16x fewer pixels), its CLS half once per image; the
upsampled bin logits are never stored (`dense.upsampled_bins`); the resize to the depth map is a precomputed
matrix pair (`dense.interpolation`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit import atomic
from dinokit.dense import data
from dinokit.dense.depth import DepthConfig, Dinov2ForDepthEstimation
from dinokit.dense.features import (
    DenseFeatures,
    DepthFeatures,
    check_processor,
    dense_processor,
    extract,
    preprocess,
    to_image,
)
from dinokit.dense.head_training import FitLog, HeadTrainConfig, fit
from dinokit.dense.interpolation import resize_separable, to_image_weights
from dinokit.dense.linear_depth import LinearDepthHead
from dinokit.dense.losses import sigloss
from dinokit.dense.metrics import depth_errors, mean_depth_errors
from dinokit.dense.output import MARKER, staged_output, write_predictions
from dinokit.dense.padding import center_pad
from dinokit.dense.palette import colorize_depth
from dinokit.dense.segment import finite_or_none

ARCHITECTURE = "Dinov2ForDepthEstimation"


@dataclass
class DepthTrainConfig(HeadTrainConfig):
    """HeadTrainConfig with the depth head's own peak learning rate: 3e-3 reached the RMSE of the former 2,000 fixed
    steps within 100 epochs where 1e-3 fell 1.2-2.2 % short (issue 26; benchmarks/dense_train_sweep.py, two seeds,
    README "Training time"). Meta published no depth training config."""

    lr: float = 3e-3


def load_depth_split(root, depth_scale: float):
    samples = data.list_pairs(root, "depth")
    depths = []
    for sample in samples:
        depth = data.read_depth(sample.target, depth_scale)
        data.check_depth(depth, sample.target, sample.image)
        depths.append(depth)
    return samples, depths


def _predict(head: LinearDepthHead, features: DenseFeatures, batch: list[int], patch: int,
             out_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Depth (H, W) of each image in `batch` at its out size: Meta's head (bins from the x4-upsampled map) then
    `to_image`."""
    grids = [features.grid(i) for i in batch]
    logits = torch.cat([head.grid_logits(features.tokens(i)) for i in batch])
    depths = head.depth_from_grid_logits(logits, grids)
    out = []
    for i, grid, depth, size in zip(batch, grids, depths, out_sizes):
        rows, cols = to_image_weights(grid, features.resized(i), patch, tuple(size), maps=tuple(depth.shape))
        out.append(resize_separable(depth, rows, cols))
    return out


def _check_broadcast_cls(head: LinearDepthHead, features: DenseFeatures) -> None:
    """`grid_logits` reads each level's CLS channels from the first patch: refuse features where they vary."""
    _, cls = head.patch_and_cls_channels()
    for i in range(len(features)):
        tokens = features.tokens(i)[:, cls]
        if not torch.equal(tokens, tokens[:1].expand_as(tokens)):
            raise ValueError(f"features of {features.stems[i]!r} are not Meta's depth input (patch map and CLS "
                             "broadcast per block): delete the feature cache or pass --no-cache")


def fit_depth_head(head, features, depths, patch, config: DepthTrainConfig, progress=False) -> FitLog:
    targets = [torch.from_numpy(d) for d in depths]
    features = features.in_float32()
    _check_broadcast_cls(head, features)

    def batch_loss(batch: list[int]) -> torch.Tensor:
        predictions = _predict(head, features, batch, patch, [targets[i].shape for i in batch])
        return sum(sigloss(p, targets[i], head.max_depth) for p, i in zip(predictions, batch)) / len(batch)

    head.train()
    log = fit(head.parameters(), len(features), batch_loss, config, progress)
    head.eval()
    return log


@torch.no_grad()
def evaluate_depth_head(head, features, depths, patch) -> dict:
    per_image = [depth_errors(_predict(head, features, [i], patch, [d.shape])[0], d, head.min_depth, head.max_depth)
                 for i, d in enumerate(depths)]
    return mean_depth_errors(per_image)


def train_depth(model, train, val, output, *, depth_scale: float = 1000.0, min_depth: float = 0.001,
                max_depth: float = 10.0, layers: int = 4, size: int = 518,
                config: DepthTrainConfig = DepthTrainConfig(), cache_dir="default", progress: bool = True) -> dict:
    import dinokit

    started = time.perf_counter()
    train_samples, train_depths = load_depth_split(train, depth_scale)
    val_samples, val_depths = load_depth_split(val, depth_scale)
    torch.manual_seed(config.seed)  # a preset (random weights) is then the same model, and its features cached
    backbone = dinokit.load_model(model)
    depther = Dinov2ForDepthEstimation(DepthConfig.linear(backbone.config, layers, min_depth, max_depth))
    depther.backbone.load_meta_state_dict(backbone.vit.state_dict(), None)
    depther.eval()
    processor = dense_processor(size, backbone)
    check_processor(processor, depther.config.backbone_config.patch_size)
    with staged_output(Path(output), "dinokit depth train", ARCHITECTURE) as staging:
        extractor = DepthFeatures(depther)
        train_features = extract(extractor, [s.image for s in train_samples], [s.stem for s in train_samples],
                                 processor, cache_dir=cache_dir, progress=progress)
        val_features = extract(extractor, [s.image for s in val_samples], [s.stem for s in val_samples],
                               processor, cache_dir=cache_dir, progress=progress)
        torch.manual_seed(config.seed)
        bc = depther.config.backbone_config
        depther.head = LinearDepthHead(bc.hidden_size, layers, min_depth, max_depth)
        fit_log = fit_depth_head(depther.head, train_features, train_depths, extractor.patch_size, config, progress)
        metrics = evaluate_depth_head(depther.head, val_features, val_depths, extractor.patch_size)
        metrics.update(train_images=len(train_samples), val_images=len(val_samples), layers=layers, size=size,
                       depth_range=[min_depth, max_depth], seconds=round(time.perf_counter() - started, 2),
                       train_steps=fit_log.steps, stop_reason=fit_log.stop_reason)
        depther.config.data["architectures"] = [ARCHITECTURE]
        depther.save_pretrained(staging)
        processor.save_pretrained(staging)
        atomic.write_text(staging / "training_log.json",
                          json.dumps({"config": config.__dict__, **fit_log.summary()}, indent=2))
        atomic.write_text(staging / MARKER, json.dumps(finite_or_none(metrics), indent=2))
    return metrics


def load_depther(path, size: int | None = None):
    from dinokit.processing import Dinov2ImageProcessor

    path = Path(path).expanduser()
    depther = Dinov2ForDepthEstimation.from_pretrained(path)
    if size is None and (path / "preprocessor_config.json").is_file():
        try:
            return depther, Dinov2ImageProcessor.from_pretrained(path)
        except ValueError:  # transformers' DPT processor config: use dinokit's dense preprocessing
            pass
    return depther, dense_processor(size or 518, depther.config.backbone_config)


@torch.no_grad()
def depth_image(depther, processor, image_path: Path) -> np.ndarray:
    """Depth (H, W) in metres at the image's resolution (Meta's clamp to the head's range)."""
    from dinokit.processing import load_image

    image = load_image(image_path)
    patch = depther.config.backbone_config.patch_size
    pixels = preprocess(image_path, processor, patch)
    padded = center_pad(pixels, patch)
    depth = depther(padded).predicted_depth
    grid = (padded.shape[-2] // patch, padded.shape[-1] // patch)
    depth = to_image(depth, tuple(pixels.shape[-2:]), patch, (image.height, image.width), grid=grid)[0]
    low, high = depther.depth_range
    return depth.clamp(min=low, max=high).numpy()


def predict_depth(inputs, model, output, depth_scale: float = 1000.0, size: int | None = None,
                  progress: bool = True) -> list[Path]:
    """PRED/<stem>_depth.png (colour map) and PRED/<stem>_depth16.png (uint16, depth x depth_scale)."""
    images = [p for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs) for p in data.list_images(item)]
    depther, processor = load_depther(model, size)
    check_processor(processor, depther.config.backbone_config.patch_size, "--size" if size else None, str(model))

    def predict(path: Path):
        depth = depth_image(depther, processor, path)
        sixteen = Image.fromarray(np.clip(np.round(depth * depth_scale), 0, 65535).astype(np.uint16))
        return [(f"{path.stem}_depth.png", colorize_depth(depth)), (f"{path.stem}_depth16.png", sixteen)]

    return write_predictions(images, Path(output).expanduser(), "dinokit depth predict", predict, progress)
