"""Dense commands' outputs: a finished model folder written in one step (through `dinokit.output_folder`: a
staging folder beside OUT then replaces OUT, so OUT is the previous complete result or the new one, never a mix
or a half), and prediction pictures written one atomic file each."""

from __future__ import annotations

import json
from pathlib import Path

from dinokit import atomic, locking, output_folder

MARKER = "metrics.json"  # written last into the staging folder; a dense output folder always has it


def _is_dense_output(architecture: str | tuple[str, ...]):
    names = (architecture,) if isinstance(architecture, str) else architecture

    def is_ours(output: Path) -> bool:
        try:
            written = json.loads((output / "config.json").read_text()).get("architectures", [])
        except (OSError, ValueError, AttributeError):
            return False
        return (output / MARKER).is_file() and any(name in written for name in names)

    return is_ours


def staged_output(output: Path, command: str, architecture: str | tuple[str, ...]):
    """`dinokit.output_folder.staged_output` for a model folder: OUT may be new, empty, or an earlier output of
    the same command (its config names `architecture`, one of them if a tuple); it is then replaced."""
    return output_folder.staged_output(output, command, _is_dense_output(architecture))


ERRORS = "errors.json"  # images a predict run could not read: [{"path", "reason"}], written when there are any


def write_predictions(images: list[Path], output: Path, command: str, predict, progress: bool = True) -> list[Path]:
    """For each image, `predict(path)` -> [(file name, PIL picture)], each picture written atomically into
    `output`. An image that cannot be read is skipped: logged, and listed in `output/errors.json` (as embed
    lists them in errors.parquet), so one bad file never stops a folder nor hides among the results."""
    import logging

    from dinokit.data.images import ImageReadError, display_path

    logger = logging.getLogger("dinokit.dense")
    written, errors = [], []
    with locking.acquire(output, command):
        iterator = images
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(images, desc=command.split()[1], unit="image")
        for path in iterator:
            try:
                pictures = predict(path)
            except ImageReadError as exc:
                errors.append({"path": display_path(path), "reason": exc.reason})
                logger.warning("skipping %s: %s", display_path(path), exc.reason)
                continue
            for name, picture in pictures:
                atomic.atomic_write(output / name, lambda tmp, p=picture: p.save(tmp, format="PNG"))
                written.append(output / name)
        if errors:
            atomic.write_text(output / ERRORS, json.dumps(errors, indent=2) + "\n")
        else:
            (output / ERRORS).unlink(missing_ok=True)  # from an earlier run into the same folder
    if images and not written:
        raise ValueError(f"none of the {len(images)} images could be read (e.g. {errors[0]['path']}: "
                         f"{errors[0]['reason']}); see {output / ERRORS}")
    return written
