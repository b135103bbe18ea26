"""Head-training recipes of `segment train` / `depth train` compared in one process on cached features: the
validation score and the head's CPU time of each (issue 26, item 5: which defaults keep the score at least CPU).

The case is benchmarks/dense_train_speed.py's (48 + 16 Penn-Fudan images at 240 x 180, the random 3-block
96-wide ViT/14, --size 518): `prepare` there writes it, the features are computed once (cached under --work)
and every recipe trains a fresh head on them exactly as `train_segmentation` / `train_depth` would (same seed
handling), so scores equal the CLI's; CPU seconds are the process's user + system time over the head training
only (no feature extraction), which depends on the load much less than wall time does.

    nice -n 19 python benchmarks/dense_train_sweep.py --task segment \
        --recipe "epochs=100" "epochs=100,patience=None" "iterations=600,loss_resolution=14"

A recipe is comma-separated SegTrainConfig / HeadTrainConfig fields (Python literals). Results are appended as
JSON lines to --results.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_train_speed import DEFAULT_DATA, prepare  # noqa: E402


def parse_recipe(text: str) -> dict:
    recipe = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        recipe[key.strip()] = ast.literal_eval(value.strip())
    return recipe


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def segment_setup(paths: dict, cache: Path):
    import dinokit
    from dinokit.dense.features import SegmentationFeatures, dense_processor
    from dinokit.dense.segment import load_split, split_features
    from dinokit.dense.segmentation import segmentation_class

    train, val = load_split(paths["train"], 2, 255, True), load_split(paths["val"], 2, 255, True)
    torch.manual_seed(0)
    backbone = dinokit.load_model(str(paths["model"]))
    config = backbone.config.copy(segmentation_head="linear", num_labels=2, semantic_loss_ignore_index=255)
    segmenter = segmentation_class(config)(config)
    segmenter.dinov2.load_meta_state_dict(backbone.vit.state_dict(), None)
    segmenter.eval()
    processor = dense_processor(518, backbone)
    extractor = SegmentationFeatures(segmenter)
    features = [split_features(extractor, s, processor, cache, False) for s in (train, val)]
    return train, val, features, extractor.patch_size, segmenter.feature_channels


def run_segment(setup, recipe: dict) -> dict:
    from dinokit.dense.seg_head import BNSegHead
    from dinokit.dense.segment import SegTrainConfig, evaluate_head, fit_head

    train, val, (train_f, val_f), patch, channels = setup
    config = SegTrainConfig(**recipe)
    torch.manual_seed(config.seed)
    head = BNSegHead(channels, 2)
    cpu, wall = cpu_seconds(), time.perf_counter()
    log = fit_head(head, train_f, train.masks, patch, 255, config)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    metrics = evaluate_head(head, val_f, val.masks, patch, 2, 255, ["background", "foreground"])
    return {"miou": round(100 * metrics["miou"], 2),
            "iou": [round(100 * v, 2) for v in metrics["per_class_iou"].values()],
            "steps": log.steps, "stop": log.stop_reason, "last_epoch_loss": log.epoch_losses[-1:] or None,
            "lr": config.lr, "head_cpu_s": round(cpu, 1), "head_wall_s": round(wall, 1)}


def depth_setup(paths: dict, cache: Path):
    import dinokit
    from dinokit.dense.depth import DepthConfig, Dinov2ForDepthEstimation
    from dinokit.dense.depth_train import load_depth_split
    from dinokit.dense.features import DepthFeatures, dense_processor, extract

    splits = [load_depth_split(paths[name], 1000.0) for name in ("train", "val")]
    torch.manual_seed(0)
    backbone = dinokit.load_model(str(paths["model"]))
    depther = Dinov2ForDepthEstimation(DepthConfig.linear(backbone.config, 4, 0.001, 20.0))
    depther.backbone.load_meta_state_dict(backbone.vit.state_dict(), None)
    depther.eval()
    processor = dense_processor(518, backbone)
    extractor = DepthFeatures(depther)
    features = [extract(extractor, [s.image for s in samples], [s.stem for s in samples], processor,
                        cache_dir=cache, progress=False) for samples, _ in splits]
    return splits, features, extractor.patch_size, backbone.config.hidden_size


def run_depth(setup, recipe: dict) -> dict:
    from dinokit.dense.depth_train import DepthTrainConfig, evaluate_depth_head, fit_depth_head
    from dinokit.dense.linear_depth import LinearDepthHead

    ((_, train_d), (_, val_d)), (train_f, val_f), patch, hidden = setup
    config = DepthTrainConfig(**recipe)
    torch.manual_seed(config.seed)
    head = LinearDepthHead(hidden, 4, 0.001, 20.0)
    cpu, wall = cpu_seconds(), time.perf_counter()
    log = fit_depth_head(head, train_f, train_d, patch, config)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    metrics = evaluate_depth_head(head, val_f, val_d, patch)
    return {**{k: round(metrics[k], 4) for k in ("rmse", "abs_rel", "a1")},
            "steps": log.steps, "stop": log.stop_reason, "last_epoch_loss": log.epoch_losses[-1:] or None,
            "lr": config.lr, "head_cpu_s": round(cpu, 1), "head_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["segment", "depth"], default="segment")
    parser.add_argument("--recipe", nargs="+", required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--work", default="/tmp/dense_train_speed")
    parser.add_argument("--results", default="/tmp/dense_train_sweep.jsonl")
    args = parser.parse_args()
    paths = prepare(Path(args.data), Path(args.work))
    cache = Path(args.work) / "feature_cache"
    setup = (segment_setup if args.task == "segment" else depth_setup)(paths, cache)
    runner = run_segment if args.task == "segment" else run_depth
    for text in args.recipe:
        load = os.getloadavg()
        record = {"task": args.task, "recipe": text, **runner(setup, parse_recipe(text)),
                  "load": [round(x, 2) for x in load], "threads": torch.get_num_threads()}
        print(json.dumps(record), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
