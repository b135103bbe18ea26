"""Tiny training setups shared by the SSL trainer and distillation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A 2-block, 32-wide ViT on 16-px crops with 4-px patches (4x4 grid) and 64 prototypes: a step takes ~0.1 s.
TINY = [
    "student.arch=vit_tiny", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=4", "student.drop_path_rate=0.2",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "crops.global_crops_scale=[0.5,1.0]", "crops.local_crops_scale=[0.2,0.5]",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=8", "train.OFFICIAL_EPOCH_LENGTH=10", "train.num_workers=0",
    "train.log_freq=1", "train.saveckp_freq=1000",
    "optim.epochs=4", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
]


def make_images(folder: Path, n: int = 24, size: int = 24, seed: int = 0) -> Path:
    """`n` PNG images of coloured rectangles on noisy backgrounds (structure the model can learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        colour = rng.integers(80, 256, size=3)
        top, left = rng.integers(0, size // 2, size=2)
        h, w = rng.integers(size // 4, size // 2, size=2)
        image[top:top + h, left:left + w] = colour
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")
    return folder
