"""`dinokit eval davis` and `dinokit eval correspondence`: thin commands over the zeroshot evaluators.

`eval davis PRED_DIR TRUTH_DIR` scores masks (what `dinokit track` writes) by DAVIS J&F (`davis_files`);
`eval correspondence MATCHES TRUTH` scores the points `dinokit match --points` transferred by PCK@alpha
(`pck_files`), or, given two folders, every pair of them, per point and per pair (`pck_pairs`). Both read and check every input before scoring, print one summary line, and write the full
report as JSON with `--output`. They are registered under `dinokit eval` (owned by `dinokit.eval.cli`, which sits
below zeroshot and so cannot import it)."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    from dinokit.cli import subcommands_of
    from dinokit.zeroshot.pck_files import ALPHAS, BY

    protocols = subcommands_of(subparsers, "eval")
    p = protocols.add_parser("davis", help="DAVIS J&F of predicted masks against ground truth (davis2017-evaluation)",
                             description="Score PRED_DIR/<frame>.png against TRUTH_DIR/<frame>.png (one sequence, "
                                         "e.g. a `dinokit track` output), or PRED_DIR/<seq>/<frame>.png against "
                                         "TRUTH_DIR/<seq>/<frame>.png (DAVIS's Annotations/480p; the sequences of "
                                         "PRED_DIR are scored). Frame sets must match.")
    p.add_argument("predicted", metavar="PRED_DIR", help="predicted indexed masks")
    p.add_argument("truth", metavar="TRUTH_DIR", help="ground-truth indexed masks (255 = void)")
    p.add_argument("--output", "-o", default=None, help="write the report (global, per object) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_davis)

    p = protocols.add_parser("correspondence", help="PCK@alpha of `dinokit match --points` against true points",
                             description="Score the points of MATCHES (a matches.json of `dinokit match A B "
                                         "--points TRUTH`) against TRUTH, a JSON object {\"points\": [[x, y], ...] "
                                         "(A), \"truth\": [[x, y], ...] (B), \"bbox\": [x1, y1, x2, y2] (B's box, "
                                         "for --by bbox)}. Many pairs (SPair-71k): MATCHES_DIR/<pair>/matches.json "
                                         "(or <pair>.json) against TRUTH_DIR/<pair>.json, reported per point (all "
                                         "keypoints pooled) and per pair (mean of each pair's PCK).")
    p.add_argument("matches", metavar="MATCHES|MATCHES_DIR", help="matches.json written by dinokit match --points, "
                                                                  "or a folder of them, one per pair")
    p.add_argument("truth", metavar="TRUTH|TRUTH_DIR", help="ground-truth points JSON, or a folder of <pair>.json")
    p.add_argument("--alpha", type=float, nargs="+", default=list(ALPHAS), help="PCK thresholds as fractions")
    p.add_argument("--by", choices=BY, default="bbox",
                   help="alpha times max(w, h) of B's box (SPair-71k) or of image B")
    p.add_argument("--output", "-o", default=None, help="write the report as JSON here")
    p.set_defaults(func=_correspondence)


def _check_output(output) -> Path | None:
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder: give a file name, e.g. {Path(output) / 'metrics.json'}")
    return path


def _write(path: Path | None, report: dict) -> str:
    from dinokit.atomic import write_text

    if path is None:
        return ""
    write_text(path, json.dumps(report, indent=2) + "\n")
    return f"; wrote {path}"


def _davis(args) -> int:
    from dinokit.curate.progress import bars
    from dinokit.zeroshot import davis_files

    output = _check_output(args.output)
    pairs = davis_files.pair_sequences(args.predicted, args.truth)
    total = sum(len(frames) for frames in pairs.values())
    with bars(not args.quiet and total > 1)(total=total, desc="eval davis", unit="frame") as bar:
        report = davis_files.evaluate_pairs(pairs, progress=lambda: bar.update(1))
    g = report["global"]
    if g["J&F-Mean"] is None:
        line = "no frame to score: each sequence needs 3 or more frames (the first and last are excluded)"
    else:
        line = f"J&F {g['J&F-Mean']:.4f} (J {g['J-Mean']:.4f}, F {g['F-Mean']:.4f})"
    print(f"{line} over {len(report['per_object'])} objects in {len(report['sequences'])} sequence(s), "
          f"{report['frames_scored']} frames scored{_write(output, report)}")
    return 0


def _correspondence(args) -> int:
    from dinokit.zeroshot.pck_files import evaluate_files

    output = _check_output(args.output)
    folders = [Path(p).expanduser().is_dir() for p in (args.matches, args.truth)]
    if any(folders):
        return _correspondence_pairs(args, output, all(folders))
    report = evaluate_files(args.matches, args.truth, args.alpha, args.by)
    values = ", ".join(f"PCK@{alpha} {value:.4f}" for alpha, value in report["pck"].items())
    side = "B's box" if args.by == "bbox" else "image B"
    print(f"{values} ({report['points']} points, alpha x the longer side of {side}){_write(output, report)}")
    return 0


def _correspondence_pairs(args, output: Path | None, both: bool) -> int:
    from dinokit.zeroshot.pck_pairs import evaluate_folders

    if not both:
        which = "MATCHES" if Path(args.matches).expanduser().is_dir() else "TRUTH"
        raise ValueError(f"{which} is a folder but the other is not: give two files (one pair) or two folders "
                         f"(MATCHES_DIR/<pair>/matches.json and TRUTH_DIR/<pair>.json)")
    report = evaluate_folders(args.matches, args.truth, args.alpha, args.by)  # JSON only: quick, no bar
    values = ", ".join(f"PCK@{alpha} {value:.4f} per point, {report['pck_per_pair'][alpha]:.4f} per pair"
                       for alpha, value in report["pck"].items())
    side = "each target box" if args.by == "bbox" else "each image B"
    print(f"{values} ({report['points']} points in {report['pairs']} pairs, alpha x the longer side of "
          f"{side}){_write(output, report)}")
    return 0
