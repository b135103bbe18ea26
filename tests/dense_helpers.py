"""Tiny dense data sets on disk (images/ + masks/ or depth/) and a tiny saved backbone, for the dense tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

import dinokit

from helpers import randomize_


def tiny_backbone(path, layers: int = 4):
    config = dinokit.Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, image_size=28,
                                  patch_size=14)
    model = randomize_(dinokit.Dinov2Model(config), seed=0).eval()
    model.save_pretrained(path)
    return path


def _image(rng, height, width, box):
    pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    top, left, bottom, right = box
    pixels[top:bottom, left:right] = (200, 40, 40) + rng.integers(0, 30, size=(bottom - top, right - left, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def seg_dataset(root, n: int = 4, seed: int = 0, size=(30, 44)):
    """n images with a red box = class 1, background 0, a stripe of ignore pixels (255); palette masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    height, width = size
    for i in range(n):
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        box = (top, left, top + height // 2, left + width // 2)
        _image(rng, height, width, box).save(root / "images" / f"img{i}.jpg", quality=95)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[box[0]:box[2], box[1]:box[3]] = 1
        mask[:, -2:] = 255
        image = Image.fromarray(mask, mode="P")
        image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
        image.save(root / "masks" / f"img{i}.png")
    return root


def depth_dataset(root, n: int = 4, seed: int = 0, size=(30, 44)):
    """n images with depth PNGs (uint16 millimetres): a near box (1 m) on a far background (3 m)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    height, width = size
    for i in range(n):
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        box = (top, left, top + height // 2, left + width // 2)
        _image(rng, height, width, box).save(root / "images" / f"img{i}.png")
        depth = np.full((height, width), 3000, dtype=np.uint16)
        depth[box[0]:box[2], box[1]:box[3]] = 1000
        depth[0, :] = 0  # no measurement
        Image.fromarray(depth).save(root / "depth" / f"img{i}.png")
    return root
