"""Search for the `make demo` recipe: DINOv2 on scikit-learn's digits for a few CPU minutes, k-NN along the way.

Each run trains one recipe (a preset plus `section.key=value` overrides) on the digits written at --size px for
--minutes of training wall clock (k-NN evaluations are not counted) and at most --iterations steps (the schedules
span --iterations), and prints k-NN top-1 (the demo's protocol: k=20, T=0.07, teacher final-norm CLS, the demo's
class-stratified 2/3 - 1/3 split) every --eval-every iterations, next to random init and raw pixels.

    python benchmarks/demo_recipes.py --name base --minutes 3 --iterations 400 cpu_demo_digits
    python benchmarks/demo_recipes.py --name lr2x cpu_demo_digits optim.base_lr=0.016

One JSON line per run is appended to --results (recipe, steps done, train seconds, k-NN curve, machine, load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from dinokit.ssl.demo import _split, pixel_knn, write_digits
from dinokit.ssl.knn_monitor import cls_features, knn_accuracy, load_labelled_pixels
from dinokit.ssl.meta_arch import SSLMetaArch
from dinokit.ssl.train_config import load_train_config
from dinokit.ssl.trainer import Trainer, init_distributed


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="preset or YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings")
    parser.add_argument("--name", default="run")
    parser.add_argument("--size", type=int, default=None, help="digit image size (default: the global crop size)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget")
    parser.add_argument("--iterations", type=int, default=400, help="iterations the schedules span (and the cap)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default="/tmp/dinokit_demo_recipes")
    parser.add_argument("--results", default="/tmp/dinokit_demo_recipes.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_train_config(args.config, ["train.saveckp_freq=100000", "train.log_freq=10", *args.overrides])
    size = args.size or cfg.crops.global_crops_size
    workdir = Path(args.workdir)
    digits = write_digits(workdir / f"digits_{size}", size)
    cfg.train.OFFICIAL_EPOCH_LENGTH = math.ceil(args.iterations / cfg.optim.epochs)
    pixels, labels, _ = load_labelled_pixels(digits, size)
    train_idx, test_idx = _split(labels)

    def knn(backbone) -> float:
        f = cls_features(backbone, pixels)
        return knn_accuracy(f[train_idx], labels[train_idx], f[test_idx], labels[test_idx], k=20)

    torch.manual_seed(cfg.train.seed)
    random_init = knn(SSLMetaArch(cfg).teacher.backbone)
    raw = pixel_knn(pixels, labels, train_idx, test_idx)
    run_dir = workdir / f"run_{args.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    load_start = os.getloadavg()
    trainer = Trainer(cfg, digits, run_dir, env=init_distributed("cpu"), progress=False)
    curve = [(0, 0.0, random_init)]

    def on_log(record: dict) -> None:
        if record["iteration"] % args.eval_every == 0:
            acc = knn(trainer.arch.result_backbone())
            curve.append((record["iteration"], round(record["elapsed_s"], 1), acc))
            print(f"  it {record['iteration']:4d}  {record['elapsed_s']:6.1f} s  k-NN {acc:5.1f}  "
                  f"loss {record['total_loss']:.3f}  H_t {record['teacher_entropy']:.3f} "
                  f"H_batch {record['teacher_batch_entropy']:.3f}", flush=True)

    start = time.perf_counter()
    last = trainer.run(max_iterations=args.iterations, max_minutes=args.minutes, on_log=on_log)
    wall = time.perf_counter() - start
    final = knn(trainer.arch.result_backbone())
    if curve[-1][0] != last["iteration"]:
        curve.append((last["iteration"], round(last["elapsed_s"], 1), final))
    row = {"name": args.name, "config": args.config, "overrides": args.overrides, "size": size,
           "steps": last["iteration"], "train_s": round(last["elapsed_s"], 1), "wall_s": round(wall, 1),
           "random_init": random_init, "raw_pixels": raw, "trained": final, "gain": final - random_init,
           "best": max(c[2] for c in curve), "curve": curve, "img_per_s": last.get("img_per_s"),
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpu": cpu_model(),
           "threads": torch.get_num_threads()}
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
