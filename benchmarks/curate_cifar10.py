"""`dinokit curate` on real images (issue 25, "On real images, CPU", first half): a long-tailed CIFAR-10 pool with
planted near-duplicates and out-of-domain photographs, embedded with a dinokit model, curated to a budget, and
compared with uniform random sampling at the same budget.

Pool (from ../shared/datasets): CIFAR-10 train images with Zipf class sizes (class i of the sorted class names
gets --largest / (i + 1) ** --zipf images), --copies near-duplicates of pool images (each re-encoded as JPEG
quality 50 after a 1-pixel shift: a different file, nearly the same picture), and --ood Imagenette train photographs
(out of domain: not CIFAR). Measured on the selection and on random picks of the same size (mean over 5 draws):
normalised entropy of the class histogram (10 CIFAR classes; 1 = balanced), classes covered, the smallest class's
count, the out-of-domain share, and how many planted copies dedup linked to their original.

    python benchmarks/curate_cifar10.py --model vits14 --image-size 56 --work /tmp/curate_cifar10 \\
        --output benchmarks/results_curate_cifar10_random_init.json --pictures docs/curate

--model takes whatever `dinokit embed --model` takes (a preset is a randomly initialised network; a trained
`dinokit train` teacher folder for the trained row). The commands it runs are printed and stored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import cpu_description
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def build_pool(work: Path, largest: int, zipf: float, copies: int, ood: int, seed: int) -> list[dict]:
    """The pool's images as rows {path, label (class name, 'ood' or the original's label), copy_of (row or -1)}."""
    rng = np.random.default_rng(seed)
    train = DATASETS / "cifar10" / "train"
    if not train.is_dir():
        raise SystemExit(f"{train} is missing: this benchmark needs the shared CIFAR-10 copy")
    rows = []
    for i, name in enumerate(sorted(p.name for p in train.iterdir() if p.is_dir())):
        files = sorted((train / name).glob("*.jpg"))
        take = max(1, round(largest / (i + 1) ** zipf))
        rows += [{"path": str(files[j].resolve()), "label": name, "copy_of": -1}
                 for j in np.sort(rng.choice(len(files), take, replace=False))]
    originals = rng.choice(len(rows), copies, replace=False)
    (work / "copies").mkdir(parents=True, exist_ok=True)
    for n, r in enumerate(originals):
        target = work / "copies" / f"copy{n:05d}.jpg"
        with Image.open(rows[r]["path"]) as image:
            shifted = image.convert("RGB").transform(image.size, Image.AFFINE, (1, 0, 1, 0, 1, 0))
            shifted.save(target, quality=50)
        rows.append({"path": str(target.resolve()), "label": rows[r]["label"], "copy_of": int(r)})
    photos = sorted((DATASETS / "imagenette" / "train").rglob("*.JPEG")) + \
        sorted((DATASETS / "imagenette" / "train").rglob("*.jpg"))
    rows += [{"path": str(photos[j].resolve()), "label": "ood", "copy_of": -1}
             for j in np.sort(rng.choice(len(photos), ood, replace=False))]
    return rows


def run(command: list[str], log: list[str]) -> None:
    shown = " ".join(str(c) for c in command)
    log.append(shown)
    print(f"$ {shown}", flush=True)
    subprocess.run([sys.executable, "-m", "dinokit", *map(str, command)], check=True)


def class_stats(labels: list[str], classes: list[str]) -> dict:
    counts = np.array([sum(1 for v in labels if v == c) for c in classes], dtype=np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"entropy": float(-(p * np.log(p)).sum() / np.log(len(classes))), "classes_covered": int((counts > 0).sum()),
            "smallest_class": int(counts.min()), "ood_share": sum(v == "ood" for v in labels) / max(len(labels), 1),
            "counts": dict(zip(classes, counts.astype(int).tolist()))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vits14", help="what `dinokit embed --model` takes")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--pooling", default="cls")
    parser.add_argument("--largest", type=int, default=1500, help="images of the most frequent class")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument("--ood", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.15, help="budget as a share of the pool")
    parser.add_argument("--dedup-threshold", type=float, default=None,
                        help="default: curate's own (0.95); a random-init network needs its own calibration")
    parser.add_argument("--levels", default=None, help="passed to curate --levels (default: curate's rule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", required=True, help="scratch folder (pool list, copies, embeddings, curate output)")
    parser.add_argument("--output", default=None, help="JSON file for the figures")
    parser.add_argument("--pictures", default=None, help="copy the report's PNGs here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    rows = build_pool(work, args.largest, args.zipf, args.copies, args.ood, args.seed)
    (work / "pool.txt").write_text("".join(r["path"] + "\n" for r in rows))
    commands: list[str] = []
    emb = work / "emb"
    out = work / f"curated_{args.dedup_threshold or 'default'}"
    embed = ["embed", work / "pool.txt", "--model", args.model, "--image-size", args.image_size, "--pooling",
             args.pooling, "--normalize", "-o", emb, "--quiet"]
    recorded = emb / "embed_command.json"  # the pool is rebuilt identically from --seed: reuse its embedding
    if recorded.is_file() and json.loads(recorded.read_text()) == [str(c) for c in embed]:
        commands.append(" ".join(str(c) for c in embed) + "  # reused")
    else:
        shutil.rmtree(emb, ignore_errors=True)
        run(embed, commands)
        recorded.write_text(json.dumps([str(c) for c in embed]))
    budget = round(args.fraction * len(rows))
    curate = ["curate", emb, "-o", out, "--target", budget, "--quiet"]
    if args.dedup_threshold is not None:
        curate += ["--dedup-threshold", args.dedup_threshold]
    if args.levels:
        curate += ["--levels", args.levels]
    run(curate, commands)

    import pyarrow.parquet as pq

    from dinokit.apps import store

    by_path = {r["path"]: i for i, r in enumerate(rows)}
    stored = store.load_metadata(emb).column("path").to_pylist()
    pool_row = np.array([by_path[p] for p in stored])  # embedding row -> pool row (embed sorts nothing in a list)
    classes = sorted({r["label"] for r in rows} - {"ood"})
    selected = pq.read_table(out / "selected.parquet").to_pydict()
    picked = [rows[pool_row[r]]["label"] for r, t in zip(selected["row"], selected["times_selected"])
              for _ in range(t)]
    rng = np.random.default_rng(args.seed + 1)
    random_draws = [class_stats([rows[i]["label"] for i in rng.choice(len(rows), budget, replace=False)], classes)
                    for _ in range(5)]
    component = np.load(out / "dedup" / "component.npy")
    keep = np.load(out / "dedup" / "keep.npy")
    embedding_row = np.empty(len(rows), dtype=np.int64)
    embedding_row[pool_row] = np.arange(len(pool_row))
    copy_rows = [i for i, r in enumerate(rows) if r["copy_of"] >= 0]
    linked = [component[embedding_row[i]] == component[embedding_row[rows[i]["copy_of"]]] for i in copy_rows]
    manifest = json.loads((out / "manifest.json").read_text())
    result = {
        "machine": cpu_description(), "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "seconds": round(time.perf_counter() - start, 1), "commands": commands, "args": vars(args),
        "pool": {"images": len(rows), "cifar_counts_with_copies": class_stats([r["label"] for r in rows], classes)["counts"],
                 "copies": len(copy_rows), "ood": args.ood},
        "budget": budget, "levels": manifest["levels"], "dedup_threshold": manifest["options"]["dedup_threshold"],
        "dedup": {"removed": int((~keep).sum()), "planted_copies_linked": int(sum(linked)),
                  "recall": float(np.mean(linked)) if linked else None,
                  "removed_not_planted": int((~keep).sum()) - int(sum(linked))},
        "curated": class_stats(picked, classes),
        "random": {k: float(np.mean([d[k] for d in random_draws])) for k in
                   ("entropy", "classes_covered", "smallest_class", "ood_share")},
    }
    c, r = result["curated"], result["random"]
    print(f"\n{cpu_description()}; load average {result['load_average'][0]} -> {result['load_average'][1]}; "
          f"{result['seconds']:.0f} s")
    print(f"pool {len(rows):,} images ({result['pool']['cifar_counts_with_copies']} with copies, {len(copy_rows)} planted copies, "
          f"{args.ood} Imagenette), model {args.model} at {args.image_size} px, budget {budget}, levels "
          f"{result['levels']}, dedup threshold {result['dedup_threshold']}")
    print("| selection | class entropy | classes covered | smallest class | out-of-domain share |\n|---|---|---|---|---|")
    print(f"| uniform random (5 draws) | {r['entropy']:.3f} | {r['classes_covered']:.1f} | {r['smallest_class']:.1f} | "
          f"{r['ood_share']:.1%} |")
    print(f"| dinokit curate | {c['entropy']:.3f} | {c['classes_covered']} | {c['smallest_class']} | "
          f"{c['ood_share']:.1%} |")
    print(f"dedup: {result['dedup']['removed']} removed, {result['dedup']['planted_copies_linked']} of "
          f"{len(copy_rows)} planted copies linked to their original")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    if args.pictures:
        Path(args.pictures).mkdir(parents=True, exist_ok=True)
        for png in sorted(out.glob("*.png")):
            shutil.copy(png, Path(args.pictures) / png.name)


if __name__ == "__main__":
    main()
