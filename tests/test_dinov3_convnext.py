"""DINOv3 ConvNeXt: dinokit vs transformers' DINOv3ConvNextModel/Backbone and timm's convnext_* (fp32, CPU), the
three checkpoint layouts both ways, presets, Meta's API and the errors for checkpoints of other models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dinokit
from dinokit.checkpoints import CheckpointError
from dinokit.models import dinov3_convnext_keys as keys
from dinokit.models.dinov3_convnext import (
    DINOv3ConvNextBackbone,
    DINOv3ConvNextConfig,
    DINOv3ConvNextModel,
    preset_config,
)

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-5
# The real widths of each variant; depths cut to 1-2 blocks a stage to keep the tests to seconds.
VARIANTS = {
    "tiny": dict(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 3, 1]),
    "small": dict(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 2, 1]),
    "base": dict(hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 2, 1]),
    "large": dict(hidden_sizes=[192, 384, 768, 1536], depths=[1, 1, 2, 1]),
}
SIZES = [(224, 224), (256, 320), (97, 131)]  # the last is not a multiple of 32 (nor of 4)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights under which every block and norm matters: O(1) activations through the convs and linears, and
    layer-scale gains near 1 rather than the 1e-6 init (with which every block would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:  # norm weights and all biases
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(VARIANTS))
def references(request, tmp_path_factory):
    return build_references(request.param, tmp_path_factory.mktemp(request.param))


def build_references(name: str, folder):
    """(dinokit model, transformers Model and Backbone loaded from dinokit's save_pretrained, timm model loaded
    from dinokit's timm-layout weights), all with one set of randomised weights (also used by
    benchmarks/dinov3_parity_table.py)."""
    config = DINOv3ConvNextConfig(**VARIANTS[name])
    ours = randomize(DINOv3ConvNextModel(config), seed=len(name))
    ours.save_pretrained(folder)
    hf_model = transformers.DINOv3ConvNextModel.from_pretrained(folder).eval()
    hf_backbone = transformers.DINOv3ConvNextBackbone.from_pretrained(
        folder, out_features=["stem", "stage1", "stage2", "stage3", "stage4"]).eval()
    ours_backbone = DINOv3ConvNextBackbone.from_pretrained(folder, out_features=hf_backbone.out_features)
    ref = timm.create_model(f"convnext_{name}", depths=config.depths, num_classes=0).eval()
    ref.load_state_dict(keys.from_meta(ours.meta_state_dict(), "timm"), strict=True)
    return ours, ours_backbone, hf_model, hf_backbone, ref


@torch.no_grad()
def test_every_output_matches_transformers_and_timm(references):
    ours, ours_backbone, hf_model, hf_backbone, ref = references
    for height, width in SIZES:
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        a = ours(x, output_hidden_states=True)
        b = hf_model(x, output_hidden_states=True)
        assert a.last_hidden_state.shape == (1, 1 + (height // 32) * (width // 32), ours.config.hidden_sizes[-1])
        assert a.last_hidden_state.std() > 0.5  # the randomised weights give real activations
        assert max_diff(a.last_hidden_state, b.last_hidden_state) <= TOL
        assert max_diff(a.pooler_output, b.pooler_output) <= TOL
        assert len(a.hidden_states) == len(b.hidden_states) == 5
        for mine, theirs in zip(a.hidden_states, b.hidden_states):
            assert max_diff(mine, theirs) <= TOL
        # the Backbone: un-normed stage maps (`stem` is the image itself, as in transformers)
        mine, theirs = ours_backbone(x).feature_maps, hf_backbone(x).feature_maps
        assert len(mine) == len(theirs) == 5
        for m, t in zip(mine, theirs):
            assert max_diff(m, t) <= TOL
        # timm: pooled + final norm (`forward_head(pre_logits=True)`), and every stage's map
        final, maps = ref.forward_intermediates(x, indices=4)
        assert max_diff(a.pooler_output, ref.forward_head(final, pre_logits=True)) <= TOL
        for mine, theirs in zip(a.hidden_states[1:], maps, strict=True):
            assert max_diff(mine, theirs) <= TOL


@torch.no_grad()
def test_return_dict_false_gives_transformers_tuples(references):
    ours, ours_backbone, hf_model, hf_backbone, _ = references
    x = torch.randn(1, 3, 64, 96)
    a = ours(x, return_dict=False, output_hidden_states=True)
    b = hf_model(x, return_dict=False, output_hidden_states=True)
    assert len(a) == len(b) == 3 and isinstance(a[2], tuple)
    assert len(ours(x, return_dict=False)) == len(hf_model(x, return_dict=False)) == 2
    assert len(ours_backbone(x, return_dict=False)) == len(hf_backbone(x, return_dict=False)) == 1
    assert list(ours_backbone(x, output_hidden_states=True).keys()) == ["feature_maps", "hidden_states"]
    assert ours_backbone.num_features == hf_backbone.num_features and ours_backbone.channels == hf_backbone.channels


@torch.no_grad()
def test_backbone_config_selects_stages_and_loads_a_full_model(tmp_path):
    config = DINOv3ConvNextConfig(hidden_sizes=[32, 48, 64, 80], depths=[1, 1, 1, 1],
                                  out_features=["stem", "stage2", "stage4"])
    ours = randomize(DINOv3ConvNextBackbone(config), seed=3)
    ours.save_pretrained(tmp_path)
    assert not any(k.startswith("layer_norm") for k in ours.hf_state_dict())  # transformers' Backbone has none
    theirs = transformers.DINOv3ConvNextBackbone.from_pretrained(tmp_path).eval()
    assert theirs.out_features == ["stem", "stage2", "stage4"] and theirs.out_indices == ours.out_indices
    x = torch.randn(1, 3, 96, 128)
    assert [m.shape for m in ours(x).feature_maps] == [m.shape for m in theirs(x).feature_maps]
    assert max_diff(ours(x).feature_maps[-1], theirs(x).feature_maps[-1]) <= TOL
    # a full model's folder loads as a backbone (its final norm is not needed)
    full = randomize(DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[32, 48, 64, 80], depths=[1, 1, 1, 1])))
    full.save_pretrained(tmp_path / "full")
    backbone = dinokit.AutoBackbone.from_pretrained(tmp_path / "full")
    assert isinstance(backbone, DINOv3ConvNextBackbone)
    assert torch.equal(backbone(x).feature_maps[-1], full(x, output_hidden_states=True).hidden_states[-1])


@torch.no_grad()
def test_transformers_saves_load_in_dinokit_in_both_key_layouts(tmp_path):
    from safetensors.torch import save_file

    small = dict(hidden_sizes=[32, 48, 64, 80], depths=[1, 2, 1, 1])
    theirs = randomize(transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**small)))
    theirs.save_pretrained(tmp_path / "disk")  # what transformers writes: `stages.*`
    ours = dinokit.AutoModel.from_pretrained(tmp_path / "disk")
    assert isinstance(ours, DINOv3ConvNextModel)
    x = torch.randn(2, 3, 256, 320)
    assert max_diff(ours(x).last_hidden_state, theirs(x).last_hidden_state) <= TOL
    # transformers >= 5.5's in-memory names (`model.stages.*`), as some hub files carry them
    memory = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert any(k.startswith("model.stages.") for k in memory)
    (tmp_path / "memory").mkdir()
    save_file(memory, str(tmp_path / "memory" / "model.safetensors"))
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "disk" / "config.json").read_text())
    again = DINOv3ConvNextModel.from_pretrained(tmp_path / "memory")
    assert torch.equal(again(x).last_hidden_state, ours(x).last_hidden_state)


@pytest.fixture(scope="module")
def tiny_model():
    return randomize(DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[32, 48, 64, 80], depths=[1, 2, 1, 1])))


@torch.no_grad()
def test_meta_pth_with_duplicate_norms3_loads_and_is_written_back(tmp_path, tiny_model):
    meta = tiny_model.meta_state_dict()
    assert torch.equal(meta["norms.3.weight"], meta["norm.weight"])  # Meta's duplicate, as in Meta's files
    assert not any(k.startswith(("norms.0", "norms.1", "norms.2")) for k in meta)
    torch.save({"model": meta}, tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    loaded = dinokit.load_checkpoint(tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    assert loaded.config.depths == [1, 2, 1, 1] and loaded.config.hidden_sizes == [32, 48, 64, 80]
    x = torch.randn(2, 3, 96, 160)
    assert torch.equal(loaded(x).last_hidden_state, tiny_model(x).last_hidden_state)
    # a `norms.3` that disagrees with `norm` is not silently preferred: `norm` is the final norm
    meta["norms.3.weight"] = torch.zeros_like(meta["norms.3.weight"])
    torch.save(meta, tmp_path / "edited.pth")
    assert torch.equal(dinokit.load_checkpoint(tmp_path / "edited.pth")(x).pooler_output, tiny_model(x).pooler_output)


@torch.no_grad()
def test_timm_state_dict_loads_and_converts_back(tmp_path, tiny_model):
    ref = timm.create_model("convnext_tiny", depths=[1, 2, 1, 1], dims=[32, 48, 64, 80], num_classes=0).eval()
    ref.load_state_dict(keys.from_meta(tiny_model.meta_state_dict(), "timm"), strict=True)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    loaded = dinokit.load_model(tmp_path / "timm.pth")
    x = torch.randn(1, 3, 128, 128)
    assert torch.equal(loaded(x).pooler_output, tiny_model(x).pooler_output)
    backbone = dinokit.load_model(tmp_path / "timm.pth", task="backbone")
    assert isinstance(backbone, DINOv3ConvNextBackbone)


@pytest.mark.parametrize("target", ["hf", "meta", "timm"])
@torch.no_grad()
def test_convert_command_writes_each_layout_with_the_dinov3_license(tmp_path, tiny_model, target):
    from dinokit.cli import main

    tiny_model.save_pretrained(tmp_path / "src")
    assert "DINOv3 License" in (tmp_path / "src" / "LICENSE.md").read_text()
    assert "license_name: dinov3-license" in (tmp_path / "src" / "README.md").read_text()
    dst = tmp_path / ("out" if target == "hf" else f"out_{target}.pth")
    assert main(["convert", str(tmp_path / "src"), str(dst), "--to", target]) == 0
    x = torch.randn(2, 3, 64, 64)
    if target == "hf":
        assert (dst / "LICENSE.md").is_file()
        reloaded = transformers.DINOv3ConvNextModel.from_pretrained(dst).eval()
        assert max_diff(reloaded(x).last_hidden_state, tiny_model(x).last_hidden_state) <= TOL
        return
    assert "DINOv3 License" in dst.with_name(dst.stem + ".LICENSE.md").read_text()
    state = torch.load(dst, weights_only=True)
    assert keys.detect_layout(state) == target
    assert ("norms.3.weight" in state) == (target == "meta")
    if target == "timm":
        ref = timm.create_model("convnext_tiny", depths=[1, 2, 1, 1], dims=[32, 48, 64, 80], num_classes=0).eval()
        ref.load_state_dict(state, strict=True)
        assert max_diff(ref.forward_head(ref.forward_features(x), pre_logits=True), tiny_model(x).pooler_output) <= TOL
    assert torch.equal(dinokit.load_model(dst)(x).last_hidden_state, tiny_model(x).last_hidden_state)


def test_presets_have_the_released_architectures_and_parameter_counts():
    # transformers' parameter counts of the four released models (spec dinov3.md §1.2)
    expected = {"convnext_tiny": 27_820_128, "convnext_small": 49_454_688, "convnext_base": 87_566_464,
                "convnext_large": 196_230_336}
    for name, count in expected.items():
        with torch.device("meta"):
            model = DINOv3ConvNextModel(preset_config(name))
        assert model.num_parameters() == count, name
    assert preset_config("dinov3_convnext_small").depths == [3, 3, 27, 3]
    assert preset_config("facebook/dinov3-convnext-large-pretrain-lvd1689m").hidden_sizes[-1] == 1536


def test_load_model_preset_and_auto_dispatch(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        model = dinokit.load_model("convnext_tiny", task="backbone")
    assert isinstance(model, DINOv3ConvNextBackbone) and "RANDOMLY INITIALISED" in caplog.text
    config = dinokit.AutoConfig.for_model("dinov3_convnext", depths=[1, 1, 1, 1])
    assert isinstance(dinokit.AutoModel.from_config(config), DINOv3ConvNextModel)
    with pytest.raises(ValueError, match="no 'classification' model"):
        dinokit.AutoModelForImageClassification.from_config(config)
    config.save_pretrained(tmp_path)
    assert dinokit.AutoConfig.from_pretrained(tmp_path) == config
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.depths == [1, 1, 1, 1] and theirs.model_type == "dinov3_convnext"
    assert json.loads((tmp_path / "config.json").read_text())["stage_names"][-1] == "stage4"


@torch.no_grad()
def test_meta_api_forward_features_and_get_intermediate_layers(tiny_model):
    x = torch.randn(2, 3, 96, 128)
    out = tiny_model(x, output_hidden_states=True)
    features = tiny_model.forward_features(x)
    assert torch.equal(features["x_norm_clstoken"], out.pooler_output)
    assert torch.equal(features["x_norm_patchtokens"], out.last_hidden_state[:, 1:])
    assert features["x_storage_tokens"].shape == (2, 0, 80)
    assert torch.equal(features["x_prenorm"], out.hidden_states[-1].flatten(2).transpose(1, 2))
    assert torch.equal(tiny_model.convnext(x), out.pooler_output)
    maps = tiny_model.get_intermediate_layers(x, n=4, reshape=True, norm=False)
    for mine, ref in zip(maps, out.hidden_states[1:], strict=True):
        assert torch.equal(mine, ref)
    (patches, cls_token, extra), = tiny_model.get_intermediate_layers(x, n=[3], return_class_token=True,
                                                                     return_extra_tokens=True)
    assert torch.equal(patches, out.last_hidden_state[:, 1:]) and extra.shape == (2, 0, 80)
    assert torch.allclose(cls_token, out.pooler_output, atol=1e-6)
    first, = tiny_model.get_intermediate_layers(x, n=[0], norm=True)  # stages 1-3: no norm, as Meta's `norms`
    assert torch.equal(first, out.hidden_states[1].flatten(2).transpose(1, 2))
    with pytest.raises(TypeError):
        tiny_model.get_intermediate_layers(x, 1)  # keyword-only, as Meta's DINOv3


def test_checkpoints_of_other_models_give_one_clear_error(tmp_path, tiny_model):
    small = dinokit.Dinov2Model(dinokit.Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                                     patch_size=14, image_size=56))
    small.save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError, match="not a DINOv3 ConvNeXt checkpoint"):
        DINOv3ConvNextModel.from_pretrained(tmp_path / "vit", config=DINOv3ConvNextConfig(depths=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match="model_type 'dinov2'.*AutoConfig"):
        DINOv3ConvNextModel.from_pretrained(tmp_path / "vit")
    tiny_model.save_pretrained(tmp_path / "cnx")
    other = DINOv3ConvNextConfig(hidden_sizes=[32, 48, 64, 80], depths=[3, 3, 9, 3])
    with pytest.raises(CheckpointError, match=r"depths \[3, 3, 9, 3\].*checkpoint has depths \[1, 2, 1, 1\]"):
        DINOv3ConvNextModel.from_pretrained(tmp_path / "cnx", config=other)
    with pytest.raises(CheckpointError, match="no classification head"):
        torch.save(tiny_model.meta_state_dict(), tmp_path / "cnx.pth")
        dinokit.load_checkpoint(tmp_path / "cnx.pth", head=tmp_path / "cnx.pth")
    with pytest.raises(ValueError, match="at least 32x32"):
        tiny_model(torch.zeros(1, 3, 16, 64))
