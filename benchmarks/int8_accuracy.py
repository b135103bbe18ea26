"""int8 accuracy on real images: CLS cosine to fp32 and the k-NN top-1 change, for each int8 backend.

    .venv/bin/python benchmarks/int8_accuracy.py                      # ViT-S/14, Imagenette val
    .venv/bin/python benchmarks/int8_accuracy.py --models vits14 vitb14 --per-class 100

The fp32 reference is dinokit's eager torch backend on the same weights (a random Meta-init model: no
pretrained weights can be downloaded here, so this measures what quantisation does to these weights, not to
Meta's). Cosine: mean and min over `--images` images spread over the folder. k-NN: `--per-class` images of
each class, alternately references and queries, k=10, cosine similarity (`dinokit.export.quantize.knn_delta`).
Speed is measured by benchmarks/inference.py (`--backends torch torch-int8 onnxruntime-int8`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette" / "val"


def backends_for(model, names: list[str]) -> dict:
    from dinokit.backends import get_backend

    backends = {}
    for name in names:
        if name == "torch-int8-per-tensor":
            backends[name] = get_backend(model, "torch-int8", per_channel=False)
        else:
            backends[name] = get_backend(model, name)
    return backends


def main() -> None:
    import dinokit
    from dinokit.backends import get_backend
    from dinokit.export.quantize import agreement, folder_images, knn_delta

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vits14"])
    parser.add_argument("--backends", nargs="+", default=["torch-int8", "onnxruntime-int8"],
                        help="int8 backends to check (also: torch-int8-per-tensor)")
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER), help="a labelled ImageFolder (class subfolders)")
    parser.add_argument("--images", type=int, default=256, help="images for the cosine")
    parser.add_argument("--per-class", type=int, default=100, help="images per class for the k-NN check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    folder = Path(args.folder).resolve()
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: pass --folder with a labelled image folder")
    pixels = folder_images(folder, count=args.images, size=224)
    rows = []
    for preset in args.models:
        torch.manual_seed(0)
        model = dinokit.load_model(preset).eval()
        fp32 = get_backend(model, "torch")
        for name, backend in backends_for(model, args.backends).items():
            started = time.perf_counter()
            agree = agreement(fp32, backend, pixels, source=f"{folder.parent.name}/{folder.name} images")
            knn = knn_delta(fp32, backend, folder, per_class=args.per_class)
            rows.append({"model": preset, "backend": name, "mean_cosine": agree.mean_cosine,
                         "min_cosine": agree.min_cosine, "images": agree.images, "fp32_top1": knn.fp32_top1,
                         "int8_top1": knn.int8_top1, "delta": knn.delta, "knn_queries": knn.test})
            print(f"[{preset} {name}] {agree.summary()}; {knn.summary()} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    print(f"\nint8 vs fp32 (dinokit torch) on {folder.parent.name}/{folder.name}, random-init weights\n")
    print("| model | backend | mean CLS cosine | min CLS cosine | k-NN top-1 fp32 | int8 | delta (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
              f"{r['fp32_top1']:.2f}% | {r['int8_top1']:.2f}% | {r['delta']:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
