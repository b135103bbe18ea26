"""`dinokit eval davis` and `dinokit eval correspondence` through the real CLI, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main

from helpers import save_tiny_model


def _save_mask(path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
    image.save(path)


def _two_objects() -> np.ndarray:
    ids = np.zeros((10, 10), np.uint8)
    ids[2:6, 2:6] = 1
    ids[7:9, 1:9] = 2
    return ids


def _sequence(pred_dir, truth_dir, frames=4):
    """Object 2 is predicted right in every frame; object 1 is missing from the prediction of frame 1 only."""
    truth = _two_objects()
    for i in range(frames):
        predicted = truth.copy()
        if i == 1:
            predicted[predicted == 1] = 0
        _save_mask(truth_dir / f"{i:05d}.png", truth)
        _save_mask(pred_dir / f"{i:05d}.png", predicted)


def _refused(argv, capsys, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------- eval davis
def test_eval_davis_scores_a_sequence_as_computed_by_hand(tmp_path, capsys):
    # Frames 0 and 3 are excluded. Object 1: frame 1 empty prediction (J 0; F 0: no predicted boundary gives
    # P=1, R=0), frame 2 exact (J 1, F 1) -> J-Mean = F-Mean = 0.5, Recall 0.5, Decay (2 frames: bins [f1], ...,
    # [f2]) = 0 - 1 = -1. Object 2: exact throughout -> 1, 1, 0. Global = means over the two objects.
    _sequence(tmp_path / "pred", tmp_path / "truth")
    out = tmp_path / "metrics.json"
    assert main(["eval", "davis", str(tmp_path / "pred"), str(tmp_path / "truth"), "-o", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "J&F 0.7500 (J 0.7500, F 0.7500) over 2 objects in 1 sequence(s), 2 frames scored" in line
    report = json.loads(out.read_text())
    assert report["global"] == pytest.approx({"J&F-Mean": 0.75, "J-Mean": 0.75, "J-Recall": 0.75, "J-Decay": -0.5,
                                              "F-Mean": 0.75, "F-Recall": 0.75, "F-Decay": -0.5})
    assert report["per_object"]["truth_1"] == pytest.approx({"J&F-Mean": 0.5, "J-Mean": 0.5, "F-Mean": 0.5})
    assert report["sequences"] == ["truth"] and report["frames_scored"] == 2


def test_eval_davis_reads_the_davis_layout_and_scores_the_predicted_sequences(tmp_path, capsys):
    for seq in ("bear", "dog"):
        _sequence(tmp_path / "pred" / seq, tmp_path / "truth" / seq)
    _sequence(tmp_path / "unused", tmp_path / "truth" / "train_only")  # annotations of a sequence not predicted
    assert main(["eval", "davis", str(tmp_path / "pred"), str(tmp_path / "truth"), "--quiet"]) == 0
    assert "J&F 0.7500 (J 0.7500, F 0.7500) over 4 objects in 2 sequence(s), 4 frames scored" in capsys.readouterr().out


def test_eval_davis_equals_the_metrics_track_writes(tmp_path, capsys):
    from test_zeroshot_track import moving_square, write_video

    model = save_tiny_model(tmp_path / "model")
    frames, masks = moving_square(frames=5, height=40, width=60, side=16, step=4)
    first = write_video(tmp_path / "frames", frames, masks, tmp_path / "truth")
    out = tmp_path / "out"
    assert main(["track", str(tmp_path / "frames"), "--mask", str(first), "--model", model, "-o", str(out),
                 "--truth", str(tmp_path / "truth"), "--short-side", "28", "--preset", "dinov3", "--quiet"]) == 0
    # track's output folder also holds overlay.gif, run.json and metrics.json: only the PNG masks are frames
    assert main(["eval", "davis", str(out), str(tmp_path / "truth"), "-o", str(tmp_path / "m.json"), "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "m.json").read_text())["global"] == json.loads(
        (out / "metrics.json").read_text())["global"]


def test_eval_davis_refuses_mismatched_frames_and_bad_folders_in_one_line(tmp_path, capsys):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    _sequence(pred, truth)
    argv = ["eval", "davis", str(pred), str(truth), "--quiet"]
    (pred / "00002.png").rename(tmp_path / "aside.png")
    _refused(argv, capsys, "has no prediction for 1 of the 4 ground-truth frames (first: 00002.png)")
    (tmp_path / "aside.png").rename(pred / "00002.png")
    _save_mask(pred / "00009.png", _two_objects())
    _refused(argv, capsys, "has 1 frame(s) that the ground truth")
    (pred / "00009.png").unlink()
    _save_mask(pred / "00001.png", np.full((10, 10), 3, np.uint8))
    _refused(argv, capsys, "sequence truth: the prediction has ids [3] that the first frame's ground truth does not")
    _save_mask(pred / "00001.png", np.zeros((12, 10), np.uint8))
    _refused(argv, capsys, "the prediction is 10 x 12 but the ground truth is 10 x 10 (frame 00001)")
    _refused(["eval", "davis", str(tmp_path / "nowhere"), str(truth)], capsys, "is not a folder of PNG masks")
    _refused(["eval", "davis", str(pred), str(truth), "-o", str(tmp_path)], capsys, "is a folder: give a file name")
    nested = tmp_path / "nested"
    _sequence(tmp_path / "ignored", nested / "seq")
    _refused(["eval", "davis", str(pred), str(nested)], capsys, "holds masks of one sequence but TRUTH_DIR")
    (tmp_path / "other" / "cat").mkdir(parents=True)
    _refused(["eval", "davis", str(tmp_path / "other"), str(nested)], capsys,
             "PRED_DIR has sequence(s) cat that TRUTH_DIR")


# ------------------------------------------------------------------------------- eval correspondence
def _matches_json(path, points_a, points_b, size_b=(200, 100)):
    record = {"image_a": "a.png", "image_b": "b.png", "image_size_b": list(size_b), "matches": [],
              "points": [{"a": list(a), "b": list(b), "cosine": 1.0} for a, b in zip(points_a, points_b)]}
    path.write_text(json.dumps(record))
    return str(path)


def test_eval_correspondence_pck_by_box_and_by_image_as_computed_by_hand(tmp_path, capsys):
    # Distances of the 4 predictions to the truth: 0, 3, 6, 25 pixels. Box 50 x 40 -> max side 50: thresholds
    # 5 (alpha 0.1) and 2.5 (0.05), strict: PCK 2/4 and 1/4. Image 200 x 100: 20 and 10 -> 3/4 and 3/4.
    a = [[1, 1], [2, 2], [3, 3], [4, 4]]
    truth = [[10, 10], [20, 20], [30, 30], [40, 40]]
    predicted = [[10, 10], [23, 20], [30, 36], [55, 60]]
    matches = _matches_json(tmp_path / "matches.json", a, predicted)
    (tmp_path / "truth.json").write_text(json.dumps({"points": a, "truth": truth, "bbox": [0, 0, 50, 40]}))
    out = tmp_path / "pck.json"
    assert main(["eval", "correspondence", matches, str(tmp_path / "truth.json"), "--alpha", "0.1", "0.05",
                 "-o", str(out)]) == 0
    assert "PCK@0.1 0.5000, PCK@0.05 0.2500 (4 points, alpha x the longer side of B's box)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["pck"] == {"0.1": 0.5, "0.05": 0.25} and report["threshold_pixels"] == {"0.1": 5.0, "0.05": 2.5}
    assert report["distance_pixels"] == [0.0, 3.0, 6.0, 25.0]
    assert main(["eval", "correspondence", matches, str(tmp_path / "truth.json"), "--by", "image",
                 "--alpha", "0.1", "0.05"]) == 0
    assert "PCK@0.1 0.7500, PCK@0.05 0.7500" in capsys.readouterr().out


def test_eval_correspondence_scores_what_dinokit_match_wrote_for_the_same_file(tmp_path, capsys):
    from test_zeroshot_match import noise_image

    model = save_tiny_model(tmp_path / "model")
    Image.fromarray(noise_image(seed=5)).save(tmp_path / "a.png")
    Image.fromarray(noise_image(seed=5)).save(tmp_path / "b.png")
    pairs = {"points": [[10, 10], [80.5, 60]], "truth": [[10, 10], [80.5, 60]], "bbox": [0, 0, 96, 64]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "out"
    assert main(["match", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", model, "-o", str(out),
                 "--size", "28", "--points", str(tmp_path / "pairs.json")]) == 0
    record = json.loads((out / "matches.json").read_text())
    assert record["image_size_b"] == [96, 64]
    assert main(["eval", "correspondence", str(out / "matches.json"), str(tmp_path / "pairs.json"), "-o",
                 str(tmp_path / "pck.json")]) == 0
    report = json.loads((tmp_path / "pck.json").read_text())
    predicted = np.array([p["b"] for p in record["points"]])
    distances = np.linalg.norm(predicted - np.array(pairs["truth"]), axis=1)
    assert report["pck"]["0.1"] == np.mean(distances < 9.6)  # 0.1 x max(96, 64)


def test_eval_correspondence_refuses_mismatched_or_incomplete_files_in_one_line(tmp_path, capsys):
    a, truth = [[1, 1], [2, 2]], [[10, 10], [20, 20]]
    matches = _matches_json(tmp_path / "matches.json", a, truth)
    good = {"points": a, "truth": truth, "bbox": [0, 0, 50, 40]}

    def refused(truth_data, message, extra=(), matches_path=matches):
        (tmp_path / "t.json").write_text(json.dumps(truth_data))
        _refused(["eval", "correspondence", matches_path, str(tmp_path / "t.json"), *extra], capsys, message)

    refused({**good, "points": [[1, 1], [2, 5]]}, "point 1 of A is (2, 2) in MATCHES but (2, 5) in TRUTH")
    refused({**good, "points": [[1, 1]], "truth": [[10, 10]]}, "has 2 points but TRUTH")
    refused({**good, "truth": [[10, 10]]}, "has 2 points but 1 true points")
    refused({"points": a, "truth": truth}, "has no \"bbox\" (B's object box): add it, or use --by image")
    refused({**good, "bbox": [5, 5, 5, 9]}, "is empty: give [x1, y1, x2, y2]")
    refused({"points": a}, "give a JSON object")
    refused(good, "--alpha [0.0]: give values in (0, 1]", ["--alpha", "0"])
    (tmp_path / "no_points.json").write_text(json.dumps({"matches": [], "points": None}))
    refused(good, "has no transferred points: run `dinokit match A B --points TRUTH`",
            matches_path=str(tmp_path / "no_points.json"))
    refused(good, "does not exist", matches_path=str(tmp_path / "missing.json"))
    old = json.loads((tmp_path / "matches.json").read_text())
    del old["image_size_b"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    refused(good, "does not record image B's size", ["--by", "image"], matches_path=str(tmp_path / "old.json"))


def _pairs_case(tmp_path):
    """Pair p1 (4 points, box 50 x 40) as in the one-pair case above; pair p2: 1 point 1 px off, box 20 x 10."""
    matches, truth = tmp_path / "matches", tmp_path / "truth"
    (matches / "p1").mkdir(parents=True)
    truth.mkdir()
    a = [[1, 1], [2, 2], [3, 3], [4, 4]]
    _matches_json(matches / "p1" / "matches.json", a, [[10, 10], [23, 20], [30, 36], [55, 60]])
    (truth / "p1.json").write_text(json.dumps({"points": a, "truth": [[10, 10], [20, 20], [30, 30], [40, 40]],
                                               "bbox": [0, 0, 50, 40]}))
    _matches_json(matches / "p2.json", [[5, 5]], [[8, 7]])  # the flat layout
    (truth / "p2.json").write_text(json.dumps({"points": [[5, 5]], "truth": [[8, 8]], "bbox": [0, 0, 20, 10]}))
    return matches, truth


def test_eval_correspondence_over_folders_reports_pck_per_point_and_per_pair_as_computed_by_hand(tmp_path, capsys):
    # alpha 0.1: p1 threshold 5 -> 2 of 4 right; p2 threshold 2, distance 1 -> 1 of 1. Per point 3/5, per pair
    # (1/2 + 1)/2. alpha 0.05: p1 threshold 2.5 -> 1 of 4; p2 threshold 1, distance 1 (strict) -> 0. 1/5, 1/8.
    matches, truth = _pairs_case(tmp_path)
    out = tmp_path / "pck.json"
    assert main(["eval", "correspondence", str(matches), str(truth), "--alpha", "0.1", "0.05", "-o", str(out)]) == 0
    line = capsys.readouterr().out
    assert ("PCK@0.1 0.6000 per point, 0.7500 per pair, PCK@0.05 0.2000 per point, 0.1250 per pair (5 points in 2 "
            "pairs") in line, line
    report = json.loads(out.read_text())
    assert report["pck"] == {"0.1": 0.6, "0.05": 0.2} and report["pck_per_pair"] == {"0.1": 0.75, "0.05": 0.125}
    assert report["correct_points"] == {"0.1": 3, "0.05": 1} and (report["pairs"], report["points"]) == (2, 5)
    assert report["per_pair"]["p2"] == {"points": 1, "pck": {"0.1": 1.0, "0.05": 0.0},
                                        "threshold_pixels": {"0.1": 2.0, "0.05": 1.0}}


def test_eval_correspondence_over_one_pair_folder_equals_the_one_pair_call(tmp_path, capsys):
    matches, truth = _pairs_case(tmp_path)
    (truth / "p2.json").unlink()
    (matches / "p2.json").unlink()
    assert main(["eval", "correspondence", str(matches), str(truth), "-o", str(tmp_path / "many.json")]) == 0
    assert main(["eval", "correspondence", str(matches / "p1" / "matches.json"), str(truth / "p1.json"), "-o",
                 str(tmp_path / "one.json")]) == 0
    many, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("many", "one"))
    assert many["pck"] == many["pck_per_pair"] == one["pck"] == many["per_pair"]["p1"]["pck"]


def test_eval_correspondence_refuses_mismatched_pair_folders_in_one_line(tmp_path, capsys):
    matches, truth = _pairs_case(tmp_path)
    argv = ["eval", "correspondence", str(matches), str(truth)]
    _refused(["eval", "correspondence", str(matches), str(truth / "p2.json")], capsys,
             "MATCHES is a folder but the other is not: give two files (one pair) or two folders")
    (truth / "p3.json").write_text(json.dumps({"points": [[1, 1]], "truth": [[1, 1]], "bbox": [0, 0, 9, 9]}))
    _refused(argv, capsys, "has no prediction for 1 of the 3 pairs of TRUTH_DIR (first: p3)")
    (truth / "p3.json").unlink()
    _matches_json(matches / "p4.json", [[1, 1]], [[1, 1]])
    _refused(argv, capsys, "has 1 pair(s) that TRUTH_DIR")
    (matches / "p4.json").unlink()
    (matches / "p2").mkdir()
    _matches_json(matches / "p2" / "matches.json", [[5, 5]], [[8, 7]])
    _refused(argv, capsys, "has both p2/matches.json and p2.json: keep one prediction per pair")
    (matches / "p2.json").unlink()
    (truth / "p2.json").write_text(json.dumps({"points": [[6, 5]], "truth": [[8, 8]], "bbox": [0, 0, 20, 10]}))
    _refused(argv, capsys, "pair p2: point 0 of A is (5, 5) in MATCHES but (6, 5) in TRUTH")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(["eval", "correspondence", str(matches), str(empty)], capsys, "holds no <pair>.json ground-truth files")
