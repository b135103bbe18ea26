"""Building blocks (drop path variants, SwiGLU, fused linear) and the config's transformers compatibility."""

from __future__ import annotations

import json

import pytest
import torch

import dinokit
from dinokit.config import Dinov2Config, preset_config
from dinokit.layers import Block, drop_add_residual_stochastic_depth, swiglu_hidden_features
from dinokit.layers import linear as fused

from helpers import images, max_diff, randomize_, small_config

# facebook/dinov2-small and facebook/dinov2-with-registers-giant config.json, as published on the Hub.
HUB_SMALL = {"architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
             "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 384, "image_size": 518,
             "initializer_range": 0.02, "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
             "model_type": "dinov2", "num_attention_heads": 6, "num_channels": 3, "num_hidden_layers": 12,
             "patch_size": 14, "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
             "use_swiglu_ffn": False}
HUB_REG_GIANT = {**HUB_SMALL, "architectures": ["Dinov2WithRegistersModel"], "hidden_size": 1536,
                 "num_attention_heads": 24, "num_hidden_layers": 40, "use_swiglu_ffn": True,
                 "model_type": "dinov2_with_registers", "num_register_tokens": 4, "interpolate_antialias": True,
                 "interpolate_offset": 0.0}


@pytest.mark.parametrize("name,hub", [("vits14", HUB_SMALL), ("vitg14_reg4", HUB_REG_GIANT)])
def test_presets_equal_the_hub_configs(name, hub):
    ours = preset_config(name)
    from_hub = Dinov2Config.from_dict(hub)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size", "patch_size",
                "use_swiglu_ffn", "num_register_tokens", "interpolate_offset", "interpolate_antialias",
                "layerscale_value", "layer_norm_eps", "model_type"):
        assert getattr(ours, key) == getattr(from_hub, key), key


def test_hub_config_without_interpolation_keys_selects_transformers_size_mode():
    config = Dinov2Config.from_dict(HUB_SMALL)
    assert config.interpolate_offset == 0.0 and config.interpolate_antialias is False


def test_config_json_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = preset_config("vitb14_reg4", out_features=["stage2", "stage12"], num_labels=3)
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert theirs.model_type == "dinov2_with_registers" and theirs.num_register_tokens == 4
    assert list(theirs.out_features) == ["stage2", "stage12"] and theirs.num_labels == 3
    theirs.save_pretrained(tmp_path / "back")
    again = Dinov2Config.from_pretrained(tmp_path / "back")
    assert again.out_indices == [2, 12] and again.num_labels == 3
    assert json.loads((tmp_path / "config.json").read_text())["interpolate_antialias"] is True


def test_out_features_must_name_real_stages():
    with pytest.raises(ValueError, match="not stages of this model"):
        small_config(out_features=["stage9"])


def test_swiglu_width_follows_meta_rounding():
    assert swiglu_hidden_features(1536, 4) == 4096
    assert swiglu_hidden_features(384, 4) == 1024
    # DINOv3 (dinov3.md §1.1): S+ and H+ ffn_ratio 6, align 8; 7B ffn_ratio 3, align 64 -> the presets' widths
    from dinokit.models.dinov3_vit import preset_config

    for preset, ratio, align in (("dinov3_vits16plus", 6, 8), ("dinov3_vith16plus", 6, 8), ("dinov3_vit7b16", 3, 64)):
        config = preset_config(preset)
        assert swiglu_hidden_features(config.hidden_size, ratio, align) == config.intermediate_size, preset
    assert swiglu_hidden_features(200, 3, align=64) == 448 and swiglu_hidden_features(200, 3, align=8) == 400


def test_batch_subset_drop_path_touches_only_a_subset_and_rescales():
    torch.manual_seed(0)
    x = torch.randn(10, 5, 8)
    out = drop_add_residual_stochastic_depth(x, lambda t: torch.ones_like(t), sample_drop_ratio=0.4)
    changed = (out - x).abs().amax(dim=(1, 2)) > 0
    assert changed.sum().item() == 6  # k = max(int(10 * 0.6), 1)
    assert torch.allclose((out - x)[changed], torch.full_like((out - x)[changed], 10 / 6))


def test_block_uses_batch_subset_above_rate_0_1_and_classic_below():
    torch.manual_seed(0)
    high, low = Block(16, 2, drop_path=0.5, init_values=1.0).train(), Block(16, 2, drop_path=0.05).train()
    x = torch.randn(8, 4, 16)
    calls = []
    high.attn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    high(x)
    assert calls == [4]  # attention ran on int(8 * 0.5) samples only
    calls.clear()
    low.attn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    low(x)
    assert calls == [8]
    high.eval(), low.eval()
    with torch.no_grad():
        assert torch.equal(high(x), high(x))  # no randomness at inference


def test_fused_linear_matches_plain_linear_and_can_be_disabled():
    model = randomize_(dinokit.Dinov2Model(small_config(swiglu=True)), seed=41).eval()
    x = images(2, 224, 224)
    with torch.no_grad():
        fast = model(x).last_hidden_state
        fused.set_fast_linear(False)
        try:
            plain = model(x).last_hidden_state
        finally:
            fused.set_fast_linear(True)
    assert max_diff(fast, plain) < 1e-5


def test_cpu_inference_splits_large_batches_into_token_chunks_with_the_same_result(monkeypatch):
    # A batch above CPU_TOKENS_PER_CHUNK tokens runs each block on whole-image sub-batches (cache-sized GEMMs);
    # the output must equal the unsplit batch, in order, and the split must really happen.
    from dinokit.layers import block as block_module

    model = randomize_(dinokit.Dinov2Model(small_config(registers=4)), seed=43).eval()
    x = images(5, 56, 56)  # 1 + 4 + 16 = 21 tokens per image
    with torch.no_grad():
        whole = model(x).last_hidden_state
        sizes = []
        first_block = next(m for m in model.modules() if isinstance(m, Block))
        original = block_module.Block._fused_forward
        monkeypatch.setattr(block_module.Block, "_fused_forward",
                            lambda self, t, *rest: (sizes.append(t.shape[0]) if self is first_block else None)
                            or original(self, t, *rest))
        monkeypatch.setattr(block_module, "CPU_TOKENS_PER_CHUNK", 2 * 21 + 5)
        split = model(x).last_hidden_state
    assert sizes == [2, 2, 1]
    assert max_diff(split, whole) < 1e-5


@pytest.mark.parametrize("kernel", ["onednn", "mkl-packed"])
def test_packed_weights_follow_in_place_changes_and_reloads(monkeypatch, kernel):
    # Inference caches each layer's packed (LayerScale-folded) weight; a weight or gain changed in place, or a
    # new state dict, must be seen at the next call, exactly as the unpacked path sees it.
    monkeypatch.setattr(fused, "_pinned_gemm", kernel)
    model = randomize_(dinokit.Dinov2Model(small_config()), seed=44).eval()
    x = images(2, 56, 56)

    def plain():
        fused.set_fast_linear(False)
        try:
            return model(x).last_hidden_state
        finally:
            fused.set_fast_linear(True)

    block = next(m for m in model.modules() if isinstance(m, Block))
    with torch.no_grad():
        assert max_diff(model(x).last_hidden_state, plain()) < 1e-5
        assert block.attn.proj in fused._packed_cache
        block.attn.proj.weight.mul_(3.0)
        block.ls1.gamma.add_(0.5)
        block.mlp.fc1.bias.sub_(1.0)
        assert max_diff(model(x).last_hidden_state, plain()) < 1e-5
        # the same projection without its gain (the attention-weights path) must not reuse the folded weights
        with_attention = model(x, output_attentions=True).last_hidden_state
        assert max_diff(with_attention, plain()) < 1e-5
        other = randomize_(dinokit.Dinov2Model(small_config()), seed=45)
        model.load_state_dict(other.state_dict())
        assert max_diff(model(x).last_hidden_state, other.eval()(x).last_hidden_state) < 1e-5


@pytest.mark.parametrize("kernel", ["onednn", "mkl-packed"])
def test_packed_weight_cache_stays_within_its_memory_budget(monkeypatch, kernel):
    monkeypatch.setattr(fused, "_pinned_gemm", kernel)
    monkeypatch.setattr(fused, "_PACKED_BUDGET", 0)
    model = randomize_(dinokit.Dinov2Model(small_config()), seed=46).eval()
    fused._packed_cache.clear()
    with torch.no_grad():
        model(images(1, 56, 56))
    assert len(fused._packed_cache) == 0


def test_onednn_linear_gradients_match_f_linear_in_training():
    # The CPU training path routes forward and input gradient through oneDNN: values and all three gradients
    # must equal F.linear's at float32 rounding level, for 3-D inputs and with the activation applied after.
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    act = torch.nn.GELU()
    x = torch.randn(3, 17, 48, requires_grad=True)
    g = torch.randn(3, 17, 80)
    results = []
    for enabled in (True, False):
        fused.set_fast_linear(enabled)
        try:
            layer.zero_grad()
            x.grad = None
            y = fused.linear(x, layer, act)
            y.backward(g)
            results.append((y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
        finally:
            fused.set_fast_linear(True)
    for fast, plain in zip(*results):
        assert max_diff(fast, plain) < 1e-4 * max(1.0, plain.abs().max().item())


def test_training_step_gradients_agree_with_and_without_onednn():
    model = dinokit.Dinov2Model(small_config()).train()
    x = images(2, 224, 224)
    grads = []
    for enabled in (True, False):
        fused.set_fast_linear(enabled)
        try:
            model.zero_grad()
            model(x).pooler_output.square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        finally:
            fused.set_fast_linear(True)
    assert grads[0].shape == grads[1].shape
    assert max_diff(grads[0], grads[1]) < 1e-4 * grads[1].abs().max().item()


def test_forward_features_available_on_every_model_class():
    config = small_config(num_labels=4)
    x = images(1, 224, 224)
    with torch.no_grad():
        reference = dinokit.Dinov2Model(config).eval()
        for cls in (dinokit.Dinov2ForImageClassification, dinokit.Dinov2Backbone):
            model = cls(config).eval()
            model.vit_module.load_state_dict(reference.vit.state_dict())
            assert max_diff(model.forward_features(x)["x_norm_clstoken"], reference(x).pooler_output) == 0.0
            assert len(model.get_intermediate_layers(x, n=[0, 2])) == 2
