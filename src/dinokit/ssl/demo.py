"""The demo: a few CPU minutes of DINOv2 pretraining on real images, then what the model learned.

`run_demo(output_dir, data=None, minutes=3)`:
1. images: scikit-learn's handwritten digits (1,797 real 8x8 scans, upsampled to 32 px, written as an ImageFolder
   tree under `output_dir/digits`), or `data` (an ImageFolder tree <class>/<image> for k-NN, or any folder);
2. pretrains the `cpu_tiny_cifar` preset (a 4-block ViT, 4-px patches, 32-px crops) for `minutes`;
3. prints k-NN accuracy (k=20, T=0.07, teacher CLS; a class-stratified 2/3 - 1/3 split) of the result next to
   the same architecture at random init;
4. writes `output_dir/pca.png`: the first three principal components of the teacher's patch features as RGB,
   over 8 images (the DINOv2 paper's picture; dinokit.apps.pca).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.extras import optional_import
from dinokit.ssl.knn_monitor import cls_features, knn_accuracy, load_labelled_pixels
from dinokit.ssl.meta_arch import SSLMetaArch
from dinokit.ssl.train_config import load_train_config
from dinokit.ssl.trainer import Trainer, init_distributed

logger = logging.getLogger(__name__)

DEMO_PRESET = "cpu_tiny_cifar"
IMAGE_SIZE = 32


def write_digits(folder: Path, size: int = IMAGE_SIZE) -> Path:
    """scikit-learn's digits as an ImageFolder tree of `size`-px RGB PNGs (written once)."""
    datasets = optional_import("sklearn.datasets", purpose="the demo's digits (shipped with scikit-learn)")
    digits = datasets.load_digits()
    marker = folder / ".complete"
    if marker.exists():
        return folder
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image / 16.0 * 255).astype(np.uint8)  # values 0..16
        target = folder / str(label) / f"{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB").save(target)
    marker.touch()
    return folder


def _split(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-stratified 2/3 train, 1/3 test indices."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = (2 * len(members)) // 3
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.cat(train), torch.cat(test)


def _knn(backbone, pixels, labels, train_idx, test_idx) -> float:
    features = cls_features(backbone, pixels)
    return knn_accuracy(features[train_idx], labels[train_idx], features[test_idx], labels[test_idx], k=20)


def _pca_picture(backbone, pixels: torch.Tensor, path: Path, patch_size: int, display: int = 128) -> Path:
    from dinokit.apps.pca import render
    from dinokit.apps.store import atomic_write
    from dinokit.data.augmentations import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # Features at twice the training size (a 16x16 patch grid): position embeddings are interpolated.
    size = 2 * pixels.shape[-1]
    x = torch.nn.functional.interpolate(pixels.float() / 255, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        tokens = backbone.forward_features((x.clamp(0, 1) - mean) / std)["x_norm_patchtokens"]
    grid = size // patch_size
    features = [t.reshape(grid, grid, -1).numpy() for t in tokens]
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((display, display), Image.BICUBIC) for p in pixels]
    picture = render(images, features)
    atomic_write(path, lambda tmp: picture.image.save(tmp, format="PNG"))
    return path


def run_demo(output_dir="dinokit_demo", data=None, minutes: float = 3.0, threads: int | None = None,
             overrides: list[str] | None = None) -> dict:
    """Pretrain for `minutes`, then print and return k-NN accuracies (trained vs random init) and the picture path.
    `overrides`: extra `section.key=value` training settings."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    source = Path(data) if data is not None else write_digits(output_dir / "digits")
    cfg = load_train_config(DEMO_PRESET, ["train.num_workers=1", "train.saveckp_freq=100000", "train.log_freq=20",
                                          *(overrides or [])])
    # Schedule sized for about 50 images/s (two cores); the time budget stops the run in any case.
    iterations = max(40, int(minutes * 60 * 50 / cfg.train.batch_size_per_gpu))
    cfg.train.OFFICIAL_EPOCH_LENGTH = math.ceil(iterations / cfg.optim.epochs)

    try:
        pixels, labels, classes = load_labelled_pixels(source, IMAGE_SIZE)
    except ValueError:
        pixels, labels, classes = None, None, []  # not an ImageFolder tree: no k-NN, still train and draw
    torch.manual_seed(cfg.train.seed)
    random_backbone = SSLMetaArch(cfg).teacher.backbone

    run_dir = output_dir / "run"
    resume = (run_dir / "checkpoint.pth").exists()
    trainer = Trainer(cfg, source, run_dir, resume=resume, env=init_distributed("cpu"))
    last = trainer.run(max_minutes=minutes)
    teacher = trainer.arch.result_backbone()

    result = {"iterations": last.get("iteration"), "images_per_s": last.get("img_per_s"),
              "exported": str(run_dir / "teacher")}
    if pixels is not None and len(classes) > 1:
        train_idx, test_idx = _split(labels)
        result["knn_random_init"] = _knn(random_backbone, pixels, labels, train_idx, test_idx)
        result["knn_trained"] = _knn(teacher, pixels, labels, train_idx, test_idx)
        print(f"k-NN top-1 (k=20, {len(train_idx)} train / {len(test_idx)} test images, {len(classes)} classes): "
              f"random init {result['knn_random_init']:.1f}%  ->  after {minutes:g} min of DINOv2 "
              f"{result['knn_trained']:.1f}%")
    else:
        print(f"{source} is not an ImageFolder tree of several classes: k-NN skipped.")
        if pixels is None:
            from dinokit.data import list_image_files
            from dinokit.data.images import read_image

            paths = list_image_files(source)[:8]
            pixels = torch.stack([torch.from_numpy(np.array(
                read_image(p).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))).permute(2, 0, 1)
                for p in paths])
    chosen = torch.linspace(0, len(pixels) - 1, min(8, len(pixels))).long()
    result["pca_picture"] = str(_pca_picture(teacher, pixels[chosen], output_dir / "pca.png", cfg.student.patch_size))
    print(f"patch-feature PCA picture: {result['pca_picture']}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="dinokit demo: a few CPU minutes of DINOv2 pretraining")
    parser.add_argument("--output", default="dinokit_demo")
    parser.add_argument("--data", default=None)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.output, args.data, args.minutes, args.threads)
