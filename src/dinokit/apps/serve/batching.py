"""Dynamic batching: requests that arrive together share one model call.

Each request puts its item on an asyncio queue and awaits its own future. One collector task takes the first
waiting item, then keeps taking items until the batch holds `max_batch` or `max_wait_ms` has passed since that
first item, and runs the batch function on the model lane's one thread, off the event loop. While a batch runs,
new requests queue up, so under load the next batch fills at once and the wait never applies; alone, a request
waits at most `max_wait_ms`. With max_batch=1 every request is its own model call (batching off).

Batches run on the model lane (lanes.py), one at a time. A request whose budget is spent or whose client has
gone (its future cancelled, or its `stop` true) is dropped before its batch runs; a running batch stops at the
next transformer block once every request in it is over, and still runs for as long as one of them waits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from dinokit.apps.serve.lanes import Lane, WorkStopped

log = logging.getLogger("dinokit.serve")


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, lane: Lane | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.lane = lane or Lane("model")
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
        self.lane.shutdown()

    async def submit(self, item: Any, stop: Callable[[], bool] | None = None) -> Any:
        """The batch function's result for `item`, computed together with whatever else is waiting.

        stop: true once nobody waits for this result any more (e.g. the request's budget is spent)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, stop))
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, Any]]:
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
        while True:
            batch = []
            for item, future, stop in await self._next_batch():
                if stop is not None and stop() and not future.done():  # request over before its batch ran
                    future.set_exception(WorkStopped("its request was over before the model ran"))
                if not future.done():
                    batch.append((item, future, stop))
            if not batch:
                continue
            futures = [future for _, future, _ in batch]
            everyone_gone = functools.partial(_all_over, batch)  # read on the model thread: flags only
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            self.batches_run, self.items_run = self.batches_run + 1, self.items_run + len(batch)
            try:
                results = await self.lane.run(self.run_batch, [item for item, _, _ in batch], stop=everyone_gone)
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except WorkStopped as exc:
                log.info("model batch of %d stopped: every request in it is over", len(batch))
                _fail(futures, exc)
                continue
            except Exception as exc:  # one failed batch fails its requests, never the collector
                log.exception("model batch of %d failed", len(batch))
                _fail(futures, exc)
                continue
            for future, result in zip(futures, results):
                if not future.done():
                    future.set_result(result)


def _over(future: asyncio.Future, stop: Callable[[], bool] | None) -> bool:
    return future.done() or (stop is not None and stop())


def _all_over(batch: list[tuple[Any, asyncio.Future, Any]]) -> bool:
    return all(_over(future, stop) for _, future, stop in batch)


def _fail(futures: list[asyncio.Future], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
