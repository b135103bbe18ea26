"""One call per protocol: model + train / val sets -> a JSON-ready report (model, data, settings, results, times).

    from dinokit.eval import evaluate
    report = evaluate("knn", "facebook/dinov2-small", "data/train", "data/val")

The model is anything `dinokit.load_model` accepts (a directory, a hub id, a Meta / timm checkpoint file, a preset
name such as "vits14" for random weights, or an in-memory dinokit model). The data are ImageFolder trees or file
lists (see `dinokit.eval.data`). Features come from `dinokit.eval.features` and are cached on disk.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import dinokit
from dinokit import atomic
from dinokit.eval.data import LabelledImages, load_splits
from dinokit.eval.features import FeatureSet, default_transform, extract_features
from dinokit.eval.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate
from dinokit.eval.linear import (
    LinearProbeConfig,
    linear_probe_augmented,
    linear_probe_features,
    train_transform,
)
from dinokit.eval.logreg import C_VALUES, HOLDOUT_FRACTION, LOGREG_TOL, logreg_evaluate, require_backend

PROTOCOLS = ("knn", "linear", "logreg")
SHOWN_SKIPPED = 10  # skipped files named in the printed table; the JSON report lists them all


def select_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_model(model: nn.Module, spec) -> dict:
    from dinokit.loading import preset_name

    text = None if isinstance(spec, nn.Module) else str(spec)
    preset = text is not None and preset_name(text) is not None
    if text is not None and Path(text).expanduser().exists():
        text = str(Path(text).expanduser().resolve())
    config = getattr(model, "config", None)
    return {"spec": text if text is not None else f"<in-memory {type(spec).__name__}>",
            "class": type(model).__name__,
            "random_weights": preset,
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": config.to_dict() if hasattr(config, "to_dict") else None}


def describe_data(images: LabelledImages, features: FeatureSet) -> dict:
    return {"source": images.source, "listed": len(images), **features.summary()}


def evaluate(
    protocol: str,
    model,
    train,
    val,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = "default",
    device: str | torch.device = "auto",
    transform=None,
    resize: int = 256,
    crop: int = 224,
    progress: bool = True,
    **options,
) -> dict:
    """Run `protocol` ("knn", "linear" or "logreg"); `options` go to the protocol:

    - knn: `ks`, `temperature`, `n_per_class`, `n_tries` (see `knn_evaluate`);
    - linear: `mode` ("fast" on cached features, or "reference" with augmented images through the backbone) and
      `config` (a `LinearProbeConfig`);
    - logreg: `c_values`, `holdout_fraction`, `max_iter`, `tol`, `backend` (see `logreg_evaluate`).
    `train` / `val` are ImageFolder directories, file lists or `LabelledImages`. Images go through `transform`,
    by default the eval transform (short side `resize`, centre crop `crop`) normalised as the model's inputs are.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    if protocol == "logreg":
        require_backend(options.get("backend", "auto"))  # before the features, which can take hours
    started = time.perf_counter()
    train_images, val_images = load_splits(train, val)
    spec = model
    model = dinokit.load_model(model)
    device = select_device(device)
    transform = default_transform(model, resize, crop) if transform is None else transform
    extract = dict(transform=transform, batch_size=batch_size, num_workers=num_workers, device=device,
                   cache_dir=cache_dir, progress=progress)

    feature_start = time.perf_counter()
    train_features = None
    if not (protocol == "linear" and options.get("mode") == "reference"):
        train_features = extract_features(model, train_images, description="train features", **extract)
    val_features = extract_features(model, val_images, description="val features", **extract)
    feature_seconds = time.perf_counter() - feature_start

    protocol_start = time.perf_counter()
    if protocol == "knn":
        settings = {"ks": list(options.pop("ks", KNN_KS)), "temperature": options.pop("temperature", KNN_TEMPERATURE),
                    "n_per_class": options.pop("n_per_class", None), "n_tries": options.pop("n_tries", 1),
                    "feature": "final-norm CLS, L2-normalised"}
        _no_leftovers(protocol, options)
        results = {"rows": knn_evaluate(train_features.final_cls, train_features.labels, val_features.final_cls,
                                        val_features.labels, **{k: v for k, v in settings.items() if k != "feature"})}
    elif protocol == "logreg":
        settings = {"c_values": list(options.pop("c_values", C_VALUES)),
                    "holdout_fraction": options.pop("holdout_fraction", HOLDOUT_FRACTION),
                    "max_iter": options.pop("max_iter", None), "tol": options.pop("tol", LOGREG_TOL),
                    "backend": options.pop("backend", "auto")}
        _no_leftovers(protocol, options)
        results = logreg_evaluate(train_features.final_cls, train_features.labels, val_features.final_cls,
                                  val_features.labels, progress=progress, **settings)
        settings["feature"] = "final-norm CLS (not normalised)"
    else:
        mode = options.pop("mode", "fast")
        config = options.pop("config", LinearProbeConfig())
        _no_leftovers(protocol, options)
        num_classes = len(train_images.classes)
        if mode == "fast":
            results = linear_probe_features(train_features.cls_blocks, train_features.patch_mean,
                                            train_features.labels, val_features.cls_blocks,
                                            val_features.patch_mean, val_features.labels, config,
                                            num_classes=num_classes, progress=progress)
        elif mode == "reference":
            from dinokit.eval.data import ImageDataset

            dataset = ImageDataset(train_images.paths, train_images.labels, train_transform(config, model))
            results = linear_probe_augmented(model, dataset, val_features.cls_blocks, val_features.patch_mean,
                                             val_features.labels, config, num_classes=num_classes,
                                             num_workers=num_workers, device=device, progress=progress)
        else:
            raise ValueError(f"Unknown linear-probe mode {mode!r}; use 'fast' or 'reference'.")
        settings = {"mode": mode, **config.to_dict()}
    protocol_seconds = time.perf_counter() - protocol_start

    data = {"val": describe_data(val_images, val_features)}
    if train_features is not None:
        data["train"] = describe_data(train_images, train_features)
    else:
        data["train"] = {"source": train_images.source, "listed": len(train_images),
                         "classes": len(train_images.classes),
                         "skipped_unreadable": results.get("train_skipped_unreadable", 0)}
    return {
        "protocol": protocol,
        "model": describe_model(model, spec),
        "data": data,
        "settings": {**settings, "transform": repr(transform), "feature_batch_size": batch_size,
                     "device": str(device)},
        "results": results,
        "wall_time_seconds": {"features": feature_seconds, "protocol": protocol_seconds,
                              "total": time.perf_counter() - started},
        "dinokit_version": dinokit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _no_leftovers(protocol: str, options: dict) -> None:
    if options:
        raise TypeError(f"Unknown option(s) for {protocol}: {', '.join(sorted(options))}.")


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write a report atomically (temporary file in the same folder, then rename)."""
    path = Path(path).expanduser()
    atomic.write_text(path, json.dumps(report, indent=2, default=str))
    return path


def format_table(report: dict) -> str:
    """A markdown table of the headline numbers of a report."""
    results, protocol = report["results"], report["protocol"]
    if protocol == "knn":
        lines = ["| train subset | k | top-1 | top-5 |", "|---|---:|---:|---:|"]
        for row in results["rows"]:
            subset = "all" if row["n_per_class"] is None else f"{row['n_per_class']} per class x {row['tries']}"
            top1, top5 = f"{row['top1']:.2f}", f"{row['top5']:.2f}"
            if row["tries"] > 1:
                top1, top5 = f"{top1} ± {row['top1_std']:.2f}", f"{top5} ± {row['top5_std']:.2f}"
            lines.append(f"| {subset} | {row['k']} | {top1} | {top5} |")
    elif protocol == "logreg":
        lines = ["| best C | hold-out top-1 | top-1 | top-5 |", "|---:|---:|---:|---:|",
                 f"| {results['best_C']:.3g} | {results['holdout_top1']:.2f} | {results['top1']:.2f} | "
                 f"{results['top5']:.2f} |"]
    else:
        lines = ["| mode | best head | top-1 | top-5 |", "|---|---|---:|---:|",
                 f"| {results['mode']} | {results['best_head']} | {results['top1']:.2f} | {results['top5']:.2f} |"]
    skipped = sum(part.get("skipped_unreadable", 0) for part in report["data"].values())
    times = report["wall_time_seconds"]
    lines.append("")
    lines.append(f"{report['model']['spec']} · train {report['data']['train']['listed']} / val "
                 f"{report['data']['val']['listed']} images · skipped unreadable: {skipped} · features "
                 f"{times['features']:.1f} s, {protocol} {times['protocol']:.1f} s")
    from dinokit.data.images import display_path

    for split, part in report["data"].items():  # name the skipped files on screen too, not only in the JSON
        files = part.get("skipped_files", [])
        lines += [f"skipped ({split}): {display_path(f['path'])}: {f['reason']}" for f in files[:SHOWN_SKIPPED]]
        if len(files) > SHOWN_SKIPPED:
            lines.append(f"... and {len(files) - SHOWN_SKIPPED} more {split} files (all in the --output report)")
    return "\n".join(lines)
