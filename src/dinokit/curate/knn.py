"""k-NN graphs over unit vectors and their connected components.

Neighbours come from faiss: an exact IndexFlatIP up to `exact_max` vectors, above it an IVF-Flat index with
about 4*sqrt(n) lists searched with `nprobe` lists (DINOv2 used IVF-PQ on GPUs; IVF-Flat keeps the similarities
exact for the pairs it finds). Components come from a union-find over the edges (`components`), written with
numpy so 10^8 edges need no Python loop: hook each edge's larger root under the smaller, compress, repeat.
"""

from __future__ import annotations

import math

import numpy as np

from dinokit.extras import optional_import

DEFAULT_K = 64  # DINOv2's self-dedup graph
EXACT_MAX = 200_000


def _faiss():
    return optional_import("faiss", purpose="k-NN graphs for curation")


def build_index(vectors: np.ndarray, exact_max: int = EXACT_MAX, nprobe: int = 32, rng_seed: int = 0):
    """An inner-product index over `vectors`: exact when small, IVF-Flat when large."""
    faiss = _faiss()
    n, d = vectors.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors[np.random.default_rng(rng_seed).choice(n, min(n, 64 * nlist), replace=False)]
        index.train(np.ascontiguousarray(train))
        index.nprobe = min(nprobe, nlist)
    index.add(np.ascontiguousarray(vectors))
    return index


def search(index, queries: np.ndarray, k: int, batch: int = 16_384, log=None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids), each (n, k); ids -1 where fewer than k were found."""
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), batch):
        sims[s:s + batch], ids[s:s + batch] = index.search(np.ascontiguousarray(queries[s:s + batch]), k)
        if log and len(queries) > batch:
            log(f"k-NN search {min(s + batch, len(queries)):,}/{len(queries):,}")
    return sims, ids


def knn_graph(vectors: np.ndarray, k: int = DEFAULT_K, exact_max: int = EXACT_MAX, log=None):
    """Each row's k nearest other rows: (similarities, ids), self-matches removed (ids -1 there)."""
    index = build_index(vectors, exact_max)
    sims, ids = search(index, vectors, min(k + 1, len(vectors)), log=log)
    own = ids == np.arange(len(vectors))[:, None]
    # A row whose own id is missing (an exact duplicate ranked first, or IVF) loses its last neighbour instead.
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    sims = sims[~own].reshape(len(vectors), -1)
    ids = ids[~own].reshape(len(vectors), -1)
    return sims, ids


def edges_above(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of every k-NN edge with similarity >= threshold."""
    mask = (sims >= threshold) & (ids >= 0)
    sources = np.repeat(np.arange(len(ids)), mask.sum(axis=1))
    return sources, ids[mask]


def components(n: int, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes (the smallest node id in its component): union-find over the edges."""
    parent = np.arange(n, dtype=np.int64)
    u, v = np.asarray(sources, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    while True:
        ru, rv = parent[u], parent[v]
        active = ru != rv
        if not active.any():
            break
        u, v, ru, rv = u[active], v[active], ru[active], rv[active]
        # hook: the larger root points to the smaller one (minimum wins when several edges hit one root)
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:  # compress: every node points straight to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def nn_histogram(nearest: np.ndarray, bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each row's nearest-neighbour similarity in `bins` equal bins over [-1, 1]."""
    counts, edges = np.histogram(np.clip(nearest, -1, 1), bins=bins, range=(-1.0, 1.0))
    return counts, edges
