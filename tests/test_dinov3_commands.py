"""Every command that takes a DINOv2 model takes a DINOv3 one: each runs here end to end with a tiny DINOv3 ViT
(patch 16, 4 registers, RoPE) saved with save_pretrained, and a hub id resolves through the Hugging Face cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dense_helpers import depth_dataset, seg_dataset
from dinokit.cli import main

from helpers import save_tiny_dinov3

SIZE = 32  # 2 x 2 patches of 16
HUB_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"


def _picture(rng, width: int, height: int) -> Image.Image:
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov3(tmp_path_factory.mktemp("dinov3") / "model")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 distinct pictures and a re-compressed copy of one (a near-duplicate)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        _picture(rng, 60 + 4 * i, 48).save(root / f"photo_{i:02d}.png")
    Image.open(root / "photo_03.png").convert("RGB").save(root / "photo_03_q40.jpg", quality=40)
    return root


@pytest.fixture(scope="module")
def embedded(photos, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb"
    assert main(["embed", str(photos), "--model", str(model_dir), "--output", str(out), "--image-size", str(SIZE),
                 "--batch-size", "4", "--num-workers", "0", "--quiet"]) == 0
    return out


def test_embed_stores_cls_vectors_of_the_dinov3_model(embedded, photos, model_dir):
    import dinokit
    from dinokit.apps import store
    from dinokit.processing import eval_transform

    manifest = json.loads((embedded / "manifest.json").read_text())
    assert manifest["patch_size"] == 16 and manifest["model"]["class"] == "DINOv3ViTModel"
    vectors, meta = store.load_embeddings(embedded, with_metadata=True)
    assert vectors.shape == (13, 64)
    first = meta.column("path").to_pylist().index(str(photos / "photo_00.png"))
    model = dinokit.load_model(model_dir)
    transform = eval_transform(resize=round(SIZE * 256 / 224), crop=SIZE)  # ImageNet mean/std
    with Image.open(photos / "photo_00.png") as image, torch.no_grad():
        expected = model(transform(image.convert("RGB"))[None]).pooler_output[0].numpy()
    np.testing.assert_allclose(vectors[first], expected, atol=1e-5)


def test_embed_patch_pooling_keeps_the_16_pixel_grid(photos, model_dir, tmp_path):
    import dinokit
    from dinokit.apps import store
    from dinokit.processing import eval_transform

    out = tmp_path / "patches"
    assert main(["embed", str(photos / "photo_01.png"), "--model", str(model_dir), "--output", str(out),
                 "--image-size", "48", "--pooling", "patch", "--num-workers", "0", "--quiet"]) == 0
    patches = store.load_embeddings(out)
    assert patches.shape == (1, 9, 64)  # 48 / 16 = 3 x 3 patches
    model = dinokit.load_model(model_dir)
    transform = eval_transform(resize=round(48 * 256 / 224), crop=48)
    with Image.open(photos / "photo_01.png") as image, torch.no_grad():
        hidden = model(transform(image.convert("RGB"))[None]).last_hidden_state[0]
    np.testing.assert_allclose(patches[0], hidden[1 + 4:].numpy(), atol=1e-5)  # CLS and 4 registers left out


def test_index_search_and_dedup_on_dinov3_embeddings(embedded, photos, tmp_path, capsys):
    assert main(["index", str(embedded)]) == 0
    capsys.readouterr()
    assert main(["search", str(embedded), str(photos / "photo_05.png"), "-k", "2", "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert Path(answer["results"][0]["path"]).name == "photo_05.png"
    groups = tmp_path / "groups.csv"
    assert main(["dedup", str(embedded), "--threshold", "0.98", "--output", str(groups)]) == 0
    text = groups.read_text()
    assert "photo_03.png" in text and "photo_03_q40.jpg" in text


def test_embed_int8_runs_the_dinov3_blocks_in_int8(photos, model_dir, embedded, tmp_path):
    from dinokit.apps import store

    out = tmp_path / "int8"
    assert main(["embed", str(photos), "--model", str(model_dir), "--output", str(out), "--image-size", str(SIZE),
                 "--num-workers", "0", "--int8", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["int8"] is True
    a, b = store.load_embeddings(out), store.load_embeddings(embedded)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98 and not np.array_equal(a, b)  # close to float32, but quantised


def test_pca_command_uses_16_pixel_patches(photos, model_dir, tmp_path, capsys):
    from dinokit.apps.pca import GAP

    out = tmp_path / "pca.png"
    assert main(["pca", str(photos / "photo_03.png"), "-o", str(out), "--model", str(model_dir), "--size", "32",
                 "--threshold", "none"]) == 0
    with Image.open(out) as image:
        assert image.size == (2 * 48 + GAP, 32)  # 72x48 -> 48x32: 3 x 2 patches of 16
    assert main(["pca", str(photos / "photo_00.png"), "-o", str(tmp_path / "attn.png"), "--model", str(model_dir),
                 "--size", "32", "--attention"]) == 0
    assert main(["pca", str(photos / "photo_00.png"), "-o", str(tmp_path / "x.png"), "--model", str(model_dir),
                 "--size", "28"]) == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- serve
def _post_image(url: str, path: Path) -> dict:
    """POST one image as multipart form data (field `image`), the way the page uploads it."""
    import urllib.request

    boundary = "dinokit-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_serve_process_answers_searches_with_the_dinov3_model(embedded, photos, tmp_path):
    """A real `dinokit serve` on a real port: it loads the DINOv3 model the folder was embedded with and embeds
    an uploaded query with it."""
    pytest.importorskip("fastapi", reason="dinokit serve needs the `serve` extra: pip install 'dinokit[serve]'")
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    assert main(["index", str(embedded)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "dinokit", "serve", str(embedded), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # a hang guard: the server imports torch and faiss first
        health = None
        while health is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2) as response:
                    health = json.load(response)
            except OSError:
                time.sleep(0.2)
        assert health is not None, (tmp_path / "serve.log").read_text()[-2000:]
        assert health["status"] == "ok" and health["dim"] == 64
        answer = _post_image(url + "/api/search?k=2", photos / "photo_07.png")
        assert Path(answer["results"][0]["path"]).name == "photo_07.png"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# ---------------------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    """Two classes (red and blue squares on noise), 6 training and 4 validation images each, as ImageFolders."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(3)
    for split, count in (("train", 6), ("val", 4)):
        for name, colour in (("blue", (30, 30, 220)), ("red", (220, 30, 30))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                top, left = rng.integers(0, 16, 2)
                pixels[top:top + 20, left:left + 20] = colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root / "train", root / "val"


def test_eval_knn_on_dinov3_features(labelled, model_dir, tmp_path):
    train, val = labelled
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--model", str(model_dir), "--train", str(train), "--val", str(val),
                 "--resize", "36", "--crop", "32", "--ks", "3", "--num-workers", "0", "--cache-dir",
                 str(tmp_path / "cache"), "--quiet", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["class"] == "DINOv3ViTModel" and report["model"]["random_weights"] is False
    assert report["data"]["train"]["images"] == 12 and report["data"]["val"]["images"] == 8
    assert "crop=32x32" in report["settings"]["transform"]
    assert json.dumps(report["results"]).count('"k": 3') >= 1


def test_finetune_then_classify_with_a_dinov3_backbone(labelled, model_dir, tmp_path, capsys):
    import dinokit

    train, val = labelled
    out = tmp_path / "classifier"
    assert main(["finetune", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--output",
                 str(out), "--epochs", "2", "--train-batch-size", "4", "--num-workers", "0", "--resize", "36",
                 "--crop", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    classifier = dinokit.load_model(out, task="classification")
    assert type(classifier).__name__ == "DINOv3ViTForImageClassification"
    backbone = dinokit.load_model(model_dir)
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        hidden = backbone(pixels).last_hidden_state
        features = torch.cat([hidden[:, 0], hidden[:, 5:].mean(1)], dim=1)
        torch.testing.assert_close(classifier(pixel_values=pixels).logits, classifier.classifier(features))
    capsys.readouterr()
    image = next(val.glob("red/*.png"))
    assert main(["classify", str(image), "--model", str(out), "--top-k", "2", "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert {p["label"] for p in prediction["top_k"]} == {"red", "blue"}


# ---------------------------------------------------------------------------------------------------- dense
DENSE = ["--size", "32", "--iterations", "10", "--batch-size", "2", "--quiet"]


def test_segment_train_then_predict_on_16_pixel_patches(model_dir, tmp_path):
    train, val = seg_dataset(tmp_path / "train"), seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "seg"
    assert main(["segment", "train", "--model", str(model_dir), "--train", str(train), "--val", str(val),
                 "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *DENSE]) == 0
    assert 0 <= json.loads((out / "metrics.json").read_text())["miou"] <= 1
    pred = tmp_path / "pred"
    assert main(["segment", "predict", str(val / "images"), "--model", str(out), "-o", str(pred), "--quiet"]) == 0
    with Image.open(pred / "img0.png") as mask:
        assert mask.size == (44, 30)


def test_depth_train_then_predict_on_16_pixel_patches(model_dir, tmp_path):
    train, val = depth_dataset(tmp_path / "train"), depth_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "depth"
    assert main(["depth", "train", "--model", str(model_dir), "--train", str(train), "--val", str(val),
                 "--output", str(out), "--layers", "1", "--cache-dir", str(tmp_path / "cache"), *DENSE]) == 0
    assert "abs_rel" in json.loads((out / "metrics.json").read_text())
    pred = tmp_path / "pred"
    assert main(["depth", str(val / "images" / "img0.png"), "--model", str(out), "-o", str(pred), "--quiet"]) == 0
    assert (pred / "img0_depth16.png").is_file()


# ---------------------------------------------------------------------------------------------------- export
def test_export_onnx_computes_rope_in_the_graph_and_matches_eager_at_two_sizes(model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import dinokit
    from dinokit.export import read_metadata
    from dinokit.export.onnx import ort_session

    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(out), "--sizes", "32,48x80", "--int8",
                 "--check-count", "8"]) == 0
    printed = capsys.readouterr().out
    assert "interpolation rope" in printed and "mean cosine" in printed
    assert (tmp_path / "model.int8.onnx").is_file()
    session = ort_session(out)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]  # no mask input
    assert read_metadata(out)["patch_size"] == 16
    model = dinokit.load_model(model_dir)
    for height, width in ((32, 32), (48, 80), (64, 112)):  # the last was not declared: the graph takes any size
        pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        hidden, pooled = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            reference = model(pixels)
        assert hidden.shape == (2, 1 + 4 + height * width // 256, 64)
        assert np.abs(hidden - reference.last_hidden_state.numpy()).max() <= 1e-4
        assert np.abs(pooled - reference.pooler_output.numpy()).max() <= 1e-4
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(tmp_path / "bad.onnx"),
                 "--positions", "precomputed", "--sizes", "32"]) == 2
    assert "RoPE" in capsys.readouterr().err


def test_export_torchscript_traces_rope_for_every_size(model_dir, tmp_path):
    import dinokit

    out = tmp_path / "model.pt"
    assert main(["export", "torchscript", "--model", str(model_dir), "--out", str(out), "--sizes", "32,48x80"]) == 0
    traced = torch.jit.load(str(out))
    model = dinokit.load_model(model_dir)
    pixels = torch.randn(1, 3, 64, 112, generator=torch.Generator().manual_seed(1))  # not a checked size
    with torch.no_grad():
        assert (traced(pixels)[0] - model(pixels).last_hidden_state).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------- distill
def test_train_distills_a_student_from_a_dinov3_teacher(model_dir, tmp_path):
    from ssl_helpers import TINY, make_images

    images = make_images(tmp_path / "images", n=16)
    run = tmp_path / "student"
    overrides = TINY + ["student.embed_dim=32", "student.depth=1", "optim.epochs=2", "optim.warmup_epochs=0",
                        "train.OFFICIAL_EPOCH_LENGTH=4"]
    assert main(["train", "--data", str(images), "--output", str(run), "--distill-from", str(model_dir),
                 "--no-progress", *overrides]) == 0
    from dinokit.ssl.distill import FeatureDistillArch, build_distill_arch
    from dinokit.ssl.train_config import load_train_config

    arch = build_distill_arch(load_train_config("cpu_tiny_cifar", [*overrides, f"distill.teacher={model_dir}"]), "cpu")
    assert isinstance(arch, FeatureDistillArch) and arch.teacher.patch_size == 16
    assert arch.teacher_size == 64  # the student's 4 x 4 grid (16-px crops, 4-px patches) at 16 px per patch
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["cls_distill_loss"]) for line in lines)
    assert (run / "teacher" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- model references
def _hub_cache(root: Path, hub_id: str) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE layout) holding a tiny stand-in for `hub_id`, with its processor."""
    from dinokit.processing import DINOv3ViTImageProcessor

    repo = root / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = save_tiny_dinov3(repo / "snapshots" / commit, seed=5)
    DINOv3ViTImageProcessor().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_dinov3_hub_id_resolves_through_the_hub_cache_for_embed_and_search(photos, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", HUB_ID)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "emb"
    assert main(["embed", str(photos), "--model", HUB_ID, "--output", str(out), "--image-size", str(SIZE),
                 "--num-workers", "0", "--quiet"]) == 0
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["spec"] == HUB_ID and model["random_weights"] is False and model["class"] == "DINOv3ViTModel"
    assert main(["index", str(out)]) == 0
    capsys.readouterr()
    # search loads the model again from the id the manifest recorded
    assert main(["search", str(out), str(photos / "photo_02.png"), "-k", "1", "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert Path(answer["results"][0]["path"]).name == "photo_02.png"


def test_embeddings_of_a_dinov3_preset_are_marked_random_and_not_reloaded(photos, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", str(photos / "photo_00.png"), "--model", "dinov3_vits16", "--output", str(out),
                 "--image-size", "32", "--num-workers", "0", "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["random_weights"] is True
    assert main(["index", str(out)]) == 0
    # a second random init would give other vectors: search refuses rather than compare unlike features
    assert main(["search", str(out), str(photos / "photo_00.png")]) == 2
    assert "randomly initialised" in capsys.readouterr().err


def test_a_model_with_its_own_normalisation_is_fed_with_it(photos, tmp_path):
    import dinokit
    from dinokit.apps import store
    from dinokit.dense.features import dense_processor
    from dinokit.eval.features import default_transform
    from dinokit.eval.linear import LinearProbeConfig, train_transform
    from dinokit.models.dinov3_vit import SAT_MEAN, SAT_STD
    from dinokit.processing import eval_transform

    folder = save_tiny_dinov3(tmp_path / "sat", image_mean=list(SAT_MEAN), image_std=list(SAT_STD))
    model = dinokit.load_model(folder)
    out = tmp_path / "emb"
    assert main(["embed", str(photos / "photo_04.png"), "--model", str(folder), "--output", str(out),
                 "--image-size", str(SIZE), "--num-workers", "0", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["mean"] == list(SAT_MEAN)
    transform = eval_transform(resize=round(SIZE * 256 / 224), crop=SIZE, image_mean=SAT_MEAN, image_std=SAT_STD)
    with Image.open(photos / "photo_04.png") as image, torch.no_grad():
        expected = model(transform(image.convert("RGB"))[None]).pooler_output[0].numpy()
    np.testing.assert_allclose(store.load_embeddings(out)[0], expected, atol=1e-5)
    assert list(dense_processor(32, model).image_mean) == list(SAT_MEAN)
    assert "mean [0.43" in repr(default_transform(model))  # and so in the feature-cache key
    normalize = train_transform(LinearProbeConfig(crop_size=32), model).transforms[-1]  # linear probe, finetune
    assert tuple(normalize.mean) == SAT_MEAN and tuple(normalize.std) == SAT_STD


# ---------------------------------------------------------------------------------------------------- ConvNeXt
@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory) -> Path:
    from dinokit.models.dinov3_convnext import DINOv3ConvNextConfig, DINOv3ConvNextModel

    path = tmp_path_factory.mktemp("convnext") / "model"
    torch.manual_seed(0)
    DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 1, 1])).save_pretrained(path)
    return path


def test_a_convnext_embeds_and_evaluates_on_its_stride_32_tokens(photos, convnext_dir, labelled, tmp_path):
    from dinokit.apps import store

    out = tmp_path / "emb"
    assert main(["embed", str(photos), "--model", str(convnext_dir), "--output", str(out), "--image-size", "64",
                 "--pooling", "cls+mean", "--num-workers", "0", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["patch_size"] == 32 and store.load_embeddings(out).shape == (13, 96)
    report = tmp_path / "knn.json"
    assert main(["eval", "knn", "--model", str(convnext_dir), "--train", str(labelled[0]), "--val", str(labelled[1]),
                 "--resize", "72", "--crop", "64", "--ks", "3", "--num-workers", "0", "--no-cache", "--quiet",
                 "--output", str(report)]) == 0
    assert json.loads(report.read_text())["data"]["val"]["images"] == 8


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory, labelled) -> dict:
    root = tmp_path_factory.mktemp("sets")
    return {"seg": seg_dataset(root / "seg"), "depth": depth_dataset(root / "depth"), "train": labelled[0],
            "val": labelled[1]}


@pytest.mark.parametrize("command, words", [
    (["export", "onnx", "--out", "{tmp}/m.onnx"], "ConvNeXt"),
    (["embed", "{photo}", "--output", "{tmp}/e", "--image-size", "64", "--int8", "--num-workers", "0"], "ConvNeXt"),
    (["pca", "{photo}", "-o", "{tmp}/p.png", "--size", "64", "--attention"], "no attention"),
    (["segment", "train", "--train", "{seg}", "--val", "{seg}", "--output", "{tmp}/o", "--size", "64"],
     "patch tokens"),
    (["depth", "train", "--train", "{depth}", "--val", "{depth}", "--output", "{tmp}/o", "--size", "64"],
     "patch tokens"),
    (["finetune", "--train", "{train}", "--val", "{val}", "--output", "{tmp}/o", "--num-workers", "0"],
     "classification"),
])
def test_commands_that_need_vit_tokens_refuse_a_convnext_in_one_line(command, words, convnext_dir, photos, data_sets,
                                                                      tmp_path, capsys):
    filled = [w.format(tmp=tmp_path, photo=photos / "photo_00.png", **data_sets) for w in command]
    assert main([*filled, "--model", str(convnext_dir)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    for name in ("m.onnx", "p.png", "o", "e"):  # nothing written
        assert not (tmp_path / name).exists() or ((tmp_path / name).is_dir() and not any((tmp_path / name).iterdir()))
