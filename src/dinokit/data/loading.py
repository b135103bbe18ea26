"""Iterating a DataLoader whose worker processes must never hold up the end of a run.

When a run stops early (Ctrl-C, an error), torch's DataLoader shuts its workers down politely: it asks each one to
stop, joins it for up to 5 s, sends SIGTERM and joins 5 s more, one worker after another; and if the iterator is
only collected at interpreter exit, multiprocessing's exit handler joins the workers *without a timeout*. A worker
that cannot run -- blocked on a stalled network disk or a pipe, stopped, or starved of CPU at a lower priority --
answers neither SIGINT nor SIGTERM, so Ctrl-C could wait 10 s per worker, or forever. `batches` kills the workers
at once (SIGKILL, which also ends a process sleeping in a killable wait) when the loop is left by an exception, so
the command ends in the time it takes to print its message. A loop that ends normally shuts down as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.data import DataLoader

REAP_SECONDS = 2.0  # after SIGKILL; a process the kernel cannot kill (uninterruptible I/O) is left behind


@contextmanager
def batches(loader: DataLoader) -> Iterator[Iterator]:
    """`with batches(loader) as it: for batch in it: ...` -- the loader's batches; leaving the block by an
    exception kills the workers first. The workers fork with this process's Python objects frozen
    (`gc.freeze`): otherwise the first garbage collection in each worker writes to every object's header and
    copies the parent's whole Python heap into the worker (hundreds of MB per worker once transformers is
    imported)."""
    if not loader.num_workers:
        yield iter(loader)
        return
    gc.freeze()
    try:
        iterator = iter(loader)  # the workers fork here
    finally:
        gc.unfreeze()
    try:
        yield iterator
    except BaseException:
        kill_workers(iterator)
        raise


def kill_workers(iterator) -> None:
    """SIGKILL the worker processes of a multi-process DataLoader iterator and reap them (bounded)."""
    workers = list(getattr(iterator, "_workers", ()))
    if getattr(iterator, "_worker_pids_set", False):
        # torch's SIGCHLD handler would report workers killed on purpose as a crash ("DataLoader worker is
        # killed by signal"): take them off its watch list first, as its own shutdown does.
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=REAP_SECONDS)
