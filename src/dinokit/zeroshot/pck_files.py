"""PCK@alpha of `dinokit match` output against ground-truth points (`dinokit eval correspondence`).

MATCHES is the `matches.json` that `dinokit match A B --points TRUTH` writes: its `points` list holds each given
point of A (`a`) and its predicted match in B (`b`), in the order given. TRUTH is a JSON object:

    {"points": [[x, y], ...],      # the points of A, in pixels (the same file works as `dinokit match --points`)
     "truth":  [[x, y], ...],      # where each of them really is in B, in B's pixels
     "bbox":   [x1, y1, x2, y2]}   # optional: B's object box (SPair-71k's target box), for --by bbox

A prediction is correct when its distance to the true point is below alpha * max(w, h) of B's box (`--by bbox`,
SPair-71k's rule) or of image B (`--by image`), strictly (`match.pck`). The points of A in both files must be the
same, in the same order: a MATCHES of other points is refused rather than scored against the wrong truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dinokit.zeroshot.matching import bbox_threshold, check_points, image_threshold, pck

ALPHAS = (0.1, 0.05, 0.01)
BY = ("bbox", "image")
SAME_POINT = 1e-3  # pixels: matches.json keeps the given points as floats, so they agree to rounding only


def _read_json(path, role: str):
    from dinokit.data.images import display_path

    try:
        return json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{role} {display_path(path)} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{role} {display_path(path)} is not JSON ({exc})") from None


def _pairs(values, role: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty((0, 0))
    if array.ndim != 2 or array.shape[1] != 2 or not len(array) or not np.isfinite(array).all():
        raise ValueError(f"{role}: give a non-empty list of [x, y] pairs of finite numbers")
    return array


def read_matches(path) -> dict:
    """{"a": (N, 2) given points of A, "b": (N, 2) predicted points of B, "size_b": (W, H) or None}."""
    from dinokit.data.images import display_path

    data = _read_json(path, "MATCHES")
    role = f"MATCHES {display_path(path)}"
    if not isinstance(data, dict) or "matches" not in data:
        raise ValueError(f"{role} is not a matches.json written by `dinokit match`")
    if not data.get("points"):
        raise ValueError(f"{role} has no transferred points: run `dinokit match A B --points TRUTH` (the "
                         f"ground-truth file works as --points) and evaluate its matches.json")
    try:
        a = _pairs([p["a"] for p in data["points"]], role)
        b = _pairs([p["b"] for p in data["points"]], role)
    except (KeyError, TypeError):
        raise ValueError(f"{role}: each of its points needs \"a\" and \"b\" as [x, y]") from None
    size_b = data.get("image_size_b")
    return {"a": a, "b": b, "size_b": tuple(size_b) if size_b else None}


def read_truth(path) -> dict:
    """{"a": (N, 2), "truth": (N, 2), "bbox": (x1, y1, x2, y2) or None} of a ground-truth file."""
    from dinokit.data.images import display_path

    data = _read_json(path, "TRUTH")
    role = f"TRUTH {display_path(path)}"
    if not isinstance(data, dict) or "points" not in data or "truth" not in data:
        raise ValueError(f"{role}: give a JSON object {{\"points\": [[x, y], ...] (A), \"truth\": [[x, y], ...] (B), "
                         f"\"bbox\": [x1, y1, x2, y2] (optional, B's box)}}")
    a, truth = _pairs(data["points"], f"{role} \"points\""), _pairs(data["truth"], f"{role} \"truth\"")
    if len(a) != len(truth):
        raise ValueError(f"{role} has {len(a)} points but {len(truth)} true points: give one true point per point")
    bbox = data.get("bbox")
    if bbox is not None:
        try:
            x1, y1, x2, y2 = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise ValueError(f"{role} \"bbox\": give [x1, y1, x2, y2] in B's pixels") from None
        if not (np.isfinite([x1, y1, x2, y2]).all() and x2 > x1 and y2 > y1):
            raise ValueError(f"{role} \"bbox\" {list(bbox)} is empty: give [x1, y1, x2, y2] with x2 > x1, y2 > y1")
        bbox = (x1, y1, x2, y2)
    return {"a": a, "truth": truth, "bbox": bbox}


def evaluate_files(matches_path, truth_path, alphas=ALPHAS, by: str = "bbox") -> dict:
    """PCK at each alpha of MATCHES against TRUTH (see the module notes), with the thresholds and distances."""
    from dinokit.data.images import display_path

    if by not in BY:
        raise ValueError(f"--by {by!r}: use one of {', '.join(BY)}")
    alphas = [float(a) for a in alphas]
    if not alphas or not all(0 < a <= 1 for a in alphas):
        raise ValueError(f"--alpha {alphas}: give values in (0, 1], e.g. 0.1 0.05 0.01")
    found, truth = read_matches(matches_path), read_truth(truth_path)
    if len(found["a"]) != len(truth["a"]):
        raise ValueError(f"MATCHES {display_path(matches_path)} has {len(found['a'])} points but TRUTH "
                         f"{display_path(truth_path)} has {len(truth['a'])}: run `dinokit match` with --points TRUTH")
    differ = np.flatnonzero(np.abs(found["a"] - truth["a"]).max(axis=1) > SAME_POINT)
    if len(differ):
        i = int(differ[0])
        raise ValueError(f"point {i} of A is ({found['a'][i, 0]:g}, {found['a'][i, 1]:g}) in MATCHES but "
                         f"({truth['a'][i, 0]:g}, {truth['a'][i, 1]:g}) in TRUTH: run `dinokit match` with --points "
                         f"TRUTH")
    if by == "bbox":
        if truth["bbox"] is None:
            raise ValueError(f"TRUTH {display_path(truth_path)} has no \"bbox\" (B's object box): add it, or use "
                             f"--by image")
        thresholds = {a: bbox_threshold(truth["bbox"], a) for a in alphas}
    else:
        if found["size_b"] is None:
            raise ValueError(f"MATCHES {display_path(matches_path)} does not record image B's size: rerun "
                             f"`dinokit match` (it writes image_size_b)")
        check_points(truth["truth"], found["size_b"], f"TRUTH {display_path(truth_path)} \"truth\"")
        thresholds = {a: image_threshold(found["size_b"], a) for a in alphas}
    distances = np.linalg.norm(found["b"] - truth["truth"], axis=1)
    return {"points": len(distances), "by": by, "bbox": list(truth["bbox"]) if truth["bbox"] else None,
            "pck": {f"{a:g}": pck(found["b"], truth["truth"], thresholds[a]) for a in alphas},
            "threshold_pixels": {f"{a:g}": thresholds[a] for a in alphas},
            "distance_pixels": [round(float(d), 3) for d in distances],
            "matches": str(matches_path), "truth": str(truth_path)}
