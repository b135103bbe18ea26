"""Every checkpoint loader refuses pickled code, and a checkpoint reloads as the model it was, or says it can't."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit import Dinov2Config, Dinov2Model
from dinokit.checkpoints import CheckpointError, read_state_dict
from dinokit.loading import convert, load_checkpoint, load_model
from ssl_helpers import TINY, make_images

from helpers import images, max_diff, randomize_


class _Payload:
    """Unpickling this runs `touch MARKER`: the attack a weights_only=False load lets through."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, **extra) -> Path:
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "payload": _Payload(marker), **extra}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickled payload was executed"


def _three_head_model(width: int = 96) -> Dinov2Model:
    config = Dinov2Config(hidden_size=width, num_hidden_layers=2, num_attention_heads=3, image_size=56,
                          patch_size=14)
    return randomize_(Dinov2Model(config)).eval()


# ------------------------------------------------------------------------------------------ pickled payloads
@pytest.mark.parametrize("name", ["backbone.pth", "pytorch_model.bin", "teacher_checkpoint.pth"])
def test_backbone_file_with_pickled_code_is_refused_naming_the_code(tmp_path, marker, name):
    path = _plant(tmp_path / name, marker)
    with pytest.raises(CheckpointError, match=r"pickled Python code .*posix\.system"):
        load_model(path)


def test_hf_directory_whose_bin_holds_pickled_code_is_refused(tmp_path, marker):
    _three_head_model().save_pretrained(tmp_path / "hf", safe_serialization=False)
    _plant(tmp_path / "hf" / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="pickled Python code"):
        load_model(tmp_path / "hf")


def test_linear_head_file_with_pickled_code_is_refused(tmp_path, marker):
    backbone = tmp_path / "backbone.pth"
    convert(_save_hf(tmp_path), backbone, to="meta")
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(10, 192), "bias": _Payload(marker)}, head)
    with pytest.raises(CheckpointError, match="pickled Python code"):
        load_checkpoint(backbone, head=head)


def test_resume_from_a_checkpoint_with_pickled_code_is_refused(tmp_path, marker):
    from dinokit.ssl.trainer import train

    run, data = tmp_path / "run", make_images(tmp_path / "images", n=8)
    train("cpu_tiny_cifar", data, run, overrides=TINY + ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=1"],
          progress=False)
    _plant(run / "checkpoint.pth", marker, config={}, kind="ssl")
    with pytest.raises(CheckpointError, match="pickled Python code"):
        train(None, data, run, resume=True, progress=False)


def test_distill_teacher_checkpoint_with_pickled_code_is_refused(tmp_path, marker):
    from dinokit.ssl.distill import build_distill_arch
    from dinokit.ssl.train_config import load_train_config

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    _plant(teacher / "checkpoint.pth", marker, config={}, kind="ssl")
    cfg = load_train_config("cpu_tiny_cifar", TINY + ["distill.teacher=" + str(teacher)])
    with pytest.raises(CheckpointError, match="pickled Python code"):
        build_distill_arch(cfg, "cpu")


def test_feature_cache_entry_with_a_pickled_object_array_is_recomputed_not_unpickled(tmp_path, marker):
    from dinokit.eval.data import image_folder
    from dinokit.eval.features import extract_features
    from dinokit.processing import eval_transform

    for label in ("a", "b"):
        make_images(tmp_path / "data" / label, n=3, size=28)
    images = image_folder(tmp_path / "data")
    model, transform, cache = _three_head_model(), eval_transform(resize=32, crop=28), tmp_path / "cache"
    first = extract_features(model, images, transform=transform, cache_dir=cache, progress=False)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    np.save(entry / "labels.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    again = extract_features(model, images, transform=transform, cache_dir=cache, progress=False)
    assert not again.from_cache
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_array_equal(again.cls_blocks, first.cls_blocks)


@pytest.mark.parametrize("header", [struct.pack("<Q", 2 ** 62) + b"{}", struct.pack("<Q", 10) + b"not json!!",
                                    b"\x01\x02"], ids=["huge-length", "malformed", "too-short"])
def test_safetensors_with_a_broken_header_is_a_clear_error(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(header|too)"):
        read_state_dict(path)


def test_truncated_checkpoint_says_truncated_not_pickled(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save(_three_head_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)


# ------------------------------------------------------------------------------------------ head count
def _save_hf(tmp_path: Path) -> Path:
    model = _three_head_model()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("layout,name", [("meta", "backbone.pth"), ("timm", "backbone.safetensors")])
def test_converted_file_of_a_three_head_model_reloads_with_three_heads(tmp_path, layout, name):
    source = _save_hf(tmp_path)
    expected = load_model(source)(images(1, 56, 56)).pooler_output
    convert(source, tmp_path / name, to=layout)
    reloaded = load_model(tmp_path / name)
    assert reloaded.config.num_attention_heads == 3
    assert max_diff(reloaded(images(1, 56, 56)).pooler_output, expected) < 1e-5


def test_file_of_a_non_standard_width_without_a_config_is_refused_not_guessed(tmp_path):
    from dinokit.checkpoints import meta_to_timm

    model = _three_head_model()
    backbone, _ = model.meta_state_dict()
    torch.save(backbone, tmp_path / "meta.pth")
    torch.save(meta_to_timm(backbone), tmp_path / "timm.pth")
    for name in ("meta.pth", "timm.pth"):
        with pytest.raises(CheckpointError, match=r"attention heads.*96.*num_attention_heads"):
            load_model(tmp_path / name)


def test_config_beside_the_file_gives_the_head_count(tmp_path):
    model = _three_head_model()
    backbone, _ = model.meta_state_dict()
    torch.save(backbone, tmp_path / "meta.pth")
    (tmp_path / "meta.config.json").write_text('{"num_attention_heads": 3}')
    reloaded = load_model(tmp_path / "meta.pth")
    assert reloaded.config.num_attention_heads == 3
    x = images(1, 56, 56)
    model.config.interpolate_offset, model.config.interpolate_antialias = 0.1, False  # Meta file semantics
    assert max_diff(reloaded(x).pooler_output, model(x).pooler_output) < 1e-5


def test_explicit_head_count_overrides_the_file(tmp_path):
    backbone, _ = _three_head_model().meta_state_dict()
    torch.save(backbone, tmp_path / "meta.pth")
    assert load_checkpoint(tmp_path / "meta.pth", num_attention_heads=3).config.num_attention_heads == 3


def test_official_widths_keep_dinov2s_64_wide_heads(tmp_path):
    config = Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, image_size=28, patch_size=14)
    backbone, _ = Dinov2Model(config).meta_state_dict()
    torch.save(backbone, tmp_path / "vits.pth")
    assert load_model(tmp_path / "vits.pth").config.num_attention_heads == 6


def test_training_checkpoint_loads_as_its_backbone_with_the_trained_head_count(tmp_path):
    from dinokit.ssl.trainer import train

    run = tmp_path / "run"
    train("cpu_tiny_cifar", make_images(tmp_path / "images", n=8), run,
          overrides=TINY + ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=1"], progress=False)
    from_checkpoint = load_model(run / "checkpoint.pth")
    exported = load_model(run / "teacher")
    assert from_checkpoint.config.num_attention_heads == exported.config.num_attention_heads == 2
    x = images(1, 16, 16)
    assert max_diff(from_checkpoint(x).pooler_output, exported(x).pooler_output) < 1e-5
    assert torch.load(run / "checkpoint.pth", weights_only=True)["iteration"] == 1  # plain, safe types only


# ------------------------------------------------------------------------------------------ presets
def test_preset_typo_fails_at_once_naming_the_presets(monkeypatch):
    def hub(*args, **kwargs):
        raise AssertionError("a preset typo was sent to the hub (slow retries, then a confusing error)")

    monkeypatch.setattr(Dinov2Model, "from_pretrained", hub)  # at once = without asking the hub
    with pytest.raises(ValueError, match=r"vits41.*did you mean 'vits14'"):
        load_model("vits41")


def test_preset_name_says_it_has_random_weights(caplog):
    with caplog.at_level("WARNING"):
        load_model("vits14")
    assert "randomly initialised" in caplog.text.lower() and "vits14" in caplog.text
