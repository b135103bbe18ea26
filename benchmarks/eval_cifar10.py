"""Baselines of the evaluation protocols on CIFAR-10: a randomly initialised ViT-S/14 and raw pixels.

For each feature type: k-NN top-1 for k in {10, 20, 100, 200}, the linear probe (fast mode: cached features, no
augmentation, the reference's 52-head grid and 12,500 iterations of batch 128) and logistic regression (45 C
values, 10% hold-out), with the wall time of the feature extraction and of each protocol on this machine.

- ViT-S/14: `dinokit.load_model("vits14")` (random weights, seed 0); images go through the DINOv2 eval transform
  (32 px upsampled: resize 256 bicubic, centre crop 224). Features are cached (`--cache-dir`), so a re-run only
  repeats the protocols.
- Raw pixels: the 32x32x3 images, ImageNet-normalised, flattened (3072 values). k-NN and logistic regression use
  that vector; the linear grid has 13 heads (one input variant: there are no blocks or patch tokens).

    .venv/bin/python benchmarks/eval_cifar10.py --limit 500          # 500 train / 500 test images, minutes
    .venv/bin/python benchmarks/eval_cifar10.py --skip-vit           # raw pixels on all 60,000 images
    .venv/bin/python benchmarks/eval_cifar10.py --output bench.json  # everything (ViT-S features take hours)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dinokit
from dinokit.eval.data import LabelledImages, load_splits
from dinokit.eval.features import extract_features
from dinokit.eval.knn import KNN_KS, knn_evaluate
from dinokit.eval.linear import LinearProbeConfig, linear_probe_features
from dinokit.eval.logreg import logreg_evaluate

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def subset(images: LabelledImages, limit: int | None) -> LabelledImages:
    """The first limit / num_classes images of every class (all images without a limit)."""
    if not limit:
        return images
    per_class = max(1, limit // len(images.classes))
    keep, seen = [], {}
    for i, label in enumerate(images.labels):
        if seen.get(label, 0) < per_class:
            keep.append(i)
            seen[label] = seen.get(label, 0) + 1
    return LabelledImages([images.paths[i] for i in keep], [images.labels[i] for i in keep], images.classes,
                          images.source)


def raw_pixels(images: LabelledImages) -> np.ndarray:
    """(N, 3072) ImageNet-normalised pixels of the native 32x32 images."""
    rows = np.empty((len(images), 32 * 32 * 3), dtype=np.float32)
    for i, path in enumerate(images.paths):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 255.0
        rows[i] = ((pixels - MEAN) / STD).reshape(-1)
    return rows


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def run_protocols(train_cls_blocks, train_patch_mean, train_labels, test_cls_blocks, test_patch_mean, test_labels,
                  linear_config: LinearProbeConfig, logreg_max_iter: int | None, row: dict, save) -> dict:
    """k-NN and logistic regression on the last CLS (or pixel vector), the linear grid on everything.

    `row` is filled in protocol by protocol and `save()` called after each, so a long run keeps its results.
    """
    train_final, test_final = train_cls_blocks[:, -1], test_cls_blocks[:, -1]
    knn_rows, row["knn_seconds"] = timed(knn_evaluate, train_final, train_labels, test_final, test_labels,
                                         ks=KNN_KS)
    row["knn_top1"] = {str(r["k"]): r["top1"] for r in knn_rows}
    row["knn_top5"] = {str(r["k"]): r["top5"] for r in knn_rows}
    save()
    linear, row["linear_seconds"] = timed(linear_probe_features, train_cls_blocks, train_patch_mean, train_labels,
                                          test_cls_blocks, test_patch_mean, test_labels, linear_config,
                                          num_classes=10, progress=True)
    row.update(linear_top1=linear["top1"], linear_best_head=linear["best_head"],
               linear_iterations=linear_config.iterations)
    save()
    logreg, row["logreg_seconds"] = timed(logreg_evaluate, train_final, train_labels, test_final, test_labels,
                                          max_iter=logreg_max_iter, progress=True)
    row.update(logreg_top1=logreg["top1"], logreg_best_C=logreg["best_C"], logreg_max_iter=logreg["max_iter"],
               logreg_sweep_seconds=logreg["sweep_seconds"])
    save()
    return row


def markdown(report: dict) -> str:
    ks = [str(k) for k in KNN_KS]
    lines = [
        f"CIFAR-10 ({report['train_images']} train / {report['test_images']} test images), "
        f"{report['cpus']} CPU cores, torch {report['torch_threads']} threads",
        "",
        "| features | " + " | ".join(f"k-NN k={k}" for k in ks) + " | linear (fast) | logreg (C) |",
        "|---|" + "---:|" * (len(ks) + 2),
    ]
    times = ["", "| wall time (s) | features | k-NN | linear | logreg |", "|---|---:|---:|---:|---:|"]

    def number(row, key, spec=".2f"):
        return format(row[key], spec) if key in row else "-"

    for name, row in report["results"].items():
        knn = " | ".join(f"{row['knn_top1'][k]:.2f}" if "knn_top1" in row else "-" for k in ks)
        logreg = f"{number(row, 'logreg_top1')} ({number(row, 'logreg_best_C', '.2g')})"
        lines.append(f"| {name} | {knn} | {number(row, 'linear_top1')} | {logreg} |")
        times.append(f"| {name} | {number(row, 'feature_seconds', '.0f')} | {number(row, 'knn_seconds', '.1f')} | "
                     f"{number(row, 'linear_seconds', '.1f')} | {number(row, 'logreg_seconds', '.1f')} |")
    return "\n".join(lines + times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 in ImageFolder layout (train/, test/)")
    parser.add_argument("--limit", type=int, help="at most this many images per split (evenly per class)")
    parser.add_argument("--skip-vit", action="store_true", help="raw pixels only")
    parser.add_argument("--skip-pixels", action="store_true", help="ViT-S only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cache-dir", default="default", help="feature cache (default ~/.cache/dinokit/features)")
    parser.add_argument("--linear-iterations", type=int, default=12_500)
    parser.add_argument("--logreg-max-iter", type=int, help="lbfgs iterations per C (default 100, warm-started)")
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data")

    train, test = load_splits(args.data / "train", args.data / "test")
    train, test = subset(train, args.limit), subset(test, args.limit)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    report = {"dataset": str(args.data.resolve()), "train_images": len(train), "test_images": len(test),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": {}}

    def save() -> None:
        if args.output:
            temporary = args.output.with_name(args.output.name + ".tmp")
            temporary.write_text(json.dumps({**report, "table": markdown(report)}, indent=2))
            temporary.replace(args.output)

    if not args.skip_pixels:
        (train_x, test_x), seconds = timed(lambda: (raw_pixels(train), raw_pixels(test)))
        print(f"raw pixels: loaded {len(train_x)} + {len(test_x)} images in {seconds:.1f} s")
        row = report["results"]["raw pixels (32x32x3)"] = {"feature_seconds": seconds}
        config = LinearProbeConfig(n_last_blocks=(1,), avgpool=(False,), iterations=args.linear_iterations)
        run_protocols(train_x[:, None], None, train_labels, test_x[:, None], None, test_labels, config,
                      args.logreg_max_iter, row, save)
        print(markdown(report))

    if not args.skip_vit:
        torch.manual_seed(0)
        model = dinokit.load_model("vits14")
        extract = dict(batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=args.cache_dir)
        start = time.perf_counter()
        train_features = extract_features(model, train, description="ViT-S train", **extract)
        test_features = extract_features(model, test, description="ViT-S test", **extract)
        seconds = time.perf_counter() - start
        cached = train_features.from_cache and test_features.from_cache
        print(f"ViT-S/14 features: {seconds:.1f} s{' (from cache)' if cached else ''}, "
              f"{(len(train) + len(test)) / seconds:.1f} images/s")
        row = report["results"]["ViT-S/14 random init"] = {"feature_seconds": seconds,
                                                           "features_from_cache": cached}
        run_protocols(train_features.cls_blocks, train_features.patch_mean, train_features.labels,
                      test_features.cls_blocks, test_features.patch_mean, test_features.labels,
                      LinearProbeConfig(iterations=args.linear_iterations), args.logreg_max_iter, row, save)

    print(markdown(report))
    if args.output:
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
