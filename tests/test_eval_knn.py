"""k-NN evaluation against a brute-force NumPy implementation of the DINOv2 rule, one test feature at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinokit.eval.knn import few_shot_indices, knn_evaluate, knn_neighbours, knn_predict


def brute_force_knn(train, train_labels, test, test_labels, ks, temperature=0.07):
    """The rule written out plainly: returns {k: (top-1 predictions, top-5 lists, top-1 %, top-5 %)}."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    max_k = min(max(ks), len(train))
    results = {k: ([], [], 0, 0) for k in ks}
    for query, label in zip(test, test_labels):
        sims = train.astype(np.float64) @ query.astype(np.float64)
        order = np.lexsort((np.arange(len(sims)), -sims))[:max_k]  # similarity desc, then train index asc
        top_sims = sims[order]
        weights = np.exp((top_sims - top_sims[0]) / temperature)
        weights = weights / weights.sum()
        for k in ks:
            scores = np.zeros(num_classes)
            for weight, neighbour in zip(weights[:k], order[:k]):
                scores[train_labels[neighbour]] += weight
            ranking = np.argsort(-scores, kind="stable")  # score desc, then class index asc
            preds, top5s, hits1, hits5 = results[k]
            results[k] = (preds + [ranking[0]], top5s + [list(ranking[:5])],
                          hits1 + int(ranking[0] == label), hits5 + int(label in ranking[:5]))
    return {k: (np.array(p), np.array(t), 100.0 * h1 / len(test), 100.0 * h5 / len(test))
            for k, (p, t, h1, h5) in results.items()}


def grid_features(rng, n, dim, nonzeros=4):
    """Unit vectors with `nonzeros` entries of +-0.5: every cosine is an exact multiple of 0.25, so many tie."""
    features = np.zeros((n, dim), dtype=np.float32)
    for row in features:
        row[rng.choice(dim, nonzeros, replace=False)] = rng.choice([-0.5, 0.5], nonzeros)
    return features


def assert_matches_brute_force(train, train_labels, test, test_labels, ks, **options):
    expected = brute_force_knn(train, train_labels, test, test_labels, ks)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train, train_labels, test, ks=ks, num_classes=num_classes, **options)
    rows = {row["k"]: row for row in knn_evaluate(train, train_labels, test, test_labels, ks=ks, **options)}
    for k in ks:
        preds, top5, top1_acc, top5_acc = expected[k]
        ranking = scores[k].sort(dim=1, descending=True, stable=True).indices
        np.testing.assert_array_equal(scores[k].argmax(dim=1).numpy(), preds)
        np.testing.assert_array_equal(ranking[:, :5].numpy(), top5)
        assert rows[k]["top1"] == pytest.approx(top1_acc, abs=1e-9)
        assert rows[k]["top5"] == pytest.approx(top5_acc, abs=1e-9)


def test_knn_matches_brute_force_on_random_features():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16))
    test = rng.normal(size=(60, 16))
    train_labels = rng.integers(0, 7, 300)
    test_labels = rng.integers(0, 7, 60)
    assert_matches_brute_force(train, train_labels, test, test_labels, ks=(1, 5, 10, 20, 100, 200),
                               dtype=torch.float64)


def test_knn_matches_brute_force_with_many_exact_similarity_ties():
    rng = np.random.default_rng(1)
    train = grid_features(rng, 400, 8)
    test = grid_features(rng, 80, 8)
    train_labels = rng.integers(0, 6, 400)
    test_labels = rng.integers(0, 6, 80)
    sims = test @ train.T
    assert len(np.unique(sims)) <= 9  # few distinct values: ties at every rank, including the k-th
    assert_matches_brute_force(train, train_labels, test, test_labels, ks=(1, 3, 10, 20, 100, 200))


def test_knn_result_does_not_depend_on_chunk_sizes():
    rng = np.random.default_rng(2)
    train = grid_features(rng, 500, 8)
    test = grid_features(rng, 70, 8)
    train_labels = rng.integers(0, 5, 500)
    test_labels = rng.integers(0, 5, 70)
    whole = knn_neighbours(train, test, 200)
    for train_chunk, test_chunk in [(23, 9), (64, 1000), (199, 16), (500, 70)]:
        sims, indices = knn_neighbours(train, test, 200, train_chunk_size=train_chunk, test_chunk_size=test_chunk)
        assert torch.equal(sims, whole[0]) and torch.equal(indices, whole[1])
    assert_matches_brute_force(train, train_labels, test, test_labels, ks=(10, 20, 100, 200),
                               train_chunk_size=37, test_chunk_size=11)


def test_knn_neighbours_break_similarity_ties_by_lower_train_index():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    sims, indices = knn_neighbours(train, np.array([[1.0, 0.0]], dtype=np.float32), 4, train_chunk_size=2)
    assert indices.tolist() == [[0, 2, 3, 1]]
    assert sims.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_knn_class_score_ties_go_to_the_lower_class_index():
    # Two neighbours with identical similarity but different labels: classes 3 and 1 tie exactly.
    train = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    scores = knn_predict(train, np.array([3, 1]), np.array([[1.0, 0.0]], dtype=np.float32), ks=(2,))
    assert scores[2][0, 1] == scores[2][0, 3]
    rows = knn_evaluate(train, np.array([3, 1]), np.array([[1.0, 0.0]], dtype=np.float32), np.array([1]), ks=(2,))
    assert rows[0]["top1"] == 100.0


def test_knn_with_k_larger_than_class_size_and_than_train_set():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(30, 8))
    train_labels = np.repeat(np.arange(6), 5)  # 5 per class: k = 10, 20 exceed every class
    test = rng.normal(size=(25, 8))
    test_labels = rng.integers(0, 6, 25)
    assert_matches_brute_force(train, train_labels, test, test_labels, ks=(10, 20, 100, 200), dtype=torch.float64)
    scores = knn_predict(train, train_labels, test, ks=(100, 200))
    assert torch.equal(scores[100], scores[200])  # both use all 30 train features
    assert torch.allclose(scores[200].sum(dim=1), torch.ones(25, dtype=torch.float64))


def test_knn_perfect_on_well_separated_clusters():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(4, 32)) * 10
    train_labels = rng.integers(0, 4, 400)
    test_labels = rng.integers(0, 4, 100)
    train = centres[train_labels] + rng.normal(size=(400, 32))
    test = centres[test_labels] + rng.normal(size=(100, 32))
    for row in knn_evaluate(train, train_labels, test, test_labels, ks=(10, 20)):
        assert row["top1"] == 100.0 and row["top5"] == 100.0


def test_few_shot_uses_n_per_class_and_reports_mean_and_std_over_tries():
    rng = np.random.default_rng(5)
    train = rng.normal(size=(200, 8))
    train_labels = np.repeat(np.arange(4), 50)
    test = rng.normal(size=(40, 8))
    test_labels = rng.integers(0, 4, 40)
    subset = few_shot_indices(torch.from_numpy(train_labels), 3, seed=0)
    assert np.bincount(train_labels[subset.numpy()]).tolist() == [3, 3, 3, 3]
    assert not torch.equal(subset, few_shot_indices(torch.from_numpy(train_labels), 3, seed=1))

    rows = knn_evaluate(train, train_labels, test, test_labels, ks=(2, 10), n_per_class=[3], n_tries=4)
    few = [row for row in rows if row["n_per_class"] == 3]
    assert [row["k"] for row in few] == [2, 3]  # ks <= n plus k = n, as the reference
    per_try = []
    for seed in range(4):
        idx = few_shot_indices(torch.from_numpy(train_labels), 3, seed)
        per_try.append(brute_force_knn(train[idx.numpy()], train_labels[idx.numpy()], test, test_labels, (2,))[2][2])
    assert few[0]["top1"] == pytest.approx(np.mean(per_try), abs=1e-9)
    assert few[0]["top1_std"] == pytest.approx(np.std(per_try), abs=1e-9)


def test_knn_rejects_mismatched_inputs_with_clear_errors():
    with pytest.raises(ValueError, match="different dimensions"):
        knn_evaluate(np.zeros((4, 3)), np.zeros(4, int), np.zeros((2, 5)), np.zeros(2, int))
    with pytest.raises(ValueError, match="labels"):
        knn_evaluate(np.ones((4, 3)), np.zeros(3, int), np.ones((2, 3)), np.zeros(2, int))
    with pytest.raises(ValueError, match="empty"):
        knn_evaluate(np.ones((0, 3)), np.zeros(0, int), np.ones((2, 3)), np.zeros(2, int))
