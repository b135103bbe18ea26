"""Video label propagation (`dinokit.zeroshot.tracking`), the DAVIS J&F evaluator and `dinokit track`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.cli import main
from dinokit.zeroshot import davis
from dinokit.zeroshot.tracking import (
    PRESETS,
    initial_probs,
    labels_at,
    planned_size,
    propagate,
    settings_for,
    track,
)

from helpers import save_tiny_model


# ------------------------------------------------------------------------------ independent references
def v1_formula(current, context_feats, context_probs, radius, topk):
    """DINO v1 `label_propagation`: exp(cos / 0.1) times a square 0/1 window, zero below the k-th largest over all
    context frames (ties kept), divided by the sum."""
    t, h, w, D = context_feats.shape
    tar = current.reshape(-1, D)
    src = context_feats.reshape(t, -1, D)
    aff = torch.exp(torch.einsum("qd,tkd->tqk", tar, src) / 0.1)  # t x queries x keys
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    window = ((ii[:, None] - ii[None]).abs() <= radius) & ((jj[:, None] - jj[None]).abs() <= radius)
    aff = aff * window[None].float()
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # (t keys) x queries
    kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = context_probs.reshape(t, -1, context_probs.shape[-1]).reshape(-1, context_probs.shape[-1]).T
    return (segs @ aff).T.reshape(h, w, -1)


def v3_formula(current, context_feats, context_probs, radius, shape, topk, temperature):
    """DINOv3 notebook `propagate` with `make_neighborhood_mask`, written as in the notebook."""
    t, h, w, M = context_probs.shape
    ij = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).float()
    order = 2 if shape == "circle" else math.inf
    mask = torch.linalg.vector_norm(ij[:, :, None, None, :] - ij[None, None], ord=order, dim=-1) <= radius
    dot = torch.einsum("ijd,tuvd->ijtuv", current, context_feats)
    dot = torch.where(mask[:, :, None], dot, -torch.inf)
    dot = dot.flatten(2, -1).flatten(0, 1)
    kth = torch.topk(dot, dim=1, k=topk).values
    dot = torch.where(dot >= kth[:, -1:], dot, -torch.inf)
    weights = F.softmax(dot / temperature, dim=1)
    probs = weights @ context_probs.flatten(0, 2)
    return (probs / probs.sum(dim=1, keepdim=True)).unflatten(0, (h, w))


def random_case(seed=0, t=3, h=12, w=16, D=32, M=4):
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(t, h, w, D, generator=gen), dim=-1)
    current = F.normalize(torch.randn(h, w, D, generator=gen), dim=-1)
    current[0, 0] = feats[1, 0, 1]  # a tie: the same key in two context frames
    feats[2, 0, 1] = feats[1, 0, 1]
    probs = torch.softmax(3 * torch.randn(t, h, w, M, generator=gen), dim=-1)
    return current, feats, probs


@pytest.mark.parametrize("band_rows", [1, 5, None])
def test_propagation_equals_the_v1_script_formula_with_a_square_window(band_rows):
    current, feats, probs = random_case()
    settings = settings_for("dino", radius=3)
    ours = propagate(current, feats, probs, settings, band_rows=band_rows)
    expected = v1_formula(current, feats, probs, radius=3, topk=5)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("shape,radius", [("circle", 3), ("square", 2.5), ("circle", math.inf)])
def test_propagation_equals_the_v3_notebook_formula(shape, radius):
    current, feats, probs = random_case(seed=1)
    settings = settings_for("dinov3", radius=radius, shape=shape, topk=7)
    ours = propagate(current, feats, probs, settings, band_rows=4)
    expected = v3_formula(current, feats, probs, radius, shape, 7, 0.2)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_presets_resize_as_their_references(monkeypatch):
    dino, v3 = PRESETS["dino"], PRESETS["dinov3"]
    assert planned_size(1440, 1920, v3, 16) == (880, 1168)  # 80 x 60 patches is over the default token bound
    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "10000")
    assert planned_size(480, 854, dino, 16) == (480, 832)  # DAVIS 854 x 480 -> 832 x 480
    assert planned_size(480, 1200, dino, 16) == (480, 1152)  # `shooting`
    assert planned_size(480, 480, dino, 8) == (480, 448)  # v1: square frames take the landscape branch
    assert planned_size(1440, 1920, v3, 16) == (960, 1280)  # the notebook's demo video
    assert planned_size(480, 854, v3, 16) == (960, 1712)
    assert planned_size(854, 480, v3, 14) == (1722, 966)  # portrait, p14: short ceil(960/14)*14
    assert (dino.shape, dino.temperature, v3.shape, v3.temperature) == ("square", 0.1, "circle", 0.2)
    assert all(p.context == 7 and p.radius == 12 and p.topk == 5 for p in (dino, v3))


def test_a_circle_window_of_radius_12_has_441_cells_and_a_square_625():
    from dinokit.zeroshot.tracking import _window

    for shape, cells in (("circle", 441), ("square", 625)):
        inside = _window(torch.tensor([20]), torch.arange(41), 41, settings_for("dinov3", shape=shape))
        assert int(inside[20].sum()) == cells


class SquareOracle:
    """Features = one-hot of 'is this patch red' (the tracked square), plus a little noise."""

    patch_size, mean, std = 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __call__(self, pixels):
        p = self.patch_size
        red = pixels[0, 0] - pixels[0, 1]
        h, w = red.shape[0] // p, red.shape[1] // p
        fraction = (red > 0.5).float().reshape(h, p, w, p).mean(dim=(1, 3))
        noise = 1e-3 * torch.randn(h, w, 2, generator=torch.Generator().manual_seed(int(red.sum())))
        return torch.stack([fraction, 1 - fraction], dim=-1) + noise


def moving_square(frames=6, height=96, width=128, side=32, step=8):
    """A red square moving one patch (8 px) right per frame on a grey background, with its masks."""
    images, masks = [], []
    for t in range(frames):
        image = np.full((height, width, 3), 90, dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        y, x = 24, 8 + step * t
        image[y:y + side, x:x + side] = (220, 30, 30)
        mask[y:y + side, x:x + side] = 1
        images.append(Image.fromarray(image))
        masks.append(mask)
    return images, masks


@pytest.mark.parametrize("preset", ["dino", "dinov3"])
def test_an_oracle_feature_model_tracks_a_moving_square_near_perfectly(preset):
    frames, masks = moving_square()
    predicted = list(track(frames, masks[0], SquareOracle(), preset, short_side=96))
    assert len(predicted) == len(frames) and np.array_equal(predicted[0], masks[0])
    scores = davis.SequenceScores.from_first_truth(masks[0])
    for p, g in zip(predicted, masks):
        assert p.shape == g.shape and p.dtype == np.uint8
        scores.add(p, g)
    result = davis.summarize({"square": scores})["global"]
    assert result["J-Mean"] > 0.95 and result["J&F-Mean"] > 0.95, result


def test_first_mask_ids_map_to_label_channels_on_the_patch_grid():
    mask = np.zeros((32, 48), dtype=np.int64)
    mask[:16, :16], mask[16:, 32:] = 3, 255  # 255 is void: background
    from dinokit.zeroshot.tracking import mask_ids

    for preset in ("dino", "dinov3"):
        probs = initial_probs(mask_ids(mask), (2, 3), PRESETS[preset], 4)
        assert probs.shape == (2, 3, 4)
        assert probs.argmax(-1).tolist() == [[3, 0, 0], [0, 0, 0]]


def test_labels_return_at_the_frame_resolution_by_each_presets_rule():
    probs = torch.zeros(2, 2, 2)
    probs[..., 0] = 1
    probs[0, 0] = torch.tensor([0.2, 0.8])
    for preset in ("dino", "dinov3"):
        ids = labels_at(probs, (20, 30), PRESETS[preset], 8)
        assert ids.shape == (20, 30) and ids.dtype == np.uint8
        assert ids[0, 0] == 1 and ids[-1, -1] == 0


def test_frames_of_another_size_and_a_mask_of_the_wrong_size_are_refused():
    frames, masks = moving_square(frames=3)
    with pytest.raises(ValueError, match="the first mask is 10 x 10 pixels but the first frame is 128 x 96"):
        list(track(frames, np.zeros((10, 10)), SquareOracle(), short_side=96))
    frames[2] = frames[2].resize((64, 48))
    with pytest.raises(ValueError, match="frame 2 is 64 x 48 but the first frame is 128 x 96"):
        list(track(frames, masks[0], SquareOracle(), short_side=96))


# ------------------------------------------------------------------------------ J&F
def test_boundary_map_is_davis_seg2bmap_on_a_hand_drawn_square():
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:4, 1:4] = True
    expected = np.zeros((6, 6), dtype=bool)
    expected[0, 0:4] = True  # above: the bottom / bottom-right neighbours are foreground
    expected[0:4, 0] = True
    expected[1:4, 3] = True  # the square's right column differs from its right neighbour
    expected[3, 1:4] = True  # and its bottom row from the one below
    assert np.array_equal(davis.boundary_map(mask), expected)


def test_tolerance_radius_and_disk_follow_davis2017():
    assert davis.boundary_radius(480, 854) == 8 and davis.boundary_radius(360, 480) == 5
    assert int(davis.disk(8).sum()) == 197
    skimage = pytest.importorskip("skimage.morphology")
    assert np.array_equal(davis.disk(5), skimage.disk(5).astype(bool))


def test_region_and_boundary_scores_on_hand_computed_cases():
    a = np.zeros((10, 10), dtype=bool)
    b = np.zeros((10, 10), dtype=bool)
    a[0:4, 0:5], b[2:6, 0:5] = True, True  # overlap 10, union 30
    assert davis.region_similarity(a, b) == pytest.approx(1 / 3)
    assert davis.region_similarity(a, a) == 1.0 and davis.region_similarity(~a & a, ~b & b) == 1.0  # both empty
    empty = np.zeros_like(a)
    assert davis.boundary_measure(empty, empty) == 1.0
    assert davis.boundary_measure(empty, a) == 0.0 and davis.boundary_measure(a, empty) == 0.0
    assert davis.boundary_measure(a, a) == 1.0
    # r = ceil(0.008 * 14.1) = 1 on 10 x 10 (a 5-cell cross). a's boundary: row 3 and column 4 above it (8 px).
    one_more = np.zeros_like(a)
    one_more[0:5, 0:5] = True  # boundary 9 px, each within 1 px of a's: P = R = 1
    assert davis.boundary_measure(one_more, a) == 1.0
    two_more = np.zeros_like(a)
    two_more[0:6, 0:5] = True  # boundary 10 px: row 5 (5 px) is 2 away, so P = 5/10; R = 5/8 (row 3 cols 0-2 miss)
    assert davis.boundary_measure(two_more, a) == pytest.approx(2 * 0.5 * 0.625 / 1.125)


def independent_f(predicted, truth):
    """davis2017-evaluation's f_measure, with scipy's binary dilation by skimage's disk in place of cv2.dilate."""
    ndimage = pytest.importorskip("scipy.ndimage")
    morphology = pytest.importorskip("skimage.morphology")

    def seg2bmap(seg):
        seg = seg.astype(bool)
        e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
        e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
        b = seg ^ e | seg ^ s | seg ^ se
        b[-1, :], b[:, -1] = seg[-1, :] ^ e[-1, :], seg[:, -1] ^ s[:, -1]
        b[-1, -1] = 0
        return b

    r = np.ceil(0.008 * np.linalg.norm(predicted.shape))
    fg, gt = seg2bmap(predicted), seg2bmap(truth)
    fg_dil = ndimage.binary_dilation(fg, morphology.disk(r))
    gt_dil = ndimage.binary_dilation(gt, morphology.disk(r))
    n_fg, n_gt = fg.sum(), gt.sum()
    if n_fg == 0 or n_gt == 0:
        precision, recall = (1.0 if n_fg == 0 else 0.0), (1.0 if n_gt == 0 else 0.0)
    else:
        precision, recall = (fg & gt_dil).sum() / n_fg, (gt & fg_dil).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_measure_equals_an_independent_implementation_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(6):
        blobs = rng.random((2, 12, 16)) > 0.5
        predicted = np.kron(blobs[0], np.ones((8, 8), dtype=bool))  # 96 x 128: r = 2
        truth = np.kron(blobs[1], np.ones((8, 8), dtype=bool))
        assert davis.boundary_measure(predicted, truth) == pytest.approx(independent_f(predicted, truth), abs=1e-12)


def test_statistics_exclude_first_and_last_frames_and_bin_the_decay():
    assert davis.statistics([1.0, 0.9, 0.8, 0.4, 0.2, 0.0]) == pytest.approx(
        {"mean": 3.3 / 6, "recall": 3 / 6, "decay": (1.0 + 0.9) / 2 - (0.2 + 0.0) / 2})
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[2:6, 2:6] = 1
    scores = davis.SequenceScores.from_first_truth(truth)
    for predicted in (np.zeros_like(truth), truth, truth, np.zeros_like(truth)):  # first and last are wrong
        scores.add(predicted, truth)
    summary = davis.summarize({"seq": scores})
    assert summary["global"]["J-Mean"] == 1.0 and summary["global"]["J&F-Mean"] == 1.0
    assert summary["frames_scored"] == 2 and list(summary["per_object"]) == ["seq_1"]


def test_ids_outside_the_first_frames_objects_are_refused():
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[:4] = 1
    scores = davis.SequenceScores.from_first_truth(truth)
    with pytest.raises(ValueError, match=r"prediction has ids \[2\]"):
        scores.add(np.full_like(truth, 2), truth)
    with pytest.raises(ValueError, match=r"ground truth has ids \[5\]"):
        scores.add(truth, np.full_like(truth, 5), "00007")


# ------------------------------------------------------------------------------ the command
def write_video(folder, frames, masks, truth=None):
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:05d}.png")
    first = Image.fromarray(masks[0], mode="P")
    first.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    first.save(folder.parent / "first.png")
    if truth is not None:
        truth.mkdir()
        for i, mask in enumerate(masks):
            Image.fromarray(mask, mode="P").save(truth / f"{i:05d}.png")
    return folder.parent / "first.png"


def test_track_command_writes_masks_overlay_and_metrics(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    frames, masks = moving_square(frames=4, height=40, width=60, side=16, step=4)
    first = write_video(tmp_path / "frames", frames, masks, tmp_path / "truth")
    out = tmp_path / "out"
    assert main(["track", str(tmp_path / "frames"), "--mask", str(first), "--model", model, "-o", str(out),
                 "--truth", str(tmp_path / "truth"), "--short-side", "28", "--preset", "dinov3", "--quiet"]) == 0
    assert "J&F" in capsys.readouterr().out
    for i in range(4):
        with Image.open(out / f"{i:05d}.png") as written:
            assert written.mode == "P" and written.size == (60, 40)
            assert written.getpalette()[:6] == [0, 0, 0, 10, 200, 30]  # the first mask's palette
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["global"]) == {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    run = json.loads((out / "run.json").read_text())
    assert run["preset"] == "dinov3" and run["settings"]["short_side"] == 28 and run["num_frames"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the staging folder is gone


def test_track_command_refuses_bad_inputs_with_one_line_and_writes_nothing(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    frames, masks = moving_square(frames=3, height=40, width=60, side=16, step=4)
    first = write_video(tmp_path / "frames", frames, masks, tmp_path / "truth")
    common = ["--model", model, "--short-side", "28", "--preset", "dinov3", "--quiet"]

    def refused(argv, message):
        out = tmp_path / "out"
        assert main(["track", *argv, "-o", str(out), *common]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    refused([str(tmp_path / "frames"), "--mask", str(tmp_path / "small.png")], "is 10 x 10 but the frames are 60 x 40")
    Image.new("RGB", (60, 40)).save(tmp_path / "rgb.png")
    refused([str(tmp_path / "frames"), "--mask", str(tmp_path / "rgb.png")], "is a RGB image, not a mask of ids")
    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(tmp_path / "truth" / "00002.png")
    refused([str(tmp_path / "frames"), "--mask", str(first), "--truth", str(tmp_path / "truth")],
            "ground truth has ids [7] that its first frame does not have")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    refused([str(tmp_path / "broken.mp4"), "--mask", str(first)], "broken.mp4")
    (tmp_path / "broken.gif").write_bytes(b"GIF89a garbage")
    refused([str(tmp_path / "broken.gif"), "--mask", str(first)], "cannot decode the video")
    frames[1].resize((30, 20)).save(tmp_path / "frames" / "00001.png")
    refused([str(tmp_path / "frames"), "--mask", str(first)], "have different sizes")


def test_track_reads_an_animated_gif_as_a_video(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    frames, masks = moving_square(frames=3, height=40, width=60, side=16, step=4)
    first = write_video(tmp_path / "frames", frames, masks)
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    assert main(["track", str(tmp_path / "clip.gif"), "--mask", str(first), "--model", model, "-o",
                 str(tmp_path / "out"), "--short-side", "56", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == ["00000.png", "00001.png", "00002.png"]
