"""AnomalyDINO on planted defects in Imagenette: image AUROC, pixel AUROC and AU-PRO at 1 / 4 / 16 shots.

Data (../shared/datasets/imagenette, 224 x 224): per class, the normal images are its first 16 `train` files
sorted (k shots = the first k, as AnomalyDINO's seed 0); the test set is its first 2·N `val` files sorted: the
first N as they are (normal), the other N each with one 48 x 48 square copied, at the same place, from a `val`
image of another class (the defect; its pixels are the ground-truth mask), placed uniformly at random (seed 0).

AnomalyDINO as `dinokit anomaly` runs it (no masking, no rotation) at --resolution 224 (the images' own size; the
paper's 448 would upsample them and cost 4x the tokens on this CPU). Feature sources:
- `vits14`: the ViT-S/14 architecture with RANDOM weights (the `vits14` preset, seed 0): no trained weights can
  be downloaded here, so this row tests the plumbing, not DINO;
- `raw pixels`: each 14 x 14 patch's 588 normalised pixel values (a toy model with the same interface);
- with `--trained MODEL`, `trained ...`: a `dinokit train` model with small patches (e.g. the CIFAR-10 micro ViT,
  patch 4) at resolution x patch / 14 (64 for patch 4), i.e. the same 16 x 16 grid of 14-pixel cells;
  `--only-trained` skips the other rows.

    OMP_NUM_THREADS=2 nice python benchmarks/zeroshot_anomaly.py --results benchmarks/results_zeroshot_anomaly.json
    python benchmarks/zeroshot_anomaly.py --trained RUN/teacher --only-trained \
        --results benchmarks/results_zeroshot_anomaly_trained.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402

from dinokit.data.images import read_image  # noqa: E402
from dinokit.zeroshot.anomaly import MemoryBank, patch_tokens, score_tokens  # noqa: E402
from dinokit.zeroshot.anomaly_metrics import au_pro, image_auroc, pixel_auroc  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette"
CLASSES = ("n03028079", "n03417042", "n03888257")  # church, garbage truck, parachute
SQUARE = 48
SHOTS = (1, 4, 16)


class RawPixelPatches(torch.nn.Module):
    """Patch tokens = each patch's normalised pixels, behind the model interface the zeroshot extractor reads."""

    def __init__(self, patch: int = 14):
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch, hidden_size=3 * patch * patch, num_register_tokens=0)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the extractor a device and dtype
        self.__dict__["vit_module"] = self

    def forward(self, pixel_values):
        p = self.config.patch_size
        patches = torch.nn.functional.unfold(pixel_values, p, stride=p).transpose(1, 2)
        return SimpleNamespace(last_hidden_state=torch.cat([patches.mean(1, keepdim=True), patches], 1) + self.anchor)


def files(data: Path, split: str, cls: str) -> list[Path]:
    return sorted((data / split / cls).glob("*.JPEG"))


def test_set(data: Path, cls: str, n: int, rng) -> tuple[list, list[np.ndarray]]:
    """2n test images (n normal, n with a planted square) and their masks."""
    own = files(data, "val", cls)[: 2 * n]
    others = [f for c in sorted(p.name for p in (data / "val").iterdir()) if c != cls for f in files(data, "val", c)]
    images, masks = [], []
    for i, path in enumerate(own):
        image = np.asarray(read_image(path)).copy()
        mask = np.zeros(image.shape[:2], bool)
        if i >= n:
            source = np.asarray(read_image(others[rng.integers(len(others))]).resize(image.shape[1::-1]))
            y = rng.integers(0, image.shape[0] - SQUARE + 1)
            x = rng.integers(0, image.shape[1] - SQUARE + 1)
            image[y:y + SQUARE, x:x + SQUARE] = source[y:y + SQUARE, x:x + SQUARE]
            mask[y:y + SQUARE, x:x + SQUARE] = True
        from PIL import Image

        images.append(Image.fromarray(image))
        masks.append(mask)
    return images, masks


def evaluate(net, normals, tests, masks, resolution: int) -> list[dict]:
    bank_tokens = [patch_tokens(net, image, resolution)[0] for image in normals]
    test_tokens = [patch_tokens(net, image, resolution) for image in tests]
    labels = [int(m.any()) for m in masks]
    rows = []
    for shots in SHOTS:
        bank = MemoryBank.build(np.concatenate(bank_tokens[:shots]), {"resolution": resolution})
        scored = [score_tokens(t, g, bank, (im.height, im.width)) for (t, g), im in zip(test_tokens, tests)]
        heats = [s.heat for s in scored]
        rows.append({"shots": shots, "image_auroc": image_auroc(labels, [s.score for s in scored]),
                     "pixel_auroc": pixel_auroc(masks, heats), "au_pro": au_pro(heats, masks)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-side", type=int, default=15, help="normal and defective test images per class")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--trained", default=None, help="a trained model (path) for the `trained` row")
    parser.add_argument("--only-trained", action="store_true", help="only the --trained row")
    args = parser.parse_args()
    if args.only_trained and not args.trained:
        parser.error("--only-trained needs --trained MODEL")

    from dinokit import load_model

    torch.manual_seed(0)
    models = {} if args.only_trained else {"vits14 (random)": (load_model("vits14").eval(), args.resolution),
                                           "raw pixels": (RawPixelPatches().eval(), args.resolution)}
    if args.trained:
        from cell_encoder import load_trained

        trained, trained_name = load_trained(args.trained)
        patch = trained.config.patch_size
        if args.resolution * patch % 14:
            parser.error(f"--resolution {args.resolution} is not whole 14-pixel cells")
        models[trained_name] = (trained, args.resolution * patch // 14)  # the same grid of 14-pixel cells
    load = os.getloadavg()
    start = time.perf_counter()
    per_class = []
    for cls in CLASSES:
        rng = np.random.default_rng(0)
        normals = [read_image(p) for p in files(args.data, "train", cls)[: max(SHOTS)]]
        tests, masks = test_set(args.data, cls, args.per_side, rng)
        for name, (net, resolution) in models.items():
            for row in evaluate(net, normals, tests, masks, resolution):
                per_class.append({"class": cls, "features": name, **row})
    seconds = time.perf_counter() - start

    rows = []
    for name in models:
        for shots in SHOTS:
            chosen = [r for r in per_class if r["features"] == name and r["shots"] == shots]
            rows.append({"features": name, "shots": shots,
                         **{k: float(np.mean([r[k] for r in chosen])) for k in ("image_auroc", "pixel_auroc", "au_pro")}})
    print(f"Imagenette planted {SQUARE}x{SQUARE} squares, classes {', '.join(CLASSES)}, {args.per_side} normal + "
          f"{args.per_side} defective test images each, resolution {args.resolution}; {cpu_description()}; "
          f"load average {load[0]:.2f} at start, {seconds:.0f} s")
    print("| features | shots | image AUROC | pixel AUROC | AU-PRO (FPR 0.3) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['shots']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
              f"{r['au_pro']:.3f} |")
    if args.results:
        args.results.write_text(json.dumps({
            "benchmark": "zeroshot_anomaly", "classes": CLASSES, "per_side": args.per_side, "square": SQUARE,
            "resolution": args.resolution,
            "note": "vits14 uses RANDOM weights (no trained weights here): plumbing, not DINO",
            "trained_model": args.trained,
            "machine": cpu_description(), "load_average_at_start": load, "seconds": seconds, "rows": rows,
            "per_class": per_class}, indent=2) + "\n")


if __name__ == "__main__":
    main()
