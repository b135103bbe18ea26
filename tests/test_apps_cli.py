"""The `dinokit embed | index | search | dedup | pca` commands end to end, with a tiny random model on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from dinokit.apps.pca import GAP, pca_picture
from dinokit.cli import main

from helpers import randomize_


def _smooth_image(rng, size=(96, 72)) -> Image.Image:
    """A few blurry colour blobs: survives resizing and re-compression the way photos do."""
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    return coarse.resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """20 distinct images, plus near-duplicates of three of them: resized, re-compressed, slightly cropped."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(20):
        _smooth_image(rng).save(root / f"photo_{i:02d}.png")
    source = Image.open(root / "photo_03.png").convert("RGB")
    source.resize((48, 36), Image.BICUBIC).save(root / "photo_03_small.png")
    source.save(root / "photo_03_q30.jpg", quality=30)
    Image.open(root / "photo_11.png").convert("RGB").crop((4, 3, 92, 69)).save(root / "photo_11_crop.png")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56)
    randomize_(Dinov2Model(config)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedded(collection, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "emb"
    code = main(["embed", str(collection), "--model", str(model_dir), "--output", str(out), "--image-size", "56",
                 "--batch-size", "8", "--num-workers", "0", "--quiet"])
    assert code == 0
    return out


def test_embed_writes_the_clip_retrieval_layout(embedded, model_dir):
    manifest = json.loads((embedded / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_embedded"] == 23 and manifest["num_errors"] == 0
    assert manifest["model"]["spec"] == str(Path(model_dir).resolve())
    assert np.load(embedded / "img_emb" / "img_emb_0.npy").shape == (23, 64)
    assert pq.read_table(embedded / "metadata" / "metadata_0.parquet").column_names == ["path", "width", "height"]


def test_search_finds_each_query_image_itself_first(embedded, collection, capsys):
    assert main(["index", str(embedded)]) == 0
    assert "flat index of 23 x 64 vectors" in capsys.readouterr().out
    queries = [str(collection / "photo_05.png"), str(collection / "photo_17.png")]
    assert main(["search", str(embedded), *queries, "-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for query, result in zip(queries, results):
        assert result["query"] == query
        assert result["results"][0]["path"] == query and result["results"][0]["score"] == pytest.approx(1, abs=1e-4)
        assert [r["rank"] for r in result["results"]] == [1, 2, 3]
    assert main(["search", str(embedded / "index"), queries[0], "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == queries[0]


def test_dedup_command_writes_groups_with_kept_images(embedded, tmp_path, capsys):
    assert main(["dedup", str(embedded), "--threshold", "0.9", "--output", str(tmp_path / "groups.csv")]) == 0
    assert "near-duplicate groups" in capsys.readouterr().out
    summary = json.loads((tmp_path / "groups.json").read_text())
    kept = {g["keep"] for g in summary["groups"]}
    removed = {p for g in summary["groups"] for p in g["remove"]}
    assert not kept & removed and summary["num_duplicates"] == len(removed)
    assert (tmp_path / "groups.csv").read_text().startswith("group,path,keep,width,height,similarity")


def test_errors_are_one_line_not_a_traceback(tmp_path, model_dir, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["embed", str(tmp_path / "empty"), "--model", str(model_dir), "--output", str(tmp_path / "o")])
    assert code == 2 and "error: No images found in folder" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "x.jpg"]) == 2
    assert "dinokit index" in capsys.readouterr().err


@pytest.mark.parametrize("registers", [0, 4])
def test_pca_picture_has_one_row_per_input(collection, tmp_path, registers):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model = randomize_(model).eval()
    inputs = [collection / "photo_01.png", collection / "photo_02.png", collection / "photo_11_crop.png"]
    picture = pca_picture(inputs, tmp_path / "pca.png", model=model, size=56)
    with Image.open(tmp_path / "pca.png") as written:
        assert written.size == picture.image.size
    # 96x72 -> 70x56 (short side 56, long side rounded to whole patches); 88x66 -> 70x56 as well.
    assert [len(row) for row in picture.boxes] == [2, 2, 2]
    assert all(box[2] - box[0] == 70 and box[3] - box[1] == 56 for row in picture.boxes for box in row)
    assert picture.image.size == (70 * 2 + GAP, 56 * 3 + 2 * GAP)
    assert [m.shape for m in picture.masks] == [(4, 5)] * 3

    attention = pca_picture(inputs[:2], tmp_path / "attn.png", model=model, size=56, attention=True)
    assert [len(row) for row in attention.boxes] == [1 + 2, 1 + 2]  # the input, then one map per head
    assert (tmp_path / "attn.png").is_file()


def test_pca_command(collection, model_dir, tmp_path, capsys):
    out = tmp_path / "pca.png"
    assert main(["pca", str(collection / "photo_01.png"), "-o", str(out), "--model", str(model_dir),
                 "--size", "28", "--threshold", "none"]) == 0
    assert "1 rows" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (2 * 42 + GAP, 28)  # 96x72 -> 37.3x28 -> 42x28


def test_pca_rejects_a_size_that_is_not_a_multiple_of_14(collection, model_dir, tmp_path, capsys):
    assert main(["pca", str(collection / "photo_01.png"), "-o", str(tmp_path / "x.png"), "--model",
                 str(model_dir), "--size", "50"]) == 2
    assert "multiple of the patch size 14" in capsys.readouterr().err
