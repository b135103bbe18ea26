"""Retrieval of pool images close to curated seed sets (DINOv2 §3, App. A.4).

- sample-based (seed sets of more than `SAMPLE_BASED_ABOVE` images in "auto" mode): the `per_seed` nearest pool
  images of every seed image (DINOv2: 4, or 32 for ImageNet-1k).
- cluster-based (smaller seed sets): assign the seed images to the pool's level-1 clusters; from every cluster
  holding more than `min_seed_hits` seed images (DINOv2: 3) take `per_cluster` pool images (10,000; a smaller
  cluster gives all it has), at random; at most `cap` images per seed set (1,000,000), drawn at random.

Collisions -- one pool image retrieved more than once (by several seed images, or seed sets) -- are counted, not
added: each image is kept once with the number of times it was retrieved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinokit.curate import knn
from dinokit.curate.engine import LOCAL
from dinokit.curate.kmeans import assign
from dinokit.curate.progress import Silent

SAMPLE_BASED_ABOVE = 1_000_000
MODES = ("auto", "sample", "cluster")


@dataclass
class Retrieved:
    name: str
    mode: str
    rows: np.ndarray  # distinct pool rows retrieved (positions in the pool given)
    times: np.ndarray  # how many times each was retrieved
    nominal: int  # per_seed * |seeds|, or per_cluster * #clusters before the cap (DINOv2 Table 15's counting)
    clusters: int = 0  # qualifying clusters (cluster-based)

    @property
    def collisions(self) -> int:
        return int(self.times.sum() - len(self.rows))


def sample_based(pool, seeds, per_seed: int, name: str = "seed", exact_max: int = knn.EXACT_MAX,
                 progress=Silent, engine=LOCAL) -> Retrieved:
    """`pool` and `seeds`: unit rows, arrays or `inputs.Vectors` (read batch by batch)."""
    per_seed = min(per_seed, len(pool))
    _, ids = knn.search(knn.build_index(pool, exact_max), seeds, per_seed, progress=progress, engine=engine)
    ids = ids[ids >= 0]
    rows, times = np.unique(ids, return_counts=True)
    return Retrieved(name, "sample", rows, times, per_seed * len(seeds))


def cluster_based(pool_labels: np.ndarray, centroids: np.ndarray, seeds: np.ndarray, *, min_seed_hits: int = 3,
                  per_cluster: int = 10_000, cap: int = 1_000_000, rng: np.random.Generator | None = None,
                  name: str = "seed", device: str = "cpu") -> Retrieved:
    rng = rng if rng is not None else np.random.default_rng(0)
    seed_labels, _ = assign(seeds, centroids, device=device)
    hits = np.bincount(seed_labels, minlength=len(centroids))
    chosen = np.flatnonzero(hits > min_seed_hits)
    order = np.argsort(pool_labels, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(pool_labels, minlength=len(centroids)))]
    picked = []
    for c in chosen:
        members = order[bounds[c]:bounds[c + 1]]
        picked.append(members if len(members) <= per_cluster else rng.choice(members, per_cluster, replace=False))
    rows = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    if len(rows) > cap:
        rows = np.sort(rng.choice(rows, cap, replace=False))
    return Retrieved(name, "cluster", rows, np.ones(len(rows), dtype=np.int64), per_cluster * len(chosen),
                     clusters=len(chosen))


def choose_mode(mode: str, num_seeds: int) -> str:
    if mode not in MODES:
        raise ValueError(f"retrieval mode is one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "sample" if num_seeds > SAMPLE_BASED_ABOVE else "cluster"
    return mode
