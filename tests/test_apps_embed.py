"""`dinokit.apps.embed`: sharded output, row alignment, bad files, resuming, torchrun, with a tiny random model."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from dinokit.apps import store
from dinokit.apps.embed import embed, embed_images, eval_transform, list_images

from helpers import randomize_

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO / ".." / "shared" / "datasets" / "imagenette" / "val"
SIZE = 56  # 4 x 4 patches: tiny and fast


def tiny_model(registers: int = 0) -> torch.nn.Module:
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=14)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return randomize_(model).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _image_bytes(rng, fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int, rng) -> bytes:
    """A small PNG whose header claims a huge size: PIL refuses it as a decompression bomb before decoding."""
    data = bytearray(_image_bytes(rng, "PNG"))
    header = bytearray(data[16:29])
    header[0:8] = struct.pack(">II", width, height)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return bytes(data)


BAD_FILES = ["corrupt.png", "empty.jpg", "huge.png", "not_an_image.jpg", "truncated.jpg"]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """23 good images of assorted sizes and formats in nested folders, plus one of each kind of bad file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(23):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        fmt = ["JPEG", "PNG", "WEBP"][i % 3]
        ext = {"JPEG": ".JPG", "PNG": ".png", "WEBP": ".webp"}[fmt]
        (folder / f"img_{i:02d}{ext}").write_bytes(_image_bytes(rng, fmt, (30 + 7 * i, 90 - 2 * i)))
    png = _image_bytes(rng, "PNG")
    (root / "corrupt.png").write_bytes(png[:60] + bytes(b ^ 0xFF for b in png[60:120]) + png[120:])
    (root / "empty.jpg").write_bytes(b"")
    (root / "huge.png").write_bytes(_png_claiming(30000, 30000, rng))
    (root / "not_an_image.jpg").write_bytes(b"just some text\n")
    jpeg = _image_bytes(rng, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    (root / ".hidden.jpg").write_bytes(b"ignored: hidden")
    return root


def _run(inputs, model, out, **kw):
    kw = {"image_size": SIZE, "batch_size": 4, "shard_size": 10, "num_workers": 0, "progress": False, **kw}
    return embed(inputs, model, out, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_hold_the_sorted_files_with_rows_aligned_to_metadata(images_dir, model, tmp_path):
    report = _run(images_dir, model, tmp_path / "out")
    assert (report.num_files, report.num_embedded, report.num_errors, report.num_shards) == (28, 23, 5, 3)
    names = sorted(p.name for p in (tmp_path / "out" / "img_emb").iterdir())
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]

    embeddings, metadata = store.load_embeddings(tmp_path / "out", with_metadata=True)
    paths = metadata.column("path").to_pylist()
    assert paths == [p for p in list_images(images_dir) if Path(p).name not in BAD_FILES]
    for row in (0, 9, 22):  # each row is the embedding of the file its metadata row names
        alone = embed_images([paths[row]], model, image_size=SIZE)
        np.testing.assert_allclose(embeddings[row], alone[0], rtol=1e-4, atol=1e-4)
        with Image.open(paths[row]) as image:
            assert (metadata.column("width")[row].as_py(), metadata.column("height")[row].as_py()) == image.size
    manifest = store.read_manifest(tmp_path / "out")
    assert manifest["complete"] and manifest["num_embedded"] == 23 and manifest["dim"] == 64
    assert manifest["preprocessing"]["resize_short_side"] == 64 and manifest["preprocessing"]["center_crop"] == SIZE


def test_unreadable_files_land_in_errors_parquet_with_a_reason(images_dir, model, tmp_path):
    _run(images_dir, model, tmp_path / "out")
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert sorted(Path(e["path"]).name for e in errors) == BAD_FILES
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert "0 bytes" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["huge.png"]
    assert "cannot identify image file" in reasons["not_an_image.jpg"]
    assert reasons["corrupt.png"]


def test_interrupted_run_resumes_to_the_same_bytes_as_a_clean_run(images_dir, model, tmp_path, monkeypatch):
    _run(images_dir, model, tmp_path / "clean")

    real_write, written = store.write_shard, []

    def write_then_die(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # like Ctrl-C during the third shard
        real_write(*args, **kwargs)
        written.append(args[1])

    monkeypatch.setattr(store, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(images_dir, model, tmp_path / "resumed")
    with pytest.raises(ValueError, match="incomplete"):
        store.load_embeddings(tmp_path / "resumed")
    monkeypatch.setattr(store, "write_shard", real_write)

    report = _run(images_dir, model, tmp_path / "resumed")
    assert report.shards_already_done == 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "clean")


def test_resuming_with_other_settings_is_refused(images_dir, model, tmp_path):
    _run(images_dir, model, tmp_path / "out")
    with pytest.raises(ValueError, match="different embedding run.*pooling"):
        _run(images_dir, model, tmp_path / "out", pooling="mean")
    with pytest.raises(ValueError, match="model weights differ"):
        _run(images_dir, randomize_(tiny_model(), seed=7), tmp_path / "out")


def test_int8_embedding_is_close_to_float32_recorded_and_not_mixed_on_resume(images_dir, model, tmp_path):
    _run(images_dir, model, tmp_path / "fp32")
    report = _run(images_dir, model, tmp_path / "int8", int8=True)
    assert report.num_embedded == 23
    fp32, int8 = store.load_embeddings(tmp_path / "fp32"), store.load_embeddings(tmp_path / "int8")
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.98 and not np.array_equal(fp32, int8)  # quantised, and still the same features
    manifest = store.read_manifest(tmp_path / "int8")
    assert manifest["int8"] is True and store.read_manifest(tmp_path / "fp32")["int8"] is False
    # the fingerprint is of the float weights: the same model, so only the int8 setting differs
    assert manifest["model"]["weights_sha256"] == store.read_manifest(tmp_path / "fp32")["model"]["weights_sha256"]
    with pytest.raises(ValueError, match="different embedding run.*int8: True -> False"):
        _run(images_dir, model, tmp_path / "int8")


def test_int8_embedding_refuses_a_gpu_device(images_dir, model, tmp_path):
    with pytest.raises(ValueError, match="CPU only.*--device cpu"):
        _run(images_dir, model, tmp_path / "out", int8=True, device="cuda")
    assert not (tmp_path / "out" / store.MANIFEST).exists()


def test_decoding_workers_of_a_cpu_model_run_below_the_models_priority(images_dir, model, tmp_path, monkeypatch):
    import importlib

    embed_module = importlib.import_module("dinokit.apps.embed")
    real_decode, seen = embed_module.decode, tmp_path / "niceness.txt"

    def decode_and_note_priority(item, transform):  # runs in the (forked) worker
        with open(seen, "a") as f:
            f.write(f"{os.getpid()} {os.nice(0)}\n")
        return real_decode(item, transform)

    monkeypatch.setattr(embed_module, "decode", decode_and_note_priority)
    _run(images_dir, model, tmp_path / "out", num_workers=1)
    workers = {line.split()[0]: int(line.split()[1]) for line in seen.read_text().splitlines()}
    assert str(os.getpid()) not in workers and len(workers) == 1
    assert set(workers.values()) == {min(19, os.nice(0) + embed_module.DECODE_NICENESS)}  # 19: the lowest
    import gc

    assert gc.get_freeze_count() == 0  # objects frozen for the fork are unfrozen in this process again


def test_default_decoding_workers_leave_a_cpu_model_its_cores(monkeypatch):
    from dinokit.apps.embed import default_num_workers

    for cores, cpu, gpu in ((1, 0, 1), (2, 0, 2), (4, 0, 4), (8, 1, 8), (16, 2, 8), (128, 8, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert (default_num_workers(torch.device("cpu")), default_num_workers(torch.device("cuda"))) == (cpu, gpu)


def test_empty_inputs_are_clear_errors(tmp_path, model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="No images found in folder"):
        _run(tmp_path / "empty", model, tmp_path / "out")
    with pytest.raises(ValueError, match="matches no files"):
        _run(str(tmp_path / "*.jpg"), model, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(tmp_path / "missing", model, tmp_path / "out")
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no files"):
        _run(tmp_path / "list.txt", model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_glob_and_file_list_inputs(images_dir, tmp_path):
    jpgs = list_images(str(images_dir / "**" / "*.JPG"))
    assert len(jpgs) == 8 and all(p.endswith(".JPG") for p in jpgs)
    (images_dir / "list.txt").write_text("class_0/img_00.JPG\n# comment\nclass_1/img_01.png\n")
    try:
        assert list_images(images_dir / "list.txt") == [str(images_dir / "class_0" / "img_00.JPG"),
                                                         str(images_dir / "class_1" / "img_01.png")]
    finally:
        (images_dir / "list.txt").unlink()


@pytest.mark.parametrize("pooling, registers, shape", [
    ("cls", 0, (64,)), ("mean", 4, (64,)), ("cls+mean", 0, (128,)), ("patch", 4, (25, 64))])
def test_poolings_give_their_shapes_at_any_multiple_of_14(images_dir, tmp_path, pooling, registers, shape):
    model = tiny_model(registers)
    files = list_images(images_dir)[:6]
    report = _run(files, model, tmp_path / "out", pooling=pooling, image_size=70, normalize=True, dtype="float16")
    embeddings = store.load_embeddings(tmp_path / "out")
    assert report.feature_shape == shape and embeddings.shape == (6, *shape) and embeddings.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=-1), 1.0, atol=2e-3)

    # The same pooling by hand from the model's tokens (registers sit between CLS and patches).
    pixels = torch.stack([eval_transform(70)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state
    cls, patches = tokens[:, 0], tokens[:, 1 + registers:]
    expected = {"cls": cls, "mean": patches.mean(1), "cls+mean": torch.cat([cls, patches.mean(1)], -1),
                "patch": patches}[pooling]
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=3e-3)


def test_image_size_must_be_a_multiple_of_the_patch_size(images_dir, model, tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        _run(images_dir, model, tmp_path / "out", image_size=100)


def test_imagenette_images_with_workers(model, tmp_path):
    if not IMAGENETTE.is_dir():
        pytest.skip(f"{IMAGENETTE} is not available")
    files = list_images(IMAGENETTE)[::19][:200]
    report = _run(files, model, tmp_path / "out", shard_size=64, batch_size=16, num_workers=2)
    assert (report.num_embedded, report.num_errors, report.num_shards) == (200, 0, 4)
    embeddings, metadata = store.load_embeddings(tmp_path / "out", with_metadata=True)
    assert metadata.column("path").to_pylist() == files
    rows = [0, 64, 199]
    np.testing.assert_allclose(embeddings[rows], embed_images([files[r] for r in rows], model, image_size=SIZE),
                               rtol=1e-4, atol=1e-4)


TORCHRUN_SCRIPT = """
import os
import sys
from dinokit import load_model
from dinokit.apps.embed import embed
model = load_model(sys.argv[1])
report = embed(sys.argv[2], model, sys.argv[3], image_size=56, batch_size=4, shard_size=5, num_workers=1,
               progress=False)
# one write per line: the ranks share an unbuffered pipe, and print() writes each argument separately
sys.stdout.write(f"rank {os.environ.get('RANK', '-')} of {os.environ.get('WORLD_SIZE', '1')} "
                 f"embedded {report.num_embedded}\\n")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_write_what_one_process_writes(images_dir, model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    script = tmp_path / "run_embed.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(images_dir),
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                             str(tmp_path / "model"), str(images_dir), str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "rank 0 of 2 embedded 23" in double.stdout and "rank 1 of 2 embedded 23" in double.stdout
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert store.read_manifest(tmp_path / "two")["num_shards"] == 6  # both ranks had work
