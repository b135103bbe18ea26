"""AnomalyDINO: few-shot anomaly detection with a memory bank of normal patch features.

Follows the reference code (dammsi/AnomalyDINO, `src/backbones.py`, `src/detection.py`, `src/utils.py`,
`src/post_eval.py`; Apache-2.0, read, not copied):

- Input: shorter side resized to `resolution` (448 by default; the paper also reports 672), bicubic with
  antialiasing, the long side `int(resolution · long / short)` (torchvision's rule), the model's normalisation,
  then cropped (top-left kept) to whole patches. Features: the final-normed output tokens of the last block.
- Memory bank: the L2-normalised patch features of the normal images (all their patches: the reference masks
  reference images only on request, `mask_reference`), optionally each image rotated by 0, 45, ..., 315 degrees
  (`rotate`; the reference's "agnostic" preprocessing turns it on for every object) with mirrored borders.
- Score of a patch: cosine distance 1 − max cosine similarity to the bank (faiss exact inner product; the
  reference's IndexFlatL2 on unit vectors / 2 is the same number). With `mask=True`, patches outside the
  foreground mask get distance 0.
- Foreground mask (`foreground_mask`): the first principal component of the image's patch features above
  `threshold` (10, for DINOv2 output tokens); if that keeps at most 35 % of the central crop (20 % border cut on
  each side) the component's sign is flipped; then a 3 x 3 dilation and a 3 x 3 closing (borders do not erode).
- Image score: the mean of the top 1 % of all patch distances (masked patches count as 0), the max when the
  grid has fewer than 100 patches.
- Heat map: the patch distances resized bilinearly (half-pixel centres) to the original image size, then a
  Gaussian of sigma 4 pixels (scipy's `gaussian_filter`).

A bank is a folder: `bank.faiss` (the index) and `manifest.json` (the model, its weights' SHA-256, patch size,
feature dimension, resolution and options). Scoring with another model than the bank's is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RESOLUTION = 448
MASK_THRESHOLD = 10.0
ROTATIONS = (0, 45, 90, 135, 180, 225, 270, 315)
HEAT_SIGMA = 4.0
BANK_FORMAT = "dinokit-anomaly-bank"
BANK_VERSION = 1
INDEX_FILE = "bank.faiss"
MANIFEST_FILE = "manifest.json"


# ------------------------------------------------------------------------------------------------ pixels in
def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H, W) with the shorter side `resolution` and the longer one int(resolution · long / short)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def prepare(image, model, resolution: int = RESOLUTION, name: str = "image"):
    """(1, 3, H, W) normalised pixels of a PIL image as the reference feeds them: resized, cropped (top-left kept)
    to whole patches. Over the patch-token bound (`dinokit.data.token_bound`) the image is instead resized
    straight to the bounded grid."""
    from PIL import Image

    from dinokit.data.token_bound import bounded_size
    from dinokit.zeroshot.features import normalize_image, patch_size_of

    p = patch_size_of(model)
    if resolution < p:
        raise ValueError(f"resolution {resolution} is smaller than one patch ({p} pixels): use at least {p}")
    h, w = resized_size(image.height, image.width, resolution)
    h, w = max(h, p), max(w, p)
    cropped = (h - h % p, w - w % p)
    bounded = bounded_size(*cropped, p, name=name)
    if bounded != cropped:
        return normalize_image(image.resize(bounded[::-1], Image.BICUBIC), model)
    return normalize_image(image.resize((w, h), Image.BICUBIC), model)[..., : cropped[0], : cropped[1]]


def rotated(image, angle: float):
    """`image` rotated counter-clockwise by `angle` degrees about its centre, same size, borders mirrored
    (the reference's cv2.warpAffine with BORDER_REFLECT_101 is scipy's 'mirror')."""
    from PIL import Image
    from scipy import ndimage

    if angle % 360 == 0:
        return image
    array = np.asarray(image, dtype=np.float32)
    out = np.stack([ndimage.rotate(array[..., c], angle, reshape=False, order=1, mode="mirror")
                    for c in range(array.shape[-1])], axis=-1)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def foreground_mask(features, grid: tuple[int, int], threshold: float = MASK_THRESHOLD, kernel: int = 3,
                    border: float = 0.2) -> np.ndarray:
    """(h, w) bool foreground of one image's (h*w, C) patch features (see the module notes)."""
    from scipy import ndimage

    x = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    component = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])  # sklearn's sign rule (largest entry positive)
    first = (centred @ component).reshape(grid)
    mask = first > threshold
    h, w = grid
    centre = mask[int(h * border):int(h * (1 - border)), int(w * border):int(w * (1 - border))]
    if centre.sum() <= centre.size * 0.35:
        mask = -first > threshold
    square = np.ones((kernel, kernel), bool)
    mask = ndimage.binary_dilation(mask, square)
    # A closing whose erosion treats the outside as foreground, as OpenCV's does (scipy's would erode edges).
    mask = ndimage.binary_erosion(ndimage.binary_dilation(mask, square), square, border_value=1)
    return mask


def image_score(distances: np.ndarray) -> float:
    """Mean of the top 1 % of patch distances (the max when 1 % is less than one patch)."""
    flat = np.sort(np.asarray(distances, dtype=np.float64).ravel())[::-1]
    top = int(flat.size * 0.01)
    return float(flat[0]) if top == 0 else float(flat[:top].mean())


def heat_map(distances: np.ndarray, image_size: tuple[int, int], sigma: float = HEAT_SIGMA) -> np.ndarray:
    """(H, W) float32: patch distances resized bilinearly to the image, smoothed by a Gaussian of `sigma` px."""
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    grid = torch.from_numpy(np.asarray(distances, dtype=np.float32))[None, None]
    up = F.interpolate(grid, size=tuple(image_size), mode="bilinear", align_corners=False)[0, 0].numpy()
    return gaussian_filter(up, sigma=sigma).astype(np.float32)


# ------------------------------------------------------------------------------------------------ the bank
@dataclass
class Scored:
    """One image's anomaly score, patch distances and heat map."""

    name: str
    score: float
    distances: np.ndarray  # (h, w) cosine distances (0 outside the foreground mask when masking)
    heat: np.ndarray  # (H, W) at the original image size
    foreground: np.ndarray | None  # (h, w) bool when masking


class MemoryBank:
    """Unit-length normal patch features in a faiss exact inner-product index, with how they were made."""

    def __init__(self, index, manifest: dict):
        self.index = index
        self.manifest = manifest

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, features: np.ndarray, manifest: dict) -> MemoryBank:
        import faiss

        features = _unit(features)
        if features.shape[0] == 0:
            raise ValueError("the memory bank would be empty: give at least one readable normal image")
        index = faiss.IndexFlatIP(features.shape[1])
        index.add(features)
        return cls(index, {**manifest, "dim": int(features.shape[1]), "num_vectors": int(index.ntotal)})

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N,) cosine distance of each feature row to its nearest bank vector."""
        features = _unit(features)
        if features.shape[1] != self.dim:
            raise ValueError(f"features of dimension {features.shape[1]} against a bank of dimension {self.dim}: "
                             f"score with the model the bank was built with")
        similarity, _ = self.index.search(features, 1)
        return 1.0 - similarity[:, 0].astype(np.float64)

    def save(self, folder) -> Path:
        import faiss

        from dinokit.atomic import atomic_write, write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / INDEX_FILE, lambda tmp: faiss.write_index(self.index, str(tmp)), option="--output")
        write_text(folder / MANIFEST_FILE, json.dumps(self.manifest, indent=2) + "\n")  # last: marks it complete
        return folder

    @classmethod
    def load(cls, folder) -> MemoryBank:
        import faiss

        folder = Path(folder)
        manifest_path, index_path = folder / MANIFEST_FILE, folder / INDEX_FILE
        if not manifest_path.is_file() or not index_path.is_file():
            raise FileNotFoundError(f"{folder} is not a memory bank (no {MANIFEST_FILE} and {INDEX_FILE}): build "
                                    f"one with `dinokit anomaly fit NORMAL_DIR --model M --output {folder}`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest_path} is not valid JSON ({exc}): rebuild the bank") from None
        if manifest.get("format") != BANK_FORMAT:
            raise ValueError(f"{manifest_path} is not a dinokit anomaly bank manifest: rebuild the bank")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise ValueError(f"{index_path} is not a readable faiss index ({str(exc).splitlines()[0]}): "
                             f"rebuild the bank") from None
        if index.ntotal == 0 or index.ntotal != manifest.get("num_vectors") or index.d != manifest.get("dim"):
            raise ValueError(f"{folder}: the index holds {index.ntotal} vectors of dimension {index.d} but the "
                             f"manifest says {manifest.get('num_vectors')} of {manifest.get('dim')}: the bank is "
                             f"empty or its files do not belong together; rebuild it")
        return cls(index, manifest)

    def check_model(self, model) -> None:
        """Refuse a model other than the bank's (architecture, feature size or weights)."""
        from dinokit.apps.embed import weights_sha256
        from dinokit.zeroshot.features import patch_size_of

        recorded = self.manifest.get("model") or {}
        dim, p = int(model.config.hidden_size), patch_size_of(model)
        if dim != self.dim or p != self.manifest.get("patch_size"):
            raise ValueError(f"this bank was built with {_who(recorded)} (features of dimension {self.dim}, patch "
                             f"{self.manifest.get('patch_size')}); the model given has dimension {dim}, patch {p}: "
                             f"score with the bank's model or rebuild the bank with `dinokit anomaly fit`")
        if recorded.get("weights_sha256") and weights_sha256(model) != recorded["weights_sha256"]:
            raise ValueError(f"this bank was built with {_who(recorded)}, whose weights differ from the model "
                             f"given: score with the bank's model or rebuild the bank with this one")


def _who(recorded: dict) -> str:
    spec = recorded.get("spec") or "an in-memory model"
    return f"{spec} ({recorded.get('class', '?')})"


def _unit(features) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32).reshape(-1, np.shape(features)[-1]))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------- fit and score
def patch_tokens(net, image, resolution: int = RESOLUTION, name: str = "image"):
    """((h*w, C) output tokens, (h, w)) of one PIL image as AnomalyDINO feeds it (`prepare`)."""
    import torch

    from dinokit.zeroshot.features import extract

    pixels = prepare(image, net, resolution, name)
    with torch.inference_mode():
        out = extract(net, pixels, "tokens", pad=False)
    features = out.features[0].numpy()
    return features.reshape(-1, features.shape[-1]), out.grid


def _model(model, device):
    from dinokit.apps.embed import load, select_device

    net = load(model).to(select_device(device)).eval()
    if not hasattr(net, "vit_module"):
        raise ValueError(f"AnomalyDINO reads a ViT's patch tokens; {type(net).__name__} is not a dinokit ViT")
    return net


def fit(normal_images, model, *, resolution: int = RESOLUTION, shots: int | None = None,
        mask_reference: bool = False, rotate: bool = False, threshold: float = MASK_THRESHOLD,
        device: str = "auto", progress: bool = False) -> MemoryBank:
    """A memory bank from normal images (paths or PIL images; the first `shots` of them when given)."""
    from dinokit.apps.embed import describe_model
    from dinokit.curate.progress import bars
    from dinokit.data.token_bound import check_short_side
    from dinokit.zeroshot.features import patch_size_of

    items = list(normal_images)
    if shots is not None:
        if shots < 1:
            raise ValueError(f"shots must be at least 1, got {shots}")
        if shots > len(items):
            logger.warning("%d shots asked for but only %d normal images given: using all of them", shots, len(items))
        items = items[:shots]
    if not items:
        raise ValueError("no normal images given: the memory bank needs at least one")
    net = _model(model, device)
    check_short_side(resolution, patch_size_of(net), "--resolution")
    angles = ROTATIONS if rotate else (0,)
    features, names = [], []
    with bars(progress)(total=len(items), desc="memory bank", unit="image") as bar:
        for item in items:
            image, name = _open(item)
            for angle in angles:
                tokens, grid = patch_tokens(net, rotated(image, angle), resolution, name)
                if mask_reference:
                    tokens = tokens[foreground_mask(tokens, grid, threshold).ravel()]
                features.append(tokens)
            names.append(name)
            bar.update(1)
    manifest = {"format": BANK_FORMAT, "version": BANK_VERSION, "model": describe_model(net, model),
                "patch_size": patch_size_of(net), "resolution": resolution, "rotate": rotate,
                "mask_reference": mask_reference, "threshold": threshold, "images": names}
    return MemoryBank.build(np.concatenate(features), manifest)


def score_image(image, bank: MemoryBank, net, *, mask: bool = False, threshold: float = MASK_THRESHOLD,
                name: str = "") -> Scored:
    """Score one PIL image against the bank with the (already checked) model."""
    tokens, grid = patch_tokens(net, image, int(bank.manifest["resolution"]), name or "image")
    return score_tokens(tokens, grid, bank, (image.height, image.width), mask=mask, threshold=threshold, name=name)


def score_tokens(tokens: np.ndarray, grid: tuple[int, int], bank: MemoryBank, image_size: tuple[int, int], *,
                 mask: bool = False, threshold: float = MASK_THRESHOLD, name: str = "") -> Scored:
    """Score one image's (h*w, C) patch tokens: distances, image score and the heat map at `image_size` (H, W)."""
    foreground = foreground_mask(tokens, grid, threshold) if mask else None
    distances = bank.distances(tokens).reshape(grid)
    if foreground is not None:
        distances = np.where(foreground, distances, 0.0)
    return Scored(name=name, score=image_score(distances), distances=distances,
                  heat=heat_map(distances, image_size), foreground=foreground)


def score(images, bank, model=None, *, mask: bool = False, threshold: float = MASK_THRESHOLD,
          device: str = "auto", progress: bool = False, on_error=None) -> list[Scored]:
    """Anomaly scores and heat maps of `images` (paths or PIL images) against `bank` (a MemoryBank or its
    folder). `model` defaults to the bank's; another model is refused. `on_error(item, exc)`: called for an
    unreadable image file, which is then skipped (by default the error is raised)."""
    from dinokit.curate.progress import bars
    from dinokit.data.images import ImageReadError

    bank = bank if isinstance(bank, MemoryBank) else MemoryBank.load(bank)
    if model is None:
        recorded = bank.manifest.get("model") or {}
        if not recorded.get("spec") or recorded.get("random_weights"):
            what = "randomly initialised weights" if recorded.get("random_weights") else "an in-memory model"
            raise ValueError(f"this bank was built with {what}, which cannot be loaded again: pass the model "
                             f"(model=... in Python), or build the bank from a saved model (a folder or hub id)")
        model = recorded["spec"]
    net = _model(model, device)
    bank.check_model(net)
    items = list(images)
    results = []
    with bars(progress)(total=len(items), desc="anomaly score", unit="image") as bar:
        for item in items:
            try:
                image, name = _open(item)
            except ImageReadError as exc:
                if on_error is None:
                    raise
                on_error(item, exc)
                bar.update(1)
                continue
            results.append(score_image(image, bank, net, mask=mask, threshold=threshold, name=name))
            bar.update(1)
    return results


def _open(item):
    from PIL import Image

    from dinokit.data.images import display_path, pil_to_rgb, read_image

    if isinstance(item, Image.Image):
        return pil_to_rgb(item), ""
    return read_image(item), display_path(item)
