"""`dinokit curate` end to end: inputs (embedding folders, .npy), dedup with planted copies, decontamination,
retrieval, outputs, clear errors on bad input, stages run alone, and resume after a SIGKILL mid-stage."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from dinokit.apps import store
from dinokit.cli import main
from dinokit.curate.pipeline import CurateOptions, curate

pytest.importorskip("faiss")
pq = pytest.importorskip("pyarrow.parquet")

DIM = 32


def mixture(seed=0, classes=12, zipf=1.0, scale=400, spread=0.8):
    """Unit vectors from a long-tailed mixture: class c has about scale / (c+1)^zipf + 8 members."""
    rng = np.random.default_rng(seed)
    sizes = (scale / np.arange(1, classes + 1) ** zipf).astype(int) + 8
    centres = rng.normal(size=(classes, DIM))
    x = np.concatenate([c + spread * rng.normal(size=(m, DIM)) for c, m in zip(centres, sizes)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(classes), sizes)


def near_copies(x, rows, rng, noise=0.02):
    copies = x[rows] + noise * rng.normal(size=(len(rows), x.shape[1])) / np.sqrt(x.shape[1])
    return (copies / np.linalg.norm(copies, axis=1, keepdims=True)).astype(np.float32)


def write_folder(root, vectors, paths, sizes=None, shards=2, manifest=None):
    bounds = np.linspace(0, len(vectors), shards + 1).astype(int)
    for i in range(shards):
        a, b = bounds[i], bounds[i + 1]
        meta = {"path": paths[a:b], "width": [s[0] for s in (sizes or [(10, 10)] * len(paths))[a:b]],
                "height": [s[1] for s in (sizes or [(10, 10)] * len(paths))[a:b]]}
        store.write_shard(root, i, shards, vectors[a:b], meta)
    store.write_manifest(root, {"complete": True, "num_shards": shards, "pooling": "cls", "dim": DIM,
                                "model": {"spec": "test", "weights_sha256": "abc"}, **(manifest or {})})
    return root


FAST = dict(n_iters=8, resample_steps=2)


def test_planted_copies_are_found_and_one_per_group_kept_by_the_stated_rule(tmp_path):
    rng = np.random.default_rng(1)
    x, _ = mixture(1)
    planted = rng.choice(len(x), 60, replace=False)
    pool = np.concatenate([x, near_copies(x, planted, rng)])
    paths = [f"img{i:05d}.jpg" for i in range(len(pool))]
    sizes = [(10, 10)] * len(x) + [(20, 20)] * len(planted)  # the copies are bigger: they are the ones kept
    folder = write_folder(tmp_path / "emb", pool, paths, sizes)
    report = curate(folder, tmp_path / "out", options=CurateOptions(dedup_threshold=0.98, **FAST), quiet=True)
    keep = np.load(tmp_path / "out" / "dedup" / "keep.npy")
    component = np.load(tmp_path / "out" / "dedup" / "component.npy")
    copies = np.arange(len(x), len(pool))
    recall = np.mean(component[planted] == component[copies])
    assert recall >= 0.95
    assert keep[copies].mean() >= 0.95 and not keep[planted[component[planted] == component[copies]]].any()
    groups = list(open(tmp_path / "out" / "dedup" / "groups.csv"))
    assert groups[0].strip() == "component,row,path,keep,similarity" and len(groups) - 1 >= 2 * 57
    histogram = json.loads((tmp_path / "out" / "dedup" / "nn_similarity.json").read_text())
    assert sum(histogram["counts"]) == len(pool) and histogram["threshold"] == 0.98
    assert (tmp_path / "out" / "nn_similarity.png").is_file()
    assert report.counts["after_dedup"] == int(keep.sum())
    # no kmeans budget: the selection is every survivor, named by the metadata paths in global row order
    table = pq.read_table(tmp_path / "out" / "selected.parquet").to_pydict()
    assert table["row"] == np.flatnonzero(keep).tolist()
    assert table["path"] == [paths[r] for r in table["row"]]
    assert (tmp_path / "out" / "selected.txt").read_text().split() == table["path"]


def test_decontamination_drops_every_pool_component_touching_an_evaluation_image(tmp_path):
    rng = np.random.default_rng(2)
    x, _ = mixture(2)
    np.save(tmp_path / "pool.npy", x)
    evaluation_rows = rng.choice(len(x), 20, replace=False)
    np.save(tmp_path / "eval.npy", near_copies(x, evaluation_rows, rng, noise=0.01))
    curate(tmp_path / "pool.npy", tmp_path / "out", excludes=[("test", str(tmp_path / "eval.npy"))],
           options=CurateOptions(dedup_threshold=0.999, exclude_threshold=0.98, stages=("dedup", "decontam")),
           quiet=True)
    keep = np.load(tmp_path / "out" / "decontam" / "keep.npy")
    assert not keep[evaluation_rows].any()
    removed = list(open(tmp_path / "out" / "decontam" / "removed.csv"))[1:]
    assert len(removed) == (~keep).sum() - (~np.load(tmp_path / "out" / "dedup" / "keep.npy")).sum()
    assert len(removed) < 3 * len(evaluation_rows)  # only the touched components, not the neighbourhood
    assert all(line.split(",")[2] == "test" for line in removed)


def test_balanced_sampling_from_an_embedding_folder_beats_random_on_class_entropy(tmp_path):
    x, labels = mixture(3, classes=15, zipf=1.3, scale=1500)
    folder = write_folder(tmp_path / "emb", x, [f"{i}.jpg" for i in range(len(x))])
    report = curate(folder, tmp_path / "out", options=CurateOptions(target=300, levels=[60, 15], **FAST),
                    quiet=True)
    table = pq.read_table(tmp_path / "out" / "selected.parquet").to_pydict()
    assert sum(table["times_selected"]) == 300 == report.counts["selected_with_repeats"]
    assert set(table["source"]) == {"balanced"} and all(p.count("/") == 1 for p in table["cluster_path"])

    def entropy(rows):
        p = np.bincount(labels[rows], minlength=15) / len(rows)
        return -(p[p > 0] * np.log(p[p > 0])).sum() / np.log(15)

    uniform = np.mean([entropy(np.random.default_rng(s).choice(len(x), 300, replace=False)) for s in range(5)])
    assert entropy(np.array(table["row"])) > uniform + 0.05
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["levels"] == [60, 15] and manifest["counts"]["target"] == 300
    import faiss

    assert manifest["versions"]["numpy"] == np.__version__ and manifest["versions"]["faiss"] == faiss.__version__
    assert manifest["options"]["random_seed"] == 0 and manifest["options"]["device"] in ("cpu", "cuda")  # resolved
    assert "entropy" in (tmp_path / "out" / "report.html").read_text()


def test_retrieval_from_seed_sets_both_modes_with_collisions_counted(tmp_path):
    rng = np.random.default_rng(4)
    x, labels = mixture(4)
    np.save(tmp_path / "pool.npy", x)
    np.save(tmp_path / "seeds.npy", near_copies(x, np.flatnonzero(labels == 3)[:10], rng, noise=0.2))
    for mode in ("sample", "cluster"):
        out = tmp_path / mode
        curate(tmp_path / "pool.npy", out, seeds=[("s", str(tmp_path / "seeds.npy"))],
               options=CurateOptions(retrieval=mode, per_seed=8, per_cluster=25, min_seed_hits=2, levels=[20],
                                     dedup_threshold=0.999, **FAST), quiet=True)
        info = json.loads((out / "retrieval" / "s.json").read_text())
        table = pq.read_table(out / "selected.parquet").to_pydict()
        assert set(table["source"]) == {"retrieved:s"} and info["mode"] == mode
        assert info["distinct"] == len(table["row"]) and (labels[table["row"]] == 3).mean() > 0.8
        if mode == "sample":
            assert info["nominal"] == 80 and info["collisions"] == 80 - info["distinct"]


def test_cli_end_to_end_and_a_stage_run_alone_is_reused_by_the_full_run(tmp_path, capsys):
    x, _ = mixture(5)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    paths = []
    for i in range(len(x)):
        paths.append(str(image_dir / f"{i}.png"))
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(paths[-1])
    folder = write_folder(tmp_path / "emb", x, paths)
    out = tmp_path / "out"
    assert main(["curate", str(folder), "-o", str(out), "--stages", "dedup", "--quiet"]) == 0
    assert (out / "selected.txt").is_file() and not (out / "clusters").exists()
    assert main(["curate", str(folder), "-o", str(out), "--fraction", "0.2", "--levels", "30,6", "--iters", "5",
                 "--resample-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "dedup: done earlier" in captured.err and "selected_images" in captured.out
    lines = (out / "selected.txt").read_text().splitlines()
    kept = int(np.load(out / "dedup" / "keep.npy").sum())
    assert len(lines) == round(0.2 * kept) and set(lines) <= set(paths)
    assert (out / "cluster_thumbnails.png").is_file() and "cluster_thumbnails.png" in (out / "report.html").read_text()


def test_every_long_stage_shows_a_progress_bar_unless_quiet(tmp_path, capsys):
    x, _ = mixture(10)
    np.save(tmp_path / "pool.npy", x)
    np.save(tmp_path / "seeds.npy", x[:10])
    common = dict(target=100, levels=[20, 4], retrieval="sample", **FAST)
    curate(tmp_path / "pool.npy", tmp_path / "out", seeds=[("s", str(tmp_path / "seeds.npy"))],
           options=CurateOptions(**common))
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    for bar in (r"check pool", r"check s", r"k-NN search", r"k-means\+\+", r"Lloyd \([\d,]+ -> 20\)", r"Lloyd \(20 -> 4\)"):
        assert any(re.match(bar, line) and "%|" in line for line in segments), bar  # a tqdm bar, not a log line
    curate(tmp_path / "pool.npy", tmp_path / "quiet", seeds=[("s", str(tmp_path / "seeds.npy"))],
           options=CurateOptions(**common), quiet=True)
    assert capsys.readouterr().err == ""


def test_a_clip_retrieval_folder_is_a_pool_and_selected_txt_feeds_train_and_embed(tmp_path):
    """clip-retrieval's own layout (float16 shards, `image_path` and `key` columns, no manifest.json) is curated
    like a `dinokit embed` folder; selected.txt lists those images, and `dinokit train --data` and `dinokit
    embed` read it as the same files in the same order."""
    import pyarrow as pa

    from dinokit.apps.embed import list_entries
    from dinokit.data.datasets import training_entries

    x, _ = mixture(9)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    paths = []
    for i in range(len(x)):
        paths.append(str(image_dir / f"{i:04d}.png"))
        Image.new("RGB", (8, 8), (i % 256, i // 256, 0)).save(paths[-1])
    folder = tmp_path / "clip_retrieval"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    half = len(x) // 2
    for shard, (a, b) in enumerate([(0, half), (half, len(x))]):
        np.save(folder / "img_emb" / f"img_emb_{shard}.npy", x[a:b].astype(np.float16))
        pq.write_table(pa.table({"image_path": paths[a:b], "key": [f"{i:09d}" for i in range(a, b)]}),
                       folder / "metadata" / f"metadata_{shard}.parquet")
    out = tmp_path / "out"
    assert main(["curate", str(folder), "-o", str(out), "--target", "100", "--levels", "20,4", "--iters", "5",
                 "--resample-steps", "1", "--quiet"]) == 0
    table = pq.read_table(out / "selected.parquet").to_pydict()
    assert sum(table["times_selected"]) == 100 and table["path"] == [paths[r] for r in table["row"]]
    assert table["key"] == [f"{r:09d}" for r in table["row"]]
    listed = (out / "selected.txt").read_text().splitlines()
    assert listed == table["path"]
    assert [str(e.path) for e in training_entries(str(out / "selected.txt"))] == listed
    assert [e.path for e in list_entries([str(out / "selected.txt")])] == listed


def test_selected_txt_of_a_pool_embedded_from_webdataset_shards_feeds_train(tmp_path):
    from dinokit.data import sources
    from dinokit.data.datasets import training_entries
    from shards import write_shard

    rng = np.random.default_rng(11)
    for shard in range(3):
        write_shard(tmp_path / f"{shard:05d}.tar", shard, 35, rng)
    samples = sources.list_entries(str(tmp_path / "{00000..00002}.tar"))
    x, _ = mixture(11)
    folder = write_folder(tmp_path / "emb", x[:len(samples)], [e.name for e in samples])  # embed's names
    curate(folder, tmp_path / "out", options=CurateOptions(target=30, levels=[6, 2], **FAST), quiet=True)
    listed = (tmp_path / "out" / "selected.txt").read_text().splitlines()
    assert len(listed) == 30 and all(".tar#" in line for line in listed)
    entries = training_entries(str(tmp_path / "out" / "selected.txt"))
    assert sorted(e.key for e in entries) == sorted(listed)
    assert all(sources.read_sample(e).image is not None for e in entries)


@pytest.mark.parametrize("problem, message", [
    ("seed_dim", "16-d vectors but the pool"),
    ("nan", "NaN or infinite"),
    ("zero", "zero vector"),
    ("empty", "empty"),
    ("target", "more than the"),
    ("mixed_norms", "with and without --normalize"),
    ("model", "similarities between them mean nothing"),
    ("patch", "patch grids"),
    ("pooling", "pooling 'mean' vs the pool's 'cls'"),
    ("seed_empty", "set 's'"),
    ("nan_folder", "3 unusable vector(s) (NaN, infinite or zero) -- row 3 (img3.jpg): NaN"),
    ("manifest_dim", "the manifest says 16-d vectors"),
    ("decontam_all", "no pool image is left after decontamination"),
    ("levels", "--levels takes positive cluster counts"),
    ("exclude_threshold", "--exclude-threshold is a cosine similarity"),
    ("same_names", "two --exclude sets have the same NAME"),
    ("device", "--device is auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_inputs_get_one_clear_error_and_no_output(tmp_path, capsys, problem, message):
    x, _ = mixture(6)
    pool = tmp_path / "pool.npy"
    np.save(pool, x)
    argv = ["curate", str(pool), "-o", str(tmp_path / "out"), "--quiet"]
    if problem == "seed_dim":
        np.save(tmp_path / "s.npy", x[:5, :16])
        argv += ["--seed", f"s={tmp_path / 's.npy'}"]
    elif problem in ("nan", "zero", "empty"):
        bad = x.copy() if problem != "empty" else x[:0]
        if problem == "nan":
            bad[7, 3] = np.nan
        elif problem == "zero":
            bad[7] = 0
        np.save(pool, bad)
    elif problem == "target":
        argv += ["--target", str(10 * len(x))]
    elif problem == "mixed_norms":
        raw = x.copy()
        raw[len(x) // 2:] *= 3
        argv[1] = str(write_folder(tmp_path / "emb", raw, [f"{i}" for i in range(len(x))]))
    elif problem == "model":
        argv[1] = str(write_folder(tmp_path / "emb", x, [f"{i}" for i in range(len(x))]))
        other = write_folder(tmp_path / "other", x[:20], [f"{i}" for i in range(20)], shards=1,
                             manifest={"model": {"weights_sha256": "different"}})
        argv += ["--exclude", f"ev={other}"]
    elif problem == "patch":
        argv[1] = str(write_folder(tmp_path / "emb", x, [f"{i}" for i in range(len(x))],
                                   manifest={"pooling": "patch"}))
    elif problem == "pooling":  # same weights, another pooling: same dimension, different meaning
        argv[1] = str(write_folder(tmp_path / "emb", x, [f"{i}" for i in range(len(x))]))
        other = write_folder(tmp_path / "other", x[:20], [f"{i}" for i in range(20)], shards=1,
                             manifest={"pooling": "mean"})
        argv += ["--seed", f"s={other}"]
    elif problem == "seed_empty":
        np.save(tmp_path / "s.npy", x[:0])
        argv += ["--seed", f"s={tmp_path / 's.npy'}"]
        message += f" ({tmp_path / 's.npy'}) is empty"
    elif problem == "nan_folder":  # every bad row counted, across shards, and named by its image
        bad = x.copy()
        bad[[3, 5, len(x) - 2], 0] = [np.nan, np.inf, np.nan]
        argv[1] = str(write_folder(tmp_path / "emb", bad, [f"img{i}.jpg" for i in range(len(x))]))
    elif problem == "manifest_dim":  # shards of another model copied into a folder
        argv[1] = str(write_folder(tmp_path / "emb", x, [f"{i}" for i in range(len(x))], manifest={"dim": 16}))
    elif problem == "decontam_all":  # the evaluation set is the pool: nothing may be left that looks complete
        argv += ["--exclude", f"ev={pool}", "--stages", "dedup,decontam"]
    elif problem == "levels":
        argv += ["--levels", "10,0"]
    elif problem == "exclude_threshold":
        argv += ["--exclude", f"ev={pool}", "--exclude-threshold", "1.5"]
    elif problem == "same_names":
        argv += ["--exclude", f"ev={pool}", "--exclude", f"ev={pool}"]
    elif problem == "device":  # was taken for the CPU without a word
        argv += ["--device", "gpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine (and on a GPU one)
    np.save(tmp_path / "pool.npy", mixture(6)[0])
    assert main(["curate", str(tmp_path / "pool.npy"), "-o", str(tmp_path / "out"), "--device", "cuda",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch sees no CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # was: dedup ran and wrote its files, then torch failed


def test_skip_invalid_leaves_bad_rows_out_lists_them_and_curates_the_rest_as_without_them(tmp_path, capsys):
    x, _ = mixture(8)
    bad_rows = [4, 150, len(x) - 1]
    bad = x.copy()
    bad[4, 0], bad[150, 2], bad[len(x) - 1] = np.nan, np.inf, 0
    paths = [f"img{i:04d}.jpg" for i in range(len(x))]
    good = [i for i in range(len(x)) if i not in bad_rows]
    with_bad = write_folder(tmp_path / "with_bad", bad, paths, shards=3)
    without = write_folder(tmp_path / "without", x[good], [paths[i] for i in good], shards=3)
    seed = x[:20].copy()
    seed[3] = np.nan
    np.save(tmp_path / "seed.npy", seed)
    common = dict(target=150, levels=[20, 4], **FAST)
    curate(without, tmp_path / "clean", options=CurateOptions(**common), quiet=True)
    assert main(["curate", str(with_bad), "-o", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "--skip-invalid" in capsys.readouterr().err
    report = curate(with_bad, tmp_path / "out", seeds=[("s", str(tmp_path / "seed.npy"))],
                    options=CurateOptions(**common, skip_invalid=True, retrieval="sample"))
    err = capsys.readouterr().err
    assert "3 NaN, infinite or zero vector(s) of pool left out" in err and "1 NaN" in err
    lines = (tmp_path / "out" / "invalid.csv").read_text().splitlines()
    assert lines == ["row,path,reason", "4,img0004.jpg,NaN or infinite values",
                     "150,img0150.jpg,NaN or infinite values", f"{len(x) - 1},img{len(x) - 1:04d}.jpg,a zero vector"]
    assert report.counts["invalid_skipped"] == 3
    assert not np.load(tmp_path / "out" / "dedup" / "keep.npy")[bad_rows].any()
    assert not set(bad_rows) & set(np.load(tmp_path / "out" / "clusters" / "rows.npy").tolist())
    balanced = set(np.load(tmp_path / "out" / "sampling" / "rows.npy").tolist())
    clean = np.load(tmp_path / "clean" / "sampling" / "rows.npy")
    assert balanced == {good[i] for i in clean}  # the same selection as a pool without those rows


def test_a_seed_set_recording_the_same_model_by_path_only_is_accepted_and_an_unrecorded_one_noted(tmp_path, capsys):
    x, _ = mixture(6)
    pool = write_folder(tmp_path / "pool", x, [f"{i}" for i in range(len(x))])  # weights "abc", spec "test"
    same = write_folder(tmp_path / "same", x[:30], [f"{i}" for i in range(30)], shards=1,
                        manifest={"model": {"spec": "test"}})  # an older manifest: no weights hash
    np.save(tmp_path / "bare.npy", x[:30])
    report = curate(pool, tmp_path / "out", seeds=[("same", str(same)), ("bare", str(tmp_path / "bare.npy"))],
                    options=CurateOptions(retrieval="sample", stages=("retrieve",)))
    assert report.counts["retrieved:same"]["distinct"] > 0
    err = capsys.readouterr().err
    assert "bare and the pool cannot be checked" in err and "same and the pool" not in err


def test_the_pool_is_never_loaded_whole_and_streaming_changes_no_result(tmp_path, monkeypatch):
    """With small chunks and --memory-mb 2, k-means reads the memory-mapped pool chunk by chunk: the peak of
    Python-side allocations stays well under the pool's float32 size, and the selection equals an in-memory
    run's byte for byte."""
    import tracemalloc

    from dinokit.curate import inputs

    monkeypatch.setattr(inputs, "CHUNK_BYTES", 1 << 20)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 384))[rng.integers(0, 40, 12_000)] + 0.5 * rng.normal(size=(12_000, 384)))
    np.save(tmp_path / "pool.npy", x.astype(np.float32))  # not unit-length: normalised as it is read
    pool_bytes = x.size * 4
    common = dict(stages=("kmeans", "sample"), levels=[20, 4], n_iters=3, resample_steps=1, target=1000)
    curate(tmp_path / "pool.npy", tmp_path / "in_memory", options=CurateOptions(**common), quiet=True)  # first:
    tracemalloc.start()  # the modules it imported (faiss, scipy, pyarrow) are not counted below
    curate(tmp_path / "pool.npy", tmp_path / "streamed", options=CurateOptions(**common, memory_mb=2), quiet=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * pool_bytes, f"peak {peak / 2**20:.1f} MiB for a {pool_bytes / 2**20:.1f} MiB pool"
    for name in ("selected.parquet", "clusters/level1.npy", "clusters/centroids_level2.npy"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "in_memory" / name).read_bytes(), name


def test_vectors_view_reads_the_same_rows_as_the_loaded_array(tmp_path):
    from dinokit.curate.inputs import Vectors, concatenate

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)).astype(np.float16), rng.normal(size=(11, 5)).astype(np.float16)
    whole = np.concatenate([a, b]).astype(np.float32)
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    v = Vectors([a, b])
    rows = np.array([12, 3, 7, 6, 3, 17])
    assert v.shape == (18, 5) and np.array_equal(v[:], whole) and np.array_equal(v[rows], whole[rows])
    assert np.array_equal(v[4:13], whole[4:13]) and np.array_equal(v[::5], whole[::5])
    sub = v.subset(rows)
    assert np.array_equal(sub[1:4], whole[rows[1:4]]) and np.array_equal(np.asarray(sub), whole[rows])
    both = concatenate([sub, v])
    assert np.array_equal(both[[0, 6, 17]], whole[[12, 0, 11]]) and len(both) == 24


KILL_ARGS = ["--target", "150", "--levels", "40,8", "--iters", "5", "--resample-steps", "1"]


@pytest.fixture(scope="module")
def cli():
    from processes import CliServer

    with CliServer() as server:
        yield server


@pytest.fixture(scope="module")
def uninterrupted(cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("curate_reference")
    np.save(folder / "pool.npy", mixture(7)[0])
    run = cli.run(["curate", folder / "pool.npy", *KILL_ARGS, "-o", folder / "out"], folder / "log")
    assert run.returncode == 0, run.output()
    return folder


@pytest.mark.parametrize("pause_at", ["keep.npy", "level2.npy", "level1.json", "rows.npy#2"])
def test_sigkilled_mid_stage_resumes_to_the_bytes_of_an_uninterrupted_run(cli, uninterrupted, tmp_path, pause_at):
    argv = ["curate", uninterrupted / "pool.npy", *KILL_ARGS, "-o", tmp_path / "out"]
    run = cli.start(argv, tmp_path / "killed.log", pause_at=pause_at)
    run.wait_for_pause()
    run.kill()
    assert not (tmp_path / "out" / "manifest.json").exists()
    again = cli.run(argv, tmp_path / "again.log")
    assert again.returncode == 0, again.output()
    if pause_at in ("level2.npy", "rows.npy#2"):  # killed after level 1 (or after all of k-means): not redone
        assert "done earlier" in again.output()
    assert not list((tmp_path / "out").rglob(".*.tmp"))
    for name in ("selected.parquet", "clusters/level1.npy", "clusters/level2.npy", "sampling/rows.npy"):
        assert (tmp_path / "out" / name).read_bytes() == (uninterrupted / "out" / name).read_bytes(), name
