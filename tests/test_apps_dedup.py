"""Near-duplicate groups as connected components over cosine similarity >= threshold."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dinokit.apps import store
from dinokit.apps.dedup import dedup, find_duplicate_groups


def _planted(n_unique=300, dim=64, group_sizes=(2, 3, 4, 2, 5, 2), noise=0.05, seed=0):
    """Random unit vectors plus near copies of some of them; returns vectors and the planted groups."""
    rng = np.random.default_rng(seed)
    vectors = list(rng.normal(size=(n_unique, dim)))
    groups = []
    for source, size in zip(rng.choice(n_unique, len(group_sizes), replace=False), group_sizes):
        members = [int(source)]
        for _ in range(size - 1):
            vectors.append(vectors[source] + noise * rng.normal(size=dim))
            members.append(len(vectors) - 1)
        groups.append(sorted(members))
    order = rng.permutation(len(vectors))  # scatter the copies through the collection
    position = np.argsort(order)
    shuffled = np.asarray(vectors, dtype=np.float32)[order]
    return shuffled, sorted(sorted(int(position[m]) for m in g) for g in groups)


def test_planted_duplicate_groups_are_found_exactly():
    vectors, planted = _planted()
    found = [g.tolist() for g in find_duplicate_groups(vectors, threshold=0.9, batch_size=50)]
    assert found == planted


def test_groups_are_transitive_chains():
    # a~b and b~c but a and c below the threshold: still one group.
    angles = np.radians([0.0, 20.0, 40.0, 120.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    groups = find_duplicate_groups(vectors, threshold=float(np.cos(np.radians(25))))
    assert [g.tolist() for g in groups] == [[0, 1, 2]]


def test_threshold_outside_cosine_range_is_rejected():
    with pytest.raises(ValueError, match="threshold"):
        find_duplicate_groups(np.eye(3, dtype=np.float32), threshold=1.5)


def test_dedup_keeps_the_largest_image_then_the_smallest_path(tmp_path):
    vectors, planted = _planted(n_unique=40, group_sizes=(3, 2), seed=3)
    n = len(vectors)
    paths = [f"/photos/{i:03d}.jpg" for i in range(n)]
    widths, heights = [100] * n, [100] * n
    big = planted[0][-1]
    widths[big] = 400  # the largest of the first group must be kept even though its path sorts last
    store.write_shard(tmp_path, 0, 1, vectors, {"path": paths, "width": widths, "height": heights})
    store.write_manifest(tmp_path, {"complete": True, "num_shards": 1, "pooling": "cls"})

    report = dedup(tmp_path, threshold=0.9, output=tmp_path / "out" / "groups.csv")
    assert [g["keep"] for g in report.groups] == [paths[big], paths[planted[1][0]]]  # tie -> smallest path
    assert report.num_duplicates == 3

    with open(tmp_path / "out" / "groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows if r["keep"] == "1"] == [g["keep"] for g in report.groups]
    assert sorted(r["path"] for r in rows) == sorted(paths[i] for g in planted for i in g)
    summary = json.loads((tmp_path / "out" / "groups.json").read_text())
    assert summary["num_groups"] == 2 and summary["num_duplicates"] == 3
    assert all(0.9 <= s <= 1.0 + 1e-6 for g in summary["groups"] for s in g["similarity"])


def test_no_duplicates_gives_empty_outputs(tmp_path):
    vectors = np.eye(5, dtype=np.float32)
    store.write_shard(tmp_path, 0, 1, vectors, {"path": list("abcde")})
    store.write_manifest(tmp_path, {"complete": True, "num_shards": 1})
    report = dedup(tmp_path, threshold=0.5)
    assert report.groups == [] and json.loads((tmp_path / "duplicates.json").read_text())["num_groups"] == 0
