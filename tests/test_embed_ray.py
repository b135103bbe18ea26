"""`dinokit embed --engine ray` on a real local Ray cluster: the local engine's folder, vectors and errors; resume;
a model worker killed mid-run."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinokit.apps import store
from dinokit.apps.embed import embed
from shards import image_bytes, write_shard

from helpers import save_tiny_dinov3, save_tiny_model

ray = pytest.importorskip("ray")
embed_module = importlib.import_module("dinokit.apps.embed")  # the module, not dinokit.apps.embed()

SIZE = 28
ACTOR_TITLE = b"MapWorker(MapBatches(Embedder))"


pytestmark = pytest.mark.usefixtures("local_ray")  # 2 CPUs: 1 decoding task + 1 model actor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), image_size=SIZE)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """17 images (three formats, assorted sizes), two bad files, and two WebDataset shards (one bad member)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    for i in range(17):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        (root / f"img_{i:02d}.{ext}").write_bytes(image_bytes(rng, fmt, (30 + 5 * i, 60 - 2 * i)))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_bytes(b"not an image")
    shards = root / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", 0, 4, rng)
    write_shard(shards / "00001.tar", 1, 4, rng, corrupt={1})
    return [str(p) for p in sorted(root.glob("*.*"))] + [str(shards / "{00000..00001}.tar")]


def _run(inputs, model_dir, out, **kw):
    kw = {"image_size": SIZE, "batch_size": 3, "shard_size": 7, "num_workers": 0, "progress": False, **kw}
    return embed(inputs, model_dir, out, **kw)


def _by_key(folder: Path):
    vectors, meta = store.load_embeddings(folder, with_metadata=True)
    keys = meta.column("path").to_pylist()
    order = np.argsort(keys)
    return [keys[i] for i in order], vectors[order]


def _errors(folder: Path):
    return sorted((r["path"], r["reason"]) for r in pq.read_table(folder / store.ERRORS).to_pylist())


def test_ray_engine_writes_the_local_engines_vectors_metadata_and_errors(inputs, model_dir, tmp_path):
    local = _run(inputs, model_dir, tmp_path / "local")
    remote = _run(inputs, model_dir, tmp_path / "ray", engine="ray", workers=1)
    assert (remote.num_files, remote.num_embedded, remote.num_errors) == (local.num_files, 24, 3)
    local_keys, local_vectors = _by_key(tmp_path / "local")
    ray_keys, ray_vectors = _by_key(tmp_path / "ray")
    assert ray_keys == local_keys
    assert np.abs(ray_vectors - local_vectors).max() <= 1e-6
    assert _errors(tmp_path / "ray") == _errors(tmp_path / "local")
    assert pq.read_table(store.shard_paths(tmp_path / "ray", 0, 4)[1]).equals(
        pq.read_table(store.shard_paths(tmp_path / "local", 0, 4)[1]))
    assert store.read_manifest(tmp_path / "ray")["engine"] == "ray"


def test_ray_engine_embeds_with_a_dinov3_model_and_its_own_normalisation(inputs, tmp_path):
    """Patch 16, registers, RoPE, and a non-ImageNet mean/std (the SAT-493M models'), which the Ray decoding
    tasks must apply as the local engine does."""
    from dinokit.models.dinov3_vit import SAT_MEAN, SAT_STD

    model = save_tiny_dinov3(tmp_path / "dinov3", image_mean=list(SAT_MEAN), image_std=list(SAT_STD))
    images = [p for p in inputs if "/img_" in p][:8]  # 8 good image files: 2 shards of 7 and 1
    _run(images, model, tmp_path / "local", image_size=32)
    _run(images, model, tmp_path / "ray", engine="ray", workers=1, image_size=32)
    local_keys, local_vectors = _by_key(tmp_path / "local")
    ray_keys, ray_vectors = _by_key(tmp_path / "ray")
    assert ray_keys == local_keys and local_vectors.shape == (8, 64)
    assert np.abs(ray_vectors - local_vectors).max() <= 1e-6
    assert store.read_manifest(tmp_path / "ray")["preprocessing"]["mean"] == list(SAT_MEAN)


def test_int8_ray_actors_quantise_as_the_local_engine_does(inputs, model_dir, tmp_path):
    _run(inputs, model_dir, tmp_path / "local", int8=True)
    _run(inputs, model_dir, tmp_path / "ray", engine="ray", workers=1, int8=True)
    local_keys, local_vectors = _by_key(tmp_path / "local")
    ray_keys, ray_vectors = _by_key(tmp_path / "ray")
    assert ray_keys == local_keys and store.read_manifest(tmp_path / "ray")["int8"] is True
    assert np.abs(ray_vectors - local_vectors).max() <= 1e-5


def test_an_interrupted_ray_run_completes_only_the_missing_shards(inputs, model_dir, tmp_path, monkeypatch):
    real_write, written = embed_module.write_shard, []

    def write_then_die(plan, output_dir, shard, parts):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # the driver dies after two shards
        real_write(plan, output_dir, shard, parts)
        written.append(shard)

    monkeypatch.setattr(embed_module, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, model_dir, tmp_path / "ray", engine="ray")
    monkeypatch.setattr(embed_module, "write_shard", real_write)
    done = {s: os.stat(store.shard_paths(tmp_path / "ray", s, 4)[0]).st_mtime_ns for s in written}

    report = _run(inputs, model_dir, tmp_path / "ray", engine="ray")
    assert report.shards_already_done == 2
    assert {s: os.stat(store.shard_paths(tmp_path / "ray", s, 4)[0]).st_mtime_ns for s in written} == done
    _run(inputs, model_dir, tmp_path / "local")
    assert _by_key(tmp_path / "ray")[0] == _by_key(tmp_path / "local")[0]
    assert np.abs(_by_key(tmp_path / "ray")[1] - _by_key(tmp_path / "local")[1]).max() <= 1e-6


def _actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if ACTOR_TITLE in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_killing_a_model_worker_mid_run_still_embeds_every_image_exactly_once(model_dir, tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(90):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    _run(folder, model_dir, tmp_path / "local", batch_size=2, shard_size=10)

    out, outcome = tmp_path / "ray", {}
    job = threading.Thread(target=lambda: outcome.update(report=_run(folder, model_dir, out, engine="ray",
                                                                     batch_size=2, shard_size=10)))
    job.start()
    killed = None
    deadline = time.monotonic() + 600  # a hang guard, not a bound: Ray's start alone takes a minute when loaded
    while job.is_alive() and time.monotonic() < deadline:
        shards_done = len(list((out / store.METADATA_DIR).glob("*.parquet"))) if out.exists() else 0
        pids = _actor_pids()
        if shards_done >= 1 and pids:  # the model actor is mid-run: some shards written, others not
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    job.join(timeout=600)
    assert killed is not None, ("the job ended before a model worker could be killed; give it more images"
                                if not job.is_alive() else "no shard and model worker after 600 s")
    assert not job.is_alive() and "report" in outcome
    report = outcome["report"]
    assert (report.num_embedded, report.num_errors) == (90, 0)
    keys, vectors = _by_key(out)
    assert keys == sorted(set(keys)) and len(keys) == 90  # every image exactly once
    local_keys, local_vectors = _by_key(tmp_path / "local")
    assert keys == local_keys and np.abs(vectors - local_vectors).max() <= 1e-6
    assert killed not in _actor_pids()
