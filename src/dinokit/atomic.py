"""Whole-file writes: readers, resumed runs and concurrent writers see the old file or the whole new one.

`atomic_write(path, write)` lets `write` fill a temporary file with a unique name in the same folder
(`.<name>.<random>.tmp`), flushes it to the disk, and renames it over `path` (a rename within one file system is
atomic). Unique names matter: two processes writing the same file each rename their own complete temporary
file (a fixed name let one rename the other's half-written file, or find it gone). On any failure, or
Ctrl-C, the temporary file is removed. A process killed outright (SIGKILL, power loss) can leave one behind;
`remove_stale_temporaries` deletes those, and commands call it while they hold their output folder's lock
(`dinokit.locking`), when no live writer can own one.

A full disk, a quota, a read-only or unwritable folder become one `OutputWriteError` (an OSError) naming the
file and the fix, instead of a bare errno from deep inside numpy, pyarrow or torch (`writing`).

Whole folders (a trained model, a command's output folder) are written the same way: into a staging folder
beside the target (`staged_folder`), which replaces the target only once complete (`replace_folder`), so the
target is the previous complete folder or the new one, never a mix or a half.

Nothing in dinokit sits below this module: it imports only the standard library (torch only in `torch_save`).
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"

# errno -> (what happened, what to do); "{option}" is the command's output option.
_EXPLAINED = {
    errno.ENOSPC: ("no space left on device", "free space or use another {option}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or use another {option}"),
    errno.EROFS: ("read-only file system", "use another {option}"),
    errno.EACCES: ("permission denied", "make the folder writable or use another {option}"),
    errno.EPERM: ("operation not permitted", "make the folder writable or use another {option}"),
}
# pyarrow and faiss raise OSError without an errno; their messages carry the C library's text.
_MESSAGES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
             "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


class OutputWriteError(OSError):
    """An output file could not be written (disk full, read-only, no permission); the message names it."""


def explain(exc: OSError, path: str | os.PathLike, option: str = "--output") -> OSError:
    """`exc` as an OutputWriteError naming `path` and the fix, when it is a full disk or an unwritable folder."""
    if isinstance(exc, OutputWriteError):
        return exc
    code = exc.errno
    if code not in _EXPLAINED:
        code = next((c for text, c in _MESSAGES.items() if text in str(exc)), None)
    if code is None:
        return exc
    what, fix = _EXPLAINED[code]
    error = OutputWriteError(f"{what} writing {path}: {fix.format(option=option)}")
    error.errno = code
    return error


@contextmanager
def writing(path: str | os.PathLike, option: str = "--output") -> Iterator[None]:
    """Turn a full disk or an unwritable folder met while writing `path` into one clear OutputWriteError."""
    try:
        yield
    except OSError as exc:
        explained = explain(exc, path, option)
        if explained is exc:
            raise
        raise explained from exc


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask() sets it, racing other threads)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True,
                 option: str = "--output") -> None:
    """Call `write(tmp)` to fill a fresh temporary file beside `path`, then rename it to `path`.

    durable: fsync the file before the rename and the folder after it, so that after a power loss `path` is
    the old or the new file, never an empty one (renames can reach the disk before the data).
    The temporary file has the permissions a new file would get (mkstemp's are 0600).
    """
    path = Path(path)
    tmp = None
    try:
        with writing(path, option):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
            tmp = Path(name)
            try:
                os.fchmod(fd, 0o666 & ~_umask())
            finally:
                os.close(fd)
            write(tmp)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            pause_point(path)
            os.replace(tmp, path)
            tmp = None
            if durable:
                _fsync_folder(path.parent)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, **kwargs) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), **kwargs)


def torch_save(obj, path: str | os.PathLike, **kwargs) -> None:
    """torch.save, atomically and durably: a crash never leaves a truncated checkpoint under `path`."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp), **kwargs)


def is_temporary(name: str) -> bool:
    """Whether `name` is one of `atomic_write`'s temporary files."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete temporary files left in `folder` by killed writers; call it only while holding the folder's lock."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(f".*{TEMPORARY_SUFFIX}") if recursive else folder.glob(f".*{TEMPORARY_SUFFIX}")
    removed = []
    for path in candidates:
        if path.is_file() and is_temporary(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------ whole folders
def staging_folder(target: str | os.PathLike) -> Path:
    """A new empty folder `.<name>.<random>` beside `target`: on its file system, so it can be renamed onto it.
    It gets the permissions a new folder would get (mkdtemp's are 0700), as the folder it becomes should."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike, option: str = "--output") -> None:
    """Put the complete folder `staging` where `target` is. A folder cannot be renamed over a non-empty one, so
    the old `target` is first renamed aside (`.<name>.old`), then removed; a kill between the two renames leaves
    the old folder there, which `remove_stale_staging` deletes on the next run."""
    staging, target = Path(staging), Path(target)
    with writing(target, option):
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(target: str | os.PathLike, option: str = "--output") -> Iterator[Path]:
    """Yield a staging folder beside `target`; when the block ends without an error, it replaces `target`. On
    any error (or Ctrl-C) the staging folder is removed and `target` is left as it was. Hold `target`'s lock
    (`dinokit.locking`, with the lock file beside `target`, since `target` itself is replaced) around this."""
    target = Path(target)
    with writing(target, option):
        staging = staging_folder(target)
    try:
        yield staging
        replace_folder(staging, target, option)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Delete the folders `.<name>.*` beside `target` (staging and `.old` folders of killed runs); call it only
    while holding `target`'s lock, when no live run can own one. Files (the lock file itself) are left."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):  # `run[1]` is a name, not a pattern
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------ test hook
PAUSE_ENV = "DINOKIT_TEST_PAUSE_AT"
PAUSE_MESSAGE = "DINOKIT_TEST_PAUSED"
_pauses: Counter = Counter()


def pause_point(path: str | os.PathLike) -> None:
    """Test-only: with DINOKIT_TEST_PAUSE_AT="<glob>[#n]" set, the n-th write (default the first) of a file
    whose name matches stops just before its rename, says so on stderr and sleeps until killed. The fault tests
    SIGKILL a real process at that exact point (a half-finished write). Unset, it costs one dictionary lookup."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if not fnmatch.fnmatchcase(Path(path).name, pattern):
        return
    _pauses[spec] += 1
    if _pauses[spec] == int(nth or 1):
        print(f"{PAUSE_MESSAGE} {os.getpid()} {path}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
