"""Frozen-backbone features for the evaluation protocols, extracted once and cached on disk.

For every image we keep what all protocols need (Meta's `get_intermediate_layers(x, 4, return_class_token=True)`):
- `cls_blocks` (N, 4, D): the CLS token of the last 4 blocks, each through the final norm; the last one is the
  "final-norm CLS" used by k-NN and logistic regression;
- `patch_mean` (N, D): the mean of the last block's normed patch tokens (registers excluded).

Cache. Features are stored under `<cache_dir>/<key>/` as .npy files (read back as memmaps) with a JSON manifest.
The key hashes everything that changes the features: the model's weights (every tensor of its state dict) and
config, the image list (paths, labels, file sizes and modification times), the transform and the block count.
A changed image file or model therefore gets new features; an identical request reads the cache with no model
forward. Entries are written to a temporary folder and renamed, so an interrupted run leaves no half entry.
One process computes an entry at a time (a lock per entry): another one asking for the same features waits
and reads them; staging folders of a killed run are removed by the next one.

Unreadable images are skipped and reported: `FeatureSet.skipped` lists (path, reason); they are never counted
in accuracies, and the protocols' results state how many there were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinokit import atomic, locking
from dinokit.eval.data import ImageDataset, LabelledImages, collate_skipping_unreadable

CACHE_FORMAT = 1
N_LAST_BLOCKS = 4

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$DINOKIT_CACHE/features`, else `$XDG_CACHE_HOME/dinokit/features`, else `~/.cache/dinokit/features`."""
    if os.environ.get("DINOKIT_CACHE"):
        return Path(os.environ["DINOKIT_CACHE"]).expanduser() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "dinokit" / "features"


def default_transform(model: nn.Module | None = None, resize: int = 256, crop: int = 224):
    """The DINOv2 eval transform: resize short side 256 (bicubic), centre crop 224, normalised as `model`'s inputs
    are (ImageNet's mean/std but for the DINOv3 SAT-493M models; see `processing.model_normalization`)."""
    from dinokit.processing import eval_transform, model_normalization

    mean, std = model_normalization(model)
    return eval_transform(resize=resize, crop=crop, image_mean=mean, image_std=std)


@dataclass
class FeatureSet:
    """Features of the readable images of a labelled set (rows in the order of `paths`)."""

    cls_blocks: np.ndarray  # (N, blocks, D) float32
    patch_mean: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images
    from_cache: bool = False

    @property
    def final_cls(self) -> np.ndarray:
        """Final-norm CLS token (N, D): the k-NN and logistic-regression feature."""
        return self.cls_blocks[:, -1]

    def summary(self) -> dict:
        return {"images": len(self.labels), "classes": len(self.classes), "skipped_unreadable": len(self.skipped),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped], "from_cache": self.from_cache}


def backbone_module(model: nn.Module) -> nn.Module:
    """The module with Meta's `get_intermediate_layers` (dinokit models and Meta-style backbones have it)."""
    if hasattr(model, "get_intermediate_layers"):
        return model
    raise TypeError(f"{type(model).__name__} has no get_intermediate_layers(); pass a dinokit model (or a model "
                    f"spec that dinokit.load_model accepts).")


def model_depth(model: nn.Module) -> int | None:
    """Number of blocks whose class tokens the protocols can stack, when the model says: a ViT's transformer
    blocks; a ConvNeXt's trailing stages of the output width (one: its stages widen)."""
    config = getattr(model, "config", None)
    widths = getattr(config, "hidden_sizes", None)
    if widths:
        return next(i for i, width in enumerate(reversed(widths), 1)
                    if i == len(widths) or widths[-i - 1] != width)
    for value in (getattr(model, "n_blocks", None), getattr(config, "num_hidden_layers", None)):
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def backbone_features(model: nn.Module, pixel_values: torch.Tensor,
                      n_blocks: int = N_LAST_BLOCKS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls_blocks (B, n, D), patch_mean (B, D)) in float32 from a frozen backbone, n = min(n_blocks, depth)."""
    depth = model_depth(model)
    n_blocks = min(n_blocks, depth) if depth else n_blocks
    outputs = backbone_module(model).get_intermediate_layers(pixel_values, n=n_blocks, return_class_token=True)
    cls_blocks = torch.stack([cls for _, cls in outputs], dim=1)
    patch_mean = outputs[-1][0].mean(dim=1)
    return cls_blocks.float(), patch_mean.float()


def _hash_model(model: nn.Module, digest) -> None:
    config = getattr(model, "config", None)
    digest.update(type(model).__name__.encode())
    if hasattr(config, "to_json_string"):
        digest.update(config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def cache_key(model: nn.Module, images: LabelledImages, transform, n_blocks: int = N_LAST_BLOCKS) -> str:
    """Hash of model weights + config, image list (+ sizes and mtimes), transform and block count."""
    digest = hashlib.blake2b(digest_size=20)
    depth = model_depth(model)
    n_blocks = min(n_blocks, depth) if depth else n_blocks
    digest.update(f"dinokit-features-v{CACHE_FORMAT}:blocks={n_blocks}:{transform!r}".encode())
    _hash_model(model, digest)
    digest.update(json.dumps(images.classes).encode())
    for path, label in zip(images.paths, images.labels):
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(os.fsencode(path) + f"\0{label}\0{state}\n".encode())  # any file name, UTF-8 or not
    return digest.hexdigest()


def _load_cached(entry: Path, images: LabelledImages) -> FeatureSet | None:
    """The cached features, or None for a damaged entry (which is then computed again). np.load keeps
    allow_pickle=False: an object array planted in a cache is refused, never unpickled."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        return FeatureSet(
            cls_blocks=np.load(entry / "cls_blocks.npy", mmap_mode="r"),
            patch_mean=np.load(entry / "patch_mean.npy", mmap_mode="r"),
            labels=np.load(entry / "labels.npy"),
            paths=manifest["paths"], classes=images.classes,
            skipped=[tuple(item) for item in manifest["skipped"]], from_cache=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("feature cache entry %s is damaged (%s: %s); computing the features again",
                       entry, type(exc).__name__, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_entry(entry: Path, features: FeatureSet, description: dict) -> None:
    write_entry(entry, {"cls_blocks": features.cls_blocks, "patch_mean": features.patch_mean,
                        "labels": features.labels},
                {"format": CACHE_FORMAT, **description, "paths": features.paths,
                 "skipped": [list(item) for item in features.skipped]})


def write_entry(entry: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """A cache entry folder (`<name>.npy` per array + manifest.json) written whole: into a staging folder beside
    it, then renamed, so a reader sees no entry or a complete one. If another process wrote the same entry
    first, its (identical) entry stays."""
    temporary = None
    try:
        with atomic.writing(entry, option="--cache-dir (or --no-cache)"):
            temporary = atomic.staging_folder(entry)
            for name, array in arrays.items():
                np.save(temporary / f"{name}.npy", array)
            (temporary / "manifest.json").write_text(json.dumps(manifest))
            atomic.pause_point(entry)
            os.replace(temporary, entry)
            temporary = None
    except OSError:
        if not entry.exists():
            raise
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _entry_lock(entry: Path):
    """The lock of one cache entry: a second process needing the same features waits, then reads them."""
    return locking.acquire(entry, "dinokit feature extraction", lock_path=entry.with_name(f".{entry.name}.lock"),
                           wait=True, option="--cache-dir (or --no-cache)")


@torch.no_grad()
def compute_features(model: nn.Module, images: LabelledImages, *, transform=None, batch_size: int = 64,
                     num_workers: int = 0, n_blocks: int = N_LAST_BLOCKS, device: str | torch.device = "cpu",
                     progress: bool = True, description: str = "features") -> FeatureSet:
    """Run the backbone over every image (no cache). Unreadable images are skipped and listed."""
    transform = default_transform(model) if transform is None else transform
    device = torch.device(device)
    model = backbone_module(model).to(device).eval()
    loader = torch.utils.data.DataLoader(ImageDataset(images.paths, images.labels, transform),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_skipping_unreadable)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=description, unit="batch")
    cls_parts, patch_parts, index_parts, skipped = [], [], [], []
    for batch in loader:
        skipped += [(images.paths[index], reason) for index, reason in batch["errors"]]
        if batch["pixel_values"] is None:
            continue
        cls_blocks, patch_mean = backbone_features(model, batch["pixel_values"].to(device), n_blocks)
        cls_parts.append(cls_blocks.cpu().numpy())
        patch_parts.append(patch_mean.cpu().numpy())
        index_parts.append(batch["indices"].numpy())
    if not index_parts:
        raise ValueError(f"None of the {len(images)} images of {images.source} could be read "
                         f"(first error: {skipped[0][1] if skipped else 'none'}).")
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} unreadable image(s) of {images.source}, e.g. {skipped[0][0]}: "
                      f"{skipped[0][1]}", stacklevel=2)
    kept = np.concatenate(index_parts)
    return FeatureSet(cls_blocks=np.concatenate(cls_parts), patch_mean=np.concatenate(patch_parts),
                      labels=np.asarray(images.labels, dtype=np.int64)[kept],
                      paths=[images.paths[i] for i in kept], classes=images.classes, skipped=skipped)


def extract_features(model: nn.Module, images: LabelledImages, *, transform=None, batch_size: int = 64,
                     num_workers: int = 0, n_blocks: int = N_LAST_BLOCKS, device: str | torch.device = "cpu",
                     cache_dir: str | os.PathLike | None = "default", progress: bool = True,
                     description: str = "features") -> FeatureSet:
    """Features of a labelled image set, from the cache when this exact model / data / transform was seen.

    `cache_dir="default"` uses `default_cache_dir()`; `None` disables caching.
    """
    transform = default_transform(model) if transform is None else transform
    if cache_dir is None:
        return compute_features(model, images, transform=transform, batch_size=batch_size,
                                num_workers=num_workers, n_blocks=n_blocks, device=device, progress=progress,
                                description=description)
    cache_dir = default_cache_dir() if cache_dir == "default" else Path(cache_dir).expanduser()
    key = cache_key(model, images, transform, n_blocks)
    entry = cache_dir / key
    if (entry / "manifest.json").is_file() and (cached := _load_cached(entry, images)) is not None:
        return cached
    with _entry_lock(entry):
        # written by the process we waited for (a damaged entry is removed and computed again)
        if (entry / "manifest.json").is_file() and (cached := _load_cached(entry, images)) is not None:
            return cached
        atomic.remove_stale_staging(entry)  # under the entry's lock: left by killed runs
        features = compute_features(model, images, transform=transform, batch_size=batch_size,
                                    num_workers=num_workers, n_blocks=n_blocks, device=device, progress=progress,
                                    description=description)
        _write_entry(entry, features, {"source": images.source, "transform": repr(transform),
                                       "n_blocks": n_blocks, "model_class": type(model).__name__,
                                       "classes": images.classes})
    return features
