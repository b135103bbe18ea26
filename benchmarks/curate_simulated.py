"""The published simulated benchmark of Vo et al. (ssl-data-curation `vis/notebook.ipynb`, spec/curation.md §3.6),
reproduced with dinokit's hierarchical k-means.

Data: 7,000 N((-1,-1), 0.5^2 I) + 1,000 N((1,-1), .) + 500 N((0,1), .) + 500 U([-3,3]^2). Metric: KL divergence of
the Gaussian KDE (bandwidth 0.5) of 300 final centroids from the uniform density on [-3,3]^2, on a grid of step
0.02. Published: raw 0.942, k-means 0.340, 2 levels 0.132, 3 levels 0.081, 3 levels + resampling 0.042, 300 uniform
points 0.040 +- 0.007. "raw" here = 300 points drawn from the data.

    python benchmarks/curate_simulated.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dinokit.curate import hierarchy

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

GRID = np.arange(-3, 3 + 1e-9, 0.02)
PUBLISHED = {"raw data (300 points)": 0.942, "k-means 300": 0.340, "2 levels 1500,300": 0.132,
             "3 levels 3000,1000,300": 0.081, "3 levels + resampling (sizes 2,2,2)": 0.042,
             "300 uniform points (bound)": 0.040}


def data(rng):
    def blob(centre, n):
        return np.asarray(centre) + 0.5 * rng.normal(size=(n, 2))
    return np.concatenate([blob((-1, -1), 7000), blob((1, -1), 1000), blob((0, 1), 500),
                           rng.uniform(-3, 3, size=(500, 2))]).astype(np.float32)


def kl_to_uniform(points, bandwidth=0.5):
    gx, gy = np.meshgrid(GRID, GRID, indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    d2 = ((grid[:, None, :] - points[None, :, :].astype(np.float64)) ** 2).sum(-1)
    density = np.exp(-d2 / (2 * bandwidth ** 2)).sum(1)
    p = density / density.sum()
    q = 1.0 / len(p)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q)).sum())


def hierarchical(x, ks, steps, sizes, seed):
    level_input, level = x, None
    for i, k in enumerate(ks):
        level = hierarchy.cluster_level(level_input, k, n_iters=50, resample_steps=steps,
                                        sample_size=sizes[i] if sizes else 1, rng=np.random.default_rng([seed, i]))
        level_input = level.centroids
    return level.centroids


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results_curate_simulated.json")
    args = parser.parse_args()
    rows = {name: [] for name in PUBLISHED}
    seconds = {name: [] for name in PUBLISHED}
    for run in range(args.runs):
        rng = np.random.default_rng(run)
        x = data(rng)
        methods = {
            "raw data (300 points)": lambda x=x, rng=rng: x[rng.choice(len(x), 300, replace=False)],
            "k-means 300": lambda x=x, run=run: hierarchical(x, [300], 0, None, run),
            "2 levels 1500,300": lambda x=x, run=run: hierarchical(x, [1500, 300], 0, None, run),
            "3 levels 3000,1000,300": lambda x=x, run=run: hierarchical(x, [3000, 1000, 300], 0, None, run),
            "3 levels + resampling (sizes 2,2,2)": lambda x=x, run=run: hierarchical(x, [3000, 1000, 300], 10, [2, 2, 2], run),
            "300 uniform points (bound)": lambda rng=rng: rng.uniform(-3, 3, size=(300, 2)),
        }
        for name, method in methods.items():
            start = time.perf_counter()
            points = method()
            seconds[name].append(time.perf_counter() - start)
            rows[name].append(kl_to_uniform(points))
        print(f"run {run + 1}/{args.runs} done", flush=True)
    print(f"\nCPU: {cpu_description()}; {args.runs} runs (data seeds 0..{args.runs - 1})")
    print("| method | published KL | dinokit KL (mean +- std over runs) | seconds per run |\n|---|---|---|---|")
    for name in PUBLISHED:
        v = np.array(rows[name])
        print(f"| {name} | {PUBLISHED[name]:.3f} | {v.mean():.3f} +- {v.std():.3f} | {np.mean(seconds[name]):.1f} |")
    with open(args.output, "w") as f:
        json.dump({"cpu": cpu_description(), "runs": args.runs, "published": PUBLISHED, "kl": rows,
                   "seconds": seconds}, f, indent=1)


if __name__ == "__main__":
    main()
