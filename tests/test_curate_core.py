"""The curation algorithms against the reference's worked vectors and independent implementations (sklearn,
scipy, faiss brute force): spec/curation.md §7 checks 1, 2, 5, 7 (components) and 8."""

from __future__ import annotations

import numpy as np
import pytest

from dinokit.curate import hierarchy, kmeans, knn, retrieval, sampling

pytest.importorskip("faiss")


def gaussian_mixture(n_per, dim=16, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per), dim))
    x = np.concatenate([c + spread * rng.normal(size=(m, dim)) for c, m in zip(centres, n_per)])
    labels = np.repeat(np.arange(len(n_per)), n_per)
    return x.astype(np.float32), labels


# ------------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("sizes, target, multiplier, expected", [
    ([1, 5, 10, 100], 30, 1, [1, 5, 10, 14]),
    ([3, 3, 3, 100], 20, 1, [3, 3, 3, 11]),
    ([10, 10, 10], 20, 1, [6, 7, 7]),  # sorted: which two get the +1 is random
    ([1, 2, 3], 100, 1, [1, 2, 3]),
    ([1, 2, 50], 20, 2, [2, 4, 14]),
    ([4, 4], 5, 1, [2, 3]),
])
def test_allocation_reproduces_the_reference_worked_vectors(sizes, target, multiplier, expected):
    for seed in range(5):
        counts = sampling.allocate(sizes, target, multiplier, np.random.default_rng(seed))
        assert sorted(counts.tolist()) == expected


def test_allocation_invariants_hold_on_random_inputs():
    rng = np.random.default_rng(1)
    for _ in range(300):
        sizes = rng.integers(1, 200, size=rng.integers(1, 30)) ** rng.integers(1, 3)
        m = int(rng.integers(1, 4))
        target = int(rng.integers(0, 2 * sizes.sum() * m + 2))
        counts = sampling.allocate(sizes, target, m, rng)
        assert counts.sum() == min(target, sizes.sum() * m)
        assert (counts <= sizes * m).all() and (counts >= 0).all()
        uncapped = counts[counts < sizes * m]  # clusters not given everything share the cap within 1
        if len(uncapped):
            assert uncapped.max() - uncapped.min() <= 1
            assert (counts[counts == sizes * m] <= uncapped.max()).all()


# ------------------------------------------------------------------------------------------ k-means
def test_lloyd_steps_equal_sklearn_from_the_same_initial_centroids():
    from sklearn.cluster import KMeans

    x, _ = gaussian_mixture([300, 200, 150, 100, 50], seed=2)
    init = kmeans.kmeans_plusplus(x, 8, np.random.default_rng(0))  # spread out: no cluster empties (sklearn
    # would move an empty cluster's centroid; the reference, like dinokit, keeps it)
    for steps in (1, 3, 10):
        ours = kmeans.kmeans(x, 8, n_iters=steps, init=init)
        ref = KMeans(8, init=init, n_init=1, max_iter=steps, tol=0, algorithm="lloyd").fit(x)
        np.testing.assert_array_equal(ours.labels, ref.labels_)
        assert abs(ours.inertia - ref.inertia_) <= 1e-5 * ref.inertia_
        np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-5)


def test_float64_assignment_agrees_with_faiss():
    x, _ = gaussian_mixture([200, 100], seed=3)
    c = x[:10]
    a32, d32 = kmeans.assign(x, c)
    a64, d64 = kmeans.assign(x, c, precision="float64")
    np.testing.assert_array_equal(a32, a64)
    np.testing.assert_allclose(d32, d64, rtol=1e-3, atol=1e-4)


def test_kmeans_plusplus_potential_matches_sklearn_over_seeds():
    from sklearn.cluster import kmeans_plusplus

    x, _ = gaussian_mixture([400, 300, 200, 100, 50, 25], seed=4)

    def potential(centres):
        return kmeans.assign(x, centres)[1].sum(dtype=np.float64)

    ours = np.mean([potential(kmeans.kmeans_plusplus(x, 20, np.random.default_rng(s))) for s in range(20)])
    ref = np.mean([potential(kmeans_plusplus(x, 20, random_state=s)[0]) for s in range(20)])
    assert abs(ours / ref - 1) < 0.05


def test_lloyd_inertia_never_increases_and_empty_clusters_keep_their_centroid():
    x, _ = gaussian_mixture([500, 300, 100], seed=5)
    result = kmeans.kmeans(x, 12, n_iters=15, rng=np.random.default_rng(0))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.inertia_history, result.inertia_history[1:]))
    far = np.full((1, x.shape[1]), 100.0, dtype=np.float32)  # a centroid no point is near
    moved = kmeans.update_centroids(x, kmeans.assign(x, np.r_[x[:3], far])[0], np.r_[x[:3], far])
    np.testing.assert_array_equal(moved[3], far[0])


def test_one_dimensional_kmeans_centroid_density_follows_p_to_the_one_third():
    # spec §3.6: in 1-D, k-means centroids have density ~ p^(1/3), not p
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 40_000), rng.normal(6, 1, 4_000)]).astype(np.float32)[:, None]
    centres = np.sort(kmeans.kmeans(x, 200, n_iters=30, rng=rng).centroids[:, 0])
    grid = np.linspace(-3, 9, 25)
    observed = np.histogram(centres, bins=grid)[0] / len(centres)

    def mass(power):
        mid = (grid[1:] + grid[:-1]) / 2
        p = 10 * np.exp(-mid ** 2 / 2) + np.exp(-(mid - 6) ** 2 / 2)
        return p ** power / (p ** power).sum()

    assert np.abs(observed - mass(1 / 3)).sum() < 0.5 * np.abs(observed - mass(1.0)).sum()


# ------------------------------------------------------------------------------------------ hierarchy
def test_default_levels_follow_the_spec_rule():
    assert hierarchy.default_levels(1_000) == [16]
    assert hierarchy.default_levels(1_000_000) == [15625, 1562, 156]
    assert hierarchy.default_levels(1_000_000_000) == [15625000, 1562500, 156250, 15625]
    assert hierarchy.auto_sample_size(1000, 100) == 5 and hierarchy.auto_sample_size(100, 100) == 1


def test_resampling_moves_centroids_towards_the_cores_of_a_skewed_mixture():
    # 90 % of the points in one blob: plain k-means spends most centroids there; resampling spreads them out.
    x, labels = gaussian_mixture([4500, 250, 250], dim=8, spread=0.3, seed=6)
    plain = hierarchy.cluster_level(x, 30, n_iters=20, resample_steps=0)
    resampled = hierarchy.cluster_level(x, 30, n_iters=20, resample_steps=10, sample_size=20)

    def in_dominant_blob(level):
        nearest = kmeans.assign(level.centroids, x)[0]
        return (labels[nearest] == 0).mean()

    assert in_dominant_blob(resampled) < in_dominant_blob(plain)


def test_hierarchy_levels_form_a_tree_of_non_empty_clusters():
    x, _ = gaussian_mixture([300] * 10, seed=7)
    levels = [hierarchy.cluster_level(x, 60, n_iters=5, resample_steps=2)]
    levels.append(hierarchy.cluster_level(levels[0].centroids, 10, n_iters=5, resample_steps=2))
    sizes = hierarchy.flat_sizes(levels)
    assert sizes[0].sum() == sizes[1].sum() == len(x) and (sizes[0] > 0).all() and (sizes[1] > 0).all()
    assert hierarchy.point_paths(levels).shape == (len(x), 2)


def test_first_level_split_gives_about_k_times_splits_clusters():
    x, _ = gaussian_mixture([400] * 5, seed=8)
    level = hierarchy.cluster_level(x, 10, n_iters=5, resample_steps=0, n_splits=4)
    assert 30 <= level.k <= 40 and (np.bincount(level.labels) > 0).all()
    with pytest.raises(ValueError, match="split"):
        hierarchy.cluster_level(x, 10, resample_steps=3, n_splits=4)


# ------------------------------------------------------------------------------------------ sampling
def entropy(counts):
    p = np.asarray(counts, float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def test_balanced_sampling_flattens_a_long_tailed_mixture():
    sizes = (3000 / np.arange(1, 21) ** 1.2).astype(int) + 5  # Zipf-like class sizes
    x, labels = gaussian_mixture(sizes.tolist(), dim=16, spread=0.2, seed=9)
    levels = [hierarchy.cluster_level(x, 120, n_iters=10, resample_steps=3)]
    levels.append(hierarchy.cluster_level(levels[0].centroids, 25, n_iters=10, resample_steps=3))
    rows, times = sampling.sample(levels, 600, rng=np.random.default_rng(0))
    assert times.sum() == 600 and (times == 1).all()
    random_rows = np.random.default_rng(0).choice(len(x), 600, replace=False)
    curated = np.bincount(labels[rows], minlength=20)
    uniform = np.bincount(labels[random_rows], minlength=20)
    assert entropy(curated) > entropy(uniform) + 0.05
    assert (curated > 0).sum() >= (uniform > 0).sum()


def test_sampling_multiplier_and_leaf_strategies():
    x, _ = gaussian_mixture([50, 10], seed=10)
    levels = [hierarchy.cluster_level(x, 2, n_iters=5, resample_steps=0)]
    rows, times = sampling.sample(levels, 200, multiplier=3)
    # a budget above 3 x the pool: every image, each exactly three times (180 < 200)
    np.testing.assert_array_equal(rows, np.arange(60))
    assert (times == 3).all()
    rows, times = sampling.sample(levels, 100, multiplier=3)  # 100 of 180: no image more than three times
    assert times.sum() == 100 and times.max() <= 3 and len(rows) == len(set(rows.tolist()))
    rows, times = sampling.sample(levels, 10, leaf="closest")
    lv = levels[0]
    for c in range(lv.k):
        members = np.flatnonzero(lv.labels == c)
        taken = np.intersect1d(rows, members)
        closest = members[np.argsort(lv.sqdist[members], kind="stable")][:len(taken)]
        np.testing.assert_array_equal(np.sort(closest), taken)


# ------------------------------------------------------------------------------------------ graphs
def test_union_find_components_equal_scipy_connected_components():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(11)
    n = 3000
    src, dst = rng.integers(0, n, 2500), rng.integers(0, n, 2500)
    ours = knn.components(n, src, dst)
    _, ref = connected_components(coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)), directed=False)
    # same partition: a bijection between label sets
    pairs = set(zip(ours.tolist(), ref.tolist()))
    assert len(pairs) == len(set(ours.tolist())) == len(set(ref.tolist()))
    assert (ours <= np.arange(n)).all()  # labelled by the smallest member


def test_sample_based_retrieval_equals_faiss_brute_force():
    import faiss

    rng = np.random.default_rng(12)
    pool = rng.normal(size=(2000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    seeds = pool[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    got = retrieval.sample_based(pool, seeds, 4)
    index = faiss.IndexFlatIP(32)
    index.add(pool)
    ids = index.search(seeds, 4)[1]
    rows, times = np.unique(ids, return_counts=True)
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_array_equal(got.times, times)
    assert got.nominal == 200 and got.collisions == 200 - len(rows)  # DINOv2 Table 15 counting: N x |queries|


def test_cluster_based_retrieval_takes_clusters_with_more_than_m_seed_hits_and_caps():
    x, labels = gaussian_mixture([100, 100, 100], seed=13)
    level = hierarchy.cluster_level(x, 3, n_iters=10, resample_steps=0)
    seeds = np.r_[x[labels == 0][:5], x[labels == 1][:2]]  # 5 hits in one cluster, 2 in another
    got = retrieval.cluster_based(level.labels, level.centroids, seeds, min_seed_hits=3, per_cluster=40, cap=1000)
    assert got.clusters == 1 and len(got.rows) == 40 and set(labels[got.rows]) == {0}
    assert got.nominal == 40
    capped = retrieval.cluster_based(level.labels, level.centroids, seeds, min_seed_hits=1, per_cluster=1000,
                                     cap=150)
    assert capped.clusters == 2 and len(capped.rows) == 150


def test_readme_toy_rings_small_rings_get_far_more_than_their_share():
    # spec §3.5/§7.3, scaled down 10x: rings of 2000/20/100/50/800 points; uniform picks give the 20-point ring
    # 100 * 20 / 2970 = 0.7 of 100 images.
    rng = np.random.default_rng(14)
    counts, radii = [2000, 20, 100, 50, 800], [1, 2, 3, 4, 5]
    angle = [rng.uniform(0, 2 * np.pi, m) for m in counts]
    x = np.concatenate([np.c_[r * np.cos(a), r * np.sin(a)] for r, a in zip(radii, angle)])
    x = (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    ring = np.repeat(np.arange(5), counts)
    levels = [hierarchy.cluster_level(x, 100, n_iters=20, resample_steps=3, sample_size=15)]
    levels.append(hierarchy.cluster_level(levels[0].centroids, 30, n_iters=20, resample_steps=3, sample_size=2))
    rows, _ = sampling.sample(levels, 100, rng=np.random.default_rng(0))
    picked = np.bincount(ring[rows], minlength=5)
    assert picked[1] >= 3, picked  # >= 4x its share
    assert picked[0] < 0.75 * 100 * 2000 / 2970, picked  # the dominant ring well under its share


def test_torch_assignment_path_equals_faiss():
    # the CUDA path's arithmetic, run on the CPU (no GPU here): same labels, same distances
    x, _ = gaussian_mixture([300, 200, 100], seed=15)
    c = x[::37]
    labels, dist = kmeans.assign(x, c)
    torch_labels, torch_dist = kmeans._assign_torch(x, c, "cpu", 128)
    np.testing.assert_array_equal(labels, torch_labels)
    np.testing.assert_allclose(dist, torch_dist, rtol=1e-4, atol=1e-4)


def test_ivf_knn_graph_finds_planted_copies_like_the_exact_one():
    from dinokit.curate import dedup

    rng = np.random.default_rng(16)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted = rng.choice(len(x), 100, replace=False)
    copies = x[planted] + 0.003 * rng.normal(size=(100, 32)).astype(np.float32)
    pool = np.concatenate([x, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    exact = dedup.self_dedup(pool, 0.98, k=8)
    approximate = dedup.self_dedup(pool, 0.98, k=8, exact_max=1000)  # IVF-Flat
    for result in (exact, approximate):
        assert np.mean(result.component[planted] == result.component[len(x):]) >= 0.95
        assert result.keep.sum() == len(x)


def test_device_auto_takes_a_gpu_only_when_torch_sees_one_and_nothing_asks_for_the_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kmeans.resolve_device("auto") == "cuda"
    assert kmeans.resolve_device("auto", precision="float64") == "cpu"  # float64 assignments run on the CPU
    assert kmeans.resolve_device("auto", engine="ray") == "cpu"  # Ray tasks assign with faiss on the workers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kmeans.resolve_device("auto") == "cpu" and kmeans.resolve_device("cpu") == "cpu"


def test_devices_that_cannot_run_the_assignments_are_refused(monkeypatch):
    import torch

    with pytest.raises(ValueError, match="--device is auto, cpu, cuda or cuda:N, got 'gpu'"):
        kmeans.resolve_device("gpu")
    with pytest.raises(ValueError, match="float64 assignments run on the CPU"):
        kmeans.resolve_device("cuda", precision="float64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        kmeans.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert kmeans.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        kmeans.resolve_device("cuda:2")
