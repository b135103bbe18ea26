"""Where the server's work runs, and how it stops once nobody waits for it.

Work runs in lanes, each with its own threads, so one kind of work cannot hold up the others:
    model   one thread: the dynamic batcher's model calls (embeddings of uploads for /api/search, /api/embed)
    heavy   one thread: expensive one-off work (PCA pictures: decode, model, PNG; duplicate groupings); it
            admits a few requests at a time and refuses more (LaneFull, 503), so they cannot pile up
    decode  a few threads decoding uploads before they reach the model
The event loop's default pool keeps the quick work (thumbnails, index searches, file checks), and nothing slow
runs on the event loop itself, so /api/health and the page answer whatever the lanes are doing. The model and
heavy lanes may run the model at the same time: a slow PCA picture shares the CPU with searches instead of
making them queue behind it.

Stopping: each job carries a `stop` callable (true once its request's budget is spent or its client has gone).
A job whose request is over before it starts is skipped. Once running, the job stops at the next stop point:
`check_stop()` raises WorkStopped in the thread that runs it, and `install_stop_points` makes every transformer
block of a model a stop point (a forward pre-hook), so abandoned model work ends within one block instead of
running to the end. Outside a lane job the stop points do nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch import nn

_job = threading.local()  # .stop: the stop callable of the lane job running on this thread, if any


class WorkStopped(Exception):
    """The request this work was for is over (its budget is spent or its client has gone)."""


class LaneFull(Exception):
    """A lane already holds as many requests as it admits (503, retry later)."""

    def __init__(self, lane: Lane) -> None:
        super().__init__(f"the server is busy: {lane.capacity} {lane.describes} are already running or waiting; "
                         f"retry in a few seconds")


def check_stop() -> None:
    """Raise WorkStopped if the lane job running on this thread should stop; no-op outside lane jobs."""
    stop = getattr(_job, "stop", None)
    if stop is not None and stop():
        raise WorkStopped("its request is over")


def _stop_point(module: nn.Module, args) -> None:
    check_stop()


def install_stop_points(model: nn.Module) -> int:
    """Make each block of `model` (every member of its ModuleLists) a stop point; returns how many. Idempotent."""
    if getattr(model, "_dinokit_stop_points", None) is not None:
        return model._dinokit_stop_points
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in blocks:
        block.register_forward_pre_hook(_stop_point)
    model._dinokit_stop_points = len(blocks)
    return len(blocks)


class Lane:
    """A fixed set of worker threads; `capacity` (None: unbounded) caps the jobs admitted and not yet finished."""

    def __init__(self, name: str, *, workers: int = 1, capacity: int | None = None,
                 describes: str = "requests of this kind") -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.name, self.capacity, self.describes = name, capacity, describes
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"dinokit-{name}")
        self._lock = threading.Lock()
        self.admitted = 0  # jobs submitted and not yet finished (running or waiting)
        self.jobs_run = self.jobs_skipped = self.jobs_stopped = 0  # totals, in /api/health

    async def run(self, fn: Callable[..., Any], *args, stop: Callable[[], bool] | None = None) -> Any:
        """`fn(*args)` on this lane's threads. Cancelling the caller drops the job if it has not started;
        a started job stops at its next stop point once `stop()` is true."""
        with self._lock:
            if self.capacity is not None and self.admitted >= self.capacity:
                raise LaneFull(self)
            self.admitted += 1
        try:
            future = self.executor.submit(self._job, fn, args, stop)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)  # also when its caller left before it ran (then skipped)
        return await asyncio.wrap_future(future)

    def _release(self, future=None) -> None:
        with self._lock:
            self.admitted -= 1
            if future is not None and future.cancelled():
                self.jobs_skipped += 1

    def _job(self, fn, args, stop):
        if stop is not None and stop():
            with self._lock:
                self.jobs_skipped += 1
            raise WorkStopped("its request was over before the work started")
        _job.stop = stop
        try:
            result = fn(*args)
        except WorkStopped:
            with self._lock:
                self.jobs_stopped += 1
            raise
        finally:
            _job.stop = None
        with self._lock:
            self.jobs_run += 1
        return result

    def stats(self) -> dict:
        with self._lock:
            return {"admitted": self.admitted, "run": self.jobs_run, "skipped": self.jobs_skipped,
                    "stopped": self.jobs_stopped}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
