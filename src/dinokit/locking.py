"""One dinokit process writes an output folder at a time: an advisory lock on `<folder>/.dinokit.lock`.

A second `dinokit embed` / `train` / `index` / `finetune` pointed at a folder in use refuses at once with the
holder's PID and command, instead of racing the first (both "succeeding" on one mixed folder). The lock is an
flock(2) on the lock file: the kernel drops it when its holder exits, however it exits (SIGKILL, crash, power
off), so a lock file left behind never blocks a rerun; a clean exit also deletes the file.

Under torchrun the ranks of one job share their output folder: rank 0 takes the lock for all of them and tells
every rank the outcome (`acquire_for_ranks`), so a refusal stops the whole job with the same message.
The lock is advisory: it excludes dinokit processes, not other programs. It works on local file systems and
on NFS (where Linux maps flock to byte-range locks); on platforms without fcntl it is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dinokit.atomic import writing

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".dinokit.lock"

_held: dict[int, OutputLock] = {}  # fd -> lock, to drop from forked children


class OutputInUse(RuntimeError):
    """Another process holds the output folder's lock."""


class OutputLock:
    """A held lock (a context manager; `release()` is idempotent). `path` is None for a no-op lock."""

    def __init__(self, path: Path | None = None, fd: int | None = None, created_folder: bool = False):
        self.path, self.fd, self.pid, self.created_folder = path, fd, os.getpid(), created_folder
        if fd is not None:
            _held[fd] = self

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        _held.pop(fd, None)
        try:
            if os.getpid() == self.pid:  # delete while still holding it: a waiter then retries on a new file
                self.path.unlink(missing_ok=True)
                if self.created_folder:  # a run that failed early leaves no empty output folder behind
                    try:
                        self.path.parent.rmdir()
                    except OSError:  # not empty: it holds the run's output
                        pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock with its parent; closing its copy keeps the lock tied
    # to the parent alone, so a killed parent's lock is free at once even while its workers wind down.
    for fd, lock in list(_held.items()):
        lock.fd = None
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _holder(fd: int) -> dict:
    for _ in range(20):  # the holder writes its details just after locking
        text = os.pread(fd, 65536, 0)
        if text:
            try:
                return json.loads(text)
            except ValueError:
                pass
        time.sleep(0.01)
    return {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid", "?")
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"PID {pid}{where} ({holder.get('command', 'dinokit')} started {holder.get('started', '?')})"


def acquire(target: str | os.PathLike, command: str, *, lock_path: str | os.PathLike | None = None,
            wait: bool = False, option: str = "--output") -> OutputLock:
    """Lock `target` (a folder; the lock file's folder is created if missing) for `command`, e.g. "dinokit embed".

    lock_path: the lock file (default `target/.dinokit.lock`; give one beside `target` when `target` itself gets
    replaced). wait: block until the holder is done (saying so on stderr) instead of raising OutputInUse.
    """
    target = Path(target)
    lock_path = Path(lock_path) if lock_path is not None else target / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        return OutputLock()
    with writing(lock_path, option):
        while True:
            created = not lock_path.parent.is_dir()
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _describe(_holder(fd))
                    if not wait:
                        raise OutputInUse(f"{target} is in use by {holder}; wait for it or use another "
                                          f"{option}.") from None
                    print(f"{command}: waiting for {holder}, which is writing {target}", file=sys.stderr,
                          flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:  # the previous holder deletes the file as it leaves: lock the file that is there now
                    current = os.stat(lock_path).st_ino
                except FileNotFoundError:
                    current = None
                if current != os.fstat(fd).st_ino:
                    os.close(fd)
                    continue
                details = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                           "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
                           "argv": sys.argv}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(details).encode(), 0)
                return OutputLock(lock_path, fd, created)
            except BaseException:
                if fd not in _held:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise


def acquire_for_ranks(target: str | os.PathLike, command: str, rank: int, world_size: int,
                      **kwargs) -> OutputLock:
    """`acquire` for a job of `world_size` torchrun ranks sharing `target`: rank 0 locks, every rank learns the
    outcome (a collective: call it on every rank), and all raise the same error when it is refused."""
    if world_size <= 1:
        return acquire(target, command, **kwargs)
    import torch.distributed as dist

    lock, error = OutputLock(), None
    if rank == 0:
        try:
            lock = acquire(target, command, **kwargs)
        except (OutputInUse, OSError) as exc:
            error = exc
    outcome = [None if error is None else (isinstance(error, OutputInUse), str(error))]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if error is not None:
            raise error
        in_use, message = outcome[0]
        raise (OutputInUse if in_use else OSError)(message)
    return lock
