"""Self-dedup and decontamination, DINOv2's rules (§3, App. A.3) on a k-NN graph.

Self-dedup: link every image to its k = 64 nearest neighbours whose cosine similarity is >= threshold; each
connected component of that graph keeps one image (KEEP_RULE) and drops the rest. DINOv2's 0.6 was a threshold
on copy-detection (SSCD) descriptors and does not transfer to DINO features, so the default is `dinokit dedup`'s
0.95 and the nearest-neighbour similarity histogram is written for calibration.

Decontamination (--exclude): the same graph over pool + evaluation images at its own threshold; every pool
component that contains an evaluation image is dropped whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinokit.curate import inputs, knn
from dinokit.curate.engine import LOCAL
from dinokit.curate.progress import Silent

DEFAULT_THRESHOLD = 0.95
KEEP_RULE = "most pixels (width*height), then smallest path, then lowest row"


@dataclass
class DedupResult:
    keep: np.ndarray  # (N,) bool
    component: np.ndarray  # (N,) int64, the smallest row of each row's component
    nearest: np.ndarray  # (N,) float32, similarity to the nearest other row (-1 when N == 1)
    num_edges: int


def keep_one_per_component(component: np.ndarray, names: list[str] | None, pixels: np.ndarray | None) -> np.ndarray:
    n = len(component)
    pixels = np.zeros(n, dtype=np.int64) if pixels is None else np.asarray(pixels, dtype=np.int64)
    name_rank = np.zeros(n, dtype=np.int64)
    if names is not None:
        name_rank[np.argsort(np.asarray(names, dtype=object), kind="stable")] = np.arange(n)
    order = np.lexsort((np.arange(n), name_rank, -pixels, component))
    first = np.r_[True, component[order][1:] != component[order][:-1]]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    return keep


def self_dedup(vectors: np.ndarray, threshold: float = DEFAULT_THRESHOLD, *, k: int = knn.DEFAULT_K,
               names: list[str] | None = None, pixels: np.ndarray | None = None,
               exact_max: int = knn.EXACT_MAX, progress=Silent, engine=LOCAL) -> DedupResult:
    check_threshold(threshold, "dedup")
    n = len(vectors)
    if n == 1:
        return DedupResult(np.ones(1, bool), np.zeros(1, np.int64), np.full(1, -1, np.float32), 0)
    sources, targets, nearest = knn.threshold_graph(vectors, threshold, k, exact_max, progress=progress,
                                                    engine=engine)
    component = knn.components(n, sources, targets)
    return DedupResult(keep_one_per_component(component, names, pixels), component, nearest, len(sources))


def check_threshold(threshold: float, what: str) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the {what} threshold is a cosine similarity in [-1, 1], got {threshold}")


@dataclass
class DecontaminationResult:
    drop: np.ndarray  # (N,) bool over the pool rows given
    nearest_reference: np.ndarray  # (N,) int64: nearest evaluation image of each pool row
    similarity: np.ndarray  # (N,) float32: its similarity
    num_edges: int


def decontaminate(pool, references, threshold: float, *, k: int = knn.DEFAULT_K,
                  exact_max: int = knn.EXACT_MAX, progress=Silent, engine=LOCAL) -> DecontaminationResult:
    """Drop every pool component (k-NN graph over pool + references, edges >= threshold) holding a reference."""
    check_threshold(threshold, "decontamination (--exclude)")
    n = len(pool)
    both = inputs.concatenate([pool, references])
    sources, targets, _ = knn.threshold_graph(both, threshold, k, exact_max, progress=progress, engine=engine)
    component = knn.components(len(both), sources, targets)
    contaminated = np.zeros(len(both), dtype=bool)
    contaminated[np.unique(component[n:])] = True
    drop = contaminated[component[:n]]
    ref_sims, ref_ids = knn.search(knn.build_index(references, exact_max), pool, 1, progress=progress,
                                   engine=engine)
    return DecontaminationResult(drop, ref_ids[:, 0], ref_sims[:, 0], len(sources))
