"""`dinokit discover` and `dinokit anomaly fit|score`: thin commands over dinokit.zeroshot.discovery / anomaly.

Outputs are written into a staging folder beside OUT that replaces OUT at the end, so OUT is the previous
complete result or the new one, never a half. An image that cannot be read is skipped, logged and listed in
OUT/errors.json; everything that can be checked before the model runs (ground truth present and of the right
size, the bank and its model) is checked first.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

logger = logging.getLogger("dinokit.zeroshot")

ERRORS = "errors.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("discover", help="find the main object of each image without labels (LOST, TokenCut): "
                                               "boxes, masks, pictures; CorLoc with --truth")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders (searched recursively)")
    p.add_argument("--model", "-m", required=True,
                   help="model directory, hub id, checkpoint file or preset (vits14, dinov3_vits16 = random)")
    p.add_argument("--output", "-o", required=True, help="output folder (boxes.json, masks/, vis/, metrics.json)")
    p.add_argument("--method", choices=["lost", "tokencut"], default="lost", help="discovery algorithm")
    p.add_argument("--facet", choices=["keys", "tokens"], default="keys",
                   help="last-block attention keys (both papers) or final-normed output tokens (the DINOv3 paper's "
                        "TokenCut)")
    p.add_argument("--k", type=int, default=100, help="LOST: how many lowest-degree patches can join the seed")
    p.add_argument("--tau", type=float, default=0.2, help="TokenCut: cosine above which two patches are linked")
    p.add_argument("--eps", type=float, default=1e-5, help="TokenCut: edge weight below --tau")
    p.add_argument("--no-binary-graph", action="store_true",
                   help="TokenCut: keep the cosine as the edge weight above --tau instead of 1")
    p.add_argument("--gram-bias", type=float, default=0.0,
                   help="LOST: constant added to the key Gram matrix before its sign tests (the registers paper "
                        "used one, value unpublished)")
    p.add_argument("--truth", default=None, metavar="DIR",
                   help="ground truth per image stem: <stem>.xml (VOC boxes) or <stem>.png / <stem>_mask.png "
                        "(instance-id masks, e.g. Penn-Fudan); writes metrics.json (CorLoc, IoU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_discover)

    anomaly = subparsers.add_parser("anomaly", help="AnomalyDINO: a memory bank of normal patch features (fit), "
                                                    "anomaly scores and heat maps (score)")
    actions = anomaly.add_subparsers(dest="action", required=True)
    fit = actions.add_parser("fit", help="build a memory bank from normal images")
    fit.add_argument("normal", metavar="NORMAL_DIR", help="folder of normal images (e.g. MVTec <object>/train/good)")
    fit.add_argument("--model", "-m", required=True,
                     help="model directory, hub id or checkpoint file (a random preset cannot be reloaded to score)")
    fit.add_argument("--output", "-o", required=True, help="bank folder to write (bank.faiss, manifest.json)")
    fit.add_argument("--shots", type=int, default=None,
                     help="use the first N images (sorted by name), as AnomalyDINO's few-shot runs (default: all)")
    fit.add_argument("--resolution", type=int, default=448, help="shorter side the images are resized to (the "
                                                                  "paper: 448 or 672)")
    fit.add_argument("--rotate", action="store_true",
                     help="add each normal image rotated by 45, 90, ..., 315 degrees (the reference's 'agnostic' "
                          "preprocessing)")
    fit.add_argument("--mask-reference", action="store_true",
                     help="keep only the normal images' foreground patches (PCA mask)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_anomaly_fit)

    score = actions.add_parser("score", help="score images against a bank: scores.csv, heat maps, and metrics.json "
                                             "for an MVTec-layout test folder")
    score.add_argument("images", nargs="+", metavar="IMAGES",
                       help="image files or folders; an MVTec-layout test folder (good/ + defect folders) is "
                            "also evaluated")
    score.add_argument("--bank", required=True, help="bank folder written by `dinokit anomaly fit`")
    score.add_argument("--output", "-o", required=True, help="output folder (scores.csv, heatmaps/, metrics.json)")
    score.add_argument("--model", "-m", default=None, help="the bank's model, when its recorded path has moved "
                                                           "(another model is refused)")
    score.add_argument("--mask", action="store_true",
                       help="zero the distances of background patches (PCA foreground mask, threshold 10)")
    score.add_argument("--ground-truth", default=None, metavar="DIR",
                       help="MVTec ground_truth folder (default: ground_truth beside the test folder)")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=_anomaly_score)


# -------------------------------------------------------------------------------------------------- inputs
def collect_images(inputs: list[str]) -> list[tuple[Path, str]]:
    """(path, output name) per image: folders searched recursively (names relative to the folder, sub-folders
    kept), files by their name. Two inputs with the same output name are refused."""
    from dinokit.data.images import find_image_files

    found = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found += [(f, f.relative_to(path).with_suffix("").as_posix()) for f in find_image_files(path)]
        elif path.exists() or path.is_symlink():
            found.append((path, path.stem))
        else:
            raise FileNotFoundError(f"{text} does not exist: give image files or folders")
    if not found:
        raise ValueError(f"no image files in {', '.join(inputs)}")
    names: dict[str, Path] = {}
    for path, name in found:
        if name in names:
            raise ValueError(f"{names[name]} and {path} would write the same output name '{name}': give them in "
                             f"separate runs or rename one")
        names[name] = path
    return found


def staged(output: str, command: str, marker: str):
    """A staging folder that replaces OUT on success (`dinokit.output_folder`). OUT may be new, empty, or an
    earlier output of this command (it has `marker`); anything else is refused rather than overwritten."""
    from dinokit import output_folder

    return output_folder.staged_output(output, command, output_folder.has_file(marker))


def _skip(errors: list, path, exc) -> None:
    from dinokit.data.images import display_path

    errors.append({"path": display_path(path), "reason": exc.reason})
    logger.warning("skipping %s: %s", display_path(path), exc.reason)


def _finish_errors(staging: Path, errors: list, total: int, done: int) -> None:
    if errors:
        (staging / ERRORS).write_text(json.dumps(errors, indent=2) + "\n")
    if total and not done:
        raise ValueError(f"none of the {total} images could be read (e.g. {errors[0]['path']}: "
                         f"{errors[0]['reason']})")


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------ discover
def _discover(args) -> int:
    import numpy as np
    from PIL import Image

    from dinokit.apps.embed import describe_model, load, select_device
    from dinokit.curate.progress import bars
    from dinokit.data.images import ImageReadError, display_path
    from dinokit.extras import require
    from dinokit.zeroshot import corloc as cl
    from dinokit.zeroshot.discovery import Discovery, discover

    require("scipy", purpose="dinokit discover")
    images = collect_images(args.images)
    truth_files = {}
    if args.truth is not None:
        if not Path(args.truth).is_dir():
            raise FileNotFoundError(f"--truth {args.truth} is not a folder")
        for path, name in images:  # every image has its ground truth, and masks fit their images: before any work
            truth_files[name] = cl.truth_file(args.truth, path.stem)
            _check_truth_size(truth_files[name], path)
    net = load(args.model).to(select_device(args.device)).eval()
    if not hasattr(net, "vit_module"):
        raise ValueError(f"discover reads a ViT's last block; {type(net).__name__} is not a dinokit ViT")
    options = dict(method=args.method, facet=args.facet, k_patches=args.k, tau=args.tau, eps=args.eps,
                   binary=not args.no_binary_graph, gram_bias=args.gram_bias)
    records, errors, boxes, truths, box_ious, mask_ious = [], [], [], [], [], []
    with staged(args.output, "dinokit discover", "boxes.json") as staging:
        with bars(not args.quiet)(total=len(images), desc=f"discover ({args.method})", unit="image") as bar:
            for path, name in images:
                bar.update(1)
                try:
                    (found,) = discover([path], net, device=args.device, **options)
                except ImageReadError as exc:
                    _skip(errors, path, exc)
                    continue
                found: Discovery
                pixel_mask = found.pixel_mask()
                _save_png(Image.fromarray(pixel_mask.astype(np.uint8) * 255), staging / "masks" / f"{name}.png")
                _save_png(_discovery_picture(path, found, pixel_mask), staging / "vis" / f"{name}.png")
                record = {**found.to_json(), "name": display_path(name), "path": display_path(path)}
                if args.truth is not None:
                    truth = cl.read_truth(truth_files[name], found.image_size)
                    record["truth_boxes"] = [list(b) for b in truth.boxes]
                    record["best_iou"] = round(cl.best_iou(found.box, truth.boxes), 4)
                    boxes.append(found.box)
                    truths.append(truth.boxes)
                    box_ious.append(record["best_iou"])
                    if truth.foreground is not None:
                        mask_ious.append(cl.mask_iou(pixel_mask, truth.foreground))
                        record["mask_iou"] = round(mask_ious[-1], 4)
                records.append(record)
        _finish_errors(staging, errors, len(images), len(records))
        if args.truth is not None:
            value, hits = cl.corloc(boxes, truths)
            metrics = {"corloc": value, "images": len(hits), "correct": int(sum(hits)),
                       "mean_best_box_iou": float(np.mean(box_ious)),
                       "misses": [r["name"] for r, hit in zip(records, hits) if not hit], "skipped": len(errors)}
            if mask_ious and len(mask_ious) == len(records):
                metrics["mean_mask_iou"] = float(np.mean(mask_ious))
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        run = {"command": "discover", **options, "model": describe_model(net, args.model), "images": records}
        (staging / "boxes.json").write_text(json.dumps(run, indent=2) + "\n")
    summary = f"{len(records)} images -> {args.output}"
    if args.truth is not None:
        summary += f"; CorLoc {metrics['corloc']:.1f} ({metrics['correct']}/{metrics['images']})"
        if "mean_mask_iou" in metrics:
            summary += f", mask IoU {metrics['mean_mask_iou']:.3f}"
    print(summary + (f"; {len(errors)} unreadable, listed in {ERRORS}" if errors else ""))
    return 0


def _check_truth_size(truth: Path, image: Path) -> None:
    """Refuse a ground-truth mask whose size differs from its image's (headers only; VOC files are not masks)."""
    from PIL import Image, UnidentifiedImageError

    if truth.suffix.lower() == ".xml":
        return
    try:
        with Image.open(truth) as m:
            mask_size = m.size
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read ground-truth mask {truth} ({exc}): fix or replace it") from None
    try:
        with Image.open(image) as im:
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
            image_size = im.size[::-1] if turned else im.size
    except (OSError, UnidentifiedImageError):
        return  # the image itself is unreadable: it is skipped and listed
    if mask_size != image_size:
        raise ValueError(f"ground-truth mask {truth} is {mask_size[0]} x {mask_size[1]} pixels but its image "
                         f"{image} is {image_size[0]} x {image_size[1]}: give the mask of this image, at its size")


def _discovery_picture(path, found, pixel_mask):
    """The image with the object's mask tinted, its box drawn and the seed patch marked."""
    import numpy as np
    from PIL import Image, ImageDraw

    from dinokit.data.images import read_image

    image = np.asarray(read_image(path), dtype=np.float32)
    tint = np.array([255, 64, 0], np.float32)
    image[pixel_mask] = 0.65 * image[pixel_mask] + 0.35 * tint
    picture = Image.fromarray(image.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = found.box
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 255, 0), width=2)
    sy = found.image_size[0] / found.model_size[0]
    sx = found.image_size[1] / found.model_size[1]
    r, c = found.seed
    p = found.patch_size
    draw.rectangle([c * p * sx, r * p * sy, (c + 1) * p * sx - 1, (r + 1) * p * sy - 1], outline=(255, 255, 0),
                   width=2)
    return picture


# ------------------------------------------------------------------------------------------------- anomaly
def _anomaly_fit(args) -> int:
    from dinokit.extras import require
    from dinokit.zeroshot.anomaly import fit

    require("faiss", "scipy", purpose="dinokit anomaly fit")
    normal = Path(args.normal).expanduser()
    if not normal.is_dir():
        raise FileNotFoundError(f"{args.normal} is not a folder of normal images")
    images = [path for path, _ in collect_images([str(normal)])]
    with staged(args.output, "dinokit anomaly fit", "manifest.json") as staging:
        bank = fit(images, args.model, resolution=args.resolution, shots=args.shots, mask_reference=args.mask_reference,
                   rotate=args.rotate, device=args.device, progress=not args.quiet)
        bank.save(staging)
    print(f"memory bank of {bank.size:,} patch features (dimension {bank.dim}) from "
          f"{len(bank.manifest['images'])} images -> {args.output}")
    return 0


def _anomaly_score(args) -> int:
    from dinokit.data.images import display_path
    from dinokit.extras import require
    from dinokit.zeroshot import anomaly_metrics as am
    from dinokit.zeroshot.anomaly import MemoryBank, score

    require("faiss", "scipy", "sklearn", purpose="dinokit anomaly score")
    bank = MemoryBank.load(args.bank)  # refused before anything is read if it is not a complete bank
    images = collect_images(args.images)
    tests = None
    if len(args.images) == 1 and am.is_mvtec_test_folder(args.images[0]):
        tests = {item.path: item for item in am.mvtec_test_images(args.images[0], args.ground_truth)}
        am.check_mask_sizes(list(tests.values()))
    elif args.ground_truth is not None:
        raise ValueError("--ground-truth needs one MVTec-layout test folder (good/ and defect sub-folders) as input")
    errors, rows, heats, scored_tests = [], [], [], []
    names = {path: name for path, name in images}
    with staged(args.output, "dinokit anomaly score", "scores.csv") as staging:
        results = score([p for p, _ in images], bank, args.model, mask=args.mask, device=args.device,
                        progress=not args.quiet, on_error=lambda item, exc: _skip(errors, item, exc))
        skipped = {e["path"] for e in errors}
        done = [p for p, _ in images if display_path(p) not in skipped]
        _finish_errors(staging, errors, len(images), len(done))
        top = max(float(r.heat.max()) for r in results)
        low = min(float(r.heat.min()) for r in results)
        for path, result in zip(done, results):
            rows.append((display_path(names[path]), display_path(path), f"{result.score:.6f}"))
            _save_png(_heat_picture(path, result.heat, low, top), staging / "heatmaps" / f"{names[path]}.png")
            if tests is not None:
                scored_tests.append(tests[path])
                heats.append(result.heat)
        if tests is not None:
            report = am.evaluate(scored_tests, [r.score for r in results], heats)
            report["skipped"] = len(errors)
            (staging / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        run = {"command": "anomaly score", "bank": str(args.bank), "mask": args.mask, "heat_scale": [low, top],
               "bank_manifest": {k: v for k, v in bank.manifest.items() if k != "images"}}
        (staging / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["name", "path", "score"])
        writer.writerows(rows)
        (staging / "scores.csv").write_text(text.getvalue())
    summary = f"{len(rows)} images scored -> {args.output}"
    if tests is not None:
        summary += f"; image AUROC {report['image_auroc']:.3f}"
        if "au_pro" in report:
            summary += f", pixel AUROC {report['pixel_auroc']:.3f}, AU-PRO {report['au_pro']:.3f}"
    print(summary + (f"; {len(errors)} unreadable, listed in {ERRORS}" if errors else ""))
    return 0


def _heat_picture(path, heat, low: float, top: float):
    """The image with the heat map blended on it, on one colour scale for the whole run ([low, top])."""
    import numpy as np
    from PIL import Image

    from dinokit.data.images import read_image

    image = np.asarray(read_image(path), dtype=np.float32)
    t = np.clip((heat - low) / max(top - low, 1e-12), 0, 1)[..., None]
    colour = np.concatenate([t, 4 * t * (1 - t), 1 - t], axis=-1) * 255  # blue (low) -> green -> red (high)
    return Image.fromarray((0.5 * image + 0.5 * colour).astype(np.uint8))
