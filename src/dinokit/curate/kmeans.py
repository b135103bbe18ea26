"""k-means as the reference curation code runs it: squared L2, k-means++ init, a fixed number of Lloyd steps.

- Init: sklearn's greedy k-means++ -- the first centre uniform at random, then each next one the best (lowest
  potential) of `2 + floor(ln k)` candidates drawn with probability proportional to D^2.
- Lloyd: assign every point to its nearest centroid (faiss IndexFlatL2 in float32; numpy in float64 with
  precision="float64"; torch on a GPU with device="cuda"), then each centroid = mean of its points, the sums
  accumulated in float64 (the reference's `high_precision`). An empty cluster keeps its previous centroid.
  No tolerance stop: the reference runs all `n_iters` (50 in its configs).

Every pass over `x` reads it in chunks, so `x` may be an `inputs.Vectors` streamed from memory-mapped shards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from dinokit.curate import inputs
from dinokit.curate.engine import LOCAL
from dinokit.curate.progress import Silent
from dinokit.extras import optional_import

DEFAULT_ITERS = 50


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32
    labels: np.ndarray  # (N,) int64, nearest centroid of each point (to the final centroids)
    sqdist: np.ndarray  # (N,) float32, squared distance to it
    inertia_history: list[float] = field(default_factory=list)  # after each assignment, final one last

    @property
    def inertia(self) -> float:
        return self.inertia_history[-1]


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _chunks(x, itemsize: int = 4):
    """(start, block) over the rows of x: an ndarray (views) or an `inputs.Vectors` (reads); blocks of
    `inputs.CHUNK_BYTES` at `itemsize` bytes per value."""
    chunk = inputs.rows_per_chunk(x.shape[1], itemsize)
    for start in range(0, len(x), chunk):
        yield start, np.asarray(x[start:start + chunk])


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, n_local_trials: int | None = None,
                    return_indices: bool = False, progress=Silent):
    """k rows of `x` chosen by greedy k-means++ (as sklearn.cluster.kmeans_plusplus)."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means++ needs 1 <= k <= {n} points, got k={k}")
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    x_norms = np.concatenate([_sq_norms(block) for _, block in _chunks(x)])

    def sqdist(rows: np.ndarray) -> np.ndarray:  # (n, len(rows)) squared distances, float64, >= 0
        centres = np.asarray(x[rows])
        d = np.empty((n, len(rows)), dtype=np.float64)
        for start, block in _chunks(x):
            d[start:start + len(block)] = block @ centres.T
        d *= -2.0  # in place: one (n, trials) array, not four
        d += x_norms[:, None]
        d += x_norms[rows][None, :]
        return np.maximum(d, 0.0, out=d)

    indices = np.empty(k, dtype=np.int64)
    indices[0] = rng.integers(n)
    closest = sqdist(indices[:1])[:, 0]
    potential = closest.sum()
    bar = progress(total=k, desc="k-means++", unit="centre")
    for c in range(1, k):
        bar.update()
        if potential <= 0:  # every point sits on a centre already: take any not chosen yet
            indices[c] = np.setdiff1d(np.arange(n), indices[:c])[0]
            continue
        candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * potential)
        candidates = np.minimum(candidates, n - 1)
        distances = sqdist(candidates)
        np.minimum(distances, closest[:, None], out=distances)
        potentials = distances.sum(axis=0)
        best = int(np.argmin(potentials))
        indices[c], closest, potential = candidates[best], distances[:, best].copy(), potentials[best]
    bar.close()
    centers = np.array(x[indices], dtype=np.float32)
    return (centers, indices) if return_indices else centers


def resolve_device(device: str, precision: str = "float32", engine: str = "local") -> str:
    """Where the assignments run: 'cpu' (faiss) or 'cuda[:N]' (torch). `auto` takes a CUDA GPU when torch sees
    one and nothing else asks for the CPU (float64 assignments and Ray tasks run there); an explicit cuda device
    is checked here, before any stage runs, instead of failing in torch after dedup."""
    if device == "cpu":
        return device
    if device == "auto":
        if precision != "float32" or engine != "local":
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device is auto, cpu, cuda or cuda:N, got {device!r}")
    if precision == "float64":
        raise ValueError(f"float64 assignments run on the CPU: drop --device {device} or --precision float64")
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (faiss) or "
                         f"auto")
    number = int(device.partition(":")[2] or 0)
    if number >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _nearest(centroids: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """(labels, squared distances) of a block's rows to their nearest centroid: faiss IndexFlatL2, float32."""
    faiss = optional_import("faiss", purpose="k-means assignments")
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    d, i = index.search(np.ascontiguousarray(block, dtype=np.float32), 1)
    return i[:, 0], np.maximum(d[:, 0], 0)


def assign(x: np.ndarray, centroids: np.ndarray, *, precision: str = "float32", device: str = "cpu",
           chunk: int | None = None, engine=LOCAL) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row and the squared distance to it, `chunk` rows at a time (default: as many
    as keep one chunk's vectors and distances within `inputs.CHUNK_BYTES`, as the reference's 1e8 / k rows).
    The float32 (faiss) path runs its batches on `engine`: this process, or Ray tasks with equal results."""
    chunk = chunk or inputs.rows_per_chunk(max(x.shape[1], len(centroids)), 8)
    if device.startswith("cuda"):
        return _assign_torch(x, centroids, device, chunk)
    if precision == "float64":
        c = centroids.astype(np.float64)
        c_norms = _sq_norms(c)
        labels = np.empty(len(x), dtype=np.int64)
        dist = np.empty(len(x), dtype=np.float32)
        for s in range(0, len(x), chunk):
            block = np.asarray(x[s:s + chunk], dtype=np.float64)
            d = _sq_norms(block)[:, None] + c_norms[None, :] - 2.0 * block @ c.T
            labels[s:s + len(block)] = np.argmin(d, axis=1)
            dist[s:s + len(block)] = np.maximum(d[np.arange(len(block)), labels[s:s + len(block)]], 0)
        return labels, dist
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    chunk = inputs.rows_per_chunk(x.shape[1])  # faiss blocks its distance matrix itself
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    for s, (i, d) in engine.map(_nearest, x, chunk, centroids):
        labels[s:s + len(i)], dist[s:s + len(i)] = i, d
    return labels, dist


def _assign_torch(x, centroids, device, chunk):
    import torch

    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32), device=device)
    c_norms = (c * c).sum(1)
    labels, dists = [], []
    for s in range(0, len(x), chunk):
        block = torch.as_tensor(np.asarray(x[s:s + chunk], dtype=np.float32), device=device)
        d = (block * block).sum(1, keepdim=True) + c_norms[None] - 2 * block @ c.T
        value, label = d.min(dim=1)
        labels.append(label.cpu().numpy())
        dists.append(value.clamp_min(0).cpu().numpy())
    return np.concatenate(labels).astype(np.int64), np.concatenate(dists).astype(np.float32)


def update_centroids(x: np.ndarray, labels: np.ndarray, previous: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Mean of each cluster's rows, summed in float64; an empty cluster keeps its previous centroid."""
    sparse = optional_import("scipy.sparse", purpose="k-means centroid updates")
    chunk = chunk or inputs.rows_per_chunk(x.shape[1], 8)
    k = len(previous)
    sums = np.zeros(previous.shape, dtype=np.float64)
    for s in range(0, len(x), chunk):
        block = np.asarray(x[s:s + chunk], dtype=np.float64)
        rows = labels[s:s + len(block)]
        onehot = sparse.csr_matrix((np.ones(len(block)), (rows, np.arange(len(block)))), shape=(k, len(block)))
        sums += onehot @ block
    counts = np.bincount(labels, minlength=k)
    centroids = previous.astype(np.float64, copy=True)
    full = counts > 0
    centroids[full] = sums[full] / counts[full, None]
    return centroids.astype(np.float32)


def kmeans(x: np.ndarray, k: int, *, n_iters: int = DEFAULT_ITERS, rng: np.random.Generator | None = None,
           init: np.ndarray | str = "kmeans++", precision: str = "float32", device: str = "cpu",
           progress=Silent, engine=LOCAL) -> KMeansResult:
    """`n_iters` Lloyd steps from k-means++ (or "random" rows, or given centroids)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if isinstance(init, str):
        if init == "kmeans++":
            centroids = kmeans_plusplus(x, k, rng, progress=progress)
        elif init == "random":
            centroids = np.array(x[np.sort(rng.choice(len(x), k, replace=False))], dtype=np.float32)
        else:
            raise ValueError(f"init is 'kmeans++', 'random' or an array, got {init!r}")
    else:
        centroids = np.array(init, dtype=np.float32)
    history = []
    labels, dist = assign(x, centroids, precision=precision, device=device, engine=engine)
    with progress(total=n_iters, desc=f"Lloyd ({len(x):,} -> {k:,})", unit="iter") as bar:
        for _ in range(n_iters):
            history.append(float(dist.sum(dtype=np.float64)))
            centroids = update_centroids(x, labels, centroids)
            labels, dist = assign(x, centroids, precision=precision, device=device, engine=engine)
            bar.update()
    history.append(float(dist.sum(dtype=np.float64)))
    return KMeansResult(centroids, labels, dist, history)
