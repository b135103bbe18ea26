"""torch.jit.trace as in the transformers docs, and clear errors on bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import dinokit
from dinokit.checkpoints import CheckpointError
from dinokit.hub import HubError
from dinokit.loading import load_checkpoint

from helpers import images, max_diff, randomize_, small_config


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
def test_trace_matches_eager_and_is_reused_at_another_resolution(registers):
    model = randomize_(dinokit.Dinov2Model(small_config(registers=registers)), seed=31).eval()
    model.config.return_dict = False
    x = images(2, 224, 224, seed=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, [x])
    with torch.no_grad():
        for size in [(224, 224), (518, 518), (224, 308)]:
            y = images(1, *size, seed=33)
            eager = model(y)
            got = traced(y)
            assert isinstance(got, tuple) and len(got) == 2
            assert max_diff(got[0], eager[0]) <= 1e-5, size
            assert max_diff(got[1], eager[1]) <= 1e-5, size


def test_cached_position_embeddings_follow_weight_updates():
    model = randomize_(dinokit.Dinov2Model(small_config()), seed=34).eval()
    x = images(1, 224, 224)
    with torch.no_grad():
        before = model(x).last_hidden_state
        assert model(x).last_hidden_state.equal(before)  # second call served from the cache
        model.vit.pos_embed.mul_(2.0)  # in-place update bumps the version: cache must not serve stale grids
        after = model(x).last_hidden_state
    fresh = dinokit.Dinov2Model(model.config)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_diff(after, fresh.eval()(x).last_hidden_state) == 0.0
        assert max_diff(after, before) > 1e-3


def test_a_model_cast_inside_inference_mode_runs_and_follows_in_place_updates():
    import copy

    model = randomize_(dinokit.Dinov2Model(small_config()), seed=35).eval()
    x = images(1, 56, 70, seed=36)  # not the native grid: the position table is resampled
    with torch.no_grad():
        reference = model.double()(x.double()).last_hidden_state
    model.float()
    with torch.inference_mode():
        cast = copy.deepcopy(model).double()  # its tables are inference tensors: no version counter
        assert max_diff(cast(x.double()).last_hidden_state, reference) == 0.0
        cast.vit.pos_embed.mul_(2.0)
        assert max_diff(cast(x.double()).last_hidden_state, reference) > 1e-3  # not a stale cached grid


def test_wrong_channel_count_is_a_clear_error():
    model = dinokit.Dinov2Model(small_config())
    with pytest.raises(ValueError, match=r"expected pixel_values of shape \(batch, 3, height, width\)"):
        model(torch.zeros(1, 1, 224, 224))
    with pytest.raises(ValueError, match="expected pixel_values"):
        model(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="You have to specify pixel_values"):
        model()


def test_checkpoint_of_another_architecture_lists_the_mismatch(tmp_path):
    dinokit.Dinov2Model(small_config(hidden_size=64, num_attention_heads=1)).save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"shape mismatches \[.*cls_token"):
        dinokit.AutoModel.from_pretrained(tmp_path / "small", config=small_config())
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a DINOv2 checkpoint"):
        load_checkpoint(tmp_path / "resnet.pth")
    deeper = dinokit.Dinov2Model(small_config(num_hidden_layers=4))
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[blocks\.3\."):
        dinokit.AutoModel.from_pretrained(tmp_path / "deeper", config=small_config())
    # strict=False is the explicit opt-in
    partial = dinokit.AutoModel.from_pretrained(tmp_path / "deeper", config=small_config(), strict=False)
    assert partial.config.num_hidden_layers == 3


def test_config_of_another_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit", "hidden_size": 768}')
    with pytest.raises(ValueError, match="model_type 'vit'"):
        dinokit.AutoModel.from_pretrained(tmp_path)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    model = dinokit.Dinov2Model(small_config())
    model.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        dinokit.AutoModel.from_pretrained(tmp_path)
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "garbage.pth")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dinokit.AutoModel.from_pretrained(tmp_path / "nowhere" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        dinokit.AutoModel.from_pretrained(tmp_path / "empty")


def test_unreachable_hub_id_names_the_id_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"facebook/dinov2-nonexistent-xyz.*local directory"):
        dinokit.AutoModel.from_pretrained("facebook/dinov2-nonexistent-xyz")


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    model = dinokit.Dinov2Model(small_config())
    from dinokit import checkpoints

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_file_atomic", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
