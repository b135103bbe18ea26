"""`dinokit.locking`: one process per output folder; a killed holder never blocks a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dinokit import locking

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import os, sys, time
from dinokit import locking
lock = locking.acquire(sys.argv[1], "dinokit embed")
if len(sys.argv) > 2:  # a forked child (like a DataLoader worker) that outlives its parent
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder: Path, fork_child: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)] + (["fork"] if fork_child else []),
                               env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_second_process_refuses_at_once_naming_the_holders_pid_and_command(tmp_path):
    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(locking.OutputInUse) as info:
            locking.acquire(tmp_path / "out", "dinokit embed")
        message = str(info.value)
        assert f"{tmp_path / 'out'} is in use by PID {holder.pid} (dinokit embed started " in message
        assert message.endswith("; wait for it or use another --output.")
        assert isinstance(info.value, RuntimeError)  # cli.main prints it as one line
    finally:
        _kill(holder)


def test_lock_of_a_sigkilled_process_is_free_at_once_although_its_file_remains(tmp_path):
    holder = _holder(tmp_path / "out")
    _kill(holder)
    assert (tmp_path / "out" / locking.LOCK_NAME).exists()  # stale file: the kernel dropped the lock itself
    with locking.acquire(tmp_path / "out", "dinokit train") as lock:
        assert lock.path == tmp_path / "out" / locking.LOCK_NAME


def test_forked_children_do_not_keep_their_killed_parents_lock(tmp_path):
    holder = _holder(tmp_path / "out", fork_child=True)
    _kill(holder)  # its child sleeps on, like a DataLoader worker that has not noticed yet
    with locking.acquire(tmp_path / "out", "dinokit embed"):
        pass


def test_two_locks_in_one_process_exclude_each_other_and_a_clean_release_deletes_the_file(tmp_path):
    with locking.acquire(tmp_path, "dinokit index"):
        with pytest.raises(locking.OutputInUse, match=f"in use by PID {os.getpid()} \\(dinokit index"):
            locking.acquire(tmp_path, "dinokit index")
    assert not (tmp_path / locking.LOCK_NAME).exists()
    locking.acquire(tmp_path, "dinokit index").release()


def test_a_waiting_lock_gets_the_folder_once_the_holder_releases_it(tmp_path, capsys):
    first = locking.acquire(tmp_path, "dinokit eval")
    got = []
    waiter = threading.Thread(target=lambda: got.append(locking.acquire(tmp_path, "dinokit eval", wait=True)))
    waiter.start()
    said = ""
    deadline = time.monotonic() + 120  # only a hang fails: the event awaited is the waiter saying it waits
    while "waiting for PID" not in said:  # released earlier, the waiter would never have had to wait
        assert waiter.is_alive() and time.monotonic() < deadline, f"the waiter did not wait: {got}, {said!r}"
        time.sleep(0.01)
        said += capsys.readouterr().err
    assert got == []
    first.release()
    waiter.join(timeout=120)
    assert len(got) == 1 and got[0].fd is not None
    got[0].release()


def test_lock_file_beside_a_folder_that_gets_replaced(tmp_path):
    target = tmp_path / "classifier"
    with locking.acquire(target, "dinokit finetune", lock_path=tmp_path / ".classifier.lock"):
        with pytest.raises(locking.OutputInUse, match=f"{target} is in use"):
            locking.acquire(target, "dinokit finetune", lock_path=tmp_path / ".classifier.lock")
    assert not target.exists()  # only the lock file's folder is created


def test_a_folder_created_for_the_lock_is_removed_again_if_the_run_wrote_nothing(tmp_path):
    locking.acquire(tmp_path / "new", "dinokit embed").release()
    assert not (tmp_path / "new").exists()
    with locking.acquire(tmp_path / "used", "dinokit embed"):
        (tmp_path / "used" / "manifest.json").write_text("{}")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["manifest.json"]
