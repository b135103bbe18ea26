"""dinokit vs transformers on the same random weights: every output within 1e-5, both save/load directions."""

from __future__ import annotations

import pytest
import torch

import dinokit

from helpers import images, max_diff, randomize_, small_config

transformers = pytest.importorskip("transformers")

SIZES = [(224, 224), (518, 518), (224, 308)]
TOL = 1e-5


def _pair(tmp_path, model_cls, hf_cls, config, eager=False, seed=0):
    ours = randomize_(model_cls(config), seed).eval()
    ours.save_pretrained(tmp_path)
    kwargs = {"attn_implementation": "eager"} if eager else {"attn_implementation": "sdpa"}
    theirs = hf_cls.from_pretrained(str(tmp_path), **kwargs).eval()
    return ours, theirs


@pytest.fixture(scope="module", params=[0, 4], ids=["plain", "reg4"])
def base_pair(request, tmp_path_factory):
    config = small_config(registers=request.param)
    return _pair(tmp_path_factory.mktemp("base"), dinokit.Dinov2Model, transformers.AutoModel, config, eager=True)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_base_model_every_output_matches_transformers(base_pair, size):
    ours, theirs = base_pair
    x = images(2, *size)
    with torch.no_grad():
        a = ours(x, output_hidden_states=True, output_attentions=True)
        b = theirs(pixel_values=x, output_hidden_states=True, output_attentions=True)
    assert type(theirs).__name__ == ("Dinov2WithRegistersModel" if ours.config.num_register_tokens else "Dinov2Model")
    assert max_diff(a.last_hidden_state, b.last_hidden_state) < TOL
    assert max_diff(a.pooler_output, b.pooler_output) < TOL
    assert len(a.hidden_states) == ours.config.num_hidden_layers + 1
    assert max_diff(a.hidden_states, b.hidden_states) < TOL
    assert max_diff(a.attentions, b.attentions) < TOL


def test_masked_positions_match_transformers(base_pair):
    ours, theirs = base_pair
    x = images(2, 224, 224, seed=1)
    mask = torch.rand(2, 256, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        a = ours(x, bool_masked_pos=mask).last_hidden_state
        b = theirs(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        unmasked = ours(x).last_hidden_state
    assert max_diff(a, b) < TOL
    assert max_diff(a, unmasked) > 1e-3  # the mask token really replaced patches


def test_sdpa_path_matches_transformers_sdpa(tmp_path):
    ours, theirs = _pair(tmp_path, dinokit.Dinov2Model, transformers.AutoModel, small_config(swiglu=True))
    x = images(2, 224, 308)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, theirs(pixel_values=x).last_hidden_state) < TOL


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
def test_classifier_logits_and_loss_match_transformers(tmp_path, registers):
    config = small_config(registers=registers, num_labels=7)
    ours, theirs = _pair(tmp_path, dinokit.Dinov2ForImageClassification,
                         transformers.AutoModelForImageClassification, config, eager=True)
    labels = torch.tensor([3, 6])
    for size in SIZES:
        x = images(2, *size, seed=2)
        with torch.no_grad():
            a = ours(x, labels=labels, output_hidden_states=True, output_attentions=True)
            b = theirs(pixel_values=x, labels=labels, output_hidden_states=True, output_attentions=True)
        assert max_diff(a.logits, b.logits) < TOL
        assert abs(a.loss.item() - b.loss.item()) < TOL
        assert max_diff(a.hidden_states, b.hidden_states) < TOL
        assert max_diff(a.attentions, b.attentions) < TOL


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
@pytest.mark.parametrize("apply_layernorm,reshape", [(True, True), (False, False)])
def test_backbone_feature_maps_match_transformers(tmp_path, registers, apply_layernorm, reshape):
    config = small_config(registers=registers, out_features=["stem", "stage1", "stage3"],
                          apply_layernorm=apply_layernorm, reshape_hidden_states=reshape)
    # transformers' AutoBackbone asks the Hub whether the path is a repo; its concrete classes load offline.
    hf_cls = transformers.Dinov2WithRegistersBackbone if registers else transformers.Dinov2Backbone
    ours, theirs = _pair(tmp_path, dinokit.AutoBackbone.from_config, hf_cls, config)
    assert ours.channels == list(theirs.channels)
    for size in SIZES:
        x = images(1, *size, seed=3)
        with torch.no_grad():
            a = ours(x, output_hidden_states=True)
            b = theirs(pixel_values=x, output_hidden_states=True)
        assert len(a.feature_maps) == 3
        if reshape:
            assert a.feature_maps[0].shape == (1, 128, size[0] // 14, size[1] // 14)
        assert max_diff(a.feature_maps, b.feature_maps) < TOL
        assert max_diff(a.hidden_states, b.hidden_states) < TOL


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
def test_transformers_checkpoint_loads_in_dinokit(tmp_path, registers):
    """The other direction: transformers' own init and save_pretrained, read by dinokit."""
    hf_config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    hf_config = hf_config_cls(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518,
                              patch_size=14, num_labels=3)
    hf_cls = (transformers.Dinov2WithRegistersForImageClassification if registers
              else transformers.Dinov2ForImageClassification)
    theirs = randomize_(hf_cls(hf_config), seed=5).eval()
    theirs.save_pretrained(tmp_path)
    ours = dinokit.AutoModelForImageClassification.from_pretrained(tmp_path)
    base = dinokit.AutoModel.from_pretrained(tmp_path)  # a classifier checkpoint loads as the base model too
    x = images(2, 224, 308, seed=4)
    with torch.no_grad():
        assert max_diff(ours(x).logits, theirs(pixel_values=x).logits) < TOL
        assert max_diff(base(x).last_hidden_state, theirs.base_model(pixel_values=x).last_hidden_state) < TOL
    assert ours.config.num_register_tokens == registers
    assert ours.config.interpolate_antialias == bool(registers)  # transformers >= 4.45 defaults


def test_return_dict_false_gives_tuples_like_transformers(base_pair):
    ours, theirs = base_pair
    x = images(1, 224, 224)
    with torch.no_grad():
        a = ours(x, return_dict=False, output_hidden_states=True)
        b = theirs(pixel_values=x, return_dict=False, output_hidden_states=True)
    assert isinstance(a, tuple) and len(a) == len(b) == 3
    assert max_diff(a[0], b[0]) < TOL and max_diff(a[2], b[2]) < TOL


def test_sharded_save_round_trips_through_transformers(tmp_path):
    ours = randomize_(dinokit.Dinov2Model(small_config()), seed=7).eval()
    ours.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    theirs = transformers.AutoModel.from_pretrained(tmp_path).eval()
    again = dinokit.AutoModel.from_pretrained(tmp_path)
    x = images(1, 224, 224)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, theirs(pixel_values=x).last_hidden_state) < TOL
        assert max_diff(ours(x).last_hidden_state, again(x).last_hidden_state) == 0.0


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    ours = randomize_(dinokit.Dinov2Model(small_config()), seed=8).eval()
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    again = dinokit.AutoModel.from_pretrained(tmp_path)
    x = images(1, 224, 224)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, again(x).last_hidden_state) == 0.0
