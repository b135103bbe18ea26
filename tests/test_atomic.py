"""`dinokit.atomic`: whole-file writes that survive concurrent writers, failures and kills."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dinokit import atomic
from dinokit.apps import store

REPO = Path(__file__).resolve().parents[1]
CHUNKS, CHUNK = 32, 512


def _write_version(path: Path, version: int) -> None:
    """One whole version of the file: CHUNKS chunks of one byte value, written slowly to interleave writers."""
    def write(tmp):
        with open(tmp, "wb") as f:
            for _ in range(CHUNKS):
                f.write(bytes([version]) * CHUNK)
                f.flush()
                time.sleep(0)  # let the other writers run in between

    atomic.atomic_write(path, write, durable=False)


def _is_one_whole_version(data: bytes) -> bool:
    return len(data) == CHUNKS * CHUNK and len(set(data)) == 1


def test_concurrent_threads_writing_one_file_never_fail_and_leave_one_whole_version(tmp_path):
    path = tmp_path / "shard.npy"
    errors, seen = [], []

    def writer(version):
        try:
            for _ in range(10):
                _write_version(path, version)
                seen.append(_is_one_whole_version(path.read_bytes()))
        except Exception as exc:  # the fixed temporary name gave FileNotFoundError on rename
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(1, 13)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(seen) and len(seen) == 120
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npy"]  # no temporary file left


WRITER = f"""
import sys, time
from pathlib import Path
from dinokit import atomic
path, version = Path(sys.argv[1]), int(sys.argv[2])
def write(tmp):
    with open(tmp, "wb") as f:
        for _ in range({CHUNKS}):
            f.write(bytes([version]) * {CHUNK}); f.flush(); time.sleep(0.0005)
for _ in range(15):
    atomic.atomic_write(path, write, durable=False)
    data = path.read_bytes()
    assert len(data) == {CHUNKS} * {CHUNK} and len(set(data)) == 1, "a mixed or partial file"
"""


def test_concurrent_processes_writing_one_file_never_fail_and_leave_one_whole_version(tmp_path):
    path = tmp_path / "manifest.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(v)], env=env,
                                stderr=subprocess.PIPE, text=True) for v in range(1, 7)]
    failures = [(w.wait(timeout=120), w.stderr.read()) for w in writers]
    assert [code for code, _ in failures] == [0] * 6, [err[-1500:] for code, err in failures if code]
    assert _is_one_whole_version(path.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_store_atomic_write_is_the_shared_one():
    assert store.atomic_write is atomic.atomic_write


def test_failure_or_interrupt_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"old")

    def half_then(exc):
        def write(tmp):
            tmp.write_bytes(b"half")
            raise exc
        return write

    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            atomic.atomic_write(path, half_then(exc))
        assert path.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_new_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("code, text", [
    (errno.ENOSPC, "no space left on device writing {path}: free space or use another --output"),
    (errno.EDQUOT, "disk quota exceeded writing {path}: free space or use another --output"),
    (errno.EROFS, "read-only file system writing {path}: use another --output"),
    (errno.EACCES, "permission denied writing {path}: make the folder writable or use another --output"),
])
def test_full_disk_or_unwritable_folder_is_one_clear_error_naming_the_file(tmp_path, code, text):
    path = tmp_path / "img_emb_3.npy"

    def write(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(atomic.OutputWriteError) as info:
        atomic.atomic_write(path, write)
    assert str(info.value) == text.format(path=path)
    assert info.value.errno == code and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_errors_without_errno_are_recognised_by_their_message(tmp_path):
    with pytest.raises(atomic.OutputWriteError, match="no space left on device writing .*meta.parquet"):
        with atomic.writing(tmp_path / "meta.parquet"):
            raise OSError("IOError: [Errno 28] error writing bytes to file. Detail: No space left on device")


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic.writing(tmp_path / "x"):
            raise FileNotFoundError(errno.ENOENT, "gone")


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "img_emb").mkdir()
    stale = [tmp_path / ".manifest.json.k2j3h4.tmp", tmp_path / "img_emb" / ".img_emb_1.npy.abc123.tmp"]
    kept = [tmp_path / "manifest.json", tmp_path / "notes.tmp", tmp_path / "img_emb" / "img_emb_0.npy"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(atomic.remove_stale_temporaries(tmp_path, recursive=True)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
