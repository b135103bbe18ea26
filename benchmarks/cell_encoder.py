"""A model with small patches, read on another model's patch grid: the zeroshot benchmarks' trained-model rows.

The only trained weights on a CPU machine are `dinokit train`'s own small models, e.g. the CIFAR-10 micro ViT
(patch 4, trained on 32 px images) that `benchmarks/ssl_cifar10.py` exports. Run on a 224 px photo at its own
patch size it would see 4 px patches (56 x 56 tokens), a scale it never trained on and a grid that no other row
has. `CellEncoder` instead shrinks the image by patch / cell (14 -> 4) first, so each token covers one 14 px
cell of the original: the same grid as the ViT-S/14 and raw-pixel rows, objects at about the scale the model saw
in training, and 1/12 of the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinokit.zeroshot.tracking import ModelEncoder


def shrink_to_cells(pixels: torch.Tensor, cell: int, patch: int) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels, H and W whole `cell`s -> (B, 3, H / cell * patch, W / cell * patch), area
    averaged (antialiased bilinear), so patch i of the result is cell i of the input."""
    _, _, H, W = pixels.shape
    if H % cell or W % cell:
        raise ValueError(f"{H} x {W} pixels are not whole {cell}-pixel cells: pad or resize first")
    return F.interpolate(pixels, size=(H // cell * patch, W // cell * patch), mode="bilinear", antialias=True,
                         align_corners=False)


class CellEncoder:
    """An encoder (the `zeroshot.tracking` interface: `patch_size`, `mean`, `std`, called on (1, 3, H, W) pixels ->
    (h, w, D)) that runs `model` on the image shrunk so its patches are `cell`-pixel cells of the input."""

    def __init__(self, model, cell: int = 14, facet: str = "tokens"):
        self.inner = ModelEncoder(model, facet)
        self.patch_size, self.mean, self.std = cell, self.inner.mean, self.inner.std

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner(shrink_to_cells(pixels, self.patch_size, self.inner.patch_size))


def load_trained(path):
    """The trained model of a benchmark row (anything `dinokit.load_model` takes) in eval mode, and its row name."""
    from dinokit import load_model

    model = load_model(str(path)).eval()
    config = model.config
    return model, f"trained ViT {config.num_hidden_layers}x{config.hidden_size}/p{config.patch_size}"
