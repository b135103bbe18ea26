"""Weighted k-NN classification on frozen features, the DINOv2 protocol (Meta's `dinov2/eval/knn.py`).

The rule, for every test feature:
1. L2-normalise test and train features; similarity = cosine = dot product.
2. Take the `max(ks)` most similar train features (200 by default), sorted by similarity.
3. Weight them with `softmax(similarity / T)` over those `max(ks)` neighbours (T = 0.07).
4. Score of class c for a given k = sum of the weights of the first k neighbours whose label is c.
5. Top-1 / top-5 accuracy of these class scores, in percent.

Differences from the reference, all in places the reference leaves undefined:
- Ties are resolved deterministically. Neighbours with equal similarity are ordered by train index (lower
  first), so the neighbour list does not depend on chunk sizes or on `torch.topk` internals. Classes with equal
  score are ranked by class index (lower first); for top-1 this is what the reference's `torch.argmax` does.
- `max(ks)` larger than the training set uses every training feature (the reference's `topk` would fail).
  Any k larger than a class's size just works: the neighbours then include other classes.
- Few-shot: the reference averages accuracies over tries; we also report their standard deviation.

Memory: train features are consumed in chunks of `train_chunk_size` rows (normalised one chunk at a time, so a
1.2 M x 1536 float32 array, or a NumPy memmap of it, is never copied whole), and test features in chunks of
`test_chunk_size`. Only a (test chunk x train chunk) similarity block and the running top-k lists exist at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


def _as_tensor(array) -> torch.Tensor:
    """A tensor view of a tensor or array (a copy only for read-only arrays such as memmap slices)."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _take(features, indices: torch.Tensor):
    """Rows `indices` of a tensor or NumPy array (memmaps included), keeping its kind."""
    return features[indices] if isinstance(features, torch.Tensor) else features[indices.numpy()]


def _check_inputs(train_features, train_labels, test_features, test_labels=None) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"k-NN expects 2-D feature arrays (N, D); got train {tuple(train_features.shape)} "
                         f"and test {tuple(test_features.shape)}.")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"Train and test features have different dimensions ({train_features.shape[1]} vs "
                         f"{test_features.shape[1]}); extract both with the same model.")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one train and one test feature; got an empty set.")
    if len(train_labels) != len(train_features):
        raise ValueError(f"{len(train_labels)} train labels for {len(train_features)} train features.")
    if test_labels is not None and len(test_labels) != len(test_features):
        raise ValueError(f"{len(test_labels)} test labels for {len(test_features)} test features.")


def _canonical_topk(sims: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row, ordered by similarity (descending), then index (ascending).

    `sims` and `indices` are (Q, M) candidate lists; a full stable sort keeps the choice among equal similarities
    independent of where the candidates came from.
    """
    indices, order = indices.sort(dim=1)
    sims = sims.gather(1, order)
    sims, order = sims.sort(dim=1, descending=True, stable=True)
    return sims[:, :k], indices.gather(1, order[:, :k])


def _chunk_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of a (Q, M) similarity block, ties at the k-th value broken by lower column index.

    `torch.topk` is fast but picks arbitrarily among equal values at the boundary; only rows where such a tie
    exists are redone with a stable sort.
    """
    values, columns = sims.topk(k, dim=1)
    kth = values.min(dim=1, keepdim=True).values
    ambiguous = (sims >= kth).sum(dim=1) > k
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        order = sims[rows].sort(dim=1, descending=True, stable=True).indices[:, :k]
        columns[rows] = order
        values[rows] = sims[rows].gather(1, order)
    return values, columns


@torch.no_grad()
def knn_neighbours(
    train_features,
    test_features,
    k: int,
    *,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (Q, k') and train indices (Q, k') of the k' = min(k, N) nearest train features.

    Rows are sorted by similarity (descending), equal similarities by train index (ascending). Features need not
    be normalised; both sides are L2-normalised here. Accepts torch tensors, NumPy arrays or NumPy memmaps.
    """
    num_train, num_test = len(train_features), len(test_features)
    k = min(k, num_train)
    test = F.normalize(_as_tensor(test_features).to(dtype), dim=1)
    best_sims = torch.full((num_test, 0), -math.inf, dtype=dtype)
    best_indices = torch.zeros((num_test, 0), dtype=torch.long)
    for start in range(0, num_train, train_chunk_size):
        train_chunk = F.normalize(_as_tensor(train_features[start:start + train_chunk_size]).to(dtype), dim=1)
        chunk_k = min(k, len(train_chunk))
        new_sims, new_indices = [], []
        for q in range(0, num_test, test_chunk_size):
            sims = test[q:q + test_chunk_size] @ train_chunk.T
            values, columns = _chunk_topk(sims, chunk_k)
            new_sims.append(values)
            new_indices.append(columns + start)
        # Merge this chunk's candidates with the best so far; earlier chunks hold lower indices.
        best_sims, best_indices = _canonical_topk(
            torch.cat([best_sims, torch.cat(new_sims)], dim=1),
            torch.cat([best_indices, torch.cat(new_indices)], dim=1),
            k,
        )
    return best_sims, best_indices


def knn_class_scores(
    neighbour_sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    ks: Sequence[int],
    num_classes: int,
    temperature: float = KNN_TEMPERATURE,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) for each k: softmax(sim / T) over all listed neighbours, summed over the first k.

    Computed in float64 and accumulated neighbour by neighbour in rank order (a cumulative sum). Equal
    similarities get bit-identical weights (each distinct exponent is evaluated once: a vectorised `exp` may
    differ by one ulp between SIMD lanes and the scalar tail), so classes that tie mathematically tie exactly and
    the class-index tie rule applies.
    """
    if neighbour_sims.shape[1] == 0:
        raise ValueError("k-NN needs at least one neighbour per test feature.")
    sims = neighbour_sims.double()
    exponents = (sims - sims.max(dim=1, keepdim=True).values) / temperature
    distinct, position = torch.unique(exponents, return_inverse=True)
    unnormalised = torch.exp(distinct)[position]
    weights = unnormalised / unnormalised.sum(dim=1, keepdim=True)
    num_neighbours = weights.shape[1]
    # The (rows, neighbours, classes) vote tensor is built a few rows at a time (~16 M values) to bound memory.
    rows_per_step = max(1, (1 << 24) // max(1, num_neighbours * num_classes))
    scores = {k: [] for k in ks}
    for start in range(0, len(weights), rows_per_step):
        rows = slice(start, start + rows_per_step)
        votes = F.one_hot(neighbour_labels[rows], num_classes).double() * weights[rows].unsqueeze(2)
        cumulative = votes.cumsum(dim=1)
        for k in ks:
            scores[k].append(cumulative[:, min(k, num_neighbours) - 1])
    return {k: torch.cat(parts) if parts else torch.zeros(0, num_classes, dtype=torch.float64)
            for k, parts in scores.items()}


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Class indices ordered by score (descending), equal scores by class index (ascending)."""
    return scores.sort(dim=1, descending=True, stable=True).indices


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the k best classes (k capped at the number of classes)."""
    ranked = rank_classes(scores)[:, : min(k, scores.shape[1])]
    return 100.0 * (ranked == labels.view(-1, 1)).any(dim=1).double().mean().item()


def knn_predict(
    train_features,
    train_labels,
    test_features,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) of every test feature for each k in `ks`."""
    _check_inputs(train_features, train_labels, test_features)
    train_labels = _as_tensor(train_labels).long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    sims, indices = knn_neighbours(train_features, test_features, max(ks), train_chunk_size=train_chunk_size,
                                   test_chunk_size=test_chunk_size, dtype=dtype)
    return knn_class_scores(sims, train_labels[indices], ks, num_classes, temperature)


def few_shot_indices(labels: torch.Tensor, n_per_class: int, seed: int) -> torch.Tensor:
    """`n_per_class` random train indices of every class, as the reference's `filter_train` draws them."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels):
        members = (labels == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:n_per_class]])
    return torch.cat(chosen)


def knn_evaluate(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    n_per_class: Sequence[int] | int | None = None,
    n_tries: int = 1,
    train_chunk_size: int = 65536,
    test_chunk_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """k-NN top-1 / top-5 accuracies (percent), one row per (training subset, k).

    `n_per_class=None` uses all training features. An int or list of ints adds few-shot rows: for each value n,
    `n_tries` random subsets of n features per class (seeds 0..n_tries-1) are evaluated with the ks <= n plus
    k = n itself (as the reference does); rows then hold the mean and standard deviation over tries.
    """
    _check_inputs(train_features, train_labels, test_features, test_labels)
    train_labels = _as_tensor(train_labels).long()
    test_labels = _as_tensor(test_labels).long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    options = dict(temperature=temperature, num_classes=num_classes, train_chunk_size=train_chunk_size,
                   test_chunk_size=test_chunk_size, dtype=dtype)

    rows = []
    full = knn_predict(train_features, train_labels, test_features, ks=ks, **options)
    for k in sorted(ks):
        rows.append({"n_per_class": None, "k": k, "tries": 1,
                     "top1": topk_accuracy(full[k], test_labels, 1), "top1_std": 0.0,
                     "top5": topk_accuracy(full[k], test_labels, 5), "top5_std": 0.0})

    shots = [] if n_per_class is None else [n_per_class] if isinstance(n_per_class, int) else list(n_per_class)
    for n in shots:
        if n < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n}.")
        shot_ks = sorted(k for k in set(ks) | {n} if k <= n)
        accuracies = {k: ([], []) for k in shot_ks}
        for seed in range(n_tries):
            subset = few_shot_indices(train_labels, n, seed)
            scores = knn_predict(_take(train_features, subset), train_labels[subset], test_features, ks=shot_ks,
                                 **options)
            for k in shot_ks:
                accuracies[k][0].append(topk_accuracy(scores[k], test_labels, 1))
                accuracies[k][1].append(topk_accuracy(scores[k], test_labels, 5))
        for k, (top1, top5) in accuracies.items():
            rows.append({"n_per_class": n, "k": k, "tries": n_tries,
                         "top1": float(np.mean(top1)), "top1_std": float(np.std(top1)),
                         "top5": float(np.mean(top5)), "top5_std": float(np.std(top5))})
    return rows
