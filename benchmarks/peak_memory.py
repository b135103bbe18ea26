"""Peak memory of a benchmark run: this process and all its descendants (DataLoader workers, Ray's processes).

This process's own peak is the kernel's high-water mark (VmHWM, reset on entry through /proc/self/clear_refs):
exact and free. Sampling /proc/<pid>/smaps_rollup instead, every 20 ms, walked the page tables of a multi-GB
process under its mmap lock and stole a third of a core from the model's threads (on 2 cores it slowed every
method by ~40% and the fastest one most). Descendants, when there are any, are sampled (PSS, so pages shared with
this process count once) every 0.25 s; the reported peak is this process's peak plus the descendants' peak total.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def memory_kb(pid: int, key: str = "Pss:") -> int:
    """PSS of `pid` in kB (RSS where PSS is unreadable), 0 when the process is gone."""
    for name, field in ((f"/proc/{pid}/smaps_rollup", key), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(name) as f:
                for line in f:
                    if line.startswith(field):
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


def _own_high_water_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of this process plus its descendants while the `with` block runs; `.peak_kb` / `.peak_mb`."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._children_kb, self._own_sampled_kb = 0, 0

    def _run(self, sample_self: bool) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self._children_kb = max(self._children_kb, sum(memory_kb(k) for k in descendants(me)))
            if sample_self:
                self._own_sampled_kb = max(self._own_sampled_kb, memory_kb(me, "Rss:"))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self._thread = threading.Thread(target=self._run, args=(not self._hwm,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        own = _own_high_water_kb() if self._hwm else self._own_sampled_kb
        self.peak_kb = own + self._children_kb

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024
