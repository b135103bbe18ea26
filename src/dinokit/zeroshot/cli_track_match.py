"""`dinokit track` (label propagation through a video) and `dinokit match` (correspondences between two images).

Both check every input before writing anything, then write through `dinokit.output_folder`: a staging folder
beside OUT replaces OUT at the end, so a failure part-way (a frame that cannot be decoded, a ground-truth mask
with an unknown id) leaves OUT as it was, and a rerun never leaves an earlier run's frames or metrics.json beside
the new ones: nothing partial or stale that looks complete. OUT may be new, empty or an earlier output of the same
command (it has run.json / matches.json); other folders are refused rather than replaced."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.zeroshot.masks import read_id_mask

GIF_SIDE = 320  # the overlay GIF's long side: it holds every frame, so it is kept small
GIF_MS = 100
TRACK_MARKER = "run.json"  # every track output folder has it: such a folder is replaced by a rerun
MATCH_MARKER = "matches.json"


def register(subparsers) -> None:
    from dinokit.zeroshot.tracking import PRESETS, SHAPES, UPSAMPLES

    p = subparsers.add_parser("track", help="propagate a first-frame mask through a video (DINO / DINOv3 recipe)",
                              description="Carry the first frame's object ids through a video by patch-feature "
                                          "affinity (DINO v1's DAVIS script, or DINOv3's tracking notebook with "
                                          "--preset dinov3); writes OUT/<frame>.png masks, OUT/overlay.gif, "
                                          "OUT/run.json, and with --truth OUT/metrics.json (DAVIS J&F).")
    p.add_argument("frames", metavar="FRAMES_DIR|VIDEO", help="folder of frames (sorted by name) or a video file")
    p.add_argument("--mask", required=True, help="first frame's indexed PNG (0 background, 1..N objects)")
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, checkpoint file or preset")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="dino",
                   help="dino: v1 DAVIS script (480 px, square window, temperature 0.1); dinov3: v3 notebook "
                        "(960 px, circle window, temperature 0.2)")
    p.add_argument("--truth", default=None, help="folder of ground-truth masks named like the frames: writes "
                                                 "metrics.json with DAVIS J&F")
    p.add_argument("--short-side", type=int, default=None, help="resized short side (default: the preset's)")
    p.add_argument("--context", type=int, default=None, help="recent frames kept as context besides the first "
                                                             "(default 7)")
    p.add_argument("--radius", type=float, default=None, help="window radius in patches (default 12; inf: none)")
    p.add_argument("--shape", choices=SHAPES, default=None, help="window shape (default: the preset's)")
    p.add_argument("--topk", type=int, default=None, help="context patches each patch takes labels from "
                                                          "(default 5)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: the preset's)")
    p.add_argument("--upsample", choices=UPSAMPLES, default=None, help="patch labels to pixels (default: the "
                                                                       "preset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_track)

    p = subparsers.add_parser("match", help="dense / sparse correspondences between two images",
                              description="Nearest-neighbour matching of L2-normalised patch features (DINOv3's "
                                          "matching notebook); writes OUT/matches.json and OUT/matches.png.")
    p.add_argument("image_a", metavar="A", help="first image")
    p.add_argument("image_b", metavar="B", help="second image")
    p.add_argument("--model", "-m", required=True, help="model directory, hub id, checkpoint file or preset")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--points", default=None, help="JSON file of [x, y] points of A (pixels) to transfer to B")
    p.add_argument("--mutual", action="store_true", help="keep only mutual nearest neighbours (best buddies)")
    p.add_argument("--mask-a", default=None, help="foreground mask of A (alpha channel, or non-zero pixels)")
    p.add_argument("--mask-b", default=None, help="foreground mask of B")
    p.add_argument("--size", type=int, default=768, help="resized image height in pixels (rows = size // patch)")
    p.add_argument("--facet", choices=["tokens", "keys"], default="tokens",
                   help="final-normed output tokens (DINOv3's notebook) or the last block's attention keys (Amir "
                        "et al.'s dense descriptors)")
    p.add_argument("--stride", type=int, default=None,
                   help="overlapping patches this many pixels apart (a divisor of the patch size; Amir et al.'s "
                        "denser grid). Default: the patch size, no overlap")
    p.add_argument("--stratify", type=float, default=100.0, help="the picture's minimum distance between drawn "
                                                                 "matches, in A's pixels")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.set_defaults(func=_match)


# ----------------------------------------------------------------------------------------------- masks
def _palette(palette: list[int] | None) -> np.ndarray:
    from dinokit.dense.palette import voc_palette

    if not palette:
        return voc_palette()
    values = np.zeros(768, dtype=np.uint8)
    values[: len(palette)] = palette[:768]
    return values.reshape(256, 3)


def _indexed(ids: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    return image


def _overlay_thumbnail(frame: Image.Image, ids: np.ndarray, palette: np.ndarray) -> Image.Image:
    scale = min(1.0, GIF_SIDE / max(frame.size))
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    rgb = np.asarray(frame.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
    small = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize(size, Image.NEAREST))
    colours = palette[small].astype(np.float32)
    blend = np.where((small > 0)[..., None], 0.5 * rgb + 0.5 * colours, rgb)
    return Image.fromarray(blend.round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------- track
def _check_truth(truth_dir, names: list[str]) -> dict[str, Path]:
    from dinokit.data.images import display_path

    folder = Path(truth_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--truth {display_path(folder)} is not a folder of masks")
    found = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png"}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"--truth {display_path(folder)} has no mask for {len(missing)} of the {len(names)} "
                         f"frames (first: {missing[0]}.png): give one <frame>.png per frame")
    return {n: found[n] for n in names}


def _track(args) -> int:
    from dinokit import output_folder
    from dinokit.apps.embed import load, select_device
    from dinokit.atomic import write_text
    from dinokit.curate.progress import bars
    from dinokit.data.images import display_path
    from dinokit.zeroshot import davis, tracking
    from dinokit.zeroshot.video import open_frames

    settings = tracking.settings_for(args.preset, short_side=args.short_side, context=args.context,
                                     radius=args.radius, shape=args.shape, topk=args.topk,
                                     temperature=args.temperature, upsample=args.upsample)
    source = open_frames(args.frames)
    first_mask, palette = read_id_mask(args.mask, "--mask")
    width, height = source.size
    if first_mask.shape != (height, width):
        raise ValueError(f"the --mask {display_path(args.mask)} is {first_mask.shape[1]} x {first_mask.shape[0]} "
                         f"but the frames are {width} x {height}: give the first frame's mask at its size")
    truth = _check_truth(args.truth, source.names) if args.truth else None
    palette = _palette(palette)
    output = Path(args.output).expanduser()
    # refused before the model loads (and checked again under the lock)
    output_folder.check_replaceable(output, output_folder.has_file(TRACK_MARKER))

    device = select_device(args.device)
    model = load(args.model).to(device).eval()
    encoder = tracking.ModelEncoder(model)
    size = tracking.planned_size(height, width, settings, encoder.patch_size)
    scores = None
    with output_folder.staged_output(output, "dinokit track", output_folder.has_file(TRACK_MARKER)) as staging:
        thumbnails = []
        started = time.perf_counter()
        with bars(not args.quiet and len(source) > 1)(total=len(source), desc="track", unit="frame") as bar:
            frames = iter(source)
            kept: list[Image.Image] = []

            def remembered():  # the overlay needs each frame again: keep only the one in flight
                for frame in frames:
                    kept[:] = [frame]
                    yield frame

            masks = tracking.track(remembered(), tracking.mask_ids(first_mask), encoder, args.preset,
                                   **_overrides(settings, args.preset))
            for index, ids in enumerate(masks):
                name = source.names[index]
                _indexed(ids, palette).save(staging / f"{name}.png")
                thumbnails.append(_overlay_thumbnail(kept[0], ids, palette))
                if truth is not None:
                    true_ids, _ = read_id_mask(truth[name], "ground-truth mask")
                    if scores is None:
                        scores = davis.SequenceScores.from_first_truth(true_ids)
                    scores.add(ids, true_ids, name)
                bar.update(1)
        seconds = time.perf_counter() - started
        thumbnails[0].save(staging / "overlay.gif", save_all=True, append_images=thumbnails[1:], duration=GIF_MS,
                           loop=0)
        del thumbnails
        run = {"command": "track", "frames": display_path(source.path), "num_frames": len(source),
               "mask": display_path(args.mask), "model": str(args.model), "preset": args.preset,
               "settings": tracking.describe(settings), "frame_size": [width, height],
               "resized": [size[1], size[0]],
               "grid": list(tracking.grid_of(size, encoder.patch_size)), "patch_size": encoder.patch_size,
               "seconds": round(seconds, 3), "frames_per_second": round(len(source) / max(seconds, 1e-9), 3)}
        write_text(staging / "run.json", json.dumps(run, indent=2) + "\n")
        if scores is not None:
            metrics = davis.summarize({source.path.stem or "video": scores})
            write_text(staging / "metrics.json", json.dumps(davis.finite_or_none(metrics), indent=2) + "\n")
    message = f"wrote {len(source)} masks, overlay.gif and run.json to {display_path(output)}"
    if scores is not None:
        g = metrics["global"]
        message += f"; J&F {g['J&F-Mean']:.3f} (J {g['J-Mean']:.3f}, F {g['F-Mean']:.3f}) in metrics.json"
    print(message)
    return 0


def _overrides(settings, preset: str) -> dict:
    from dataclasses import asdict

    from dinokit.zeroshot.tracking import PRESETS

    base = asdict(PRESETS[preset])
    return {k: v for k, v in asdict(settings).items() if base[k] != v}


# ----------------------------------------------------------------------------------------------- match
def read_foreground(path, image_size: tuple[int, int], option: str) -> np.ndarray:
    """(H, W) float foreground in [0, 1]: the alpha channel / 255 where there is one, else non-zero pixels."""
    from dinokit.data.images import display_path

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                values = np.asarray(image.convert("RGBA"))[..., 3].astype(np.float32) / 255
            else:
                values = (np.asarray(image.convert("L")) > 0).astype(np.float32)
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {display_path(path)} does not exist") from None
    except Exception as exc:
        raise ValueError(f"cannot read {option} {display_path(path)} ({type(exc).__name__}: {exc})") from None
    if values.shape != (image_size[1], image_size[0]):
        raise ValueError(f"{option} {display_path(path)} is {values.shape[1]} x {values.shape[0]} but its image is "
                         f"{image_size[0]} x {image_size[1]}: give a mask of the image's size")
    return values


def read_points(path) -> list:
    from dinokit.data.images import display_path

    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--points {display_path(path)} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--points {display_path(path)} is not JSON ({exc}): give [[x, y], ...]") from None
    points = data.get("points") if isinstance(data, dict) else data
    if not isinstance(points, list) or not points:
        raise ValueError(f"--points {display_path(path)}: give a non-empty list [[x, y], ...] or {{\"points\": "
                         f"[[x, y], ...]}}")
    return points


def _match(args) -> int:
    from dinokit import output_folder
    from dinokit.apps.embed import load, select_device
    from dinokit.data.images import display_path, read_image
    from dinokit.zeroshot.matching import check_points, match, picture
    from dinokit.zeroshot.tracking import ModelEncoder

    image_a, image_b = read_image(args.image_a), read_image(args.image_b)
    mask_a = read_foreground(args.mask_a, image_a.size, "--mask-a") if args.mask_a else None
    mask_b = read_foreground(args.mask_b, image_b.size, "--mask-b") if args.mask_b else None
    points = check_points(read_points(args.points), image_a.size, f"--points {display_path(args.points)}") \
        if args.points else None
    output = Path(args.output).expanduser()
    # refused before the model loads (and checked again under the lock)
    output_folder.check_replaceable(output, output_folder.has_file(MATCH_MARKER))
    device = select_device(args.device)
    encoder = ModelEncoder(load(args.model).to(device).eval(), args.facet, args.stride)
    started = time.perf_counter()
    result = match(image_a, image_b, encoder, size=args.size, mutual=args.mutual, mask_a=mask_a, mask_b=mask_b,
                   points=points)
    seconds = time.perf_counter() - started
    xy_a, xy_b = result.pairs()
    record = {
        "image_a": display_path(args.image_a), "image_b": display_path(args.image_b), "model": str(args.model),
        "image_size_a": list(image_a.size), "image_size_b": list(image_b.size),
        "size": args.size, "mutual_only": args.mutual, "facet": args.facet, "patch_size": result.a.patch_size,
        "stride": result.a.step,
        "grid_a": list(result.a.grid), "grid_b": list(result.b.grid), "seconds": round(seconds, 3),
        "matches": [{"a": [round(float(x), 2) for x in pa], "b": [round(float(x), 2) for x in pb],
                     "cosine": round(float(c), 5), "mutual": bool(m)}
                    for pa, pb, c, m in zip(xy_a, xy_b, result.matches.cosine, result.matches.mutual)],
    }
    if points is not None:
        record["points"] = [{"a": [float(x) for x in pa], "b": [round(float(x), 2) for x in pb],
                             "cosine": round(float(c), 5)}
                            for pa, pb, c in zip(result.points_a, result.points_b, result.points_cosine)]
    drawing = picture(image_a, image_b, result, distance=args.stratify)
    with output_folder.staged_output(output, "dinokit match", output_folder.has_file(MATCH_MARKER)) as staging:
        drawing.save(staging / "matches.png", format="PNG")
        (staging / "matches.json").write_text(json.dumps(record, indent=1) + "\n")
    what = f"{len(result.matches)} matches" + (f" and {len(points)} points" if points is not None else "")
    print(f"wrote {what} to {display_path(output / 'matches.json')} and matches.png")
    return 0
