"""The DINOv2 paper's curation claim at CPU scale (issue 25): pretrain on a curated subset of an uncurated pool and on
a uniformly random subset of the same size, with the same recipe and the same number of images seen, and compare
k-NN top-1 on CIFAR-10 test.

1. The pool (benchmarks/curate_cifar10.build_pool): CIFAR-10 train with Zipf class sizes, planted near-copies and
   Imagenette photographs (out of domain).
2. `dinokit embed` the pool with --embed-model: a trained `dinokit train` teacher folder (the paper curates with a
   pretrained model's features) or a preset name (random init).
3. `dinokit curate` to --fraction of the pool -> selected.txt; the random subset draws as many pool images uniformly
   (--seed). Both lists are stored with their class histograms.
4. Pretrain --config on each list with benchmarks/ssl_cifar10.py (--train-source), same seed and --iterations.
   The runs go side by side, one single-threaded process each, so that they share whatever else the machine does.
5. k-NN (k=20, T=0.07, teacher CLS at --eval-size) of each run against a class-stratified 10,000 of CIFAR-10 train,
   on all 10,000 test images; ssl_cifar10.py also stores random init and raw pixels under the same protocol.

    python benchmarks/curate_train_cifar10.py --work /tmp/c25 --embed-model /tmp/c25/embedder/teacher \\
        --iterations 2500 --output benchmarks/results_curate_train_cifar10.json

Every step is reused when its output exists (a rerun after a kill goes on), except a training run whose results
file is incomplete: remove its folder to redo it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from curate_cifar10 import DATASETS, build_pool, class_stats
from machine import cpu_description

HERE = Path(__file__).resolve().parent


def dinokit(args: list, log: list[str]) -> None:
    log.append("dinokit " + " ".join(map(str, args)))
    print(f"$ {log[-1]}", flush=True)
    subprocess.run([sys.executable, "-m", "dinokit", *map(str, args)], check=True)


def subsets(work: Path, rows: list[dict], args, log: list[str]) -> dict[str, list[str]]:
    """{'curated': paths, 'random': paths}, the curated list in curate's order, the random one in pool order."""
    emb, out = work / "emb", work / "curated"
    if not (emb / "embed_command.json").is_file():
        dinokit(["embed", work / "pool.txt", "--model", args.embed_model, "--image-size", args.embed_size,
                 "--pooling", "cls", "--normalize", "-o", emb, "--quiet"], log)
        (emb / "embed_command.json").write_text(json.dumps(log[-1]))
    budget = round(args.fraction * len(rows))
    if not (out / "selected.txt").is_file():
        command = ["curate", emb, "-o", out, "--target", budget, "--quiet"]
        if args.dedup_threshold is not None:
            command += ["--dedup-threshold", args.dedup_threshold]
        dinokit(command, log)
    curated = (out / "selected.txt").read_text().split("\n")
    curated = [p for p in curated if p]
    rng = np.random.default_rng(args.seed)
    random = [rows[i]["path"] for i in np.sort(rng.choice(len(rows), len(curated), replace=False))]
    for name, paths in (("curated", curated), ("random", random)):
        (work / f"{name}.txt").write_text("".join(p + "\n" for p in paths))
    return {"curated": curated, "random": random}


def pretrain(work: Path, names: list[str], args) -> dict[str, dict]:
    """Runs ssl_cifar10.py on each subset list side by side; returns each run's results JSON."""
    procs = {}
    for name in names:
        results = work / f"train_{name}.json"
        if results.is_file() and "final_knn_top1" in json.loads(results.read_text()):
            continue
        command = [sys.executable, str(HERE / "ssl_cifar10.py"), "--train-source", str(work / f"{name}.txt"),
                   "--config", args.config, "--iterations", str(args.iterations), "--minutes", str(args.minutes),
                   "--eval-size", str(args.eval_size), "--threads", "1", "--workers", "0",
                   "--eval-points", str(args.eval_points), "--skip-full", "--output", str(work / f"run_{name}"),
                   "--results", str(results), *args.overrides]
        print("$ " + " ".join(command), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs[name] = subprocess.Popen(command, stdout=open(work / f"train_{name}.log", "w"),
                                       stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"the {name} run failed: see {work / f'train_{name}.log'}")
    return {name: json.loads((work / f"train_{name}.json").read_text()) for name in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch folder (pool, embeddings, curate output, runs)")
    parser.add_argument("--embed-model", required=True,
                        help="what `dinokit embed --model` takes: a trained teacher folder, or a preset (random init)")
    parser.add_argument("--embed-size", type=int, default=32, help="image size for the embedding")
    parser.add_argument("--largest", type=int, default=5000, help="images of the most frequent CIFAR class")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--ood", type=int, default=1000, help="Imagenette photographs in the pool")
    parser.add_argument("--fraction", type=float, default=0.3, help="the budget as a share of the pool")
    parser.add_argument("--dedup-threshold", type=float, default=None, help="default: curate's own")
    parser.add_argument("--config", default="cpu_micro_cifar")
    parser.add_argument("--iterations", type=int, required=True, help="training iterations of each run")
    parser.add_argument("--minutes", type=float, default=120.0, help="a safety cap on each run's training time")
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--eval-points", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="pool and random-subset seed")
    parser.add_argument("--output", default=None, help="JSON file for the figures")
    parser.add_argument("overrides", nargs="*", help="section.key=value training settings for both runs")
    args = parser.parse_args()
    if not (DATASETS / "cifar10" / "test").is_dir():
        raise SystemExit(f"{DATASETS / 'cifar10'} is missing: this benchmark needs the shared CIFAR-10 copy")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    log: list[str] = []
    rows = build_pool(work, args.largest, args.zipf, args.copies, args.ood, args.seed)
    (work / "pool.txt").write_text("".join(r["path"] + "\n" for r in rows))
    lists = subsets(work, rows, args, log)
    label = {r["path"]: r["label"] for r in rows}
    classes = sorted({r["label"] for r in rows} - {"ood"})
    stats = {name: class_stats([label[p] for p in paths], classes) for name, paths in lists.items()}
    copies = {r["path"] for r in rows if r["copy_of"] >= 0}
    for name, paths in lists.items():
        stats[name]["images"] = len(paths)
        stats[name]["planted_copies"] = sum(p in copies for p in paths)
    runs = pretrain(work, ["curated", "random"], args)
    result = {
        "benchmark": "curate_train_cifar10", "machine": cpu_description(), "args": vars(args), "commands": log,
        "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "seconds": round(time.perf_counter() - start, 1),
        "pool": {"images": len(rows), "counts": class_stats([r["label"] for r in rows], classes)["counts"],
                 "copies": len(copies), "ood": args.ood},
        "subsets": stats,
        "runs": {name: {"final_knn_top1": run["final_knn_top1"], "curve": run["curve"],
                        "iterations_done": run["iterations_done"], "global_batch": run["global_batch"],
                        "images_seen": run["iterations_done"] * run["global_batch"],
                        "throughput_img_per_s": run["throughput_img_per_s"],
                        "teacher_entropy_end": run.get("teacher_entropy_end")} for name, run in runs.items()},
        "baselines": runs["curated"]["baselines"],
        "knn": runs["curated"]["knn"],
    }
    print(f"\n{cpu_description()}; load average {result['load_average'][0]} -> {result['load_average'][1]}")
    print(f"pool {len(rows):,} images; subsets of {stats['curated']['images']:,}; {args.config}, "
          f"{args.iterations} iterations x {runs['curated']['global_batch']} images each")
    print("| pretraining set | class entropy | smallest class | Imagenette share | planted copies | k-NN top-1 |")
    print("|---|---|---|---|---|---|")
    for name in ("random", "curated"):
        s, r = stats[name], result["runs"][name]
        print(f"| {name} | {s['entropy']:.3f} | {s['smallest_class']} | {s['ood_share']:.1%} | "
              f"{s['planted_copies']} | {r['final_knn_top1']:.2f} |")
    b = result["baselines"]
    print(f"random init {b['random_init']:.2f}, raw pixels {b['raw_pixels']:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
