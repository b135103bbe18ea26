"""Nearest neighbours of query images (or vectors) in an index built by `dinokit.apps.index`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.apps.index import load_index, normalized_float32


@dataclass
class Match:
    rank: int  # 1 = most similar
    path: str
    score: float  # cosine similarity


def _is_image_input(queries) -> bool:
    image_types = (str, Path, Image.Image)
    if isinstance(queries, image_types):
        return True
    return isinstance(queries, (list, tuple)) and bool(queries) and isinstance(queries[0], image_types)


def query_vectors(queries, manifest: dict, *, model=None, device: str = "auto", batch_size: int = 16) -> np.ndarray:
    """Vectors for `queries`: arrays pass through; images are embedded exactly as the indexed folder was."""
    if not _is_image_input(queries):
        if hasattr(queries, "detach"):  # torch tensor
            queries = queries.detach().float().cpu().numpy()
        return np.asarray(queries, dtype=np.float32)
    from dinokit.apps.embed import embed_images, model_from_manifest

    images = [queries] if isinstance(queries, (str, Path, Image.Image)) else list(queries)
    if model is None:
        model = model_from_manifest(manifest)
    return embed_images(images, model, image_size=manifest.get("image_size", 224),
                        pooling=manifest.get("pooling", "cls"), device=device, batch_size=batch_size)


def search(index_dir: str | Path, queries, k: int = 10, *, model=None, device: str = "auto",
           batch_size: int = 16) -> list[list[Match]]:
    """The `k` most similar indexed images of each query, best first.

    queries: image paths or PIL images, embedded with the model and preprocessing recorded in the index's
    manifest (pass `model` to override, e.g. an in-memory model); or an array of vectors of shape (q, dim).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    index, metadata, info = load_index(index_dir)
    vectors = query_vectors(queries, info.get("embeddings_manifest", {}), model=model, device=device,
                            batch_size=batch_size)
    vectors = normalized_float32(vectors)
    if vectors.shape[1] != index.d:
        raise ValueError(f"queries have dimension {vectors.shape[1]} but the index holds {index.d}-dimensional "
                         f"vectors; embed queries with the model and pooling the index was built with.")
    scores, ids = index.search(vectors, min(k, index.ntotal))
    paths = metadata.column("path").to_pylist()
    results = []
    for row_ids, row_scores in zip(ids, scores):
        found = [(i, s) for i, s in zip(row_ids, row_scores) if i >= 0]  # -1: fewer than k reachable
        results.append([Match(rank=r + 1, path=paths[i], score=float(s)) for r, (i, s) in enumerate(found)])
    return results
