"""DAVIS J&F of folders of masks (`dinokit eval davis PRED_DIR TRUTH_DIR`): predictions against ground truth.

Two layouts, told apart by TRUTH_DIR:
- one sequence: TRUTH_DIR holds `<frame>.png` (what `dinokit track --output` writes, and `--truth` reads);
- DAVIS: TRUTH_DIR holds `<sequence>/<frame>.png` (`Annotations/480p`); every sequence folder of PRED_DIR is
  scored against the ground truth of the same name. Sequences only in TRUTH_DIR are not scored (DAVIS's
  annotation folder holds train and val): the result names the sequences scored.

Within a sequence the frame sets must be equal: a ground-truth frame without a prediction, or a predicted frame
without ground truth, is one error naming the first such frame, raised before any mask is read (davis2017-
evaluation aborts on a missing prediction too). Frames are scored in name order; the scores are
`dinokit.zeroshot.davis`'s (first and last frame excluded, objects = the first ground-truth frame's ids).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dinokit.zeroshot import davis
from dinokit.zeroshot.masks import read_id_mask


def mask_files(folder: Path) -> dict[str, Path]:
    """{frame name: path} of the PNG files directly inside `folder`, hidden files skipped, in name order."""
    return dict(sorted((p.stem, p) for p in folder.iterdir()
                       if p.suffix.lower() == ".png" and not p.name.startswith(".") and p.is_file()))


def _folder(path, role: str) -> Path:
    from dinokit.data.images import display_path

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} {display_path(folder)} is not a folder of PNG masks")
    return folder


def pair_frames(predicted: Path, truth: Path, sequence: str | None = None) -> list[tuple[str, Path, Path]]:
    """[(frame, predicted mask, true mask)] of one sequence, or one ValueError naming the first unpaired frame."""
    from dinokit.data.images import display_path

    where = f" of sequence {sequence}" if sequence else ""
    pred, true = mask_files(predicted), mask_files(truth)
    if not true:
        raise ValueError(f"the ground truth{where} {display_path(truth)} holds no PNG masks")
    missing = [name for name in true if name not in pred]
    if missing:
        raise ValueError(f"{display_path(predicted)} has no prediction for {len(missing)} of the {len(true)} "
                         f"ground-truth frames{where} (first: {missing[0]}.png): give one <frame>.png per "
                         f"ground-truth frame, named like it")
    extra = [name for name in pred if name not in true]
    if extra:
        raise ValueError(f"{display_path(predicted)} has {len(extra)} frame(s){where} that the ground truth "
                         f"{display_path(truth)} does not have (first: {extra[0]}.png): give the ground truth of the "
                         f"same frames, or remove the others")
    return [(name, pred[name], true[name]) for name in true]


def pair_sequences(predicted, truth) -> dict[str, list[tuple[str, Path, Path]]]:
    """{sequence: frames} for the layout of TRUTH (see the module notes), checked before any mask is read."""
    from dinokit.data.images import display_path

    predicted, truth = _folder(predicted, "PRED_DIR"), _folder(truth, "TRUTH_DIR")
    if mask_files(truth):  # one sequence
        return {truth.name: pair_frames(predicted, truth)}
    sequences = sorted(p.name for p in truth.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sequences:
        raise ValueError(f"TRUTH_DIR {display_path(truth)} holds neither PNG masks nor sequence folders of them")
    if mask_files(predicted):
        raise ValueError(f"PRED_DIR {display_path(predicted)} holds masks of one sequence but TRUTH_DIR "
                         f"{display_path(truth)} holds sequence folders: give the sequence's own ground-truth "
                         f"folder ({display_path(truth / sequences[0])}, ...)")
    scored = sorted(p.name for p in predicted.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not scored:
        raise ValueError(f"PRED_DIR {display_path(predicted)} holds no sequence folders (<sequence>/<frame>.png)")
    unknown = [name for name in scored if name not in sequences]
    if unknown:
        raise ValueError(f"PRED_DIR has sequence(s) {', '.join(unknown[:3])} that TRUTH_DIR {display_path(truth)} "
                         f"does not have: give the matching ground truth")
    return {name: pair_frames(predicted / name, truth / name, name) for name in scored}


def evaluate_folders(predicted, truth, bound_th: float = davis.BOUND_TH) -> dict:
    """davis.summarize of every sequence (see the module notes), with "sequences": the names scored.
    NaN statistics (sequences of two frames or fewer) are returned as None, as written to JSON."""
    return evaluate_pairs(pair_sequences(predicted, truth), bound_th)


def evaluate_pairs(pairs: dict[str, list[tuple[str, Path, Path]]], bound_th: float = davis.BOUND_TH,
                   progress: Callable[[], None] | None = None) -> dict:
    """`evaluate_folders` of `pair_sequences`' pairs; `progress()` is called after each frame."""
    sequences = {}
    for name, frames in pairs.items():
        scores = None
        for frame, pred_path, true_path in frames:
            true_ids, _ = read_id_mask(true_path, "ground-truth mask")
            pred_ids, _ = read_id_mask(pred_path, "predicted mask")
            if scores is None:
                scores = davis.SequenceScores.from_first_truth(true_ids, bound_th=bound_th)
            try:
                scores.add(pred_ids, true_ids, frame)
            except ValueError as exc:
                raise ValueError(f"sequence {name}: {exc}") from None
            if progress is not None:
                progress()
        sequences[name] = scores
    summary = davis.summarize(sequences)
    summary["sequences"] = list(pairs)
    return davis.finite_or_none(summary)
