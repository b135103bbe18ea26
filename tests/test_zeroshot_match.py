"""Dense / sparse matching (`dinokit.zeroshot.matching`), the PCK evaluator and `dinokit match`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.cli import main
from dinokit.zeroshot.matching import (
    Side,
    bbox_threshold,
    check_points,
    dense_matches,
    image_threshold,
    match,
    patch_foreground,
    pck,
    planned_size,
    stratify,
)
from dinokit.zeroshot.tracking import PixelEncoder

from helpers import save_tiny_model

P = 8


def noise_image(height=64, width=96, seed=0) -> np.ndarray:
    """Random colours per 2 x 2 block: every patch is distinct, so raw-pixel features match unambiguously."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (height // 2, width // 2, 3)), np.ones((2, 2, 1))).astype(np.uint8)


def side(features: torch.Tensor, foreground=None) -> Side:
    h, w, _ = features.shape
    return Side(F.normalize(features, dim=-1), (w * P, h * P), P, foreground)


def test_an_image_matched_with_itself_maps_every_patch_to_itself():
    image = Image.fromarray(noise_image())
    result = match(image, image, PixelEncoder(P), size=64)
    assert result.a.grid == (8, 12) and len(result.matches) == 96
    assert np.array_equal(result.matches.index_a, result.matches.index_b) and result.matches.mutual.all()
    a, b = result.pairs()
    assert np.array_equal(a, b) and a[0].tolist() == [4.0, 4.0]  # patch centres, (x, y)


def test_a_shifted_pair_recovers_the_shift_for_dense_matches_and_given_points():
    big = noise_image(64, 128, seed=1)
    shift = 2 * P  # B shows A moved 16 px to the left: A's pixel x is B's pixel x - 16
    image_a, image_b = Image.fromarray(big[:, :96]), Image.fromarray(big[:, shift:shift + 96])
    result = match(image_a, image_b, PixelEncoder(P), size=64,
                   points=[[20.0, 10.0], [50.5, 33.0], [95.0, 63.0]])
    a, b = result.pairs()
    visible = a[:, 0] >= shift  # A patches that are also in B
    assert np.allclose(b[visible], a[visible] - [shift, 0])
    # each point -> the centre of its A patch, moved 16 px left: (20, 12) -> (4, 12), (52, 36) -> (36, 36), ...
    assert result.points_b.tolist() == [[4.0, 12.0], [36.0, 36.0], [76.0, 60.0]]


def amir_best_buddies(fa: torch.Tensor, fb: torch.Tensor) -> set[tuple[int, int]]:
    """Amir et al.'s rule: nn_2[nn_1[i]] == i on cosine similarities."""
    sim = F.normalize(fa, dim=-1) @ F.normalize(fb, dim=-1).T
    nn_1, nn_2 = sim.argmax(dim=1), sim.argmax(dim=0)
    return {(i, int(nn_1[i])) for i in range(len(fa)) if int(nn_2[nn_1[i]]) == i}


def test_mutual_matches_are_the_best_buddies_subset_of_the_dense_matches():
    gen = torch.Generator().manual_seed(3)
    fa, fb = torch.randn(6, 7, 16, generator=gen), torch.randn(5, 9, 16, generator=gen)
    every = dense_matches(side(fa), side(fb))
    mutual = dense_matches(side(fa), side(fb), mutual=True)
    pairs = set(zip(every.index_a.tolist(), every.index_b.tolist()))
    buddies = set(zip(mutual.index_a.tolist(), mutual.index_b.tolist()))
    assert len(every) == 42 and buddies < pairs
    assert buddies == amir_best_buddies(fa.reshape(-1, 16), fb.reshape(-1, 16))
    assert set(zip(every.index_a[every.mutual].tolist(), every.index_b[every.mutual].tolist())) == buddies
    expected = (F.normalize(fa.reshape(-1, 16), dim=-1) @ F.normalize(fb.reshape(-1, 16), dim=-1).T).argmax(1)
    assert np.array_equal(every.index_b, expected.numpy())  # one-directional argmax over all of B


def test_foreground_masks_keep_pairs_whose_two_ends_are_foreground():
    gen = torch.Generator().manual_seed(4)
    fa, fb = torch.randn(4, 4, 8, generator=gen), torch.randn(4, 4, 8, generator=gen)
    fg_a, fg_b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    fg_a[:2], fg_b[:, :2] = True, True
    every = dense_matches(side(fa), side(fb))
    kept = dense_matches(side(fa, fg_a), side(fb, fg_b))
    expected = [(a, b) for a, b in zip(every.index_a, every.index_b) if fg_a.reshape(-1)[a] and fg_b.reshape(-1)[b]]
    assert list(zip(kept.index_a, kept.index_b)) == expected


def test_a_patch_is_foreground_when_more_than_half_of_it_is():
    mask = np.zeros((16, 16), np.float32)
    mask[:8, :5] = 1  # 40 of 64 pixels of the top-left patch
    mask[8:, 8:12] = 1  # exactly half of the bottom-right patch: not more than half
    assert patch_foreground(mask, (2, 2), 8).tolist() == [[True, False], [False, False]]


def test_resize_sets_the_height_in_whole_patches_as_the_notebook():
    assert planned_size(480, 640, 768, 16) == (768, 1024)  # 48 rows x int(640 * 768 / (480 * 16)) = 64 columns
    assert planned_size(500, 333, 768, 16) == (768, 496)  # int(31.97) = 31 columns
    assert planned_size(480, 640, 768, 14) == (756, 1022)  # int(768/14) = 54 rows, int(73.1) = 73 columns


def test_stratify_drops_the_point_with_most_close_neighbours_first():
    points = np.array([[0, 0], [50, 0], [100, 0], [300, 0], [330, 0]], dtype=float)
    # within 100: 0-1, 0-2 (exactly 100 counts), 1-2, 3-4. Counts 2,2,2,1,1: drop 0 (first); then 1-2 (1,1,1,1):
    # drop 1; then 3-4: drop 3.
    assert stratify(points, 100).tolist() == [2, 4]
    assert stratify(points, 10).tolist() == [0, 1, 2, 3, 4]


def test_pck_counts_points_strictly_within_alpha_times_the_box_or_image_size():
    predicted = np.array([[0, 0], [10, 0], [0, 4.9], [30, 40]], dtype=float)
    truth = np.zeros((4, 2))
    assert bbox_threshold([10, 20, 60, 120], 0.1) == pytest.approx(10.0)  # max(50, 100) * 0.1
    assert image_threshold((200, 100), 0.05) == pytest.approx(10.0)
    assert pck(predicted, truth, 10.0) == 0.5  # distance 10 is not below 10
    assert pck(predicted, truth, [1, 11, 5, 51]) == 1.0
    assert np.isnan(pck(np.zeros((0, 2)), np.zeros((0, 2)), 1.0))


def test_points_outside_the_image_are_refused_naming_the_point():
    assert check_points([[0, 0], [95.5, 63]], (96, 64)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"point 1 \(96, 10\) is outside the 96 x 64 image"):
        check_points([[0, 0], [96, 10]], (96, 64))
    with pytest.raises(ValueError, match="pairs"):
        check_points([[1, 2, 3]], (96, 64))


def test_match_command_writes_matches_json_and_a_picture(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    Image.fromarray(noise_image(seed=5)).save(tmp_path / "a.png")
    Image.fromarray(noise_image(seed=5)[:, ::-1]).save(tmp_path / "b.png")
    (tmp_path / "points.json").write_text(json.dumps({"points": [[10, 10], [80.5, 60]]}))
    alpha = np.zeros((64, 96, 4), np.uint8)
    alpha[:32, :, 3] = 255
    Image.fromarray(alpha, "RGBA").save(tmp_path / "mask_a.png")
    out = tmp_path / "out"
    assert main(["match", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", model, "-o", str(out),
                 "--size", "28", "--points", str(tmp_path / "points.json"), "--mutual", "--mask-a",
                 str(tmp_path / "mask_a.png")]) == 0
    record = json.loads((out / "matches.json").read_text())
    assert record["grid_a"] == [2, 3] and record["mutual_only"] and all(m["mutual"] for m in record["matches"])
    assert all(m["a"][1] < 32 for m in record["matches"])  # only A's top half is foreground
    assert [p["a"] for p in record["points"]] == [[10.0, 10.0], [80.5, 60.0]] and len(record["points"][0]["b"]) == 2
    with Image.open(out / "matches.png") as drawing:
        assert drawing.height == 384


def test_match_command_refuses_bad_points_and_masks_and_writes_nothing(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    Image.fromarray(noise_image()).save(tmp_path / "a.png")
    (tmp_path / "far.json").write_text("[[10, 10], [500, 10]]")
    (tmp_path / "text.json").write_text("not json")
    Image.new("L", (10, 10), 255).save(tmp_path / "small_mask.png")
    cases = [(["--points", str(tmp_path / "far.json")], "point 1 (500, 10) is outside the 96 x 64 image"),
             (["--points", str(tmp_path / "text.json")], "is not JSON"),
             (["--mask-b", str(tmp_path / "small_mask.png")], "is 10 x 10 but its image is 96 x 64")]
    for options, message in cases:
        code = main(["match", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--model", model, "-o",
                     str(tmp_path / "out"), "--size", "28", *options])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
