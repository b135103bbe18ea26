"""`dinokit embed --engine ray`: the same run as the local engine, on Ray Data (a local Ray, or a cluster).

The driver (this process) does what the local engine does before and after the model: it lists the inputs, plans
the shards and batches (`embed.Plan`, the local engine's own: batches never straddle a shard, so every image meets
the same batch in either engine and the vectors agree), checks and writes the manifest under the output folder's
lock, and writes each shard through `embed.write_shard` (atomic; metadata last) once all its batches are back.
Ray Data runs the middle, streaming:

    from_items(one row per batch)  ->  map(decode + preprocess)         CPU tasks, 1 CPU each
                                   ->  map_batches(Embedder)            actor pool: `workers` actors, one model
                                                                         each, `gpus_per_worker` GPUs each

Why rows are whole batches: the batch a vector is computed in is part of its value (BLAS blocking differs per
batch size), so the local engine's batches are kept intact. Why the driver writes: shards need all their rows;
vectors are small next to images (ViT-L CLS in float16: 2 kB per image), so one driver receives a billion
images' vectors in well under an hour while the GPUs take days -- and the output folder needs to be reachable from
the driver only.

Faults: Ray retries a decoding task whose worker died and restarts a killed actor, re-running its batch. A batch
that arrives twice (a retry whose first result was delivered after all) replaces itself, so every image is written
exactly once; a shard is written only when complete, atomically, so a killed driver leaves whole shards only, and
the rerun embeds the missing shards alone (the local engine's resume).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import pickle
import sys
from dataclasses import asdict

import numpy as np
import torch

from dinokit.data.sources import Entry
from dinokit.extras import optional_import


def embed_shards_on_ray(plan, model, output_dir, shards, *, address=None, workers=None, gpus_per_worker=0.0,
                        progress=True) -> None:
    """Embed `shards` of `plan` with `model` on Ray and write them into `output_dir` (see the module notes)."""
    local = importlib.import_module("dinokit.apps.embed")  # the module (dinokit.apps.embed is also a function)

    ray = optional_import("ray", purpose="dinokit embed --engine ray")
    optional_import("ray.data", purpose="dinokit embed --engine ray")
    if gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}")
    workers = workers or 1
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    started_here = connect(address, workers)
    try:
        # model_ref stays referenced until the end: a restarted actor (after a crash) fetches the model again.
        dataset, model_ref = _pipeline(plan, model, shards, workers, gpus_per_worker)
        batches = plan.batches(shards)
        expected = {s: sum(1 for shard, _ in batches if shard == s) for s in shards}
        parts: dict[int, dict[int, local.BatchResult]] = {s: {} for s in shards}
        written = set()
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), unit="batch", desc="embed (ray)", disable=not progress, dynamic_ncols=True)
        for row in dataset.iter_rows():
            shard, number = int(row["shard"]), int(row["batch"])
            if shard in written:
                continue  # a late duplicate of a retried batch: its shard is already on disk
            fresh = number not in parts[shard]
            parts[shard][number] = pickle.loads(row["result"])  # a duplicate replaces itself: exactly once
            bar.update(int(fresh))
            if len(parts[shard]) == expected[shard]:
                local.write_shard(plan, output_dir, shard, [parts[shard][k] for k in sorted(parts[shard])])
                written.add(shard)
                del parts[shard]
        bar.close()
        missing = sorted(set(shards) - written)
        if missing:
            raise RuntimeError(f"Ray returned no results for shard(s) {missing[:5]}; run the same command again "
                               f"to embed them.")
    finally:
        if started_here:
            ray.shutdown()


def connect(address: str | None, workers: int) -> bool:
    """Join the cluster at `address` ("auto", "ray://host:10001", "host:6379"), or start a local Ray with this
    machine's cores (plus one logical CPU per model worker, as the local engine runs the model beside its
    decoding workers). An already initialised Ray (e.g. `ray.init` in a notebook or a test) is used as it is.
    Returns whether this call started it (then the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # Ray runs its workers at nice 15 (to keep the raylet responsive); on a machine shared with other work
        # that starves them, while the local engine runs at normal priority. A local Ray is this one job: nice 0.
        ray.init(num_cpus=(os.cpu_count() or 1) + workers, _system_config={"worker_niceness": 0}, **quiet)
    return True


def _pipeline(plan, model, shards, workers: int, gpus_per_worker: float):
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts batches written
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"shard": shard, "batch": number, "entries": _entries_json(plan, indices), "indices": indices}
            for number, (shard, indices) in enumerate(plan.batches(shards))]
    model_ref = ray.put(model.cpu().eval())
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    dataset = dataset.map(decode_row, fn_kwargs={"image_size": plan.image_size, "normalization": plan.normalization},
                          num_cpus=1,
                          compute=ray.data.TaskPoolStrategy(), max_retries=-1)
    return dataset.map_batches(
        Embedder,
        fn_constructor_args=([model_ref], plan.pooling, plan.normalize, plan.int8, gpus_per_worker > 0, workers),
        batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1, num_gpus=gpus_per_worker or None, max_restarts=-1, max_task_retries=-1), model_ref


def _entries_json(plan, indices: list[int]) -> str:
    return json.dumps([asdict(e) if isinstance(e, Entry) else {"key": e, "path": e}
                       for e in (plan.entries[i] for i in indices)])


@functools.lru_cache(maxsize=4)
def _transform(image_size: int, normalization: tuple = ()):
    from dinokit.apps.embed import eval_transform

    return eval_transform(image_size, normalization)


def decode_row(row: dict, image_size: int, normalization: tuple = ()) -> dict:
    """A Ray task's work on one batch row: read and preprocess its images (the local engine's `decode`)."""
    from dinokit.apps.embed import decode

    indices = [int(i) for i in row["indices"]]
    entries = [Entry(**e) for e in json.loads(row["entries"])]
    good, pixels, sizes, failed = [], [], [], []
    for index, entry in zip(indices, entries):
        image, width, height, error = decode(entry, _transform(image_size, tuple(map(tuple, normalization))))
        if error is None:
            good.append(index)
            pixels.append(image.numpy())
            sizes.append((width, height))
        else:
            failed.append((index, error))
    payload = (good, np.stack(pixels) if pixels else None, sizes, failed)
    return {"shard": row["shard"], "batch": row["batch"], "payload": pickle.dumps(payload, protocol=5)}


class Embedder:
    """One model per actor (loaded once, in `__init__`); called with one batch row at a time."""

    def __init__(self, model_ref: list, pooling: str, normalize: bool, int8: bool, use_gpu: bool, workers: int):
        import ray

        from dinokit.apps.embed import runnable_model

        # Put once by the driver (in a list, so that Ray leaves resolving it to us): every actor gets the very
        # weights the driver hashed into the manifest.
        model = ray.get(model_ref[0])
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # Ray pins one thread per logical CPU; the model may use its share
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        self.model = runnable_model(model.to(self.device).eval(), int8)
        self.pooling, self.normalize = pooling, normalize

    def __call__(self, batch):
        from dinokit.apps.embed import BatchResult, embed_pixels

        results = []
        for payload in batch["payload"]:
            good, pixels, sizes, failed = pickle.loads(payload)
            features = None
            if pixels is not None:
                features = embed_pixels(self.model, torch.from_numpy(pixels).to(self.device), self.pooling,
                                        self.normalize)
            results.append(pickle.dumps(BatchResult(good, features, sizes, failed), protocol=5))
        batch = batch[["shard", "batch"]].copy()
        batch["result"] = results
        return batch


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
