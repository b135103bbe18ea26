"""How long `dinokit segment train` (and `depth train`) takes with its old and its new defaults on a small data
set, and what validation score each reaches: issue 26's "dense heads that train in minutes".

The case of the issue was 48 CamVid training images at 240 x 180 and a 3-layer, 96-wide ViT/14. CamVid is not in
../shared/datasets, so the stand-in is Penn-Fudan (person / background, `--binarize`): the 170 stems sorted, the
first 48 train and the last 16 val, every image and mask resized to 240 x 180 (masks nearest). The backbone is a
random-weight 3-block, 96-wide, 3-head ViT/14 (seed 0): random features are weak (mIoU near "all background"),
so the table measures the training recipe's cost and whether it keeps the score, not what good features reach.

Runs (each a separate `python -m dinokit ... train` process, features recomputed every time with --no-cache, so
every wall time is the whole command a user waits for):
- `old`: the defaults before issue 26: --iterations 2000 fixed steps, the loss on logits upsampled to the full
  resized image (`--loss-resolution full` where the option exists);
- `new`: today's defaults (--epochs 100, the plateau stop after --patience 10 epochs followed by a
  --cooldown of 20 epochs with the learning rate falling to 0, --loss-resolution 7);
- `depth-old` / `depth-new`: the same for `depth train` on a synthetic depth target (below).

Depth stand-in (no depth data set is in ../shared/datasets): each Penn-Fudan image gets a made-up depth map, a
ground plane receding upwards (depth 2 m at the bottom row to 12 m at the top) with every pedestrian at the
depth of the ground where their mask ends (their feet) — a plausible layout a head can partly learn, not a
measured depth.

    nice -n 10 python benchmarks/dense_train_speed.py --runs old new
    nice -n 10 python benchmarks/dense_train_speed.py --runs depth-old depth-new

Results are merged into --results (one entry per run; a run already there is kept unless named again), with the
machine (CPU model, ISA, threads), the load average before and after each run and the run's CPU time (user +
system): on a shared machine the wall time follows the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_description
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "datasets" / "pennfudan"
SIZE = (240, 180)  # width, height: CamVid's 480 x 360 halved, as in the issue
N_TRAIN, N_VAL = 48, 16


def _old_loss_option() -> list[str]:
    """The old loss (full-resolution upsampling) is `--loss-resolution full` since issue 26; before, the only one."""
    from dinokit.dense.segment import SegTrainConfig

    return ["--loss-resolution", "full"] if hasattr(SegTrainConfig(), "loss_resolution") else []


RUNS = {
    "old": ("segment", lambda: ["--iterations", "2000", *_old_loss_option()]),
    "new": ("segment", lambda: []),
    "depth-old": ("depth", lambda: ["--iterations", "2000"]),
    "depth-new": ("depth", lambda: []),
}


def synthetic_depth(mask: np.ndarray) -> np.ndarray:
    """Depth (m) of the stand-in: a ground plane 2 m (bottom row) to 12 m (top row); each pedestrian instance at
    the ground depth of its lowest row."""
    height, width = mask.shape
    ground = 2.0 + 10.0 * (1.0 - np.arange(height, dtype=np.float32) / max(height - 1, 1))
    depth = np.repeat(ground[:, None], width, axis=1)
    for instance in np.unique(mask[mask > 0]):
        rows = np.nonzero((mask == instance).any(axis=1))[0]
        depth[mask == instance] = ground[rows.max()]
    return depth


def prepare(data: Path, work: Path) -> dict[str, Path]:
    """work/{train,val}/{images,masks,depth} at 240 x 180 and a random 3-block 96-wide ViT/14 in work/model."""
    import dinokit

    stems = sorted(p.stem for p in (data / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))
    splits = {"train": stems[:N_TRAIN], "val": stems[-N_VAL:]}
    for name, members in splits.items():
        for sub in ("images", "masks", "depth"):
            (work / name / sub).mkdir(parents=True, exist_ok=True)
        for stem in members:
            target = work / name / "images" / f"{stem}.png"
            if target.is_file():
                continue
            image = Image.open(next((data / "images").glob(stem + ".*"))).convert("RGB")
            image.resize(SIZE, Image.Resampling.BILINEAR).save(target)
            mask = Image.open(data / "masks" / f"{stem}.png").resize(SIZE, Image.Resampling.NEAREST)
            mask.save(work / name / "masks" / f"{stem}.png")
            depth = synthetic_depth(np.asarray(mask).astype(np.int64))
            Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(work / name / "depth" / f"{stem}.png")
    model = work / "model"
    if not (model / "config.json").is_file():
        torch.manual_seed(0)
        config = dinokit.Dinov2Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, patch_size=14)
        dinokit.Dinov2Model(config).eval().save_pretrained(model)
    return {"train": work / "train", "val": work / "val", "model": model}


def run(name: str, paths: dict[str, Path], work: Path) -> dict:
    task, options = RUNS[name]
    out = work / f"out_{name}"
    command = [sys.executable, "-m", "dinokit", task, "train", "--model", str(paths["model"]),
               "--train", str(paths["train"]), "--val", str(paths["val"]), "--output", str(out), "--no-cache",
               "--quiet", *options()]
    if task == "segment":
        command += ["--binarize", "--num-classes", "2"]
    else:
        command += ["--layers", "4", "--max-depth", "20"]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    metrics = json.loads((out / "metrics.json").read_text())
    log = json.loads((out / "training_log.json").read_text())
    record = {"command": " ".join(["dinokit", *command[3:]]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "seconds": metrics.get("seconds"),
              "steps": log.get("steps", (log.get("config") or {}).get("iterations")),
              "stop_reason": log.get("stop_reason", "iterations"), "final_loss": log.get("final_loss")}
    if task == "segment":
        record.update(miou=metrics["miou"], per_class_iou=metrics["per_class_iou"],
                      pixel_accuracy=metrics["pixel_accuracy"])
    else:
        record.update({k: metrics[k] for k in ("rmse", "abs_rel", "a1")})
    return record


def print_table(results: dict) -> None:
    print(f"machine: {results['machine']}")
    print("| run | task | steps (stop) | wall (s) | CPU (s) | mIoU / RMSE | load avg (1 min) before-after |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():  # also records merged by hand under "<run> <code>" names
        score = f"{100 * r['miou']:.2f}" if "miou" in r else f"{r['rmse']:.3f} m"
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "-"
        print(f"| {name} | {RUNS[name.split()[0]][0]} | {r['steps']} ({r['stop_reason']}) | {r['wall_s']:.0f} | {cpu} | {score} | "
              f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="pennfudan folder (images/, masks/)")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["old", "new"])
    parser.add_argument("--work", default="/tmp/dense_train_speed")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results_dense_train_speed.json"))
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    args = parser.parse_args()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    if not args.table:
        data, work = Path(args.data), Path(args.work)
        if not (data / "images").is_dir():
            raise SystemExit(f"{data} not found: pass --data (the shared pennfudan folder)")
        paths = prepare(data, work)
        results.update(machine=cpu_description(), torch=torch.__version__,
                       case=f"Penn-Fudan stand-in for CamVid: first {N_TRAIN} sorted stems train, last {N_VAL} val, "
                            f"{SIZE[0]}x{SIZE[1]}; random 3-block 96-wide ViT/14; --size 518 (default)")
        for name in args.runs:
            print(f"running {name} ...", flush=True)
            record = run(name, paths, work)
            record["machine"] = cpu_description()
            results["runs"][name] = record
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


if __name__ == "__main__":
    main()
