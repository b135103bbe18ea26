"""Feature extraction for the evaluation protocols: values, disk cache, unreadable images, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model
from dinokit.cli import main
from dinokit.eval.data import file_list, image_folder, load_splits
from dinokit.eval.evaluate import evaluate
from dinokit.eval.features import extract_features
from dinokit.processing import eval_transform

TRANSFORM = eval_transform(resize=32, crop=28)
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def tiny_model(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28)).eval()


def write_images(root: Path, per_class: int, seed: int = 0) -> Path:
    """An ImageFolder tree of noisy single-colour images, one class per colour."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


class ForwardCounter:
    """Counts backbone forwards by wrapping the model's get_intermediate_layers."""

    def __init__(self, model, monkeypatch):
        self.calls, original = 0, model.get_intermediate_layers

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "get_intermediate_layers", counting)


@pytest.fixture
def splits(tmp_path):
    return write_images(tmp_path / "train", 6, seed=0), write_images(tmp_path / "val", 3, seed=1)


def test_features_are_the_models_final_norm_cls_last_blocks_and_mean_patch_token(splits):
    model = tiny_model()
    images = image_folder(splits[0])
    features = extract_features(model, images, transform=TRANSFORM, batch_size=5, cache_dir=None, progress=False)
    assert features.cls_blocks.shape == (18, 4, 32) and features.patch_mean.shape == (18, 32)
    assert features.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # classes sorted: blue, green, red
    pixels = torch.stack([TRANSFORM(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(torch.from_numpy(features.final_cls), out.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(features.patch_mean), out.last_hidden_state[:, 1:].mean(dim=1),
                               atol=1e-5, rtol=1e-5)
    second_to_last = model.vit.norm(out.hidden_states[-2])[:, 0]
    torch.testing.assert_close(torch.from_numpy(features.cls_blocks[:, -2]), second_to_last, atol=1e-5, rtol=1e-5)


def test_second_extraction_reads_the_cache_without_a_model_forward(splits, tmp_path, monkeypatch):
    model, images = tiny_model(), image_folder(splits[0])
    counter = ForwardCounter(model, monkeypatch)
    first = extract_features(model, images, transform=TRANSFORM, cache_dir=tmp_path / "cache", progress=False)
    assert counter.calls > 0 and not first.from_cache
    counter.calls = 0
    second = extract_features(model, images, transform=TRANSFORM, cache_dir=tmp_path / "cache", progress=False)
    assert counter.calls == 0 and second.from_cache
    np.testing.assert_array_equal(second.cls_blocks, first.cls_blocks)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.paths == first.paths


def test_cache_is_invalidated_by_new_weights_images_or_transform(splits, tmp_path, monkeypatch):
    model, images = tiny_model(), image_folder(splits[0])
    cache = tmp_path / "cache"
    reference = extract_features(model, images, transform=TRANSFORM, cache_dir=cache, progress=False)
    counter = ForwardCounter(model, monkeypatch)

    with torch.no_grad():
        model.vit.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # one changed weight
    changed = extract_features(model, images, transform=TRANSFORM, cache_dir=cache, progress=False)
    assert counter.calls > 0 and not changed.from_cache
    assert not np.array_equal(changed.cls_blocks, reference.cls_blocks)

    counter.calls = 0
    path = images.paths[0]
    Image.new("RGB", (40, 36), (0, 0, 0)).save(path)
    os.utime(path, ns=(1, 1))  # a rewritten file: new content, new mtime
    assert not extract_features(model, images, transform=TRANSFORM, cache_dir=cache, progress=False).from_cache

    counter.calls = 0
    other = eval_transform(resize=30, crop=28)
    assert not extract_features(model, images, transform=other, cache_dir=cache, progress=False).from_cache
    assert counter.calls > 0
    assert len(list(cache.iterdir())) == 4 and not list(cache.glob(".*"))  # four complete entries, no leftovers


def test_unreadable_images_are_skipped_reported_and_not_counted(splits, tmp_path):
    train = splits[0]
    (train / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (train / "green" / "empty.jpg").write_bytes(b"")
    images = image_folder(train)
    assert len(images) == 20
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        features = extract_features(tiny_model(), images, transform=TRANSFORM, cache_dir=tmp_path / "c",
                                    progress=False)
    assert len(features.labels) == 18 and len(features.paths) == 18
    assert sorted(Path(p).name for p, _ in features.skipped) == ["broken.png", "empty.jpg"]
    cached = extract_features(tiny_model(), images, transform=TRANSFORM, cache_dir=tmp_path / "c", progress=False)
    assert cached.from_cache and len(cached.skipped) == 2  # still reported when read from the cache

    with pytest.warns(UserWarning, match="Skipped 2 unreadable"):
        report = evaluate("knn", tiny_model(), train, splits[1], transform=TRANSFORM, cache_dir=None,
                          progress=False, ks=(3,))
    assert report["data"]["train"]["skipped_unreadable"] == 2
    assert report["data"]["train"]["images"] == 18 and report["data"]["train"]["listed"] == 20


def test_a_split_without_any_readable_image_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="None of the 1 images"):
        extract_features(tiny_model(), image_folder(tmp_path), transform=TRANSFORM, cache_dir=None, progress=False)


def test_file_lists_resolve_relative_paths_and_class_names(splits, tmp_path):
    train = splits[0]
    listing = tmp_path / "list.txt"
    listing.write_text("# path class\ntrain/red/000.png red\n\ntrain/blue/001.png,blue\n")
    images = file_list(listing)
    assert images.classes == ["blue", "red"] and images.labels == [1, 0]
    assert images.paths == [str(train / "red" / "000.png"), str(train / "blue" / "001.png")]
    listing.write_text("train/red/000.png\n")
    with pytest.raises(ValueError, match="expected '<image path> <class name>'"):
        file_list(listing)


def test_empty_splits_and_mismatched_class_folders_are_clear_errors(splits, tmp_path):
    train, val = splits
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_splits(empty, val)
    (empty / "red").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_splits(train, empty)
    (val / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(val / "purple" / "0.png")
    with pytest.raises(ValueError, match="different classes: only in .*train: none; only in .*val: purple"):
        load_splits(train, val)
    with pytest.raises(FileNotFoundError, match="training set .* does not exist"):
        load_splits(tmp_path / "missing", val)


def test_cli_reports_a_wrong_model_path_in_one_line(splits, tmp_path, capsys):
    code = main(["eval", "knn", "--model", str(tmp_path / "no-such-model"), "--train", str(splits[0]),
                 "--val", str(splits[1]), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no-such-model" in err and "does not exist" in err and "Traceback" not in err
