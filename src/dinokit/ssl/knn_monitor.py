"""k-NN accuracy of a backbone during or after training (DINOv2's protocol on a labelled ImageFolder pair).

The images are decoded and resized once (`load_labelled_pixels`), so evaluating at several points of a run only
costs the forward passes. Features: final-norm CLS, L2-normalised inside `dinokit.eval.knn.knn_evaluate`
(softmax(sim / T) weighting, T = 0.07).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from dinokit.data.augmentations import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dinokit.data.images import read_image
from dinokit.eval.data import load_split
from dinokit.eval.knn import knn_evaluate


def load_labelled_pixels(source, image_size: int, max_images: int | None = None, seed: int = 0):
    """(uint8 images (N, 3, S, S), labels (N,), class names) of an ImageFolder tree or file list: short side
    resized to S (bicubic) and centre-cropped. `max_images` draws a class-stratified random subset."""
    split = load_split(source)
    labels = np.asarray(split.labels)
    indices = np.arange(len(labels))
    if max_images is not None and max_images < len(labels):
        rng = np.random.default_rng(seed)
        per_class = max(1, max_images // len(split.classes))
        indices = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                  for c in range(len(split.classes))])
        indices.sort()
    resize = transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size), transforms.PILToTensor()])
    pixels = torch.stack([resize(read_image(split.paths[i])) for i in indices])
    return pixels, torch.as_tensor(labels[indices]), split.classes


@torch.no_grad()
def cls_features(backbone, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Final-norm CLS features (N, D) float32 of uint8 images, ImageNet-normalised. `backbone`: a
    DinoVisionTransformer or a dinokit model with `forward_features`."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(pixels), batch_size):
        x = (pixels[start:start + batch_size].float() / 255 - mean) / std
        out.append(backbone.forward_features(x.to(device))["x_norm_clstoken"].float().cpu())
    backbone.train(was_training)
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Top-1 k-NN accuracy (percent)."""
    rows = knn_evaluate(train_features, train_labels, test_features, test_labels, ks=(k,), temperature=temperature)
    return float(rows[0]["top1"])


class KnnMonitor:
    """Holds decoded train/test images; `__call__(backbone)` returns top-1 k-NN accuracy."""

    def __init__(self, train_source, test_source, image_size: int, max_train: int | None = 10000,
                 max_test: int | None = None, k: int = 20):
        self.train_pixels, self.train_labels, _ = load_labelled_pixels(train_source, image_size, max_train)
        self.test_pixels, self.test_labels, _ = load_labelled_pixels(test_source, image_size, max_test)
        self.k = k

    def __call__(self, backbone) -> float:
        return knn_accuracy(cls_features(backbone, self.train_pixels), self.train_labels,
                            cls_features(backbone, self.test_pixels), self.test_labels, k=self.k)

    def raw_pixels(self) -> float:
        """The raw-pixel baseline: k-NN on the flattened, per-image-centred pixels."""
        def flat(p):
            x = p.flatten(1).float()
            return x - x.mean(1, keepdim=True)
        return knn_accuracy(flat(self.train_pixels), self.train_labels, flat(self.test_pixels), self.test_labels,
                            k=self.k)
