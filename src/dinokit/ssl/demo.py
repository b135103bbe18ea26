"""The demo: a few CPU minutes of DINOv2 pretraining on real images, then what the model learned.

`run_demo(output_dir, data=None, minutes=3.5)`:
1. images: scikit-learn's handwritten digits (1,797 real 8x8 scans, upsampled to 16 px, written as an ImageFolder
   tree under `output_dir/digits`) trained with the `cpu_demo_digits` preset, or `data` (an ImageFolder tree
   <class>/<image> for k-NN, or any folder) with `cpu_micro_cifar` at 32 px;
2. times a few steps to fit the schedules (warmup, cosine lr) into `minutes`, trains, prints the steps done;
3. prints k-NN accuracy (k=20, T=0.07, cosine; teacher final-norm CLS; a class-stratified 2/3 - 1/3 split) of
   the same architecture at random init, of the raw pixels (per-image-centred) and of the trained model;
4. writes `output_dir/neighbours.png` (one test digit per class and its 5 nearest train images under the trained
   model, random init and raw pixels) and `output_dir/pca.png` (the first three principal components of the
   teacher's patch features as RGB over 8 images, the DINOv2 paper's picture; dinokit.apps.pca).
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

DEMO_PRESET = "cpu_demo_digits"  # the digits: tiny data, a recipe found by measurement (its YAML says how)
DIGITS_SIZE = 16  # the 8x8 scans at 2x: one 4-px patch covers 2x2 original pixels
DATA_PRESET = "cpu_micro_cifar"  # --data: small photographs, evaluated at 32 px
DATA_SIZE = 32
KNN_K = 20
DIGITS_VERDICT = (
    "Where pixels still win: here, by a wide margin. The digits are 8x8 scans, centred and size-normalised, so\n"
    "two images of the same digit are already close pixel for pixel: a pixel-friendly dataset on which k-NN on\n"
    "raw pixels is very hard to beat. A few CPU minutes of self-supervised training of a tiny ViT from scratch\n"
    "recover only part of that; what the numbers show is the method learning (trained vs the same network at\n"
    "random init), not a better digit classifier than pixels. On photographs, where pixels are weak, the method\n"
    "does beat them: on CIFAR-10, 58.6 min of two CPU processes reached k-NN 50.8% against 48.0% for raw\n"
    "pixels (configs/cpu_micro_cifar.yaml).")


def write_digits(folder: Path, size: int = DIGITS_SIZE) -> Path:
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


def pixel_knn(pixels, labels, train_idx, test_idx, k: int = 20) -> float:
    """The raw-pixel baseline under the same protocol: k-NN on the flattened, per-image-centred pixels."""
    flat = _centred_pixels(pixels)
    return knn_accuracy(flat[train_idx], labels[train_idx], flat[test_idx], labels[test_idx], k=k)


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


def neighbour_rows(features: dict[str, torch.Tensor], labels, train_idx, test_idx, queries: torch.Tensor,
                   k: int = 5) -> dict[str, torch.Tensor]:
    """For each feature set, the indices (into the whole set) of the k nearest train images (cosine) of each query
    (indices into the whole set)."""
    rows = {}
    for name, f in features.items():
        f = torch.nn.functional.normalize(f.float(), dim=1)
        similarity = f[queries] @ f[train_idx].T
        rows[name] = train_idx[similarity.topk(k, dim=1).indices]
    return rows


def _neighbours_picture(pixels, labels, queries, rows: dict[str, torch.Tensor], path: Path, tile: int = 40) -> Path:
    """One row per query: the query, then for each feature set its nearest train images, framed green when the
    neighbour is the same digit and red when it is not, with the share of right neighbours under each panel."""
    from PIL import ImageDraw

    from dinokit.apps.store import atomic_write

    pad, gap, head, foot = 8, 20, 20, 18
    k = next(iter(rows.values())).shape[1]
    cell = tile + pad
    panel = k * cell
    width = pad + cell + gap + len(rows) * (panel + gap)
    height = head + len(queries) * cell + foot + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def put(index: int, x: int, y: int, frame: str | None) -> None:
        image = Image.fromarray(pixels[index].permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
        if frame is not None:
            draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], outline=frame, width=3)
        canvas.paste(image, (x, y))

    draw.text((pad, 4), "query", fill="black")
    for r, q in enumerate(queries.tolist()):
        put(q, pad, head + r * cell, None)
    for p, (name, neighbours) in enumerate(rows.items()):
        x0 = pad + cell + gap + p * (panel + gap)
        draw.text((x0, 4), f"{k} nearest train images: {name}", fill="black")
        right = 0
        for r, q in enumerate(queries.tolist()):
            for c, n in enumerate(neighbours[r].tolist()):
                same = bool(labels[n] == labels[q])
                right += same
                put(n, x0 + c * cell, head + r * cell, "#1a9641" if same else "#d7191c")
        draw.text((x0, head + len(queries) * cell + 2),
                  f"{100 * right / neighbours.numel():.0f} % the same digit as the query", fill="black")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def plan_iterations(cfg, dataset, minutes: float, steps: int = 3) -> tuple[int, float]:
    """(iterations the schedules should span, seconds per iteration): a few timed training steps (after one
    warm-up) on a throw-away copy of the model, so that warmup and cosine decay fit the budget on this machine
    under its current load. Planned 10% long: a run that the budget stops just ends before the lr is fully down."""
    import time

    from dinokit.ssl.loader import build_loader

    probe = load_train_config(cfg.to_dict())
    probe.optim.lr = 1e-4
    torch.manual_seed(probe.train.seed)
    arch = SSLMetaArch(probe)
    loader = iter(build_loader(probe, dataset))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss, _, _ = arch.forward_losses(next(loader), probe.teacher.teacher_temp)
        loss.backward()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2] * 1.15  # + optimizer step and EMA update
    return max(40, int(minutes * 60 / seconds * 1.1)), seconds


def run_demo(output_dir="dinokit_demo", data=None, minutes: float = 3.5, threads: int | None = 1,
             overrides: list[str] | None = None) -> dict:
    """Pretrain for `minutes`, then print and return k-NN accuracies (random init, raw pixels, trained) and the
    paths of the two pictures. `overrides`: extra `section.key=value` training settings. `threads`: torch threads
    of the training process (1 by default: on a loaded 2-core machine two threads were 2-10x slower per step,
    their OpenMP barriers waiting for a descheduled thread)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    preset = DEMO_PRESET if data is None else DATA_PRESET
    cfg = load_train_config(preset, ["train.saveckp_freq=100000", "train.log_freq=10", *(overrides or [])])
    image_size = DIGITS_SIZE if data is None else DATA_SIZE
    source = Path(data) if data is not None else write_digits(output_dir / "digits", image_size)

    try:
        pixels, labels, classes = load_labelled_pixels(source, image_size)
    except ValueError:
        pixels, labels, classes = None, None, []  # not an ImageFolder tree: no k-NN, still train and draw
    torch.manual_seed(cfg.train.seed)
    random_backbone = SSLMetaArch(cfg).teacher.backbone

    from dinokit.ssl.loader import build_dataset

    iterations, seconds = plan_iterations(cfg, build_dataset(cfg, source), minutes)
    cfg.train.OFFICIAL_EPOCH_LENGTH = math.ceil(iterations / cfg.optim.epochs)
    logger.info("%.2f s per step measured here now: schedules planned for %d steps in %g min", seconds,
                iterations, minutes)
    run_dir = output_dir / "run"
    resume = (run_dir / "checkpoint.pth").exists()
    trainer = Trainer(cfg, source, run_dir, resume=resume, env=init_distributed("cpu"))
    last = trainer.run(max_minutes=minutes)
    teacher = trainer.arch.result_backbone()
    steps = int(last.get("iteration") or 0)
    result = {"preset": preset, "iterations": steps, "iterations_planned": iterations,
              "train_seconds": last.get("elapsed_s"), "images_per_s": last.get("img_per_s"),
              "exported": str(run_dir / "teacher")}
    print(f"Trained {steps} steps of {cfg.train.batch_size_per_gpu} images ({steps * cfg.train.batch_size_per_gpu:,} "
          f"images, {(last.get('elapsed_s') or 0) / 60:.1f} min; preset {preset}, {iterations} steps planned).")
    if pixels is not None and len(classes) > 1:
        train_idx, test_idx = _split(labels)
        features = {"trained (DINOv2)": cls_features(teacher, pixels), "random init": cls_features(random_backbone, pixels)}

        def knn(f):
            return knn_accuracy(f[train_idx], labels[train_idx], f[test_idx], labels[test_idx], k=KNN_K)

        result["knn_random_init"] = knn(features["random init"])
        result["knn_raw_pixels"] = pixel_knn(pixels, labels, train_idx, test_idx, k=KNN_K)
        result["knn_trained"] = knn(features["trained (DINOv2)"])
        print(knn_table(result, len(train_idx), len(test_idx), len(classes), minutes, steps))
        if data is None:
            print(DIGITS_VERDICT)
        features["raw pixels"] = _centred_pixels(pixels)
        queries = _one_query_per_class(labels, test_idx)
        rows = neighbour_rows(features, labels, train_idx, test_idx, queries)
        result["neighbours_picture"] = str(_neighbours_picture(pixels, labels, queries, rows,
                                                               output_dir / "neighbours.png"))
    else:
        print(f"{source} is not an ImageFolder tree of several classes: k-NN skipped, and the neighbours picture "
              "with it.")
        if pixels is None:
            from dinokit.data import list_image_files
            from dinokit.data.images import read_image

            paths = list_image_files(source)[:8]
            pixels = torch.stack([torch.from_numpy(np.array(
                read_image(p).resize((image_size, image_size), Image.BICUBIC))).permute(2, 0, 1)
                for p in paths])
    chosen = torch.linspace(0, len(pixels) - 1, min(8, len(pixels))).long()
    result["pca_picture"] = str(_pca_picture(teacher, pixels[chosen], output_dir / "pca.png", cfg.student.patch_size))
    if "neighbours_picture" in result:
        print(f"nearest-neighbour picture (query, then its 5 nearest train images under the trained model, random "
              f"init and raw pixels; green = same digit): {result['neighbours_picture']}")
    print(f"patch-feature PCA picture: {result['pca_picture']}")
    return result


def _centred_pixels(pixels: torch.Tensor) -> torch.Tensor:
    flat = pixels.flatten(1).float()
    return flat - flat.mean(1, keepdim=True)


def _one_query_per_class(labels, test_idx) -> torch.Tensor:
    """The first test image of each class (at most 10 classes), in class order."""
    queries = []
    for c in labels.unique().tolist()[:10]:
        queries.append(test_idx[labels[test_idx] == c][0])
    return torch.stack(queries)


def knn_table(result: dict, n_train: int, n_test: int, n_classes: int, minutes: float, steps: int) -> str:
    trained = f"DINOv2, {minutes:g} min ({steps} steps)"
    width = max(len(trained), 12)
    return "\n".join([
        f"k-NN top-1 (k={KNN_K}, T=0.07, cosine; the same {n_train} train / {n_test} test images, {n_classes} "
        "classes):",
        f"  {'random init':>12}  {'raw pixels':>12}  {trained:>{width}}",
        f"  {result['knn_random_init']:>11.1f}%  {result['knn_raw_pixels']:>11.1f}%  "
        f"{result['knn_trained']:>{width - 1}.1f}%",
        f"  DINOv2 vs random init of the same network: {result['knn_trained'] - result['knn_random_init']:+.1f} "
        f"points; vs raw pixels: {result['knn_trained'] - result['knn_raw_pixels']:+.1f} points.",
    ])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="dinokit demo: a few CPU minutes of DINOv2 pretraining")
    parser.add_argument("--output", default="dinokit_demo")
    parser.add_argument("--data", default=None)
    parser.add_argument("--minutes", type=float, default=3.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a loaded machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.output, args.data, args.minutes, args.threads)
