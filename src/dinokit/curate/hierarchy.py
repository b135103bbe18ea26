"""Hierarchical k-means with resampling (Vo et al. 2024, DINOv3's LVD-1689M).

Level 1 clusters the points; level t >= 2 clusters the centroids of level t-1, so the levels form a tree whose
leaves are points. Per level: k-means on the whole level input, then `resample_steps` times: take from every
cluster the `sample_size` members closest to its centroid (or random ones), run a fresh k-means (new k-means++
init, same k) on that union, and reassign the whole level input to the new centroids. Each step pulls centroids
towards the cores of clusters and away from dense regions, flattening the centroids' density (k-means alone puts
centroids with density ~ p^(d/(d+2)), close to the data's p).

Clusters left empty by a level are dropped and the rest renumbered, so every cluster of every level is non-empty
and the next level clusters only real centroids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinokit.curate.engine import LOCAL
from dinokit.curate.inputs import materialise, take
from dinokit.curate.kmeans import DEFAULT_ITERS, assign, kmeans
from dinokit.curate.progress import Silent

LEAF_MEAN = 64  # default points per level-1 cluster (the reference's configs: 74 and 85)
BRANCHING = 10  # default children per cluster above level 1 (configs: 20/10/5 and 25/10/8/4)
MAX_LEVELS = 4
MIN_TOP_K = 100
DEFAULT_RESAMPLE_STEPS = 10
MEMORY_BUDGET = 2 << 30  # a level input or resampling sample up to this size is read into memory once


@dataclass
class Level:
    labels: np.ndarray  # (n_input,) int64: the cluster of each input row (points, or the level below's clusters)
    centroids: np.ndarray  # (k, D) float32
    sqdist: np.ndarray  # (n_input,) float32: squared distance of each input row to its centroid

    @property
    def k(self) -> int:
        return len(self.centroids)


def default_levels(n: int) -> list[int]:
    """Cluster counts, lowest level first: ~64 points per leaf cluster, then ~10 children per cluster, at most
    4 levels, no level above the first with fewer than 100 clusters."""
    if n < 1:
        raise ValueError("no points to cluster")
    ks = [max(1, min(n, round(n / LEAF_MEAN)))]
    while len(ks) < MAX_LEVELS and ks[-1] // BRANCHING >= MIN_TOP_K:
        ks.append(ks[-1] // BRANCHING)
    return ks


def auto_sample_size(n_input: int, k: int) -> int:
    """Half the mean cluster size of the level (the reference config's rule); 1 means no resampling."""
    return max(1, math.ceil(n_input / k / 2))


def closest_members(labels: np.ndarray, sqdist: np.ndarray, per_cluster: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Row indices of the `per_cluster` members of each cluster closest to its centroid (random ones if rng)."""
    key = rng.random(len(labels)) if rng is not None else sqdist
    order = np.lexsort((key, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < per_cluster])


def _compact(labels: np.ndarray, centroids: np.ndarray, sqdist: np.ndarray) -> Level:
    used, labels = np.unique(labels, return_inverse=True)
    return Level(labels.astype(np.int64), centroids[used], sqdist)


def cluster_level(x: np.ndarray, k: int, *, n_iters: int = DEFAULT_ITERS,
                  resample_steps: int = DEFAULT_RESAMPLE_STEPS, sample_size: int | None = None,
                  sample_strategy: str = "closest", n_splits: int = 1, rng: np.random.Generator | None = None,
                  precision: str = "float32", device: str = "cpu", log=None, progress=Silent,
                  memory_budget: int = MEMORY_BUDGET, engine=LOCAL) -> Level:
    """One level: k-means, then resampling steps (or the first-level split into n_splits sub-clusters each).

    `x` may be an `inputs.Vectors`: read into memory when it fits `memory_budget` bytes (each Lloyd step passes
    over it twice), else streamed from its memory-mapped shards on every pass."""
    rng = rng if rng is not None else np.random.default_rng(0)
    k = min(k, len(x))
    if n_splits > 1 and resample_steps > 0:
        raise ValueError("a level is either split (n_splits > 1) or resampled, not both (as in the reference)")
    x = materialise(x, memory_budget)
    result = kmeans(x, k, n_iters=n_iters, rng=rng, precision=precision, device=device, progress=progress,
                    engine=engine)
    centroids, labels, sqdist = result.centroids, result.labels, result.sqdist
    sample_size = auto_sample_size(len(x), k) if sample_size is None else sample_size
    for step in range(resample_steps if sample_size > 1 else 0):
        picked = closest_members(labels, sqdist, sample_size, rng if sample_strategy == "random" else None)
        sample = materialise(take(x, picked), memory_budget)
        if isinstance(sample, np.ndarray):
            sample = sample.astype(np.float32, copy=False)
        if log:
            log(f"resampling step {step + 1}/{resample_steps}: {len(picked):,} points")
        centroids = kmeans(sample, min(k, len(sample)), n_iters=n_iters, rng=rng, precision=precision,
                           device=device, progress=progress, engine=engine).centroids
        labels, sqdist = assign(x, centroids, precision=precision, device=device, engine=engine)
    if n_splits > 1:
        labels, centroids, sqdist = _split(x, labels, n_splits, n_iters, rng, precision, device, progress)
    return _compact(labels, centroids, sqdist)


def _split(x, labels, n_splits, n_iters, rng, precision, device, progress=Silent):
    """An independent k-means with min(n_splits, size) clusters inside every cluster."""
    order = np.argsort(labels, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(labels))]
    new_labels = np.empty(len(x), dtype=np.int64)
    sqdist = np.empty(len(x), dtype=np.float32)
    centroids, offset = [], 0
    with progress(total=len(bounds) - 1, desc=f"split in {n_splits}", unit="cluster") as bar:
        for c in range(len(bounds) - 1):
            bar.update()
            members = order[bounds[c]:bounds[c + 1]]
            if not len(members):
                continue
            sub = kmeans(np.asarray(x[members], dtype=np.float32), min(n_splits, len(members)), n_iters=n_iters,
                         rng=rng, precision=precision, device=device)
            new_labels[members] = sub.labels + offset
            sqdist[members] = sub.sqdist
            centroids.append(sub.centroids)
            offset += len(sub.centroids)
    return new_labels, np.concatenate(centroids), sqdist


def flat_sizes(levels: list[Level]) -> list[np.ndarray]:
    """Points under each cluster of each level (level 1 first)."""
    sizes = [np.bincount(levels[0].labels, minlength=levels[0].k)]
    for level in levels[1:]:
        sizes.append(np.bincount(level.labels, weights=sizes[-1], minlength=level.k).astype(np.int64))
    return sizes


def point_paths(levels: list[Level]) -> np.ndarray:
    """(N, L) cluster id of each point at each level, level 1 first."""
    paths = [levels[0].labels]
    for level in levels[1:]:
        paths.append(level.labels[paths[-1]])
    return np.stack(paths, axis=1)
