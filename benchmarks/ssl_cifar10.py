"""DINOv2 pretraining on CIFAR-10 for a fixed CPU budget, k-NN accuracy along the way.

Trains the `cpu_tiny_cifar` preset (or --config) on cifar10/train for --minutes of training wall clock (k-NN
evaluations are not counted), then reports k-NN top-1 (k=20, T=0.07, teacher final-norm CLS) on the full
cifar10/test against a class-stratified subset of --max-train train images at several points of the run, and at
the end against all 50,000 train images, next to the same architecture at random init and raw pixels
(per-image-centred, flattened 32x32x3) under the same protocol.

The schedules (warmup, cosine lr/wd/momentum, teacher temperature) are fitted to the budget: the "epoch" length
is set so that --iterations (or, without it, the budget divided by a short calibration's step time) make
--epochs. On a shared machine the calibration is noisy; the budget stops the run in any case.

    python benchmarks/ssl_cifar10.py --minutes 40 --results /work/notes/ssl_cifar10.json

The issue #4 measurement (58.6 min, 334k images; k-NN 50.84 against all 50k train images, raw pixels 47.96):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/ssl_cifar10.py \
        --config cpu_micro_cifar --minutes 60 --iterations 5200 --eval-size 32 --threads 1 --workers 0 \
        --eval-points 4 train.batch_size_per_gpu=32

Under torchrun the ranks train together (DDP over gloo; train.batch_size_per_gpu images per rank) and rank 0 alone evaluates and
writes; the budget is rank 0's training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from dinokit.ssl.knn_monitor import KnnMonitor
from dinokit.ssl.loader import build_dataset, build_loader
from dinokit.ssl.meta_arch import SSLMetaArch
from dinokit.ssl.train_config import load_train_config
from dinokit.ssl.trainer import Trainer, init_distributed

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10"


def calibrate(cfg, dataset, steps: int = 4, device: torch.device | str = "cpu") -> float:
    """Seconds per training iteration (forward + backward + step-free), median of `steps` after a warm-up.

    On CUDA a small model's step can be shorter than the data pipeline's time per batch, so there the wait for
    the batch is timed too, over enough steps to drain the batches the workers prefetched."""
    probe = load_train_config(cfg.to_dict())
    probe.optim.lr = 1e-4
    arch = SSLMetaArch(probe, device=device)
    loader = iter(build_loader(probe, dataset))
    on_cuda = arch.device.type == "cuda"
    if on_cuda:
        steps = max(steps, 2 * int(probe.train.num_workers) + 8)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        batch = next(loader)
        if not on_cuda:
            start = time.perf_counter()
        loss, _, _ = arch.forward_losses(batch, 0.04)
        loss.backward()
        if on_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: time them, not their launch
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def fit_schedule(cfg, iterations: int, epochs: int) -> int:
    """Make the schedules span about `iterations` as `epochs` "epochs" (checkpoint every 5); returns the total."""
    cfg.train.OFFICIAL_EPOCH_LENGTH = math.ceil(iterations / epochs)
    cfg.optim.epochs = epochs
    cfg.train.saveckp_freq = cfg.train.OFFICIAL_EPOCH_LENGTH * 5
    return cfg.train.OFFICIAL_EPOCH_LENGTH * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="training wall-clock budget")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 ImageFolder root (train/, test/)")
    parser.add_argument("--train-source", default=None,
                        help="the images to pretrain on: a folder or a list file such as curate's selected.txt "
                             "(default: DATA/train); k-NN always uses DATA/train and DATA/test")
    parser.add_argument("--config", default="cpu_tiny_cifar")
    parser.add_argument("--output", default="/tmp/dinokit_ssl_cifar10", help="run directory")
    parser.add_argument("--results", default="ssl_cifar10.json")
    parser.add_argument("--max-train", type=int, default=10000, help="k-NN train subset (class-stratified)")
    parser.add_argument("--max-test", type=int, default=None, help="k-NN test subset (default: all)")
    parser.add_argument("--skip-full", action="store_true",
                        help="skip the final k-NN against all train images (about 10 minutes here)")
    parser.add_argument("--eval-points", type=int, default=3, help="k-NN evaluations during the run (+ the end)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="image size of the k-NN evaluation (default: the global crop size; CIFAR's own 32 px "
                             "when training on smaller crops)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")
    parser.add_argument("--epochs", type=int, default=30, help="schedule epochs fitted into the budget")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations the schedule spans (default: from a calibration of the step time)")
    parser.add_argument("overrides", nargs="*", help="section.key=value training settings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    env = init_distributed(args.device)
    if env.distributed and not args.iterations:
        raise SystemExit("Under torchrun pass --iterations (every rank must plan the same schedule).")

    data = Path(args.data)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        raise SystemExit(f"CIFAR-10 not found under {data} (expected train/ and test/ ImageFolder trees).")
    source = Path(args.train_source) if args.train_source else data / "train"
    results_path = Path(args.results)
    load_start = os.getloadavg()

    cfg = load_train_config(args.config, [f"train.num_workers={args.workers}", *args.overrides])
    size = args.eval_size or cfg.crops.global_crops_size
    global_batch = cfg.train.batch_size_per_gpu * env.world_size
    if not env.is_main:  # the other ranks only train
        fit_schedule(cfg, args.iterations, args.epochs)
        Trainer(cfg, source, args.output, env=env, progress=False).run(max_minutes=args.minutes)
        return
    t0 = time.perf_counter()
    monitor = KnnMonitor(data / "train", data / "test", size, max_train=args.max_train, max_test=args.max_test, k=20)
    load_s = time.perf_counter() - t0
    print(f"k-NN sets: {len(monitor.train_labels)} train / {len(monitor.test_labels)} test images "
          f"({load_s:.0f} s to decode)", flush=True)

    results: dict = {
        "benchmark": "ssl_cifar10", "train_source": str(source), "config": args.config, "overrides": args.overrides,
        "minutes_budget": args.minutes, "threads": args.threads, "workers": args.workers,
        "processes": env.world_size, "global_batch": global_batch, "device": str(env.device),
        "knn": {"k": 20, "temperature": 0.07, "feature": "teacher final-norm CLS", "image_size": size,
                "train_images": len(monitor.train_labels), "test_images": len(monitor.test_labels)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": load_start, "shared": "other engineers' jobs ran at the same time"},
    }

    t0 = time.perf_counter()
    results["baselines"] = {"raw_pixels": monitor.raw_pixels()}
    torch.manual_seed(cfg.train.seed)
    random_init = SSLMetaArch(cfg, device=env.device).teacher.backbone
    results["baselines"]["random_init"] = monitor(random_init)
    if cfg.student.layerscale != 1.0:
        # With LayerScale 1e-5 the blocks of a fresh model are almost the identity, so every image gets nearly the
        # same CLS token; the same random ViT with LayerScale 1 is the informative random-feature baseline.
        torch.manual_seed(cfg.train.seed)
        results["baselines"]["random_init_layerscale_1"] = monitor(
            SSLMetaArch(load_train_config(cfg.to_dict(), ["student.layerscale=1.0"]),
                        device=env.device).teacher.backbone)
    eval_s = time.perf_counter() - t0
    print(f"baselines: {results['baselines']} ({eval_s:.0f} s)", flush=True)

    dataset = build_dataset(cfg, source)
    if args.iterations:
        iterations, seconds_per_iteration = args.iterations, None
    else:
        seconds_per_iteration = calibrate(cfg, dataset, device=env.device)
        # Plan 10% more than the calibration suggests: a run cut by the budget just ends with the lr not fully
        # decayed.
        iterations = max(50, int(args.minutes * 60 / seconds_per_iteration * 1.1))
    total = fit_schedule(cfg, iterations, args.epochs)
    epoch_length = cfg.train.OFFICIAL_EPOCH_LENGTH
    results["schedule"] = {"calibrated_s_per_iteration": seconds_per_iteration, "iterations_planned": total,
                           "epoch_length": epoch_length, "epochs": args.epochs,
                           "batch_size": global_batch}
    print(f"calibration: {seconds_per_iteration} s/iteration -> {total} iterations planned", flush=True)

    trainer = Trainer(load_train_config(cfg.to_dict()), source, args.output, env=env, progress=False)
    eval_at = [round(total * (i + 1) / (args.eval_points + 1)) for i in range(args.eval_points)]
    curve = [{"iteration": 0, "images_seen": 0, "train_minutes": 0.0,
              "knn_top1": results["baselines"]["random_init"]}]
    logs = []

    def on_log(record: dict) -> None:
        logs.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
        if eval_at and record["iteration"] >= eval_at[0]:
            eval_at.pop(0)
            acc = monitor(trainer.arch.result_backbone())
            curve.append({"iteration": record["iteration"],
                          "images_seen": record["iteration"] * global_batch,
                          "train_minutes": record["elapsed_s"] / 60, "knn_top1": acc})
            print(f"k-NN at iteration {record['iteration']}: {acc:.2f}%", flush=True)
            _write(results_path, {**results, "curve": curve})

    if Path(args.output, "checkpoint.pth").exists():
        raise SystemExit(f"{args.output} already holds a run; remove it or pass another --output.")
    last = trainer.run(max_minutes=args.minutes, on_log=on_log)
    final = monitor(trainer.arch.result_backbone())
    curve.append({"iteration": last["iteration"], "images_seen": last["iteration"] * global_batch,
                  "train_minutes": last["elapsed_s"] / 60, "knn_top1": final})
    if not args.skip_full:
        # The final figures against every train image (the protocol of issue #3's raw-pixel baseline).
        _write(results_path, {**results, "curve": curve})
        t0 = time.perf_counter()
        full = KnnMonitor(data / "train", data / "test", size, max_train=None, max_test=args.max_test, k=20)
        torch.manual_seed(cfg.train.seed)
        results["full_train_set"] = {
            "train_images": len(full.train_labels), "test_images": len(full.test_labels),
            "raw_pixels": full.raw_pixels(),
            "random_init": full(SSLMetaArch(cfg, device=env.device).teacher.backbone),
            "trained": full(trainer.arch.result_backbone()),
        }
        results["full_train_set"]["seconds"] = time.perf_counter() - t0
        print(f"full train set: {results['full_train_set']}", flush=True)
    rates = [r["img_per_s"] for r in logs[1:]] or [last["img_per_s"]]
    results.update({
        "curve": curve,
        "final_knn_top1": final,
        "above_random_init": final - results["baselines"]["random_init"],
        "above_raw_pixels": final - results["baselines"]["raw_pixels"],
        "throughput_img_per_s": {"mean": sum(rates) / len(rates), "min": min(rates), "max": max(rates)},
        "iterations_done": last["iteration"],
        "final_losses": {k: v for k, v in last.items() if k.endswith("loss")},
        "teacher_entropy_end": last.get("teacher_entropy"),
        "teacher_batch_entropy_end": last.get("teacher_batch_entropy"),
        "loadavg_end": os.getloadavg(),
        "run_dir": str(Path(args.output).resolve()),
    })
    _write(results_path, results)
    print(json.dumps(results, indent=2))


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
