"""Dense data sets on disk: `DIR/images/<stem>.{jpg,jpeg,png,...}` with `DIR/masks/<stem>.png` (segmentation)
or `DIR/depth/<stem>.png` (depth), and the readers of those targets.

Images are read by `dinokit.processing.load_image` (EXIF orientation applied); targets are read here, because a
class-index mask must never go through an RGB conversion: palette ("P") PNGs give their indices, greyscale
("L", "I;16", "I") PNGs their values. Every problem is one ValueError naming the file and the fix, raised by
`check_*` before any feature is computed, so a bad data set never leaves a half-written output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dinokit.data.images import IMAGE_EXTENSIONS

IMAGE_SUFFIXES = IMAGE_EXTENSIONS  # the one list every command uses
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class DenseSample:
    stem: str
    image: Path
    target: Path | None  # None for prediction-only inputs


def list_images(path: str | os.PathLike) -> list[Path]:
    """An image file, or the images of a folder (sorted; a folder with an `images/` subfolder: those)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: pass an image file or a folder of images")
    folder = path / "images" if (path / "images").is_dir() else path
    # broken and looping links are kept (like `find_image_files`), so reading them reports them
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def list_pairs(root: str | os.PathLike, target_folder: str) -> list[DenseSample]:
    """The (image, target) pairs of `root`: every image in root/images needs root/<target_folder>/<stem>.png."""
    root = Path(root).expanduser()
    images_dir, targets_dir = root / "images", root / target_folder
    layout = f"expected {root}/images/<stem>.jpg|png with {root}/{target_folder}/<stem>.png"
    if not images_dir.is_dir():
        raise ValueError(f"{root} has no images/ folder: {layout}")
    if not targets_dir.is_dir():
        raise ValueError(f"{root} has no {target_folder}/ folder: {layout}")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{images_dir} is empty: {layout}")
    stems = [p.stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"{images_dir} has several images named {duplicates[0]!r} (e.g. .jpg and .png): keep one")
    samples = []
    for image in images:
        target = targets_dir / f"{image.stem}.png"
        if not target.is_file():
            raise ValueError(f"missing {target_folder[:-1] if target_folder.endswith('s') else target_folder} "
                             f"for {image}: expected {target}")
        samples.append(DenseSample(image.stem, image, target))
    return samples


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as `load_image` returns it (EXIF rotation applied), from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _SWAPS_SIDES:
                width, height = height, width
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path} ({type(exc).__name__}: {exc}): re-encode or remove it") from None
    return height, width


def _open_target(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read {path} ({type(exc).__name__}: {exc}): re-encode it as a PNG") from None


def read_mask(path: str | os.PathLike, binarize: bool = False, ignore_index: int = 255) -> np.ndarray:
    """A class-index mask (H, W) int64. Palette PNGs give their indices (the palette is only colours);
    greyscale PNGs their values; an RGB(A) PNG is accepted only when it is grey (R = G = B).
    binarize: every value that is not 0 or `ignore_index` becomes 1 (e.g. instance ids -> foreground)."""
    path = Path(path)
    with _open_target(path) as image:
        mode = image.mode
        if mode in ("RGB", "RGBA"):
            rgb = np.asarray(image.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ValueError(
                    f"{path} is an RGB colour mask without a palette: dinokit reads class indices. Save it as a "
                    f"palette (mode P) PNG whose indices are the classes, or a greyscale PNG of class indices "
                    f"(map each colour to its class index first)")
            mask = rgb[..., 0].astype(np.int64)
        elif mode in ("P", "L", "1", "I;16", "I;16B", "I;16L", "I"):
            mask = np.asarray(image).astype(np.int64)
        elif mode in ("LA", "PA"):
            mask = np.asarray(image.getchannel(0)).astype(np.int64)
        else:
            raise ValueError(f"{path} has image mode {mode}: a mask must be a palette or greyscale PNG of class "
                             f"indices")
    if binarize:
        mask = np.where((mask != 0) & (mask != ignore_index), 1, mask)
    return mask


def check_mask(mask: np.ndarray, path: Path, image: Path, num_classes: int | None, ignore_index: int) -> None:
    expected = image_size(image)
    if mask.shape != expected:
        raise ValueError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image {image} is "
                         f"{expected[1]}x{expected[0]} (width x height): masks must have their image's size")
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_index)])
        if bad.size:
            raise ValueError(f"{path} has class value(s) {bad[:5].tolist()} >= --num-classes {num_classes} that "
                             f"are not the ignore index {ignore_index}: raise --num-classes, set --ignore-index, "
                             f"or fix the mask")


def read_depth(path: str | os.PathLike, depth_scale: float) -> np.ndarray:
    """Depth in metres (H, W) float32 from a 16-bit (or 8-bit) greyscale PNG holding depth x depth_scale; 0 means
    no measurement."""
    path = Path(path)
    with _open_target(path) as image:
        if image.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
            raise ValueError(f"{path} has image mode {image.mode}: depth maps must be 16-bit greyscale PNGs "
                             f"(depth x --depth-scale)")
        values = np.asarray(image).astype(np.float32)
    return values / float(depth_scale)


def check_depth(depth: np.ndarray, path: Path, image: Path) -> None:
    expected = image_size(image)
    if depth.shape != expected:
        raise ValueError(f"{path} is {depth.shape[1]}x{depth.shape[0]} but its image {image} is "
                         f"{expected[1]}x{expected[0]} (width x height): depth maps must have their image's size")
