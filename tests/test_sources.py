"""`dinokit.data.sources`: one listing and one error policy for folders, lists, parquet and WebDataset shards."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinokit.apps import store
from dinokit.apps.embed import embed
from dinokit.data import sources
from dinokit.data.datasets import UnlabeledImageDataset, training_entries
from dinokit.data.images import read_image
from dinokit.ssl.loader import InfiniteShardedSampler
from shards import write_shard

from helpers import save_tiny_model

SIZE = 28


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), image_size=SIZE)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Shards 00000..00002 (00001 has a sample without image and one corrupt JPEG); 00003 is missing."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shard(root / "00000.tar", 0, 5, rng)
    write_shard(root / "00001.tar", 1, 6, rng, skip_image={2}, corrupt={4})
    write_shard(root / "00002.tar", 2, 4, rng)
    return root


def test_brace_lists_expand_in_order_with_zero_padding():
    assert sources.expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert sources.expand_braces("{a,b}/{0..4..2}.tar") == ["a/0.tar", "a/2.tar", "a/4.tar", "b/0.tar", "b/2.tar",
                                                           "b/4.tar"]
    assert sources.expand_braces("x/{notalist}.jpg") == ["x/{notalist}.jpg"]


def test_shard_samples_are_keyed_in_archive_order_with_metadata_and_reasons(shard_dir):
    entries = sources.list_entries(str(shard_dir / "{00000..00003}.tar"))
    names = [e.key.rsplit("/", 1)[-1] for e in entries]
    assert names[:6] == ["00000.tar#000000000.jpg", "00000.tar#000000001.jpg", "00000.tar#000000002.jpg",
                         "00000.tar#000000003.jpg", "00000.tar#000000004.jpg", "00001.tar#000010000.jpg"]
    assert entries[0].metadata == {"key": "000000000", "url": "https://example.com/000000000.jpg",
                                   "caption": "caption 000000000"}
    errors = {e.key.rsplit("/", 1)[-1]: e.error for e in entries if e.error}
    assert errors.keys() == {"00001.tar#000010002", "00003.tar"}
    assert "no image member" in errors["00001.tar#000010002"] and "does not exist" in errors["00003.tar"]
    corrupt = next(e for e in entries if e.key.endswith("000010004.jpg"))
    assert "corrupt" in sources.read_sample(corrupt).error
    # A folder of .tar files is the same list (minus the missing shard).
    assert [e.key for e in sources.list_entries(shard_dir)] == [e.key for e in entries if e.key[-9:] != "00003.tar"]


def test_tar_members_decode_to_the_pixels_webdataset_and_the_file_reader_give(shard_dir, tmp_path):
    wds = pytest.importorskip("webdataset")
    url = str(shard_dir / "00000.tar")
    theirs = list(wds.WebDataset(url, shardshuffle=False))
    ours = sources.list_entries(url)
    assert [e.metadata["key"] for e in ours] == [s["__key__"] for s in theirs]
    for entry, sample in zip(ours, theirs):
        (tmp_path / "x.jpg").write_bytes(sample["jpg"])
        assert np.array_equal(np.asarray(sources.read_entry(entry)), np.asarray(read_image(tmp_path / "x.jpg")))


def test_a_damaged_tar_keeps_its_whole_samples_and_reports_the_rest(shard_dir, tmp_path):
    data = (shard_dir / "00000.tar").read_bytes()
    third = sources.list_tar(str(shard_dir / "00000.tar"))[2]
    (tmp_path / "cut.tar").write_bytes(data[: third.offset + 100])  # the download stopped inside sample 2's JPEG
    entries = sources.list_tar(str(tmp_path / "cut.tar"))
    reasons = [sources.read_sample(e).error for e in entries]
    assert reasons[:2] == [None, None]
    assert all(reason is not None for reason in reasons[2:]) and len(reasons) >= 3


def test_compressed_shards_are_refused_with_the_fix(tmp_path):
    with pytest.raises(sources.SourceError, match="gunzip"):
        sources.list_entries(str(tmp_path / "{0..1}.tar.gz"))


def test_a_shard_list_naming_no_existing_shard_is_one_error(tmp_path):
    with pytest.raises(sources.SourceError, match="None of the 3 shard"):
        sources.list_entries(str(tmp_path / "{0..2}.tar"))


def test_parquet_of_paths_lists_files_relative_to_it(tmp_path):
    pq.write_table(pa.table({"path": ["b.jpg", "a.jpg"], "label": [1, 0]}), tmp_path / "list.parquet")
    assert sources.list_files(tmp_path / "list.parquet") == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    entries, classes = sources.labelled_entries(tmp_path / "list.parquet")
    assert [e.label for e in entries] == [1, 0] and classes == ["0", "1"]


def test_embedding_shards_gives_the_vectors_of_the_same_images_as_files(shard_dir, tiny_model_dir, tmp_path):
    spec = str(shard_dir / "{00000..00003}.tar")
    report = embed(spec, tiny_model_dir, tmp_path / "emb", image_size=SIZE, batch_size=4, shard_size=4,
                   num_workers=0, progress=False)
    assert (report.num_files, report.num_embedded, report.num_errors) == (16, 13, 3)
    vectors, meta = store.load_embeddings(tmp_path / "emb", with_metadata=True)
    assert meta.column_names == ["path", "width", "height", "key", "url", "caption"]
    assert meta.column("caption")[0].as_py() == "caption 000000000"
    errors = pq.read_table(tmp_path / "emb" / store.ERRORS).to_pylist()
    assert sorted(e["path"].rsplit("/", 1)[-1] for e in errors) == ["00001.tar#000010002", "00001.tar#000010004.jpg",
                                                                    "00003.tar"]
    # The same images extracted to files embed to the same vectors.
    files = tmp_path / "files"
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            tar.extractall(files / shard.stem, filter="data")
    keys = [p.rsplit("#", 1)[1] for p in meta.column("path").to_pylist()]
    by_file = embed([str(next(files.glob(f"*/{k}"))) for k in keys], tiny_model_dir, tmp_path / "emb_files",
                    image_size=SIZE, batch_size=1, shard_size=100, num_workers=0, progress=False)
    assert by_file.num_embedded == 13
    file_vectors, file_meta = store.load_embeddings(tmp_path / "emb_files", with_metadata=True)
    order = {p.rsplit("/", 1)[1]: i for i, p in enumerate(file_meta.column("path").to_pylist())}
    np.testing.assert_allclose(vectors, file_vectors[[order[k] for k in keys]], atol=1e-6, rtol=0)


def test_a_list_file_names_shard_samples_by_the_names_embed_stores(shard_dir, tmp_path):
    # `dinokit curate` writes selected.txt with the names `dinokit embed` stored: `<shard>.tar#<member>` for shards
    samples = sources.list_entries(str(shard_dir / "00000.tar"))
    chosen = [samples[3], samples[1]]
    listing = tmp_path / "selected.txt"
    listing.write_text("".join(e.name + "\n" for e in chosen))
    for got in (sources.list_entries(str(listing)), training_entries(str(listing)),
                UnlabeledImageDataset(str(listing)).entries):
        assert sorted(e.key for e in got) == sorted(e.key for e in chosen) and not any(e.error for e in got)
        by_key = {e.key: e for e in got}
        for e in chosen:
            assert np.array_equal(np.asarray(sources.read_entry(by_key[e.key])), np.asarray(sources.read_entry(e)))
    listing.write_text(f"{shard_dir}/00000.tar#nope.jpg\n{shard_dir}/00003.tar#000030000.jpg\n{chosen[0].name}\n")
    errors = {e.key.rsplit("/", 1)[-1]: e.error for e in sources.list_entries(str(listing))}
    assert errors == {"00000.tar#nope.jpg": "the shard holds no such member",
                      "00003.tar#000030000.jpg": "the shard does not exist", chosen[0].key.rsplit("/", 1)[-1]: None}


def test_training_reads_shards_and_ranks_split_them_without_duplicates(shard_dir):
    dataset = UnlabeledImageDataset(str(shard_dir / "{00000..00002}.tar"))
    assert len(dataset) == 15  # the sample without an image is listed too, and skipped when read
    image, _ = dataset[0]
    assert image.size == (30, 40)
    world, per_rank = 3, 5
    seen = [[index for index, _ in _take(InfiniteShardedSampler(len(dataset), seed=1, rank=r, world_size=world),
                                         per_rank)] for r in range(world)]
    assert sorted(sum(seen, [])) == list(range(15))  # one pass over the ranks: each sample exactly once
    resumed = _take(InfiniteShardedSampler(len(dataset), seed=1, rank=1, world_size=world, start=2), 3)
    assert [i for i, _ in resumed] == seen[1][2:5]


def _take(sampler, n):
    out = []
    for item in sampler:
        if len(out) == n:
            break
        out.append(item)
    return out
