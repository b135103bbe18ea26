"""`dinokit.zeroshot.tracking` on synthetic videos: a Penn-Fudan pedestrian (its own mask) moving over an Imagenette
background, scored with DAVIS J&F (`dinokit.zeroshot.davis`: first and last frames excluded).

Each video (--videos, default 5) has --frames (24) frames of 448 x 448: background = one Imagenette val photo
(224 px, upscaled bicubic); foreground = the largest pedestrian of one Penn-Fudan image, cut out with its mask,
scaled to 280 px tall, moved by a constant velocity drawn per video (2-6 px/frame right, -2..2 px/frame down, i.e.
1-3 and +-1 px at the photos' own 224 px) with a +-2 % scale oscillation.
Seeds are fixed; the ground truth is the pasted mask.

Rows (feature sources; the propagation rule is the same for all):
- `copy first mask`: no propagation, every frame predicted as frame 0 (the floor a tracker must beat);
- `oracle`: features = (fraction of the patch inside the true mask, 1 - it) + 1e-3 noise: the propagation's own
  ceiling at this patch size (what is left is quantisation to 14-px patches);
- `raw pixels`: a patch's centred, normalised 14 x 14 x 3 pixels (`tracking.PixelEncoder`);
- `random ViT-S/14`: the `vits14` preset, RANDOMLY INITIALISED (no trained weights can be downloaded here);
- with `--trained MODEL`, `trained ...`: a `dinokit train` model with small patches (e.g. the CIFAR-10 micro ViT,
  patch 4) on the same 14-pixel grid, each frame shrunk by patch / 14 first (`cell_encoder.py`);
  `--only-trained` skips the other rows (and the speed figure).
Columns: the `dino` (v1 script) and `dinov3` (v3 notebook) rules, both at short side 448 (the frames' size, 32 x 32
patches; the presets' own 480 / 960 would only upscale the frames), so they differ in window shape, temperature,
resize and upsampling only.

Speed: frames/s of `track` with the random ViT-S/14 at the `dino` preset's own resolution (a DAVIS-size 854 x 480
frame -> 832 x 480 -> 34 x 59 patches), the load average recorded beside it.

    nice -n 10 python benchmarks/zeroshot_track.py --results benchmarks/results_zeroshot_track.json
    python benchmarks/zeroshot_track.py --trained RUN/teacher --only-trained \
        --results benchmarks/results_zeroshot_track_trained.json
    python benchmarks/zeroshot_track.py --speed-only --results benchmarks/results_zeroshot_track_speed.json
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

from dinokit.zeroshot import davis
from dinokit.zeroshot.tracking import PixelEncoder, track

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
SIZE = 448
PATCH = 14


def pedestrian(index: int) -> tuple[Image.Image, np.ndarray]:
    """The largest pedestrian of the index-th Penn-Fudan image: RGB crop and its mask (bool), cut at its box."""
    stems = sorted(p.stem for p in (DATA / "pennfudan" / "images").glob("*.jpg"))
    stem = stems[index % len(stems)]
    image = Image.open(DATA / "pennfudan" / "images" / f"{stem}.jpg").convert("RGB")
    ids = np.asarray(Image.open(DATA / "pennfudan" / "masks" / f"{stem}.png"))
    areas = {int(i): int((ids == i).sum()) for i in np.unique(ids) if i}
    mask = ids == max(areas, key=areas.get)
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return image.crop(box), mask[box[1]:box[3], box[0]:box[2]]


def background(index: int) -> Image.Image:
    files = sorted((DATA / "imagenette" / "val").glob("*/*"))
    rng = np.random.default_rng(1000 + index)
    return Image.open(files[int(rng.integers(len(files)))]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)


def synthetic_video(index: int, frames: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    rng = np.random.default_rng(index)
    person, person_mask = pedestrian(7 * index)
    scene = background(index)
    base_h = 280
    base_w = max(8, round(person.width * base_h / person.height))
    vx, vy = rng.uniform(2, 6), rng.uniform(-2, 2)
    x0, y0 = 40.0, (SIZE - base_h) / 2
    images, masks = [], []
    for t in range(frames):
        scale = 1 + 0.02 * np.sin(2 * np.pi * t / frames)
        h, w = round(base_h * scale), round(base_w * scale)
        cut = person.resize((w, h), Image.BILINEAR)
        alpha = np.asarray(Image.fromarray(person_mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) > 127
        x, y = round(x0 + vx * t), round(y0 + vy * t)
        frame = np.array(scene)
        truth = np.zeros((SIZE, SIZE), dtype=np.uint8)
        ys, xs = slice(max(0, y), min(SIZE, y + h)), slice(max(0, x), min(SIZE, x + w))
        inside = alpha[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
        frame[ys, xs][inside] = np.asarray(cut)[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x][inside]
        truth[ys, xs][inside] = 1
        images.append(Image.fromarray(frame))
        masks.append(truth)
    return images, masks


class Oracle:
    """Features from the true masks, in frame order: (fraction of the patch inside the mask, 1 - it) + noise."""

    patch_size, mean, std = PATCH, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, masks: list[np.ndarray]):
        self.masks, self.calls = masks, 0
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        H, W = pixels.shape[-2:]
        mask = self.masks[self.calls]
        self.calls += 1
        resized = np.asarray(Image.fromarray(mask * 255).resize((W, H), Image.NEAREST)) > 127
        fraction = torch.from_numpy(resized.astype(np.float32)).reshape(H // PATCH, PATCH, W // PATCH, PATCH)
        fraction = fraction.mean(dim=(1, 3))
        features = torch.stack([fraction, 1 - fraction], dim=-1)
        return features + 1e-3 * torch.randn(features.shape, generator=self.generator)


def score(videos, predict) -> dict:
    sequences = {}
    for index, (frames, masks) in enumerate(videos):
        scores = davis.SequenceScores.from_first_truth(masks[0])
        for predicted, truth in zip(predict(frames, masks), masks):
            scores.add(predicted, truth)
        sequences[f"video{index}"] = scores
    return davis.summarize(sequences)["global"]


def speed(model, frames: int = 6) -> dict:
    """frames/s of track() at the dino preset's own resolution on a DAVIS-size clip (854 x 480)."""
    rng = np.random.default_rng(0)
    clip = [Image.fromarray(rng.integers(0, 256, (480, 854, 3), dtype=np.uint8)) for _ in range(frames)]
    mask = np.zeros((480, 854), dtype=np.uint8)
    mask[100:300, 200:400] = 1
    load = os.getloadavg()
    start = time.perf_counter()
    count = sum(1 for _ in track(clip, mask, model, "dino"))
    seconds = time.perf_counter() - start
    return {"frames": count, "seconds": round(seconds, 2), "frames_per_second": round(count / seconds, 3),
            "resolution": "854x480 -> 832x480 (34 x 59 patches of 14)", "load_average": [round(v, 2) for v in load]}


def picture(path: str, frames: int) -> None:
    from dinokit import load_model
    from dinokit.dense.palette import overlay

    torch.manual_seed(0)
    images, masks = synthetic_video(0, frames)
    predicted = list(track(images, masks[0], load_model("vits14").eval(), "dino", short_side=SIZE))
    picks = [0, frames // 3, 2 * frames // 3, frames - 1]
    half = SIZE // 2
    rows = [[overlay(images[t], masks[t]).resize((half, half)) for t in picks],
            [overlay(images[t], predicted[t]).resize((half, half)) for t in picks]]
    canvas = Image.new("RGB", (4 * half + 12, 2 * half + 4), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(tile, (c * (half + 4), r * (half + 4)))
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--results", default=None, help="JSON file to write")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the frames/s figure (no videos scored)")
    parser.add_argument("--trained", default=None, help="a trained model (path) for the `trained` row")
    parser.add_argument("--only-trained", action="store_true", help="only the --trained row")
    parser.add_argument("--picture", default=None, help="only draw video 0 tracked by the random ViT-S/14 (dino "
                                                        "rules) to this PNG: frames 0, 8, 16, 23, truth vs prediction")
    args = parser.parse_args()
    if args.only_trained and not args.trained:
        parser.error("--only-trained needs --trained MODEL")
    if args.picture:
        picture(args.picture, args.frames)
        return

    from machine import cpu_description

    from dinokit import load_model

    torch.manual_seed(0)
    vit = load_model("vits14").eval()
    if args.speed_only:
        result = {"machine": cpu_description(), "speed_random_vits14_dino_preset": speed(vit)}
        print(result)
        if args.results:
            Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
        return
    videos = [synthetic_video(i, args.frames) for i in range(args.videos)]
    rows = {
        "copy first mask": lambda preset: (lambda frames, masks: [masks[0]] * len(frames)),
        "oracle": lambda preset: (lambda frames, masks: track(frames, masks[0], Oracle(masks), preset,
                                                              short_side=SIZE)),
        "raw pixels": lambda preset: (lambda frames, masks: track(frames, masks[0], PixelEncoder(PATCH), preset,
                                                                  short_side=SIZE)),
        "random ViT-S/14": lambda preset: (lambda frames, masks: track(frames, masks[0], vit, preset,
                                                                       short_side=SIZE)),
    }
    if args.only_trained:
        rows = {}
    if args.trained:
        from cell_encoder import CellEncoder, load_trained

        trained, trained_name = load_trained(args.trained)
        cells = CellEncoder(trained, PATCH)
        rows[trained_name] = lambda preset: (lambda frames, masks: track(frames, masks[0], cells, preset,
                                                                         short_side=SIZE))
    load_before = os.getloadavg()
    table = {}
    for name, make in rows.items():
        table[name] = {}
        for preset in ("dino", "dinov3"):
            start = time.perf_counter()
            table[name][preset] = score(videos, make(preset))
            table[name][preset]["seconds"] = round(time.perf_counter() - start, 2)
            g = table[name][preset]
            print(f"{name:16s} {preset:7s} J&F {100 * g['J&F-Mean']:5.1f}  J {100 * g['J-Mean']:5.1f}  "
                  f"F {100 * g['F-Mean']:5.1f}  ({g['seconds']} s)", flush=True)
    result = {"machine": cpu_description(), "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "videos": args.videos,
              "frames": args.frames, "size": SIZE, "patch": PATCH, "table": table,
              "note": "random ViT-S/14 = vits14 preset, randomly initialised: no trained weights here",
              "trained_model": args.trained}
    if not args.no_speed and not args.only_trained:
        result["speed_random_vits14_dino_preset"] = speed(vit)
        print("speed:", result["speed_random_vits14_dino_preset"])
    print(result["machine"])
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
