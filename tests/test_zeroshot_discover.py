"""Single-object discovery (LOST, TokenCut), CorLoc and its ground-truth readers, and `dinokit discover`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.zeroshot.corloc import box_iou, corloc, mask_boxes, mask_iou, read_truth, read_voc_boxes
from dinokit.zeroshot.discovery import GridDiscovery, discover, lost, pixel_box, tokencut

from helpers import save_tiny_model


def planted_block(h=12, w=16, c=32, block=(3, 5, 7, 9), seed=0):
    """Background patches near one direction, a block of patches near another that correlates negatively with it
    (foreground . background = -|background|^2 / 2)."""
    rng = np.random.default_rng(seed)
    background, foreground = rng.normal(size=c), rng.normal(size=c)
    foreground -= background * (foreground @ background) / (background @ background) + 0.5 * background
    features = background + 0.1 * rng.normal(size=(h, w, c))
    r0, c0, r1, c1 = block
    features[r0:r1, c0:c1] = foreground + 0.1 * rng.normal(size=(r1 - r0, c1 - c0, c))
    return features


# --------------------------------------------------------------------------- independent re-implementations
def reference_lost(keys: np.ndarray, k: int = 100):
    """LOST written from the paper's steps with plain loops, and a 4-connected flood fill."""
    h, w, c = keys.shape
    K = keys.reshape(-1, c).tolist()
    n = len(K)
    A = [[sum(a * b for a, b in zip(K[i], K[j])) for j in range(n)] for i in range(n)]
    degree = [sum(1 for j in range(n) if j != i and A[i][j] > 0) for i in range(n)]
    order = sorted(range(n), key=lambda i: (degree[i], i))
    seed = order[0]
    similars = [p for p in order[:k] if A[seed][p] > 0]
    foreground = {j for j in range(n) if sum(A[p][j] for p in similars) > 0}
    return seed, flood(foreground, seed, w)


def reference_tokencut(keys: np.ndarray, tau=0.2, eps=1e-5):
    """TokenCut through the symmetric normalised Laplacian: z of its 2nd eigenvalue, y = D^-1/2 z."""
    h, w, c = keys.shape
    X = keys.reshape(-1, c)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    A = np.where(X @ X.T > tau, 1.0, eps)
    d = A.sum(1)
    L = np.eye(len(d)) - A / np.sqrt(np.outer(d, d))
    _, vectors = np.linalg.eigh(L)
    y = vectors[:, 1] / np.sqrt(d)
    seed = int(np.argmax(np.abs(y)))
    side = y > y.mean() if y[seed] > y.mean() else y <= y.mean()
    return y, flood(set(np.flatnonzero(side)), seed, w)


def flood(foreground: set, seed: int, w: int) -> set:
    todo, seen = [seed], {seed}
    while todo:
        r, col = divmod(todo.pop(), w)
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= col + dc < w:
                q = (r + dr) * w + col + dc
                if q in foreground and q not in seen:
                    seen.add(q)
                    todo.append(q)
    return seen


def as_set(mask: np.ndarray) -> set:
    return set(np.flatnonzero(mask))


# ----------------------------------------------------------------------------------------------- algorithms
@pytest.mark.parametrize("algorithm", [lost, tokencut])
def test_both_methods_find_a_planted_block_exactly(algorithm):
    found = algorithm(planted_block())
    assert found.grid_box == (5, 3, 9, 7)  # (x0, y0, x1, y1) in patches
    assert found.mask.sum() == 16 and found.mask[3:7, 5:9].all()
    assert found.mask[found.seed]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lost_equals_an_independent_implementation_on_random_keys(seed):
    keys = np.random.default_rng(seed).normal(size=(9, 11, 24)) + 0.3
    for k in (5, 100):
        expected_seed, expected_mask = reference_lost(keys, k)
        found = lost(keys, k_patches=k)
        assert found.seed == divmod(expected_seed, 11)
        assert as_set(found.mask) == expected_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokencut_equals_an_independent_implementation_on_random_keys(seed):
    rng = np.random.default_rng(seed)
    keys = planted_block(8, 10, 16, block=(1, 2, 5, 6), seed=seed) + 0.4 * rng.normal(size=(8, 10, 16))
    expected_vector, expected_mask = reference_tokencut(keys)
    found = tokencut(keys)
    # The generalised eigenvector (y'Dy = 1) equals D^-1/2 z up to sign; patches with identical graph rows tie
    # for the seed, so the seed is checked as one of the largest |y|, and the component as a set.
    # Both run in float64, so the vectors agree to rounding on every CPU (float32 differed by 0.4% between CPUs).
    assert np.allclose(np.abs(found.score.ravel()), np.abs(expected_vector), rtol=1e-7, atol=1e-10)
    assert abs(found.score[found.seed]) == pytest.approx(np.abs(expected_vector).max(), rel=1e-7)
    assert found.score[found.seed] > 0  # oriented: the seed's side is positive
    assert as_set(found.mask) == expected_mask


def test_lost_breaks_degree_ties_by_the_first_patch_in_raster_order():
    keys = np.ones((3, 4, 8))  # every patch correlates with every other: all degrees equal
    found = lost(keys)
    assert found.seed == (0, 0) and found.mask.all()


def test_lost_gram_bias_shifts_which_correlations_count_as_positive():
    keys = planted_block()
    assert lost(keys, gram_bias=0.0).mask.sum() == 16
    assert lost(keys, gram_bias=1e6).mask.all()  # everything correlates positively: one component, the image


def test_tokencut_of_a_single_patch_is_that_patch():
    found = tokencut(np.ones((1, 1, 4)))
    assert found.mask.tolist() == [[True]] and found.seed == (0, 0)


def test_box_is_clipped_to_the_unpadded_image_and_scaled_back_to_the_original():
    mask = np.zeros((3, 3), bool)
    mask[1:, 2] = True
    found = GridDiscovery(mask=mask, seed=(1, 2), score=np.zeros((3, 3)))
    assert pixel_box(found, 14, (30, 40), (30, 40)) == (28, 14, 40, 30)  # padded to 42 x 42, clipped to 40 x 30
    assert pixel_box(found, 14, (30, 40), (60, 80)) == (56, 28, 80, 60)  # the model saw it at half size


# ----------------------------------------------------------------------------------------- CorLoc and truth
def test_box_iou_and_corloc_on_hand_computed_cases():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 12)) == pytest.approx(100 / 120)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    truths = [[(5, 0, 15, 10), (0, 0, 10, 12)], [(5, 0, 15, 10)], [(0, 0, 20, 10)]]
    value, hits = corloc([(0, 0, 10, 10)] * 3, truths)
    assert hits == [True, False, True]  # any ground-truth box may match; 0.5 exactly counts
    assert value == pytest.approx(200 / 3)


def test_mask_iou_and_instance_masks_to_half_open_boxes():
    ids = np.zeros((6, 8), np.uint8)
    ids[1:3, 2:5] = 1
    ids[4, 7] = 2
    assert mask_boxes(ids) == [(2, 1, 5, 3), (7, 4, 8, 5)]
    predicted = np.zeros((6, 8), bool)
    predicted[1:3, 3:6] = True
    assert mask_iou(predicted, ids > 0) == pytest.approx(4 / 9)


def test_voc_boxes_become_zero_based_half_open(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>cat</name><difficult>1</difficult><bndbox><xmin>10</xmin>"
                   "<ymin>20</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object><object><bndbox><xmin>1</xmin>"
                   "<ymin>1</ymin><xmax>5</xmax><ymax>6</ymax></bndbox></object></annotation>")
    assert read_voc_boxes(xml) == [(9, 19, 30, 40), (0, 0, 5, 6)]


def test_a_mask_of_another_size_than_its_image_is_refused(tmp_path):
    Image.fromarray(np.ones((5, 7), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match="the mask is 7 x 5 pixels but its image is 8 x 5"):
        read_truth(tmp_path / "m.png", (5, 8))


def test_corloc_truth_masks_share_the_id_mask_reader_of_track_but_take_ids_over_255(tmp_path):
    from dinokit.zeroshot.masks import read_id_mask

    Image.new("RGB", (8, 5)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="ground-truth mask .*rgb.png is a RGB image, not a mask of ids"):
        read_truth(tmp_path / "rgb.png", (5, 8))
    ids = np.zeros((5, 8), np.uint16)
    ids[1:3, 2:4], ids[3:5, 5:8] = 300, 7  # 16-bit instance ids: boxes need no 8-bit palette
    Image.fromarray(ids).save(tmp_path / "many.png")
    assert read_truth(tmp_path / "many.png", (5, 8)).boxes == [(5, 3, 8, 5), (2, 1, 4, 3)]
    with pytest.raises(ValueError, match="has ids up to 300: masks hold ids 0-255"):
        read_id_mask(tmp_path / "many.png")  # track / DAVIS write 8-bit indexed masks


# ------------------------------------------------------------------------------------------------- on images
def two_tone(path, size=(56, 70), box=(14, 14, 42, 42)):
    """A grey image with a red block (the object), and its id mask."""
    image = np.full((*size, 3), 128, np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = (220, 30, 30)
    Image.fromarray(image).save(path)
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_discover_on_a_model_returns_boxes_masks_in_image_pixels(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    two_tone(tmp_path / "a.png")
    (found,) = discover([tmp_path / "a.png"], model, method="tokencut", device="cpu")
    assert found.image_size == (56, 70) and found.grid == (4, 5)
    assert found.pixel_mask().shape == (56, 70)
    x0, y0, x1, y1 = found.box
    assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 56 and all(v % 14 == 0 or v == 70 for v in found.box)


def test_discover_command_writes_boxes_masks_pictures_and_corloc(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    for i in range(3):
        Image.fromarray(two_tone(images / f"im{i}.png", box=(14 * i, 14, 14 * i + 28, 42))).save(truth / f"im{i}.png")
    out = tmp_path / "out"
    assert main(["discover", str(images), "--model", model, "-o", str(out), "--truth", str(truth), "--quiet",
                 "--device", "cpu"]) == 0
    run = json.loads((out / "boxes.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert run["method"] == "lost" and len(run["images"]) == 3
    for record in run["images"]:
        assert (out / "masks" / f"{record['name']}.png").is_file() and (out / "vis" / f"{record['name']}.png").is_file()
        assert record["best_iou"] == pytest.approx(box_iou(record["box"], record["truth_boxes"][0]), abs=1e-4)
    hits = [r["best_iou"] >= 0.5 for r in run["images"]]
    assert metrics["corloc"] == pytest.approx(100 * sum(hits) / 3) and metrics["images"] == 3
    assert "mean_mask_iou" in metrics and "CorLoc" in capsys.readouterr().out


def test_discover_refuses_missing_or_wrongly_sized_truth_before_writing_anything(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    (tmp_path / "images").mkdir()
    (tmp_path / "truth").mkdir()
    mask = two_tone(tmp_path / "images" / "a.png")
    Image.fromarray(mask[:-1]).save(tmp_path / "truth" / "a.png")
    out = tmp_path / "out"
    argv = ["discover", str(tmp_path / "images"), "--model", model, "-o", str(out), "--truth", str(tmp_path / "truth"),
            "--quiet", "--device", "cpu"]
    assert main(argv) == 2
    assert "is 70 x 55 pixels but its image" in capsys.readouterr().err and not out.exists()
    (tmp_path / "truth" / "a.png").unlink()
    assert main(argv) == 2
    assert "no ground truth for image 'a'" in capsys.readouterr().err and not out.exists()
