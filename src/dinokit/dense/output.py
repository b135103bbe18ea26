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


def check_output(output: Path, architecture: str) -> None:
    """OUT may be new, empty, or an earlier output of the same command (then it is replaced)."""
    if output.is_file():
        raise ValueError(f"--output {output} is a file: give a folder")
    if not output.is_dir() or not any(p for p in output.iterdir() if not p.name.startswith(".")):
        return
    config = output / "config.json"
    try:
        ours = (output / MARKER).is_file() and architecture in json.loads(config.read_text()).get("architectures", [])
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"--output {output} exists and holds other files: give a new or empty folder (an earlier "
                         f"output of this command is replaced)")


@contextmanager
def staged_output(output: Path, command: str, architecture: str):
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
