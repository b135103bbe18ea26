"""Patch-feature maps of frozen backbones for dense heads, cached on disk like `eval.features`.

Preprocessing (dinokit's choice; Meta's configs resize the short side to 512/640 and train on random crops):
resize the short side to `size` (bilinear, aspect kept, `Dinov2ImageProcessor` without crop), ImageNet
normalisation, centre padding to a multiple of the patch size. An image whose aspect ratio would give more than
`max_patch_tokens()` patch tokens (4,096 by default) is resized smaller instead, to multiples of the patch size
within the bound (`dinokit.data.token_bound`); outputs are still mapped back to its own resolution. The features of one image are (C, h, w) on the
padded image's patch grid; `to_image` maps (K, h, w) logits back onto the original image, cropping the padding
first (Meta resizes the padded logits to the image size instead, which shifts them by up to half a patch).

Cache entry `<cache_dir>/<key>/`: `features.npy` (sum of h*w, C) float16, `grids.npy` (N, 4) = h, w and the
resized image's height and width, `manifest.json`. The key hashes the model's weights and config, the feature
kind, the preprocessing and the image files (paths, sizes, mtimes); entries are written to a staging folder
and renamed, under a per-entry lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit import locking
from dinokit.data.images import display_path
from dinokit.data.token_bound import bounded_size, check_short_side, max_patch_tokens
from dinokit.dense.padding import center_pad, center_padding
from dinokit.eval.features import _hash_model, default_cache_dir, write_entry

CACHE_FORMAT = 1
FLOAT32_COPY_BYTES = 2 << 30  # training keeps a float32 copy of its features up to this size


def dense_processor(size: int, model=None):
    """Short side to `size` (bilinear), no crop, normalised as `model`'s inputs are (its config's mean/std, else
    ImageNet's); saved beside a trained head, so prediction preprocesses the same way."""
    from dinokit.processing import Dinov2ImageProcessor, model_normalization

    mean, std = model_normalization(model)
    return Dinov2ImageProcessor(size={"shortest_edge": size}, do_center_crop=False,
                                resample=Image.Resampling.BILINEAR, image_mean=mean, image_std=std)


def _varies_in_size(processor) -> bool:
    """The processor resizes the short side and keeps the whole image: its long side follows the aspect ratio."""
    return bool(processor.do_resize and "shortest_edge" in processor.size and not processor.do_center_crop)


def check_processor(processor, patch_size: int, option: str | None = "--size", saved_in: str = "") -> None:
    """Refuse, before any image is read, a short side at which a square image is over the patch-token bound."""
    if _varies_in_size(processor):
        check_short_side(processor.size["shortest_edge"], patch_size, option, saved_in)


def preprocess(image_path: Path, processor, patch_size: int) -> torch.Tensor:
    """(1, 3, H', W') normalised pixels of the resized (not yet padded) image, within the patch-token bound."""
    from dinokit.processing import load_image, resize_output_size

    image = load_image(image_path)
    overrides = {}
    if _varies_in_size(processor):
        planned = resize_output_size(image.height, image.width, processor.size)
        bounded = bounded_size(*planned, patch_size, name=display_path(image_path))
        if bounded != planned:
            overrides["size"] = {"height": bounded[0], "width": bounded[1]}
    return processor(image, return_tensors="pt", **overrides)["pixel_values"]


class FeatureExtractor:
    """What a dense head reads from a backbone. `kind` names it in cache keys; `__call__` maps padded pixels
    (1, 3, H, W) to (C, H/p, W/p)."""

    patch_size = 14
    kind = "base"
    channels = 0

    def hash_into(self, digest) -> None:
        digest.update(self.kind.encode())

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SegmentationFeatures(FeatureExtractor):
    """Meta's segmentation input: the last 1 (linear) or 4 (ms) blocks' final-normed patch maps, concatenated."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.patch_size = segmenter.config.patch_size
        self.kind = f"segmentation-{segmenter.n_blocks}"
        self.channels = segmenter.feature_channels

    def hash_into(self, digest) -> None:
        super().hash_into(digest)
        _hash_model(self.segmenter.dinov2, digest)

    @torch.no_grad()
    def __call__(self, pixel_values):
        return self.segmenter.patch_features(pixel_values)[0][0]


class DepthFeatures(FeatureExtractor):
    """Meta's linear depth input: per selected block, the patch map (no final norm) and its CLS broadcast."""

    def __init__(self, depther):
        self.depther = depther
        bc = depther.config.backbone_config
        self.patch_size = bc.patch_size
        self.kind = f"depth-{'-'.join(map(str, bc.out_indices))}"
        self.channels = 2 * bc.hidden_size * len(bc.out_indices)

    def hash_into(self, digest) -> None:
        super().hash_into(digest)
        _hash_model(self.depther.backbone, digest)

    @torch.no_grad()
    def __call__(self, pixel_values):
        levels, grid, _ = self.depther.levels(pixel_values)
        maps = [torch.cat([t.transpose(1, 2).reshape(1, -1, *grid), c[:, :, None, None].expand(1, -1, *grid)], 1)
                for t, c in levels]
        return torch.cat(maps, dim=1)[0]


class RawPatchPixels(FeatureExtractor):
    """The baseline of "no representation": each 14 x 14 patch's normalised pixels (588 values) as its feature."""

    def __init__(self, patch_size: int = 14):
        self.patch_size = patch_size
        self.kind = f"raw-pixels-{patch_size}"
        self.channels = 3 * patch_size * patch_size

    def __call__(self, pixel_values):
        p = self.patch_size
        _, c, h, w = pixel_values.shape
        patches = pixel_values[0].reshape(c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3)
        return patches.reshape(c * p * p, h // p, w // p)


@dataclass
class DenseFeatures:
    """Feature maps of N images: `maps(i)` (C, h, w) float32; `resized[i]` = the image's size before padding."""

    features: np.ndarray  # (sum h*w, C)
    grids: np.ndarray  # (N, 4): h, w, resized height, resized width
    stems: list[str]
    from_cache: bool = False

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.grids[:, 0] * self.grids[:, 1])])

    def __len__(self) -> int:
        return len(self.stems)

    def in_float32(self, max_bytes: int = FLOAT32_COPY_BYTES) -> DenseFeatures:
        """These features stored as float32 in memory, when that takes at most `max_bytes`, else themselves: a head's
        training reads every image hundreds of times, and converting float16 each time (~6 ms for a 37 x 50 x 768
        map) was a fifth of a depth-head step."""
        if self.features.dtype == np.float32 or self.features.size * 4 > max_bytes:
            return self
        return dataclasses.replace(self, features=np.asarray(self.features, dtype=np.float32))

    def tokens(self, i: int) -> torch.Tensor:
        """(h*w, C) float32 tokens of image i."""
        return torch.from_numpy(np.asarray(self.features[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32))

    def grid(self, i: int) -> tuple[int, int]:
        return int(self.grids[i, 0]), int(self.grids[i, 1])

    def resized(self, i: int) -> tuple[int, int]:
        return int(self.grids[i, 2]), int(self.grids[i, 3])


def to_image(logits: torch.Tensor, resized: tuple[int, int], patch_size: int, out_size: tuple[int, int],
             grid: tuple[int, int] | None = None):
    """(K, h', w') maps of a padded image (by default on its patch grid; `grid` = the grid when they are finer)
    -> (K, H, W) on the original image: upsample to the padded size, crop the centre padding away, resize to
    `out_size` (bilinear, align_corners=False throughout)."""
    h, w = grid or logits.shape[-2:]
    x = F.interpolate(logits.unsqueeze(0), size=(h * patch_size, w * patch_size), mode="bilinear",
                      align_corners=False)
    left, _, top, _ = center_padding(resized[0], resized[1], patch_size)
    x = x[:, :, top:top + resized[0], left:left + resized[1]]
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return x[0]


def compute(extractor: FeatureExtractor, images: list[Path], processor, stems: list[str],
            progress: bool = True) -> DenseFeatures:
    parts, grids = [], []
    iterator = images
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(images, desc=f"features ({extractor.kind})", unit="image")
    for path in iterator:
        pixels = preprocess(path, processor, extractor.patch_size)
        resized = pixels.shape[-2:]
        maps = extractor(center_pad(pixels, extractor.patch_size))
        parts.append(maps.flatten(1).T.contiguous().numpy().astype(np.float16))
        grids.append([maps.shape[1], maps.shape[2], resized[0], resized[1]])
    return DenseFeatures(np.concatenate(parts), np.asarray(grids, dtype=np.int64), stems)


def cache_key(extractor: FeatureExtractor, images: list[Path], processor) -> str:
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"dinokit-dense-features-v{CACHE_FORMAT}:{processor.to_json_string()}".encode())
    digest.update(f"max_patch_tokens={max_patch_tokens()}".encode())  # over-bound images are resized by it
    extractor.hash_into(digest)
    for path in images:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def extract(extractor: FeatureExtractor, images: list[Path], stems: list[str], processor,
            cache_dir: str | os.PathLike | None = "default", progress: bool = True) -> DenseFeatures:
    """Features of `images`, from the cache when this exact extractor / preprocessing / file list was seen."""
    if cache_dir is None:
        return compute(extractor, images, processor, stems, progress)
    root = default_cache_dir() if cache_dir == "default" else Path(cache_dir).expanduser()
    entry = root / ("dense-" + cache_key(extractor, images, processor))
    cached = _load(entry, stems)
    if cached is not None:
        return cached
    with locking.acquire(entry, "dinokit dense features", lock_path=entry.with_name(f".{entry.name}.lock"),
                         wait=True, option="--cache-dir (or --no-cache)"):
        cached = _load(entry, stems)
        if cached is not None:
            return cached
        features = compute(extractor, images, processor, stems, progress)
        _write(entry, features)
    return features


def _load(entry: Path, stems: list[str]) -> DenseFeatures | None:
    if not (entry / "manifest.json").is_file():
        return None
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest["stems"] != stems:
            return None
        return DenseFeatures(np.load(entry / "features.npy", mmap_mode="r"), np.load(entry / "grids.npy"), stems,
                             from_cache=True)
    except (OSError, ValueError, KeyError):
        shutil.rmtree(entry, ignore_errors=True)  # damaged: computed again
        return None


def _write(entry: Path, features: DenseFeatures) -> None:
    write_entry(entry, {"features": features.features, "grids": features.grids},
                {"format": CACHE_FORMAT, "stems": features.stems})
