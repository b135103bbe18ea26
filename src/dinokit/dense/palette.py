"""Colours for class-index masks (PASCAL VOC's bit-interleaved colormap: 0 black, then distinct colours),
palette PNGs, overlays and a depth colour map."""

from __future__ import annotations

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def index_png(mask: np.ndarray) -> Image.Image:
    """A palette ("P") PNG image of a class-index mask: read back, its pixels are the indices."""
    if mask.max(initial=0) > 255:
        raise ValueError("palette PNGs hold at most 256 classes")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    return image


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each class's colour blended in (background, class 0, left as is)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = voc_palette()[np.clip(mask, 0, 255)].astype(np.float32)
    blend = np.where((mask > 0)[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(blend.round().astype(np.uint8))


# Matplotlib's "turbo" colour map, sampled at 9 points and interpolated linearly (a perceptual rainbow for depth).
_TURBO = np.array([[48, 18, 59], [70, 107, 227], [40, 187, 236], [49, 242, 153], [162, 252, 60],
                   [237, 208, 58], [251, 128, 34], [208, 47, 5], [122, 4, 3]], dtype=np.float32)


def colorize_depth(depth: np.ndarray) -> Image.Image:
    """Depth (H, W) -> RGB, near = blue, far = red, scaled to the map's own 2nd-98th percentile range."""
    finite = depth[np.isfinite(depth)]
    low, high = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    t = np.clip((depth - low) / max(high - low, 1e-12), 0, 1) * (len(_TURBO) - 1)
    i = np.minimum(t.astype(np.int64), len(_TURBO) - 2)
    f = (t - i)[..., None]
    return Image.fromarray(((1 - f) * _TURBO[i] + f * _TURBO[i + 1]).round().astype(np.uint8))
