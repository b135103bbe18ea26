"""Where the curation's batch passes run: in this process (`local`) or as Ray tasks (`--engine ray`).

Two passes go to the engine: nearest-centroid assignment (every Lloyd step and every resampling reassignment of
the faiss path) and k-NN search (the dedup and decontamination graphs, sample-based retrieval). Both engines cut
the rows into the same batches and run the same function on each, so their results are equal bit for bit; the
driver collects them in order. k-means++, centroid sums, components and sampling stay on the driver.

What a Ray task receives: its rows as a reference to the memory-mapped shards (`inputs.Vectors` pickles as file
names and offsets, so workers read the files themselves: on a cluster they need the same paths, a shared
filesystem) or as an array (a level input held in memory, centroids); a faiss index is serialised once into
the object store and rebuilt once per worker process.
"""

from __future__ import annotations

import itertools
import os
import uuid

import numpy as np

from dinokit.curate.progress import Silent
from dinokit.extras import optional_import

ENGINES = ("local", "ray")


class LocalEngine:
    name = "local"

    def map(self, fn, rows, batch: int, shared, *, progress=Silent, desc: str = "", unit: str = "row"):
        """(start, fn(shared, rows[start:start + batch])) for every batch, in order."""
        with progress(total=len(rows), desc=desc, unit=unit) as bar:
            for start in range(0, len(rows), batch):
                yield start, fn(shared, rows[start:start + batch])
                bar.update(min(batch, len(rows) - start))

    def close(self) -> None:
        pass


class _SerialisedIndex:
    """A faiss index as bytes, with a token naming it so each worker deserialises it once."""

    def __init__(self, index):
        self.token = uuid.uuid4().hex
        self.data = _faiss().serialize_index(index)


_WORKER_INDEXES: dict[str, object] = {}


def _resolve(shared):
    if isinstance(shared, _SerialisedIndex):
        if shared.token not in _WORKER_INDEXES:
            _WORKER_INDEXES.clear()  # one index at a time per worker: the previous stage's is done
            _WORKER_INDEXES[shared.token] = _faiss().deserialize_index(np.asarray(shared.data))
        return _WORKER_INDEXES[shared.token]
    return shared


def _run_batch(fn, shared, rows, start: int, stop: int):
    return fn(_resolve(shared), rows[start:stop])


def _faiss():
    return optional_import("faiss", purpose="curation k-NN search and assignment")


class RayEngine:
    """Batches as Ray tasks on a local Ray or the cluster at `address` (an initialised Ray is used as it is)."""

    name = "ray"

    def __init__(self, address: str | None = None, max_in_flight: int | None = None):
        self.ray = optional_import("ray", purpose="dinokit curate --engine ray")
        self.started_here = False
        if not self.ray.is_initialized():
            quiet = dict(log_to_driver=False, configure_logging=False)
            if address:
                self.ray.init(address=address, **quiet)
            else:  # a local Ray is this one job: workers at the driver's priority (Ray's default is nice 15)
                self.ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                              _system_config={"worker_niceness": 0}, **quiet)
            self.started_here = True
        self.task = self.ray.remote(_run_batch)
        self.tasks_run = 0
        self.max_in_flight = max_in_flight or 4 * max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def map(self, fn, rows, batch: int, shared, *, progress=Silent, desc: str = "", unit: str = "row"):
        is_index = type(shared).__module__.startswith("faiss")
        shared_ref = self.ray.put(_SerialisedIndex(shared) if is_index else shared)
        rows_ref = self.ray.put(rows)
        starts = iter(range(0, len(rows), batch))
        pending = [(s, self.task.remote(fn, shared_ref, rows_ref, s, s + batch))
                   for s in itertools.islice(starts, self.max_in_flight)]
        with progress(total=len(rows), desc=f"{desc} (ray)", unit=unit) as bar:
            while pending:  # in order, a bounded number in flight: results come back as the driver takes them
                start, ref = pending.pop(0)
                result = self.ray.get(ref)
                self.tasks_run += 1
                for s in itertools.islice(starts, 1):
                    pending.append((s, self.task.remote(fn, shared_ref, rows_ref, s, s + batch)))
                yield start, result
                bar.update(min(batch, len(rows) - start))

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False


def make_engine(name: str = "local", address: str | None = None):
    if name not in ENGINES:
        raise ValueError(f"--engine is one of {', '.join(ENGINES)}, got {name!r}")
    return LocalEngine() if name == "local" else RayEngine(address)


LOCAL = LocalEngine()
