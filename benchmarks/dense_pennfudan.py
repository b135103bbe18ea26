"""Linear-head segmentation on Penn-Fudan (person / background): mIoU of frozen features, head training time,
predict throughput against transformers' Dinov2Model + the same head, and overlay pictures.

Split (fixed): the 170 stems sorted, the first 120 train, the last 50 val; masks are instance ids, `mask > 0` is
the person class (`--binarize`). Every row trains Meta's linear BNHead on features at short side --size (518) with
`dinokit segment train`'s defaults (`--recipe new`: AdamW 1e-3, poly, 100 epochs of 8-image batches with the plateau
stop, the loss on 7 x 7 label cells per patch) or its defaults before issue 26 (`--recipe old`: exactly
--iterations steps, the full-resolution loss):

- `random`: the `vits14` preset (ViT-S/14 architecture, random weights);
- `pretrained`: a backbone written by `dinokit train` (its `teacher/` export), e.g. on Imagenette;
- `pixels`: the same head on each 14 x 14 patch's normalised pixels (588 values; no backbone).

Throughput: images/s of backbone + head forward at 518 x 518 (batch --batch), dinokit's
`Dinov2ForSemanticSegmentation` against transformers' `Dinov2Model` (same weights) + the same head, timed in
alternation after a warm-up; the ViT-S/14 architecture of the `random` row.

    OMP_NUM_THREADS=1 dinokit train --config benchmarks/dense_imagenette_tiny14.yaml \
        --data ../shared/datasets/imagenette/train --output /work/runs/dense_pretrain/run     # 55 CPU minutes
    OMP_NUM_THREADS=1 python benchmarks/dense_pennfudan.py --pretrained /work/runs/dense_pretrain/run/teacher \
        --results /work/notes/dense_pennfudan.json --pictures docs/dense
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from machine import cpu_description

from dinokit.dense.features import RawPatchPixels, dense_processor
from dinokit.dense.seg_head import BNSegHead
from dinokit.dense.segment import (
    SegTrainConfig,
    evaluate_head,
    fit_head,
    load_segmenter,
    load_split,
    segment_image,
    split_features,
    train_segmentation,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "pennfudan"


def make_split(data: Path, work: Path, n_train: int = 120) -> tuple[Path, Path]:
    """train/ and val/ folders of symlinks: first `n_train` sorted stems train, the rest val."""
    stems = sorted(p.stem for p in (data / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    splits = {"train": stems[:n_train], "val": stems[n_train:]}
    for name, members in splits.items():
        for sub in ("images", "masks"):
            folder = work / name / sub
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for stem in members:
            image = next((data / "images").glob(stem + ".*"))
            (work / name / "images" / image.name).symlink_to(image.resolve())
            (work / name / "masks" / f"{stem}.png").symlink_to((data / "masks" / f"{stem}.png").resolve())
    return work / "train", work / "val"


def train_config(args) -> SegTrainConfig:
    """`--recipe new`: `segment train`'s defaults (epochs, plateau stop, 7-cell loss); `old`: the defaults before
    issue 26 (exactly --iterations steps, the full-resolution loss)."""
    if args.recipe == "new":
        return SegTrainConfig()
    return SegTrainConfig(iterations=args.iterations, loss_resolution=None)


def run_model(name, model, train, val, work, args) -> dict:
    config = train_config(args)
    started = time.perf_counter()
    metrics = train_segmentation(model, train, val, work / f"out_{name}", num_classes=2, head="linear",
                                 size=args.size, binarize=True, config=config, cache_dir=args.cache_dir,
                                 progress=not args.quiet)
    return {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"], "seconds": metrics["seconds"],
            "wall_s": round(time.perf_counter() - started, 1), "output": str(work / f"out_{name}")}


def run_pixels(train, val, args) -> dict:
    started = time.perf_counter()
    train_split = load_split(train, 2, 255, True)
    val_split = load_split(val, 2, 255, True)
    processor = dense_processor(args.size)
    extractor = RawPatchPixels(14)
    train_features = split_features(extractor, train_split, processor, args.cache_dir, not args.quiet)
    val_features = split_features(extractor, val_split, processor, args.cache_dir, not args.quiet)
    torch.manual_seed(0)
    head = BNSegHead(extractor.channels, 2)
    config = train_config(args)
    fit_head(head, train_features, train_split.masks, 14, 255, config)
    metrics = evaluate_head(head, val_features, val_split.masks, 14, 2, 255, ["background", "foreground"])
    return {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"], "wall_s": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def throughput(output_dir: str, batch: int, rounds: int) -> dict:
    """images/s of dinokit's segmenter vs transformers' Dinov2Model + the same BNSegHead at 518 x 518."""
    import tempfile

    import transformers

    segmenter, _ = load_segmenter(output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        segmenter.dinov2.save_pretrained(tmp)
        hf = transformers.Dinov2Model.from_pretrained(tmp, attn_implementation="sdpa").eval()
    head = segmenter.decode_head

    def hf_forward(x):
        tokens = hf(pixel_values=x).last_hidden_state[:, 1:]
        grid = (x.shape[-2] // 14, x.shape[-1] // 14)
        return head(tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid))

    x = torch.randn(batch, 3, 518, 518)
    diff = (segmenter(x).logits - hf_forward(x)).abs().max().item()
    times = {"dinokit": [], "transformers": []}
    for _ in range(rounds):
        for name, fn in (("dinokit", lambda: segmenter(x).logits), ("transformers", lambda: hf_forward(x))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: batch / min(v) for k, v in times.items()}
    median = {k: batch / sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch": batch, "rounds": rounds, "images_per_s_best": best, "images_per_s_median": median,
            "speedup_best": best["dinokit"] / best["transformers"],
            "speedup_median": median["dinokit"] / median["transformers"], "max_abs_logit_diff": diff,
            "threads": torch.get_num_threads()}


def pictures(output_dir: str, val: Path, target: Path, count: int, width: int = 240) -> list[str]:
    """Side by side: the ground-truth person mask | the prediction, overlaid in red on a val image."""
    from PIL import Image

    from dinokit.dense.data import read_mask
    from dinokit.dense.palette import overlay

    segmenter, processor = load_segmenter(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path in sorted((val / "images").iterdir())[:count]:
        mask, image = segment_image(segmenter, processor, image_path)
        truth = read_mask(val / "masks" / f"{image_path.stem}.png", binarize=True)
        panels = [overlay(image, truth), overlay(image, mask)]
        height = round(image.height * width / image.width)
        sheet = Image.new("RGB", (2 * width + 4, height), "white")
        for i, panel in enumerate(panels):
            sheet.paste(panel.resize((width, height), Image.Resampling.BILINEAR), (i * (width + 4), 0))
        path = target / f"pennfudan_{image_path.stem}.png"
        sheet.quantize(colors=128).save(path, optimize=True)  # small files for the README
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="pennfudan folder (images/, masks/)")
    parser.add_argument("--pretrained", help="backbone written by `dinokit train` (its teacher/ folder)")
    parser.add_argument("--rows", default="random,pretrained,pixels", help="which rows to run")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--recipe", choices=["old", "new"], default="new",
                        help="head training: today's defaults, or the former fixed --iterations full-resolution")
    parser.add_argument("--iterations", type=int, default=500,
                        help="--recipe old: head steps of 8 images (500 = 33 epochs of 120)")
    parser.add_argument("--work", default="/tmp/dense_pennfudan")
    parser.add_argument("--cache-dir", default="default")
    parser.add_argument("--results", default="dense_pennfudan.json")
    parser.add_argument("--pictures", help="write overlay PNGs of a few val images here (e.g. docs/dense)")
    parser.add_argument("--picture-count", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="throughput batch")
    parser.add_argument("--rounds", type=int, default=5, help="throughput timing rounds")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    data, work = Path(args.data), Path(args.work)
    if not (data / "images").is_dir():
        raise SystemExit(f"{data} not found: pass --data (the shared pennfudan folder)")
    train, val = make_split(data, work)
    rows = args.rows.split(",")
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    results.update({"size": args.size, "recipe": args.recipe, "split": "first 120 sorted stems train, last 50 val",
                    "iterations": args.iterations if args.recipe == "old" else None,
                    "machine": {"cpu": cpu_description(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                "python": platform.python_version(), "torch": torch.__version__}})
    if "random" in rows:
        results["random"] = run_model("random", "vits14", train, val, work, args)
    if "pretrained" in rows:
        if not args.pretrained:
            raise SystemExit("--pretrained is needed for the pretrained row")
        results["pretrained"] = run_model("pretrained", args.pretrained, train, val, work, args)
        results["pretrained"]["model"] = args.pretrained
    if "pixels" in rows:
        results["pixels"] = run_pixels(train, val, args)
    Path(args.results).write_text(json.dumps(results, indent=2))
    if not args.no_throughput and "random" in results:
        results["throughput"] = throughput(results["random"]["output"], args.batch, args.rounds)
    if args.pictures:
        best = max((r for r in ("pretrained", "random") if r in results), key=lambda r: results[r]["miou"])
        results["pictures"] = {"model": best, "files": pictures(results[best]["output"], val, Path(args.pictures),
                                                                args.picture_count)}
    Path(args.results).write_text(json.dumps(results, indent=2))
    print("| features | mIoU | IoU person | IoU background | pixel acc. |")
    print("|---|---|---|---|---|")
    for row in ("random", "pretrained", "pixels"):
        if row in results:
            r = results[row]
            print(f"| {row} | {100 * r['miou']:.1f} | {100 * r['per_class_iou']['foreground']:.1f} | "
                  f"{100 * r['per_class_iou']['background']:.1f} | {100 * r['pixel_accuracy']:.1f} |")
    if "throughput" in results:
        t = results["throughput"]
        print(f"throughput at 518: dinokit {t['images_per_s_median']['dinokit']:.2f} img/s, transformers "
              f"{t['images_per_s_median']['transformers']:.2f} img/s (x{t['speedup_median']:.2f})")


if __name__ == "__main__":
    main()
