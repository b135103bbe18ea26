"""Dynamic batching: requests that arrive together share one model call.

Each request puts its item on an asyncio queue and awaits its own future. One collector task takes the first
waiting item, then keeps taking items until the batch holds `max_batch` or `max_wait_ms` has passed since that
first item, and runs the batch function on the single model thread, off the event loop. While a batch runs,
new requests queue up, so under load the next batch fills at once and the wait never applies; alone, a request
waits at most `max_wait_ms`. With max_batch=1 every request is its own model call (batching off).

The model thread is also where any other model work (e.g. the PCA picture) runs, via `run_exclusive`, so one
thread owns the model and torch's own thread pool is not shared between competing callers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("dinokit.serve")


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinokit-model")
        self.batch_sizes: list[int] = []  # the last 1000 batch sizes, for tests
        self.batches_run = self.items_run = 0  # totals, in /api/health: their ratio is the mean batch size
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._collector = asyncio.create_task(self._collect(), name="dinokit-batcher")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        self.model_thread.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: Any) -> Any:
        """The batch function's result for `item`, computed together with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def run_exclusive(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(*args)` on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [(item, future) for item, future in batch if not future.done()]  # client gone: skip it
            if not batch:
                continue
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            self.batches_run, self.items_run = self.batches_run + 1, self.items_run + len(batch)
            try:
                results = await loop.run_in_executor(self.model_thread, self.run_batch, [i for i, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # one failed batch fails its requests, never the collector
                log.exception("model batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
