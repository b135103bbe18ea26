"""A command's whole output folder written in one step: lock it, check it may be replaced, stage, swap.

`staged_output(OUT, command, is_ours)` is what `dinokit segment|depth train`, `discover`, `anomaly`, `track` and
`match` write through: OUT is then the previous complete result or the new one, never a mix or a half, and a
failed run leaves OUT exactly as it was. OUT may be new, empty, or an earlier output of the same command
(`is_ours(OUT)` says so, typically from a file the command always writes); anything else is refused rather than
overwritten, since the swap would delete it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dinokit import atomic, locking


def check_replaceable(output: Path, is_ours: Callable[[Path], bool], option: str = "--output") -> None:
    """Raise ValueError naming the fix unless `output` is new, empty (hidden files aside) or `is_ours`."""
    if output.is_file():
        raise ValueError(f"{option} {output} is a file: give a folder")
    if not output.is_dir() or not any(not p.name.startswith(".") for p in output.iterdir()):
        return
    if not is_ours(output):
        raise ValueError(f"{option} {output} exists and holds other files: give a new or empty folder (an earlier "
                         f"output of this command is replaced)")


@contextmanager
def staged_output(output: str | Path, command: str, is_ours: Callable[[Path], bool],
                  option: str = "--output") -> Iterator[Path]:
    """Lock OUT (the lock file sits beside it, as OUT itself is replaced), check it, remove staging folders of
    killed runs, yield a fresh staging folder; on success the staging folder replaces OUT. On any error the
    staging folder is removed and OUT is left as it was."""
    output = Path(output).expanduser()
    with locking.acquire(output, command, lock_path=output.with_name(f".{output.name}.lock"), option=option):
        check_replaceable(output, is_ours, option)
        atomic.remove_stale_staging(output)  # we hold the lock: no live run owns one
        with atomic.staged_folder(output, option) as staging:
            yield staging


def has_file(name: str) -> Callable[[Path], bool]:
    """`is_ours` for commands whose every output folder holds `name`."""
    return lambda output: (output / name).is_file()
