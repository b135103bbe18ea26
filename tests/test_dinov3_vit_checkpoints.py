"""DINOv3 ViT checkpoints in the three layouts, both ways; presets; Meta's API on the transformers-style classes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dinokit
from dinokit import checkpoints_dinov3 as ckpt3
from dinokit.loading import convert, load_checkpoint, load_model
from dinokit.models.dinov3_vit import (
    PRESETS,
    DINOv3ViTBackbone,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    preset_config,
)

from helpers import images, max_diff, randomize_

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-5


def _small(gated: bool = False, bias: bool = True, **kw) -> DINOv3ViTConfig:
    extra = dict(use_gated_mlp=True, hidden_act="silu") if gated else {}
    return DINOv3ViTConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=2, intermediate_size=1536,
                           num_register_tokens=4, query_bias=bias, value_bias=bias, **extra, **kw)


def _ours(config: DINOv3ViTConfig, seed: int = 0) -> DINOv3ViTModel:
    model = randomize_(DINOv3ViTModel(config), seed).eval()
    model.vit._unmasked_bias_fixup()  # the key bias is zero by construction in every layout
    return model


def test_save_pretrained_loads_in_transformers_and_back_with_the_licence_notice(tmp_path):
    ours = _ours(_small(gated=True))
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "dinov3_vit" and config["architectures"] == ["DINOv3ViTModel"]
    assert "DINOv3 License" in (tmp_path / "ours" / "LICENSE.md").read_text()
    keys = set(load_file(tmp_path / "ours" / "model.safetensors"))
    assert "model.layer.0.attention.q_proj.bias" in keys and "model.layer.0.attention.k_proj.bias" not in keys
    theirs = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "ours").eval()
    x = images(1, 256, 320)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, theirs(pixel_values=x).last_hidden_state) < TOL
    theirs.save_pretrained(tmp_path / "theirs")
    back = dinokit.AutoModel.from_pretrained(tmp_path / "theirs")
    assert type(back) is DINOv3ViTModel and back.config.rope_periods == "fp32"
    with torch.no_grad():
        assert max_diff(back(x).last_hidden_state, ours(x).last_hidden_state) == 0
    assert type(dinokit.AutoBackbone.from_pretrained(tmp_path / "theirs")) is DINOv3ViTBackbone


def test_transformers_4x_layer_keys_load_as_well(tmp_path):
    ours = _ours(_small())
    legacy = ckpt3.normal_to_hf(ours.meta_state_dict()[0], legacy=True)
    assert "layer.0.attention.o_proj.weight" in legacy and not any(k.startswith("model.") for k in legacy)
    save_file({k: v.contiguous() for k, v in legacy.items()}, tmp_path / "model.safetensors")
    ours.config.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    x = images(1, 224, 224)
    with torch.no_grad():
        assert max_diff(loaded(x).last_hidden_state, ours(x).last_hidden_state) == 0


@pytest.mark.parametrize("bias", [True, False], ids=["qkvb", "no-qkv-bias"])
def test_timm_layout_both_ways(tmp_path, bias):
    ours = _ours(_small(gated=True, bias=bias))
    convert_src = tmp_path / "hf"
    ours.save_pretrained(convert_src)
    out = convert(convert_src, tmp_path / "timm.safetensors", to="timm")
    assert "DINOv3 License" in (tmp_path / "timm.LICENSE.md").read_text()
    name = "vit_small_plus_patch16_dinov3_qkvb" if bias else "vit_small_plus_patch16_dinov3"
    reference = timm.create_model(name, pretrained=False, depth=2, num_classes=0).eval()
    reference.load_state_dict(load_file(out), strict=True)
    x = images(1, 224, 288)
    with torch.no_grad():
        assert max_diff(reference.forward_features(x), ours(x).last_hidden_state) < TOL
    # timm's own state dict (its key names, no mask token, k_bias buffer not saved) read by dinokit
    torch.save(reference.state_dict(), tmp_path / "from_timm.pth")
    loaded = load_checkpoint(tmp_path / "from_timm.pth")
    assert loaded.config.query_bias is bias and loaded.config.use_gated_mlp and loaded.config.rope_periods == "fp32"
    with torch.no_grad():
        assert max_diff(loaded(x).last_hidden_state, reference.forward_features(x)) < TOL


def test_meta_layout_both_ways_keeps_meta_keys_and_the_periods_choice(tmp_path):
    ours = _ours(_small(gated=True, untie_global_and_local_cls_norm=True, rope_periods="bf16"))
    ours.save_pretrained(tmp_path / "hf")
    # the hf directory cannot hold local_cls_norm or periods: they come back from the config
    out = convert(tmp_path / "hf", tmp_path / "dinov3_vits16plus.pth", to="meta")
    meta = torch.load(out, weights_only=True)
    assert {"storage_tokens", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask", "blocks.0.mlp.w1.weight",
            "blocks.0.mlp.w2.weight", "blocks.0.mlp.w3.weight", "blocks.0.ls1.gamma"} <= set(meta)
    assert meta["mask_token"].shape == (1, 384)
    assert meta["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * 384 + [0.0] * 384 + [1.0] * 384
    assert meta["rope_embed.periods"][1].item() == 1.3359375  # bf16 values, as Meta's files
    back = load_checkpoint(out)
    assert back.config.rope_periods == "bf16"
    x = images(1, 224, 224)
    with torch.no_grad():
        assert max_diff(back(x).last_hidden_state, ours(x).last_hidden_state) == 0


def test_meta_file_of_the_7b_kind_loads_without_qkv_bias_and_with_its_own_local_cls_norm(tmp_path):
    """7B's Meta layout: no qkv bias (hence no bias_mask), SwiGLU, `local_cls_norm` stored in the file, bf16
    periods; what is read is what was written, the untied norm included (not re-initialised)."""
    ours = _ours(_small(gated=True, bias=False, untie_global_and_local_cls_norm=True, rope_periods="bf16"), seed=3)
    meta = ckpt3.normal_to_meta(ours.meta_state_dict()[0])
    assert not any("qkv.bias" in k for k in meta) and "local_cls_norm.weight" in meta
    path = tmp_path / "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"
    torch.save(meta, path)
    back = load_checkpoint(path)
    assert back.config.query_bias is False and back.config.value_bias is False
    assert back.config.untie_global_and_local_cls_norm and back.config.rope_periods == "bf16"
    for key in ("weight", "bias"):
        assert torch.equal(getattr(back.vit.local_cls_norm, key), meta[f"local_cls_norm.{key}"])
    x = images(1, 224, 240)
    with torch.no_grad():
        assert max_diff(back(x).last_hidden_state, ours(x).last_hidden_state) == 0


def test_a_meta_sat493m_file_carries_the_satellite_normalisation(tmp_path):
    from dinokit.models.dinov3_vit import IMAGENET_MEAN, SAT_MEAN, SAT_STD

    meta = ckpt3.normal_to_meta(_ours(_small(untie_global_and_local_cls_norm=True)).meta_state_dict()[0])
    sat = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(meta, sat)
    config = load_checkpoint(sat).config
    assert (config.image_mean, config.image_std) == (list(SAT_MEAN), list(SAT_STD))
    assert load_checkpoint(sat, image_mean=list(IMAGENET_MEAN)).config.image_mean == list(IMAGENET_MEAN)
    lvd = tmp_path / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    torch.save(meta, lvd)
    assert getattr(load_checkpoint(lvd).config, "image_mean", None) in (None, list(IMAGENET_MEAN))


def test_periods_of_another_formula_are_refused_with_the_fix(tmp_path):
    meta = ckpt3.normal_to_meta(_ours(_small()).meta_state_dict()[0])
    meta["rope_embed.periods"] = torch.linspace(1, 50, 16)
    torch.save(meta, tmp_path / "odd.pth")
    with pytest.raises(ckpt3.CheckpointError, match="rope_theta"):
        load_checkpoint(tmp_path / "odd.pth")


def test_presets_have_the_released_shapes_and_normalisation():
    expected = {"dinov3_vits16": (384, 12, 6, 1536, False), "dinov3_vits16plus": (384, 12, 6, 1536, True),
                "dinov3_vitb16": (768, 12, 12, 3072, False), "dinov3_vitl16": (1024, 24, 16, 4096, False),
                "dinov3_vith16plus": (1280, 32, 20, 5120, True), "dinov3_vit7b16": (4096, 40, 32, 8192, True),
                "dinov3_vitl16_sat493m": (1024, 24, 16, 4096, False),
                "dinov3_vit7b16_sat493m": (4096, 40, 32, 8192, True)}
    assert set(PRESETS) == set(expected)
    for name, (dim, depth, heads, hidden, gated) in expected.items():
        c = preset_config(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                c.use_gated_mlp) == (dim, depth, heads, hidden, gated), name
        assert c.num_register_tokens == 4 and c.layer_norm_eps == 1e-5 and c.patch_size == 16
        assert c.query_bias is ("7b" not in name)
        assert c.untie_global_and_local_cls_norm is ("7b" in name or "sat" in name)
        assert c.image_mean == ([0.430, 0.411, 0.296] if "sat" in name else [0.485, 0.456, 0.406])
    small = load_model("dinov3_vits16")
    # Meta's count (the zero key bias included): dinov3.md §1.1
    assert sum(p.numel() for p in small.parameters()) == 21_601_152
    assert type(load_model("dinov3_vits16", task="backbone")) is DINOv3ViTBackbone


def test_meta_api_on_the_transformers_style_class():
    model = _ours(_small())
    x = images(2, 224, 256)
    feats = model.forward_features(x)
    assert feats["x_norm_clstoken"].shape == (2, 384) and feats["x_storage_tokens"].shape == (2, 4, 384)
    assert feats["x_norm_patchtokens"].shape == (2, 14 * 16, 384) and feats["x_prenorm"].shape == (2, 229, 384)
    with torch.no_grad():
        last = model(x).last_hidden_state
    assert max_diff(feats["x_norm_patchtokens"], last[:, 5:]) < 1e-5  # autograd vs fused no-grad path
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, return_extra_tokens=True)
    assert len(layers) == 2 and layers[1][0].shape == (2, 384, 14, 16)
    assert layers[1][1].shape == (2, 384) and layers[1][2].shape == (2, 4, 384)
    assert max_diff(layers[1][1], last[:, 0]) < 1e-5
    # n as a list of 0-based blocks, norm=False: the raw block output (transformers' hidden_states[i + 1])
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        (raw,) = model.get_intermediate_layers(x, n=[0], norm=False)
    assert max_diff(raw, hidden[1][:, 5:]) < 1e-5 and max_diff(raw, hidden[2][:, 5:]) > 1e-3
    with pytest.raises(TypeError):
        model.get_intermediate_layers(x, 2)  # keyword-only, as Meta's DINOv3


def test_local_cls_norm_is_used_for_local_crops_in_training_only():
    model = _ours(_small(untie_global_and_local_cls_norm=True))
    with torch.no_grad():
        model.vit.local_cls_norm.weight.fill_(2.0)
    crops = [images(1, 224, 224), images(1, 96, 96, seed=1)]
    model.train()
    global_out, local_out = model.vit.forward_features(crops)
    assert max_diff(local_out["x_norm_clstoken"], model.vit.norm(local_out["x_prenorm"])[:, 0]) > 0.1
    assert max_diff(global_out["x_norm_clstoken"], model.vit.norm(global_out["x_prenorm"])[:, 0]) < 1e-6
    model.eval()
    _, local_eval = model.vit.forward_features(crops)
    assert max_diff(local_eval["x_norm_clstoken"], model.vit.norm(local_eval["x_prenorm"])[:, 0]) < 1e-6


def test_rope_tables_are_cached_per_grid_at_inference_and_follow_the_periods():
    model = _ours(_small())
    rope = model.vit.rope_embed
    assert rope(14, 14)[0] is rope(14, 14)[0] and rope(14, 16)[0] is not rope(14, 14)[0]
    before = rope(14, 14)[1].clone()
    rope.reset_periods("bf16")
    assert rope.periods[1].item() == 1.3359375 and max_diff(rope(14, 14)[1], before) > 1e-4
    model.train()
    assert rope(14, 14)[0] is not rope(14, 14)[0]  # training: rescaled coordinates, drawn per forward


def test_key_bias_gets_no_gradient_in_training():
    model = _ours(_small())
    model.train()
    model(images(1, 64, 64)).last_hidden_state.sum().backward()
    grad = model.vit.blocks[0].attn.qkv.bias.grad
    assert grad[384:768].abs().max() == 0 and grad[:384].abs().max() > 0


def test_families_refuse_each_others_configs():
    with pytest.raises(TypeError, match="DINOv3ViTConfig"):
        DINOv3ViTModel(dinokit.Dinov2Config())
    with pytest.raises(TypeError, match="Dinov2Config"):
        dinokit.Dinov2Model(DINOv3ViTConfig())
    model = dinokit.AutoModel.from_config(DINOv3ViTConfig(num_hidden_layers=1, num_register_tokens=4))
    assert type(model) is DINOv3ViTModel
