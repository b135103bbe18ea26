"""PCK@alpha over many pairs (`dinokit eval correspondence MATCHES_DIR TRUTH_DIR`), as SPair-71k is scored.

Layout: TRUTH_DIR/<pair>.json is one ground-truth file per pair (the format of `pck_files`), and MATCHES_DIR holds
for each pair what `dinokit match A B --points TRUTH_DIR/<pair>.json -o MATCHES_DIR/<pair>` writes,
MATCHES_DIR/<pair>/matches.json (or a flat MATCHES_DIR/<pair>.json). The two pair sets must be equal: a pair
with no prediction, or a prediction with no truth, is refused rather than dropped from the mean.

Two averages, as ../shared/spec/zeroshot.md §2.4 reads GeoAware-SC's `compute_pck`:
- "per point" (`pck`): correct keypoints / all keypoints, pooled over the pairs. This is the figure the
  DINOv2 papers quote for SPair (ViT-B/14 nearest neighbour 55.6 PCK@0.1 bbox), so it is the headline;
- "per pair" (`pck_per_pair`): the mean over pairs of each pair's PCK ("per image" in the papers), which weighs a
  pair with 2 visible keypoints as much as one with 20.
Each pair is scored by `pck_files.evaluate_files`, so its threshold is its own target box (or image B)."""

from __future__ import annotations

from pathlib import Path

from dinokit.zeroshot.pck_files import ALPHAS, evaluate_files


def pair_files(matches_dir, truth_dir) -> dict[str, tuple[Path, Path]]:
    """{pair: (matches.json, truth.json)} for every pair of the two folders; one ValueError for any mismatch."""
    from dinokit.data.images import display_path

    matches_dir, truth_dir = Path(matches_dir).expanduser(), Path(truth_dir).expanduser()
    truths = {p.stem: p for p in sorted(truth_dir.glob("*.json"))}
    if not truths:
        raise ValueError(f"TRUTH_DIR {display_path(truth_dir)} holds no <pair>.json ground-truth files")
    nested = {p.parent.name: p for p in sorted(matches_dir.glob("*/matches.json"))}
    flat = {p.stem: p for p in sorted(matches_dir.glob("*.json"))}
    both = sorted(set(nested) & set(flat))
    if both:
        raise ValueError(f"MATCHES_DIR {display_path(matches_dir)} has both {both[0]}/matches.json and {both[0]}.json: "
                         f"keep one prediction per pair")
    found = {**flat, **nested}
    _same_pairs(sorted(truths), sorted(found), matches_dir, truth_dir)
    return {name: (found[name], truths[name]) for name in sorted(truths)}


def _same_pairs(truths: list[str], found: list[str], matches_dir: Path, truth_dir: Path) -> None:
    from dinokit.data.images import display_path

    missing = [n for n in truths if n not in set(found)]
    if missing:
        raise ValueError(f"MATCHES_DIR {display_path(matches_dir)} has no prediction for {len(missing)} of the "
                         f"{len(truths)} pairs of TRUTH_DIR (first: {missing[0]}): run `dinokit match A B --points "
                         f"{display_path(truth_dir / missing[0])}.json -o {display_path(matches_dir / missing[0])}`")
    extra = [n for n in found if n not in set(truths)]
    if extra:
        raise ValueError(f"MATCHES_DIR {display_path(matches_dir)} has {len(extra)} pair(s) that TRUTH_DIR "
                         f"{display_path(truth_dir)} has no <pair>.json for (first: {extra[0]}): give the truth of "
                         f"every scored pair, or remove the extra predictions")


def evaluate_folders(matches_dir, truth_dir, alphas=ALPHAS, by: str = "bbox") -> dict:
    """PCK per point and per pair at each alpha over every pair (see the module notes), with each pair's report."""
    pairs = pair_files(matches_dir, truth_dir)
    per_pair = {}
    for name, (matches, truth) in pairs.items():
        try:  # a bad file stops the run: no report is written
            per_pair[name] = evaluate_files(matches, truth, alphas, by)
        except ValueError as exc:  # some of its messages say "MATCHES" / "TRUTH" only: name the pair
            raise ValueError(f"pair {name}: {exc}") from None
    keys = list(next(iter(per_pair.values()))["pck"])
    points = sum(r["points"] for r in per_pair.values())
    # a pair's PCK times its point count is its number of correct points, exactly (a count over a count)
    correct = {k: sum(round(r["pck"][k] * r["points"]) for r in per_pair.values()) for k in keys}
    return {"pairs": len(per_pair), "points": points, "by": by,
            "pck": {k: correct[k] / points for k in keys},
            "pck_per_pair": {k: sum(r["pck"][k] for r in per_pair.values()) / len(per_pair) for k in keys},
            "correct_points": correct,
            "per_pair": {name: {"points": r["points"], "pck": r["pck"], "threshold_pixels": r["threshold_pixels"]}
                         for name, r in per_pair.items()},
            "matches": str(matches_dir), "truth": str(truth_dir)}
