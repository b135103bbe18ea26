"""Writing a finished model folder in one step: everything goes to a staging folder beside OUT, which then
replaces OUT, so OUT is either the previous complete result or the new one, never a mix or a half."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from dinokit import atomic, locking
from dinokit.eval.features import staging_dir

MARKER = "metrics.json"  # written last into the staging folder; a dense output folder always has it


def check_output(output: Path, architecture: str | tuple[str, ...]) -> None:
    """OUT may be new, empty, or an earlier output of the same command (then it is replaced); `architecture`:
    the model class name(s) such an output has."""
    if output.is_file():
        raise ValueError(f"--output {output} is a file: give a folder")
    if not output.is_dir() or not any(p for p in output.iterdir() if not p.name.startswith(".")):
        return
    config = output / "config.json"
    try:
        names = (architecture,) if isinstance(architecture, str) else architecture
        written = json.loads(config.read_text()).get("architectures", [])
        ours = (output / MARKER).is_file() and any(name in written for name in names)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"--output {output} exists and holds other files: give a new or empty folder (an earlier "
                         f"output of this command is replaced)")


@contextmanager
def staged_output(output: Path, command: str, architecture: str | tuple[str, ...]):
    """Lock OUT (lock file beside it), check it, yield a staging folder; on success the staging folder replaces
    OUT. On any error the staging folder is removed and OUT is left as it was."""
    output = Path(output).expanduser()
    with locking.acquire(output, command, lock_path=output.with_name(f".{output.name}.lock")):
        check_output(output, architecture)
        for stale in output.parent.glob(f".{output.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)  # staging folders of killed runs (we hold the lock)
        staging = staging_dir(output)
        try:
            yield staging
            with atomic.writing(output):
                old = None
                if output.exists():
                    old = output.with_name(f".{output.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(output, old)
                os.replace(staging, output)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


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
