"""Single-object discovery on Penn-Fudan: CorLoc and mask IoU of LOST and TokenCut per feature source.

Data: ../shared/datasets/pennfudan, the 170 stems sorted, the last 50 (the val split of the dense benchmark).
Ground truth: one box per pedestrian id, [min_x, min_y, max_x + 1, max_y + 1]; CorLoc = % of images whose box has
IoU >= 0.5 with any pedestrian box; mask IoU = the object's pixel mask against `mask > 0`. Images at their own
size (LOST/TokenCut do not resize), zero-padded to whole 14-pixel patches. Feature sources, each on that grid:

- `vits14 keys` / `vits14 tokens`: the ViT-S/14 architecture with RANDOM weights (the `vits14` preset, seed 0):
  no trained weights can be downloaded here, so these rows test the plumbing, not DINO;
- `raw pixels`: each patch's 588 normalised pixel values;
- `oracle`: +u on patches that are mostly person, -u elsewhere (u a fixed unit vector in 8 dimensions), plus
  N(0, 0.1²) noise: what the algorithms reach with features that separate the object perfectly;
- `whole image`: the box of the whole image and an all-ones mask (no features);
- with `--trained MODEL`, `trained ... keys` / `tokens`: a `dinokit train` model with small patches (e.g. the
  CIFAR-10 micro ViT, patch 4) on the same 14-pixel grid: the padded image shrunk by patch / 14 first
  (`cell_encoder.py`); `--only-trained` skips the other rows.

    OMP_NUM_THREADS=2 nice python benchmarks/zeroshot_discover.py --results benchmarks/results_zeroshot_discover.json
    python benchmarks/zeroshot_discover.py --trained RUN/teacher --only-trained \
        --results benchmarks/results_zeroshot_discover_trained.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cell_encoder import CellEncoder, load_trained  # noqa: E402
from machine import cpu_description  # noqa: E402

from dinokit.data.images import read_image  # noqa: E402
from dinokit.zeroshot.corloc import best_iou, mask_boxes, mask_iou  # noqa: E402
from dinokit.zeroshot.discovery import Discovery, pixel_box, run_method  # noqa: E402
from dinokit.zeroshot.features import extract, normalize_image, pad_to_multiple  # noqa: E402
from dinokit.zeroshot.masks import read_id_mask  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "pennfudan"
PATCH = 14


def val_stems(data: Path, count: int) -> list[str]:
    stems = sorted(p.stem for p in (data / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    return stems[-count:]


def raw_pixels(pixels: torch.Tensor) -> np.ndarray:
    """(h, w, 588) normalised pixels of each patch of (1, 3, H, W) pixels, zero-padded to whole patches."""
    from dinokit.zeroshot.features import pad_to_multiple

    x = pad_to_multiple(pixels, PATCH)[0]
    c, H, W = x.shape
    return x.reshape(c, H // PATCH, PATCH, W // PATCH, PATCH).permute(1, 3, 0, 2, 4).reshape(
        H // PATCH, W // PATCH, -1).numpy()


def oracle(person: np.ndarray, rng) -> np.ndarray:
    """(h, w, 8): +u where a patch is mostly person, -u elsewhere, plus noise (padding counts as background)."""
    H, W = person.shape
    padded = np.zeros((-(-H // PATCH) * PATCH, -(-W // PATCH) * PATCH))
    padded[:H, :W] = person
    h, w = padded.shape[0] // PATCH, padded.shape[1] // PATCH
    fraction = padded.reshape(h, PATCH, w, PATCH).mean(axis=(1, 3))
    u = np.ones(8) / np.sqrt(8)
    sign = np.where(fraction > 0.5, 1.0, -1.0)
    return sign[..., None] * u + 0.1 * rng.normal(size=(h, w, 8))


def score(found, size, truth_boxes, person) -> tuple[float, float]:
    d = Discovery(box=pixel_box(found, PATCH, size, size), seed=found.seed, mask=found.mask, score=found.score,
                  patch_size=PATCH, image_size=size, model_size=size)
    return best_iou(d.box, truth_boxes), mask_iou(d.pixel_mask(), person)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--trained", default=None, help="a trained model (path) for the `trained` rows")
    parser.add_argument("--only-trained", action="store_true", help="only the --trained rows")
    args = parser.parse_args()
    if args.only_trained and not args.trained:
        parser.error("--only-trained needs --trained MODEL")

    from dinokit import load_model

    torch.manual_seed(0)
    model = load_model("vits14").eval()
    rng = np.random.default_rng(0)
    sources = [] if args.only_trained else ["vits14 keys", "vits14 tokens", "raw pixels", "oracle"]
    if args.trained:
        trained, trained_name = load_trained(args.trained)
        trained_facets = {f"{trained_name} {facet}": CellEncoder(trained, PATCH, facet) for facet in ("keys", "tokens")}
        sources += list(trained_facets)
    ious = {(s, m): [] for s in sources for m in ("lost", "tokencut")}
    whole = []
    load = os.getloadavg()
    start = time.perf_counter()
    stems = val_stems(args.data, args.images)
    for stem in stems:
        image = read_image(next((args.data / "images").glob(stem + ".*")))
        ids, _ = read_id_mask(args.data / "masks" / f"{stem}.png", "Penn-Fudan mask", max_id=None)
        truth, person = mask_boxes(ids), ids > 0
        size = (image.height, image.width)
        pixels = normalize_image(image, model)
        features = {}
        if not args.only_trained:
            features = {"vits14 keys": extract(model, pixels, "keys").features[0].numpy(),
                        "vits14 tokens": extract(model, pixels, "tokens").features[0].numpy(),
                        "raw pixels": raw_pixels(pixels), "oracle": oracle(person, rng)}
        if args.trained:
            padded = pad_to_multiple(normalize_image(image, trained), PATCH)
            features.update({name: encoder(padded).numpy() for name, encoder in trained_facets.items()})
        for source, f in features.items():
            for method in ("lost", "tokencut"):
                ious[source, method].append(score(run_method(f, method), size, truth, person))
        whole.append((best_iou((0, 0, size[1], size[0]), truth), mask_iou(np.ones_like(person), person)))
    seconds = time.perf_counter() - start

    rows = []
    for (source, method), values in ious.items():
        box, mask = np.array(values).T
        rows.append({"features": source, "method": method, "corloc": 100 * float((box >= 0.5).mean()),
                     "mean_box_iou": float(box.mean()), "mean_mask_iou": float(mask.mean())})
    box, mask = np.array(whole).T
    rows.append({"features": "whole image", "method": "-", "corloc": 100 * float((box >= 0.5).mean()),
                 "mean_box_iou": float(box.mean()), "mean_mask_iou": float(mask.mean())})
    print(f"Penn-Fudan val, {len(stems)} images ({stems[0]} .. {stems[-1]}); {cpu_description()}; "
          f"load average {load[0]:.2f} at start, {seconds:.0f} s")
    print("| features | method | CorLoc | mean box IoU | mean mask IoU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['method']} | {r['corloc']:.1f} | {r['mean_box_iou']:.3f} | "
              f"{r['mean_mask_iou']:.3f} |")
    if args.results:
        args.results.write_text(json.dumps({
            "benchmark": "zeroshot_discover", "data": "pennfudan val (last 50 sorted stems)", "images": len(stems),
            "note": "vits14 rows use RANDOM weights (no trained weights here): plumbing, not DINO",
            "trained_model": args.trained,
            "machine": cpu_description(), "load_average_at_start": load, "seconds": seconds, "rows": rows},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
