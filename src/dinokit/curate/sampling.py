"""Balanced hierarchical sampling (Vo et al. 2024): a budget handed down the cluster tree by water-filling.

`allocate(sizes, target, multiplier)`: with a = sizes * multiplier, if sum(a) <= target every cluster gives all
of a (the result is then smaller than the target). Otherwise the largest cap c with sum(min(c, a_i)) <= target
is found by bisection, each cluster gives min(c, a_i), and the remainder goes out as +1 to clusters chosen at
random among those with a_i > c: small clusters are taken whole, large ones are capped equally.

`sample`: the target is allocated over the top-level clusters by their sizes in points, each cluster's share over
its children by theirs, down to level 1. A level-1 cluster of s points with budget b gives floor(b/s) copies of
every point plus b - floor(b/s)*s points drawn at random without replacement ("random", the reference's
default) or the ones closest to its centroid ("closest"). `multiplier` m bounds how often one point is picked.
"""

from __future__ import annotations

import numpy as np

from dinokit.curate.hierarchy import Level, flat_sizes

LEAF_STRATEGIES = ("random", "closest")


def allocate(sizes, target: int, multiplier: int = 1, rng: np.random.Generator | None = None) -> np.ndarray:
    """How many items each cluster gives (see the module docstring)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    available = np.asarray(sizes, dtype=np.int64) * int(multiplier)
    if target < 0 or multiplier < 1:
        raise ValueError(f"target must be >= 0 and multiplier >= 1, got {target} and {multiplier}")
    if available.sum() <= target:
        return available
    low, high = 0, int(available.max())  # sum(min(low, a)) <= target < sum(min(high, a))
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(middle, available).sum() <= target:
            low = middle
        else:
            high = middle
    counts = np.minimum(low, available)
    remainder = int(target - counts.sum())
    if remainder:
        capped = np.flatnonzero(available > low)
        counts[rng.choice(capped, remainder, replace=False)] += 1
    return counts


def sample(levels: list[Level], target: int, *, multiplier: int = 1, leaf: str = "random",
           rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, times): the points picked and how often each, rows ascending."""
    if leaf not in LEAF_STRATEGIES:
        raise ValueError(f"leaf strategy is one of {LEAF_STRATEGIES}, got {leaf!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    sizes = flat_sizes(levels)
    budget = allocate(sizes[-1], target, multiplier, rng)  # over the top level's clusters
    for depth in range(len(levels) - 1, 0, -1):  # hand each cluster's budget to its children one level down
        parents = levels[depth].labels  # parent of each child cluster
        child_budget = np.zeros(len(parents), dtype=np.int64)
        order = np.argsort(parents, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(parents, minlength=len(budget)))]
        for p in np.flatnonzero(budget):
            children = order[bounds[p]:bounds[p + 1]]
            child_budget[children] = allocate(sizes[depth - 1][children], int(budget[p]), multiplier, rng)
        budget = child_budget
    return _pick_points(levels[0], budget, leaf, rng)


def _pick_points(level: Level, budget: np.ndarray, leaf: str, rng) -> tuple[np.ndarray, np.ndarray]:
    labels = level.labels
    key = level.sqdist if leaf == "closest" else rng.random(len(labels))
    order = np.lexsort((key, labels))  # each cluster's points contiguous, closest (or a random order) first
    sizes = np.bincount(labels, minlength=len(budget))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    full = budget // np.maximum(sizes, 1)
    partial = budget - full * sizes
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    times = np.zeros(len(labels), dtype=np.int64)
    times[order] = full[labels[order]] + (rank < partial[labels[order]])
    rows = np.flatnonzero(times)
    return rows, times[rows]
