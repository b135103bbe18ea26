"""The embedding-folder layout: shards written atomically, read back in order with rows aligned."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinokit.apps import store


def _write_run(root, shard_rows, dim=4, num_shards=None):
    num_shards = num_shards or len(shard_rows)
    start = 0
    for i, rows in enumerate(shard_rows):
        emb = np.arange(start * dim, (start + rows) * dim, dtype=np.float32).reshape(rows, dim)
        paths = [f"img_{j:04d}.jpg" for j in range(start, start + rows)]
        store.write_shard(root, i, num_shards, emb, {"path": paths, "width": [10] * rows, "height": [5] * rows})
        start += rows
    store.write_manifest(root, {"complete": True, "num_shards": num_shards})
    return start


def test_shards_are_read_in_numeric_order_with_rows_aligned(tmp_path):
    total = _write_run(tmp_path, [3] * 11 + [0, 2])  # 13 shards: names padded to two digits; one empty shard
    assert (tmp_path / "img_emb" / "img_emb_00.npy").is_file()
    assert (tmp_path / "metadata" / "metadata_12.parquet").is_file()
    emb, meta = store.load_embeddings(tmp_path, with_metadata=True)
    assert emb.shape == (total, 4)
    assert meta.column("path").to_pylist() == [f"img_{j:04d}.jpg" for j in range(total)]
    np.testing.assert_array_equal(emb[:, 0], np.arange(total) * 4)  # row j came from image j


def test_incomplete_run_is_refused_with_a_resume_hint(tmp_path):
    _write_run(tmp_path, [2, 2])
    store.write_manifest(tmp_path, {"complete": False, "num_shards": 4})
    with pytest.raises(ValueError, match=r"incomplete \(2 of 4 shards done\).*again"):
        store.load_embeddings(tmp_path)


def test_shard_with_misaligned_metadata_is_reported(tmp_path):
    _write_run(tmp_path, [2, 2])
    pq.write_table(pa.table({"path": ["only_one.jpg"]}), tmp_path / "metadata" / "metadata_1.parquet")
    with pytest.raises(ValueError, match="img_emb_1.npy has 2 rows but metadata_1.parquet has 1"):
        store.load_embeddings(tmp_path)


def test_write_shard_rejects_metadata_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match="3 embeddings"):
        store.write_shard(tmp_path, 0, 1, np.zeros((3, 2), np.float32), {"path": ["a", "b"]})
    assert not (tmp_path / "metadata").exists() or not any((tmp_path / "metadata").iterdir())


def test_failed_write_leaves_neither_target_nor_temporary_file(tmp_path):
    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.atomic_write(tmp_path / "x.npy", fail)
    assert list(tmp_path.iterdir()) == []


def test_clip_retrieval_image_path_column_is_read_as_path(tmp_path):
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.ones((2, 3), np.float16))
    pq.write_table(pa.table({"image_path": ["a.jpg", "b.jpg"]}), tmp_path / "metadata" / "metadata_0.parquet")
    emb, meta = store.load_embeddings(tmp_path, dtype=np.float32, with_metadata=True)  # no manifest: external
    assert emb.dtype == np.float32 and meta.column("path").to_pylist() == ["a.jpg", "b.jpg"]


def test_errors_of_all_shards_are_merged_in_order(tmp_path):
    store.write_shard(tmp_path, 0, 3, np.zeros((0, 2), np.float32), {"path": []},
                      errors={"path": ["a.jpg"], "reason": ["zero-byte file"]})
    store.write_shard(tmp_path, 2, 3, np.zeros((1, 2), np.float32), {"path": ["c.jpg"]},
                      errors={"path": ["d.jpg"], "reason": ["truncated"]})
    assert store.merge_errors(tmp_path, 3) == 2
    assert pq.read_table(tmp_path / "errors.parquet").column("path").to_pylist() == ["a.jpg", "d.jpg"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.load_embeddings(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No img_emb"):
        store.load_embeddings(tmp_path)
