"""k-NN graphs over unit vectors and their connected components.

Neighbours come from faiss: an exact IndexFlatIP up to `exact_max` vectors, above it an IVF-Flat index with
about 4*sqrt(n) lists searched with `nprobe` lists (DINOv2 used IVF-PQ on GPUs; IVF-Flat keeps the similarities
exact for the pairs it finds). Vectors are added and searched in batches, so `vectors` may be an
`inputs.Vectors` read from memory-mapped shards; the index itself holds them (4 bytes per dimension). Components come from a union-find over the edges (`components`), written with
numpy so 10^8 edges need no Python loop: hook each edge's larger root under the smaller, compress, repeat.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dinokit.curate.engine import LOCAL
from dinokit.curate.progress import Silent
from dinokit.extras import optional_import

DEFAULT_K = 64  # DINOv2's self-dedup graph
EXACT_MAX = 200_000


def _faiss():
    return optional_import("faiss", purpose="k-NN graphs for curation")


def build_index(vectors: np.ndarray, exact_max: int = EXACT_MAX, nprobe: int = 32, rng_seed: int = 0,
                batch: int = 65_536):
    """An inner-product index over `vectors`: exact when small, IVF-Flat when large; added batch by batch."""
    faiss = _faiss()
    n, d = vectors.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(rng_seed).choice(n, min(n, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        index.nprobe = min(nprobe, nlist)
    for s in range(0, n, batch):
        index.add(np.ascontiguousarray(vectors[s:s + batch], dtype=np.float32))
    return index


def _search_block(index, block, k: int):
    return index.search(np.ascontiguousarray(block, dtype=np.float32), k)


def search_batches(index, queries, k: int, batch: int = 16_384, progress=Silent, desc: str = "k-NN search",
                   engine=LOCAL):
    """(start, similarities, ids) per batch of queries, each (batch, k); ids -1 where fewer than k were found.
    The batches run on `engine` (this process, or Ray tasks: the same batches, the same results)."""
    search_k = functools.partial(_search_block, k=k)
    for s, (sims, ids) in engine.map(search_k, queries, batch, index, progress=progress, desc=desc, unit="query"):
        yield s, sims, ids


def search(index, queries, k: int, batch: int = 16_384, progress=Silent, engine=LOCAL) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids), each (n, k); ids -1 where fewer than k were found."""
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s, batch_sims, batch_ids in search_batches(index, queries, k, batch, progress, engine=engine):
        sims[s:s + len(batch_ids)], ids[s:s + len(batch_ids)] = batch_sims, batch_ids
    return sims, ids


def _drop_self(start: int, sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    own = ids == np.arange(start, start + len(ids))[:, None]
    # A row whose own id is missing (an exact duplicate ranked first, or IVF) loses its last neighbour instead.
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    return sims[~own].reshape(len(ids), -1), ids[~own].reshape(len(ids), -1)


def knn_graph(vectors, k: int = DEFAULT_K, exact_max: int = EXACT_MAX, progress=Silent, engine=LOCAL):
    """Each row's k nearest other rows: (similarities, ids), self-matches removed (ids -1 there)."""
    index = build_index(vectors, exact_max)
    n, k1 = len(vectors), min(k + 1, len(vectors))
    sims, ids = np.empty((n, k1 - 1), dtype=np.float32), np.empty((n, k1 - 1), dtype=np.int64)
    for s, batch_sims, batch_ids in search_batches(index, vectors, k1, progress=progress, engine=engine):
        sims[s:s + len(batch_ids)], ids[s:s + len(batch_ids)] = _drop_self(s, batch_sims, batch_ids)
    return sims, ids


def threshold_graph(vectors, threshold: float, k: int = DEFAULT_K, exact_max: int = EXACT_MAX, progress=Silent,
                    engine=LOCAL):
    """The k-NN graph's edges with similarity >= threshold and each row's nearest-neighbour similarity:
    (sources, targets, nearest). Only the edges kept are stored, so memory grows with the duplicates found,
    not with n * k."""
    index = build_index(vectors, exact_max)
    n, k1 = len(vectors), min(k + 1, len(vectors))
    nearest = np.full(n, -1.0, dtype=np.float32)
    sources, targets = [], []
    for s, batch_sims, batch_ids in search_batches(index, vectors, k1, progress=progress, engine=engine):
        sims, ids = _drop_self(s, batch_sims, batch_ids)
        if sims.shape[1]:
            nearest[s:s + len(ids)] = sims[:, 0]
        source, target = edges_above(sims, ids, threshold)
        sources.append(source + s)
        targets.append(target)
    return np.concatenate(sources), np.concatenate(targets), nearest


def edges_above(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of every k-NN edge with similarity >= threshold (sources are positions in `ids`)."""
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
