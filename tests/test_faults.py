"""What survives what: real `dinokit` processes SIGKILLed at chosen points (one of them inside a write), two
processes on one output folder, a full disk and a read-only folder -- for embed, train, eval and index.

Kill points are exact: DINOKIT_TEST_PAUSE_AT (see `dinokit.atomic.pause_point`) stops a process just before it
renames the temporary file of a chosen write, i.e. in the middle of that write; the test then SIGKILLs it.
The processes are forked from one server that imported torch once (`processes.py`), so each starts in well
under a second.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model, locking
from dinokit.apps import store
from dinokit.apps.index import resolve_index_dir
from dinokit.cli import main as cli_main
from dinokit.ssl.trainer import TIMING_KEYS, read_checkpoint
from processes import CliServer
from ssl_helpers import TINY, make_images


@pytest.fixture(scope="module")
def cli():
    with CliServer() as server:
        yield server


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the server's children: exact equality needs the same float sums
    yield
    torch.set_num_threads(threads)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, hidden ones included (a leftover temporary or lock file shows up here)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*") if p.name != locking.LOCK_NAME]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                     patch_size=14)).eval()
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- embed
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    return root


def _embed_argv(photos, model_dir, out):
    return ["embed", photos, "--model", model_dir, "--output", out, "--image-size", "28", "--batch-size", "2",
            "--shard-size", "4", "--num-workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def clean_embedding(cli, photos, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean_embedding") / "out"
    run = cli.run(_embed_argv(photos, model_dir, out), out.with_name("log"))
    assert run.returncode == 0, run.output()
    return out


def test_embed_sigkilled_at_three_points_resumes_to_the_bytes_of_an_uninterrupted_run(
        cli, photos, model_dir, clean_embedding, tmp_path):
    out = tmp_path / "out"
    argv = _embed_argv(photos, model_dir, out)
    # shard 1's vectors half-written; shard 2's metadata (its completion mark) half-written; the final
    # manifest (complete: true) half-written.
    for point in ["img_emb_1.npy", "metadata_2.parquet", "manifest.json#2"]:
        run = cli.start(argv, tmp_path / "log", pause_at=point)
        run.wait_for_pause()
        run.kill()
        assert store.read_manifest(out)["complete"] is False
        with pytest.raises(ValueError, match="incomplete"):
            store.load_embeddings(out)
    resumed = cli.run(argv, tmp_path / "log")
    assert resumed.returncode == 0, resumed.output()
    assert _files(out) == _files(clean_embedding)  # no temporary, no lock file, same bytes


def test_second_embed_on_one_folder_refuses_at_once_and_a_sigkill_frees_the_folder(
        cli, photos, model_dir, clean_embedding, tmp_path):
    out = tmp_path / "out"
    argv = _embed_argv(photos, model_dir, out)
    first = cli.start(argv, tmp_path / "first.log", pause_at="img_emb_0.npy")
    first.wait_for_pause()
    before = _files(out)
    second = cli.run(argv, tmp_path / "second.log")
    assert second.returncode == 2
    assert f"is in use by PID {first.pid} (dinokit embed started" in second.output()
    assert "wait for it or use another --output" in second.output()
    assert _files(out) == before  # the second one wrote nothing
    first.kill()
    assert (out / locking.LOCK_NAME).exists()  # left by the killed run; the kernel released its lock
    third = cli.run(argv, tmp_path / "third.log")
    assert third.returncode == 0, third.output()
    assert _files(out) == _files(clean_embedding)


# ---------------------------------------------------------------------------------------------------- train
ITERATIONS = 8


@pytest.fixture(scope="module")
def ssl_images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("ssl") / "images")


def _train_argv(images, out, resume=False):
    return (["train", "--data", images, "--output", out, "--no-progress"] + (["--resume"] if resume else [])
            + TINY + ["train.saveckp_freq=1", f"train.max_iterations={ITERATIONS}"])


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_training(cli, ssl_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean_training") / "run"
    run = cli.run(_train_argv(ssl_images, out), out.with_name("log"))
    assert run.returncode == 0, run.output()
    return out


def _assert_same_training(run: Path, clean: Path) -> None:
    ours, theirs = read_checkpoint(run), read_checkpoint(clean)
    assert ours["iteration"] == theirs["iteration"] == ITERATIONS
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name  # bit for bit
    assert (run / "teacher" / "model.safetensors").read_bytes() == \
        (clean / "teacher" / "model.safetensors").read_bytes()
    assert _metrics(run) == _metrics(clean)


def test_train_sigkilled_at_three_points_one_inside_a_checkpoint_write_resumes_bit_identically(
        cli, ssl_images, clean_training, tmp_path):
    out = tmp_path / "run"
    # 1: inside the second checkpoint write (the first one stays).
    run = cli.start(_train_argv(ssl_images, out), tmp_path / "log", pause_at="checkpoint.pth#2")
    run.wait_for_pause()
    run.kill()
    assert read_checkpoint(out)["iteration"] == 1
    # 2: wherever the resumed run is once iteration 3 is logged (mid-step or mid-write). The first run logged up
    # to 2, so 3 is this run's; five more iterations, each with a checkpoint write, keep the kill inside the run.
    run = cli.start(_train_argv(ssl_images, out, resume=True), tmp_path / "log")
    run.wait_for('"iteration": 3,', file=out / "metrics.jsonl")
    run.kill()
    done = read_checkpoint(out)["iteration"]
    assert 1 <= done < ITERATIONS
    # 3: inside the last checkpoint write, before the teacher is exported.
    run = cli.start(_train_argv(ssl_images, out, resume=True), tmp_path / "log",
                    pause_at=f"checkpoint.pth#{ITERATIONS - done}")
    run.wait_for_pause()
    run.kill()
    assert read_checkpoint(out)["iteration"] == ITERATIONS - 1 and not (out / "teacher").exists()
    final = cli.run(_train_argv(ssl_images, out, resume=True), tmp_path / "log")
    assert final.returncode == 0, final.output()
    _assert_same_training(out, clean_training)
    assert _leftovers(out) == []


def test_second_train_on_one_folder_refuses_at_once_and_a_sigkill_frees_the_folder(cli, ssl_images, tmp_path):
    out = tmp_path / "run"
    first = cli.start(_train_argv(ssl_images, out), tmp_path / "first.log", pause_at="checkpoint.pth")
    first.wait_for_pause()
    for resume in (False, True):
        second = cli.run(_train_argv(ssl_images, out, resume=resume), tmp_path / "second.log")
        assert second.returncode == 2
        assert f"is in use by PID {first.pid} (dinokit train started" in second.output()
    first.kill()
    third = cli.run(_train_argv(ssl_images, out) + ["train.max_iterations=2"], tmp_path / "third.log")
    assert third.returncode == 0, third.output()
    assert read_checkpoint(out)["iteration"] == 2 and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (20, 40, 220))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root / "train", root / "val"


def _eval_argv(model_dir, labelled, cache, report):
    return ["eval", "knn", "--model", model_dir, "--train", labelled[0], "--val", labelled[1], "--cache-dir",
            cache, "--output", report, "--ks", "1", "3", "--num-workers", "0", "--device", "cpu", "--resize", "32",
            "--crop", "28", "--quiet"]


@pytest.fixture(scope="module")
def clean_eval(cli, model_dir, labelled, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clean_eval")
    run = cli.run(_eval_argv(model_dir, labelled, root / "cache", root / "report.json"), root / "log")
    assert run.returncode == 0, run.output()
    return root / "cache", root / "report.json"


def test_eval_sigkilled_at_three_points_resumes_to_the_same_feature_cache(
        cli, model_dir, labelled, clean_eval, tmp_path):
    cache, report = tmp_path / "cache", tmp_path / "report.json"
    argv = _eval_argv(model_dir, labelled, cache, report)
    # Inside the write of the train features' cache entry, of the val features' entry, of the report.
    for point in ["*#1", "*#2", "report.json"]:
        run = cli.start(argv, tmp_path / "log", pause_at=point)
        run.wait_for_pause()
        run.kill()
        assert not report.exists()
    final = cli.run(argv, tmp_path / "log")
    assert final.returncode == 0, final.output()
    assert _files(cache) == _files(clean_eval[0])  # no staging folder or lock file left, same bytes
    assert json.loads(report.read_text())["results"] == json.loads(clean_eval[1].read_text())["results"]


def test_a_second_eval_needing_the_same_features_waits_for_the_first_even_if_it_is_killed(
        cli, model_dir, labelled, clean_eval, tmp_path):
    cache = tmp_path / "cache"
    first = cli.start(_eval_argv(model_dir, labelled, cache, tmp_path / "a.json"), tmp_path / "first.log",
                      pause_at="*#1")
    first.wait_for_pause()
    second = cli.start(_eval_argv(model_dir, labelled, cache, tmp_path / "b.json"), tmp_path / "second.log")
    second.wait_for(f"waiting for PID {first.pid}")
    first.kill()
    assert second.wait() == 0, second.output()
    assert _files(cache) == _files(clean_eval[0])


def test_second_finetune_into_one_folder_refuses_at_once(cli, model_dir, labelled, tmp_path):
    def argv(output):
        return ["finetune", "--model", model_dir, "--train", labelled[0], "--val", labelled[1], "--output", output,
                "--cache-dir", tmp_path / "cache", "--epochs", "1", "--num-workers", "0", "--device", "cpu",
                "--resize", "32", "--crop", "28", "--quiet"]

    first = cli.start(argv(tmp_path / "classifier"), tmp_path / "first.log", pause_at="*#1")  # extracting features
    first.wait_for_pause()
    second = cli.run(argv(tmp_path / "classifier"), tmp_path / "second.log")
    first.kill()
    assert second.returncode == 2
    assert f"classifier is in use by PID {first.pid} (dinokit finetune started" in second.output()


# ---------------------------------------------------------------------------------------------------- index
def _embedding_folder(root: Path, n: int, seed: int) -> Path:
    vectors = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    for i in range(2):
        rows = range(i * n // 2, (i + 1) * n // 2)
        store.write_shard(root, i, 2, vectors[rows.start:rows.stop], {"path": [f"/data/{seed}_{j}.jpg" for j in rows]})
    store.write_manifest(root, {"complete": True, "num_shards": 2, "pooling": "cls"})
    return root


def _index_files(out: Path) -> dict:
    files = _files(out)
    info = json.loads(files.pop("index.json"))
    info.pop("output_dir")
    return {**files, "index.json": info}


def test_index_sigkilled_inside_each_write_leaves_no_index_and_a_rerun_builds_the_same_bytes(cli, tmp_path):
    emb = _embedding_folder(tmp_path / "emb", 40, seed=0)
    clean = cli.run(["index", emb, "--output", tmp_path / "clean"], tmp_path / "log")
    assert clean.returncode == 0, clean.output()
    out = tmp_path / "out"
    for point in ["index.faiss", "metadata.parquet", "index.json"]:
        run = cli.start(["index", emb, "--output", out], tmp_path / "log", pause_at=point)
        run.wait_for_pause()
        run.kill()
        with pytest.raises(FileNotFoundError, match="No index"):
            resolve_index_dir(out)  # search refuses; nothing looks complete
    final = cli.run(["index", emb, "--output", out], tmp_path / "log")
    assert final.returncode == 0, final.output()
    assert _index_files(out) == _index_files(tmp_path / "clean")


def test_an_interrupted_rebuild_never_pairs_the_old_index_json_with_new_vectors(cli, tmp_path):
    out = tmp_path / "index"
    first = cli.run(["index", _embedding_folder(tmp_path / "a", 40, seed=0), "--output", out], tmp_path / "log")
    assert first.returncode == 0, first.output()
    run = cli.start(["index", _embedding_folder(tmp_path / "b", 60, seed=1), "--output", out], tmp_path / "log",
                    pause_at="metadata.parquet")  # the new index.faiss is in place, the old metadata still there
    run.wait_for_pause()
    run.kill()
    with pytest.raises(FileNotFoundError, match="No index"):
        resolve_index_dir(out)


def test_second_index_build_into_one_folder_refuses_at_once(cli, tmp_path):
    emb = _embedding_folder(tmp_path / "emb", 40, seed=0)
    first = cli.start(["index", emb, "--output", tmp_path / "out"], tmp_path / "log", pause_at="index.faiss")
    first.wait_for_pause()
    second = cli.run(["index", emb, "--output", tmp_path / "out"], tmp_path / "second.log")
    first.kill()
    assert second.returncode == 2
    assert f"is in use by PID {first.pid} (dinokit index started" in second.output()


# ------------------------------------------------------------------------------------ disk full, read-only
def _failing_after(real, calls: int, code: int, file_arg: int = 0):
    """`real` that, from call number `calls` on, writes a few bytes to its file argument and fails with `code`."""
    count = [0]

    def fail(*args, **kwargs):
        count[0] += 1
        if count[0] < calls:
            return real(*args, **kwargs)
        file = args[file_arg]
        if hasattr(file, "write"):
            file.write(b"partial")
        else:
            Path(file).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    return fail


UNWRITABLE = [
    (errno.ENOSPC, "no space left on device writing {file}: free space or use another {option}"),
    (errno.EROFS, "read-only file system writing {file}: use another {option}"),
]


@pytest.mark.parametrize("code, message", UNWRITABLE)
def test_embed_on_a_full_or_read_only_disk_fails_clearly_and_resumes(
        photos, model_dir, clean_embedding, tmp_path, monkeypatch, capsys, code, message):
    out = tmp_path / "out"
    monkeypatch.setattr(np, "save", _failing_after(np.save, 2, code))  # shard 1's vectors
    assert cli_main([str(a) for a in _embed_argv(photos, model_dir, out)]) == 2
    expected = message.format(file=out / "img_emb" / "img_emb_1.npy", option="--output")
    assert capsys.readouterr().err.strip().endswith(expected)
    assert store.read_manifest(out)["complete"] is False and _leftovers(out) == []
    monkeypatch.undo()
    assert cli_main([str(a) for a in _embed_argv(photos, model_dir, out)]) == 0
    assert _files(out) == _files(clean_embedding)


@pytest.mark.parametrize("code, message", UNWRITABLE)
def test_train_on_a_full_or_read_only_disk_keeps_the_last_checkpoint_and_resumes(
        ssl_images, tmp_path, monkeypatch, capsys, code, message):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _failing_after(torch.save, 3, code, file_arg=1))  # the third checkpoint
    assert cli_main([str(a) for a in _train_argv(ssl_images, out)]) == 2
    expected = message.format(file=out / "checkpoint.pth", option="--output")
    assert capsys.readouterr().err.strip().endswith(expected)
    assert read_checkpoint(out)["iteration"] == 2 and not (out / "teacher").exists() and _leftovers(out) == []
    monkeypatch.undo()
    assert cli_main([str(a) for a in _train_argv(ssl_images, out, resume=True)]) == 0
    assert read_checkpoint(out)["iteration"] == ITERATIONS and (out / "teacher" / "model.safetensors").is_file()


@pytest.mark.parametrize("code, message", UNWRITABLE)
def test_eval_cache_on_a_full_or_read_only_disk_fails_clearly_and_leaves_no_entry(
        model_dir, labelled, clean_eval, tmp_path, monkeypatch, capsys, code, message):
    cache = tmp_path / "cache"
    monkeypatch.setattr(np, "save", _failing_after(np.save, 1, code))
    assert cli_main([str(a) for a in _eval_argv(model_dir, labelled, cache, tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    entries = {name.split("/")[0] for name in _files(clean_eval[0])}
    expected = [message.format(file=cache / entry, option="--cache-dir (or --no-cache)") for entry in entries]
    assert any(err.endswith(text) for text in expected), err  # the entry being written, named
    assert not cache.exists()  # no half entry, no staging folder, no lock file: not even the new folder
    monkeypatch.undo()
    assert cli_main([str(a) for a in _eval_argv(model_dir, labelled, cache, tmp_path / "r.json")]) == 0
    assert _files(cache) == _files(clean_eval[0])


@pytest.mark.parametrize("code, message", UNWRITABLE)
def test_index_on_a_full_or_read_only_disk_fails_clearly_and_leaves_no_index(
        tmp_path, monkeypatch, capsys, code, message):
    import faiss

    emb, out = _embedding_folder(tmp_path / "emb", 40, seed=0), tmp_path / "out"
    monkeypatch.setattr(faiss, "write_index", _failing_after(faiss.write_index, 1, code, file_arg=1))
    assert cli_main(["index", str(emb), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(message.format(file=out / "index.faiss", option="--output"))
    assert not out.exists()
    monkeypatch.undo()
    assert cli_main(["index", str(emb), "--output", str(out)]) == 0
    resolve_index_dir(out)


def test_a_folder_where_the_lock_cannot_be_created_is_one_clear_error(photos, model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).endswith(locking.LOCK_NAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    out = tmp_path / "out"
    assert cli_main([str(a) for a in _embed_argv(photos, model_dir, out)]) == 2
    assert capsys.readouterr().err.strip() == (f"dinokit embed: error: read-only file system writing "
                                               f"{out / locking.LOCK_NAME}: use another --output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the patched tests cover it")
def test_a_read_only_output_folder_is_one_clear_error(photos, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli_main([str(a) for a in _embed_argv(photos, model_dir, out)]) == 2
    finally:
        out.chmod(0o755)
    assert "permission denied writing" in capsys.readouterr().err
