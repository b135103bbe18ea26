"""`dinokit curate` stage by stage on synthetic embeddings: wall time and peak memory (RSS) per stage.

Data: N unit vectors of dimension D from a Zipf-weighted Gaussian mixture (200 components) with 1 % planted
near-duplicates. Stages: self-dedup (k-NN graph, k = 64, exact up to --exact-max, IVF above), each k-means level
(k-means++, Lloyd, resampling), balanced sampling to 10 % of the survivors. Prints the CPU model, its vector ISA,
the thread count and the load average (a shared machine's load slows every figure).

    python benchmarks/curate_scale.py --n 100000 --dim 384 --iters 10 --resample-steps 1
    python benchmarks/curate_scale.py --n 1000000 --dim 384 --iters 5 --resample-steps 0 --levels 1000,100
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
from machine import cpu_description

from dinokit.curate import dedup, hierarchy, sampling


class PeakRSS:
    """Highest resident set size of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def synthetic(n, dim, rng, components=200):
    weights = 1 / np.arange(1, components + 1) ** 1.1
    counts = rng.multinomial(n - n // 100, weights / weights.sum())
    centres = rng.normal(size=(components, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    start = 0
    for c, m in zip(centres, counts):
        x[start:start + m] = c + 0.8 * rng.normal(size=(m, dim)).astype(np.float32)
        start += m
    copies = rng.choice(start, n - start, replace=False)
    x[start:] = x[copies] + 0.01 * rng.normal(size=(n - start, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--resample-steps", type=int, default=1)
    parser.add_argument("--exact-max", type=int, default=200_000)
    parser.add_argument("--levels", default=None, help="clusters per level, e.g. 1000,100 (default: curate's rule)")
    parser.add_argument("--output", default=None, help="JSON file for the figures (rewritten after every stage)")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    print(f"CPU: {cpu_description()}; load average {load_start:.1f} at start", flush=True)
    rng = np.random.default_rng(0)
    x = synthetic(args.n, args.dim, rng)
    rows, ks = [], []

    def stage(name, fn):
        with PeakRSS() as memory:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        rows.append({"stage": name, "seconds": round(seconds, 2), "peak_rss_gb": round(memory.peak / 2 ** 30, 2),
                     "load_average_after": round(os.getloadavg()[0], 1)})
        print(f"{name}: {seconds:.1f} s, peak RSS {memory.peak / 2 ** 30:.2f} GB", flush=True)
        save(done=False)
        return result

    def save(done: bool):
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"cpu": cpu_description(), "complete": done,
                           "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
                           "args": vars(args), "levels": ks, "stages": rows}, f, indent=1)

    result = stage(f"dedup (64-NN graph, {'exact' if args.n <= args.exact_max else 'IVF'})",
                   lambda: dedup.self_dedup(x, 0.95, exact_max=args.exact_max))
    survivors = x[result.keep]
    ks[:] = [int(v) for v in args.levels.split(",")] if args.levels else hierarchy.default_levels(len(survivors))
    levels, level_input = [], survivors
    for i, k in enumerate(ks):
        def run_level(level_input=level_input, k=k, i=i):
            return hierarchy.cluster_level(level_input, k, n_iters=args.iters, resample_steps=args.resample_steps,
                                           rng=np.random.default_rng(i))
        level = stage(f"k-means level {i + 1}: {len(level_input):,} -> {k:,}", run_level)
        levels.append(level)
        level_input = level.centroids
    target = len(survivors) // 10
    stage(f"balanced sampling to {target:,}", lambda: sampling.sample(levels, target))
    total = sum(r["seconds"] for r in rows)
    print(f"\n{args.n:,} x {args.dim}, {len(survivors):,} after dedup, levels {ks}, {args.iters} Lloyd iterations, "
          f"{args.resample_steps} resampling steps; load average {os.getloadavg()[0]:.1f} at end")
    print("| stage | seconds | peak RSS (GB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['peak_rss_gb']} |")
    print(f"| total | {total:.1f} | {max(r['peak_rss_gb'] for r in rows)} |")
    save(done=True)


if __name__ == "__main__":
    main()
