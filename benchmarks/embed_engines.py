"""`dinokit embed` local engine vs `--engine ray` on this machine: the same images, the same model, interleaved.

Both engines embed the same files (Imagenette val, spread over the classes) with the same model (ViT-S/14, random
weights: the speed of a trained one), batch size and shard size. The files are split into --rounds parts; each
round runs both engines on its part, alternating which goes first, so that load from other processes on a shared
machine hits both alike. Every run is a complete `embed()` into a fresh folder (listing, manifest, shards, merge).

Ray is started once, before the rounds (as a cluster is, before jobs are submitted): its start-up is timed and
reported apart. Each Ray run still pays its per-run costs -- starting the model actor (a fresh Python process that
imports torch and receives the model) and the decode tasks' worker processes -- which the "per-run overhead" row
estimates from a run of one batch. Peak memory: the highest sum of PSS (RSS where PSS is unreadable) over this
process and all its descendants (DataLoader workers; Ray's GCS, raylet and worker processes), sampled every 20 ms.
Vectors of the two engines are compared on every round (max abs diff).

    python benchmarks/embed_engines.py                      # 2,000 images, 4 rounds
    python benchmarks/embed_engines.py --limit 200 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peak_memory import PeakMemory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "datasets" / "imagenette" / "val"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of images (default imagenette/val)")
    parser.add_argument("--limit", type=int, default=2000, help="use this many images (spread over the classes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=100, help="images per output shard")
    parser.add_argument("--num-workers", type=int, default=None, help="local decoding workers (default: cores)")
    parser.add_argument("--workers", type=int, default=1, help="Ray model actors")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import ray

    from dinokit import load_model
    from dinokit.apps import store
    from dinokit.apps.embed import embed, list_images
    from dinokit.apps.embed_ray import connect

    files = list_images(args.data)
    step = max(1, len(files) // args.limit)
    files = files[::step][: args.limit]
    cores = os.cpu_count() or 1
    print(f"{len(files)} images from {args.data}; ViT-S/14 random weights; batch {args.batch_size}; shards of "
          f"{args.shard_size}; {cores} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"ray {ray.__version__}; {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    torch.manual_seed(0)
    model = load_model("vits14").eval()
    scratch = Path(tempfile.mkdtemp(prefix="embed_engines_"))
    common = dict(pooling="cls", batch_size=args.batch_size, shard_size=args.shard_size, progress=False)

    def run(engine: str, part: list[str], out: Path) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        options = {"num_workers": args.num_workers} if engine == "local" else {"engine": "ray",
                                                                                 "workers": args.workers}
        with PeakMemory() as memory:
            start = time.perf_counter()
            embed(part, model, out, **common, **options)
            elapsed = time.perf_counter() - start
        return elapsed, memory.peak_kb / 1024

    try:
        start = time.perf_counter()
        connect(None, args.workers)
        startup = time.perf_counter() - start
        print(f"  ray start-up (local cluster, {cores + args.workers} logical CPUs): {startup:.1f} s", flush=True)

        warm = files[: args.batch_size]  # warm-up, and the per-run overhead: one batch each
        one_batch = {engine: run(engine, warm, scratch / f"warm_{engine}")[0] for engine in ("local", "ray")}

        engines = ("local", "ray")
        seconds, peak, diffs = {e: 0.0 for e in engines}, {e: 0.0 for e in engines}, []
        parts = [files[r::args.rounds] for r in range(args.rounds)]
        for r, part in enumerate(parts):
            order = engines if r % 2 == 0 else engines[::-1]
            for engine in order:
                elapsed, peak_mb = run(engine, part, scratch / engine)
                seconds[engine] += elapsed
                peak[engine] = max(peak[engine], peak_mb)
                print(f"  round {r + 1}/{args.rounds} {engine:5s} {len(part) / elapsed:6.2f} img/s "
                      f"(peak {peak_mb:,.0f} MB, load {os.getloadavg()[0]:.2f})", flush=True)
            vectors = {e: store.load_embeddings(scratch / e, with_metadata=True) for e in engines}
            keys = {e: vectors[e][1].column("path").to_pylist() for e in engines}
            assert keys["local"] == keys["ray"], "the engines embedded different files"
            diffs.append(float(np.abs(vectors["local"][0] - vectors["ray"][0]).max()))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    rate = {e: len(files) / seconds[e] for e in engines}
    local_batch_s = args.batch_size / rate["local"]
    overhead = max(0.0, one_batch["ray"] - local_batch_s)
    results = {
        "images": len(files), "cores": cores, "batch_size": args.batch_size, "shard_size": args.shard_size,
        "rounds": args.rounds, "ray_workers": args.workers, "img_per_s": rate, "ratio_ray_over_local":
        rate["ray"] / rate["local"], "peak_mb": peak, "ray_startup_s": startup,
        "one_batch_run_s": one_batch, "ray_per_run_overhead_s": overhead, "max_abs_diff": max(diffs),
        "load_average_end": os.getloadavg()[0],
    }
    print(f"\n{'engine':8s} {'img/s':>8s} {'peak MB':>9s}")
    for e in engines:
        print(f"{e:8s} {rate[e]:8.2f} {peak[e]:9,.0f}")
    print(f"ray / local: {results['ratio_ray_over_local']:.3f}   (target >= 0.85)")
    print(f"ray start-up {startup:.1f} s (once per cluster); per-run overhead ~{overhead:.1f} s (one-batch run: "
          f"ray {one_batch['ray']:.1f} s, local {one_batch['local']:.1f} s); max |local - ray| = {max(diffs):.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
