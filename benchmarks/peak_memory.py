"""Peak memory of a benchmark run: this process and all its descendants (DataLoader workers, Ray's processes)."""

from __future__ import annotations

import os
import threading


def memory_kb(pid: int) -> int:
    """PSS of `pid` in kB (RSS where PSS is unreadable), 0 when the process is gone."""
    for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(name) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except OSError:
            pass
    return 0


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            pass
    return found


class PeakMemory:
    """Peak total PSS of this process and all its descendants while the `with` block runs (sampled in a thread);
    `.peak_kb` / `.peak_mb` afterwards."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, memory_kb(me) + sum(memory_kb(k) for k in descendants(me)))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024
