"""faiss index over an embedding folder: exact by default, approximate above a size with measured recall."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from dinokit.apps import store
from dinokit.apps.index import build_index, load_index, normalized_float32
from dinokit.apps.search import search


def _folder(root, vectors, shard_size=500, pooling="cls"):
    num_shards = -(-len(vectors) // shard_size)
    for i in range(num_shards):
        rows = range(i * shard_size, min((i + 1) * shard_size, len(vectors)))
        store.write_shard(root, i, num_shards, vectors[rows.start:rows.stop],
                          {"path": [f"/data/img_{j:05d}.jpg" for j in rows]})
    store.write_manifest(root, {"complete": True, "num_shards": num_shards, "pooling": pooling})
    return root


def _clustered(n, dim=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def test_exact_index_returns_each_vector_itself_first(tmp_path):
    vectors = _clustered(1200)
    report = build_index(_folder(tmp_path, vectors))
    assert report.kind == "flat" and report.recall_at_10 == 1.0 and report.num_vectors == 1200
    queries = vectors[::97]
    results = search(tmp_path, queries * 3.0, k=5)  # any scale: queries are normalised like the index
    for row, matches in zip(range(0, 1200, 97), results):
        assert matches[0].path == f"/data/img_{row:05d}.jpg"
        assert matches[0].score == pytest.approx(1.0, abs=1e-5)
        assert [m.rank for m in matches] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(matches, matches[1:]))


@pytest.mark.parametrize("kind", ["auto", "hnsw"])
def test_approximate_index_reports_the_recall_it_achieves(tmp_path, kind):
    vectors = _clustered(6000, seed=1)
    report = build_index(_folder(tmp_path, vectors), kind=kind, exact_max=1000, target_recall=0.9,
                         recall_queries=300)
    assert report.kind == ("ivf" if kind == "auto" else "hnsw")
    assert report.recall_at_10 >= 0.9 and report.recall_queries == 300
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["recall_at_10"] == report.recall_at_10 and info["params"] == report.params

    # Measure again, independently, through the saved index with its saved search parameter.
    index, _, _ = load_index(tmp_path)
    unit = normalized_float32(vectors)
    queries = np.random.default_rng(5).choice(len(unit), 200, replace=False)
    _, exact = faiss.knn(unit[queries], unit, 11, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(unit[queries], 11)
    recall = np.mean([len(set(e) & set(f)) / 11 for e, f in zip(exact, found)])
    assert recall >= 0.85


def test_index_refuses_patch_grids(tmp_path):
    _folder(tmp_path, np.zeros((4, 2, 8), np.float32), pooling="patch")
    with pytest.raises(ValueError, match="patch grids"):
        build_index(tmp_path)


def test_search_rejects_queries_of_another_dimension(tmp_path):
    build_index(_folder(tmp_path, _clustered(50)))
    with pytest.raises(ValueError, match="dimension 16 but the index holds 32"):
        search(tmp_path / "index", np.ones((1, 16), np.float32))


def test_search_without_index_says_how_to_build_one(tmp_path):
    _folder(tmp_path, _clustered(10))
    with pytest.raises(FileNotFoundError, match="dinokit index"):
        search(tmp_path, np.ones((1, 32), np.float32))


def test_vectors_may_be_given_as_nested_lists(tmp_path):
    vectors = _clustered(30)
    build_index(_folder(tmp_path, vectors))
    (matches,) = search(tmp_path, vectors[7:8].tolist(), k=1)
    assert matches[0].path == "/data/img_00007.jpg"


def test_k_larger_than_the_collection_returns_everything(tmp_path):
    build_index(_folder(tmp_path, _clustered(7)))
    (matches,) = search(tmp_path, _clustered(7)[:1], k=50)
    assert len(matches) == 7
