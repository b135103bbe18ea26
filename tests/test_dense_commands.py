"""`dinokit segment` and `dinokit depth` end to end on tiny generated data sets, and each bad input: one clear
error naming the file, exit status 2, and no output folder that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dense_helpers import depth_dataset, seg_dataset, tiny_backbone
from dinokit.cli import main
from dinokit.dense.data import read_mask

FAST = ["--size", "28", "--iterations", "20", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("backbone") / "model")


def _train(backbone, tmp_path, train, val, out, *extra):
    return main(["segment", "train", "--model", str(backbone), "--train", str(train), "--val", str(val),
                 "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *FAST, *extra])


def test_segment_train_then_predict_writes_model_metrics_masks_and_overlays(backbone, tmp_path, capsys):
    train, val = seg_dataset(tmp_path / "train"), seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "out"
    assert _train(backbone, tmp_path, train, val, out, "--head", "ms") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class_iou"]) == {"LABEL_0", "LABEL_1"} and 0 <= metrics["miou"] <= 1
    assert metrics["num_classes"] == 2 and metrics["head"] == "ms" and metrics["val_images"] == 4
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "metrics.json"} <= {
        p.name for p in out.iterdir()}
    pred = tmp_path / "pred"
    assert main(["segment", "predict", str(val / "images"), "--model", str(out), "-o", str(pred), "--quiet"]) == 0
    mask = read_mask(pred / "img0.png")
    assert mask.shape == (30, 44)  # the input's resolution
    assert set(np.unique(mask)) <= {0, 1}
    assert Image.open(pred / "img0_overlay.png").size == (44, 30)
    # a second training run into the same folder replaces the earlier result (and reuses cached features)
    assert _train(backbone, tmp_path, train, val, out) == 0
    assert json.loads((out / "metrics.json").read_text())["features_from_cache"] is False  # linear != ms features
    assert _train(backbone, tmp_path, train, val, out) == 0
    assert json.loads((out / "metrics.json").read_text())["features_from_cache"] is True


def test_depth_train_then_predict_writes_metrics_colour_and_16_bit_depth(backbone, tmp_path):
    train, val = depth_dataset(tmp_path / "train"), depth_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "out"
    assert main(["depth", "train", "--model", str(backbone), "--train", str(train), "--val", str(val),
                 "--output", str(out), "--layers", "1", "--cache-dir", str(tmp_path / "cache"), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"abs_rel", "rmse", "log10", "a1", "a2", "a3"} <= set(metrics) and metrics["images"] == 4
    pred = tmp_path / "pred"
    # the spelling, `dinokit depth IMAGE... -o DIR`, is `dinokit depth predict IMAGE... -o DIR`
    assert main(["depth", str(val / "images" / "img0.png"), "--model", str(out), "-o", str(pred), "--quiet"]) == 0
    sixteen = Image.open(pred / "img0_depth16.png")
    assert sixteen.mode.startswith("I") and sixteen.size == (44, 30)
    values = np.asarray(sixteen)
    assert 1 <= values.min() and values.max() <= 10_000  # millimetres inside the head's 0.001-10 m range
    assert Image.open(pred / "img0_depth.png").mode == "RGB"


def _bad(backbone, tmp_path, capsys, train, fragment):
    val = seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "out"
    assert _train(backbone, tmp_path, train, val, out, "--num-classes", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinokit segment train: error:"), err
    assert fragment in err[0], err[0]
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()
    return err[0]


def test_mask_of_another_size_than_its_image_is_named(backbone, tmp_path, capsys):
    train = seg_dataset(tmp_path / "train")
    Image.new("P", (10, 10)).save(train / "masks" / "img2.png")
    line = _bad(backbone, tmp_path, capsys, train, "img2.png is 10x10 but its image")
    assert "44x30" in line


def test_mask_value_beyond_num_classes_is_named(backbone, tmp_path, capsys):
    train = seg_dataset(tmp_path / "train")
    mask = np.zeros((30, 44), dtype=np.uint8)
    mask[0, 0] = 7
    Image.fromarray(mask, mode="L").save(train / "masks" / "img1.png")
    _bad(backbone, tmp_path, capsys, train, "img1.png has class value(s) [7] >= --num-classes 2")


def test_missing_mask_is_named(backbone, tmp_path, capsys):
    train = seg_dataset(tmp_path / "train")
    (train / "masks" / "img3.png").unlink()
    _bad(backbone, tmp_path, capsys, train, "missing mask for")


def test_rgb_colour_mask_without_palette_is_refused_with_the_fix(backbone, tmp_path, capsys):
    train = seg_dataset(tmp_path / "train")
    colour = np.zeros((30, 44, 3), dtype=np.uint8)
    colour[:10, :10] = (255, 0, 0)
    Image.fromarray(colour, mode="RGB").save(train / "masks" / "img0.png")
    line = _bad(backbone, tmp_path, capsys, train, "img0.png is an RGB colour mask without a palette")
    assert "palette (mode P)" in line


def test_empty_images_folder_is_named(backbone, tmp_path, capsys):
    train = tmp_path / "train"
    (train / "images").mkdir(parents=True)
    (train / "masks").mkdir()
    _bad(backbone, tmp_path, capsys, train, "images is empty")


def test_unreadable_image_met_while_computing_features_leaves_no_output(backbone, tmp_path, capsys):
    train = seg_dataset(tmp_path / "train")
    image = train / "images" / "img1.jpg"
    header = image.read_bytes()[:600]  # the size can be read, the pixels cannot
    image.write_bytes(header)
    _bad(backbone, tmp_path, capsys, train, "img1.jpg")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.is_dir()]  # no staging left


def test_failed_rerun_keeps_the_previous_complete_output(backbone, tmp_path, capsys):
    train, val = seg_dataset(tmp_path / "train"), seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "out"
    assert _train(backbone, tmp_path, train, val, out) == 0
    before = (out / "model.safetensors").read_bytes()
    (train / "masks" / "img0.png").unlink()
    assert _train(backbone, tmp_path, train, val, out) == 2
    capsys.readouterr()
    assert (out / "model.safetensors").read_bytes() == before and (out / "metrics.json").is_file()


def test_output_folder_holding_other_files_is_refused(backbone, tmp_path, capsys):
    train, val = seg_dataset(tmp_path / "train"), seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _train(backbone, tmp_path, train, val, out) == 2
    assert "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_random_init_preset_is_the_same_model_on_every_run_so_its_features_are_cached(tmp_path):
    train, val = seg_dataset(tmp_path / "train", n=2), seg_dataset(tmp_path / "val", n=2, seed=1)
    for run in range(2):
        out = tmp_path / f"out{run}"
        assert _train("vits14", tmp_path, train, val, out) == 0
    first, second = (json.loads((tmp_path / f"out{i}" / "metrics.json").read_text()) for i in range(2))
    assert second["features_from_cache"] is True
    assert second["miou"] == first["miou"]


def test_depth_map_of_another_size_than_its_image_is_named(backbone, tmp_path, capsys):
    train, val = depth_dataset(tmp_path / "train"), depth_dataset(tmp_path / "val", seed=1)
    Image.fromarray(np.zeros((5, 5), dtype=np.uint16)).save(train / "depth" / "img2.png")
    out = tmp_path / "out"
    assert main(["depth", "train", "--model", str(backbone), "--train", str(train), "--val", str(val),
                 "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img2.png is 5x5 but its image" in err[0]
    assert not out.exists()


def test_depth_predict_runs_a_transformers_dpt_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_dense_transformers_parity import _dpt_config

    model_dir = tmp_path / "dpt"
    transformers.DPTForDepthEstimation(_dpt_config()).save_pretrained(model_dir)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(image)
    assert main(["depth", str(image), "--model", str(model_dir), "-o", str(tmp_path / "pred"), "--size", "28",
                 "--quiet"]) == 0
    assert Image.open(tmp_path / "pred" / "photo_depth16.png").size == (44, 30)
