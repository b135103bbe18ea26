"""PyTorch int8 inference (`dinokit.int8`, the `torch-int8` backend) on small random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dinokit
from dinokit.backends import get_backend
from dinokit.export.quantize import agreement, knn_delta
from dinokit.int8 import fold_layer_scale, int8_engine, quantize_int8
from dinokit.layers.layer_scale import LayerScale

from conftest import require_dataset
from helpers import images, randomize_, small_config


def model(seed: int = 0, **kw) -> dinokit.Dinov2Model:
    return randomize_(dinokit.Dinov2Model(small_config(hidden_size=64, num_attention_heads=2, **kw)), seed).eval()


def quantized_linears(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]


def test_the_engine_is_one_this_torch_build_has():
    assert int8_engine() in torch.backends.quantized.supported_engines


@pytest.mark.parametrize("swiglu", [False, True])
def test_folding_layer_scale_into_the_projections_keeps_the_outputs(swiglu):
    net = model(swiglu=swiglu)
    pixels = images(2, 56, 70, seed=1)
    with torch.no_grad():
        before = net(pixels).last_hidden_state
        fold_layer_scale(net.vit_module)
        after = net(pixels).last_hidden_state
    assert not any(isinstance(m, LayerScale) for m in net.modules())
    assert (after - before).abs().max() <= 1e-5


@pytest.mark.parametrize("swiglu", [False, True])
def test_int8_copy_quantizes_every_block_linear_and_stays_close(swiglu):
    net = model(swiglu=swiglu)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    int8 = quantize_int8(net)
    assert len(quantized_linears(int8)) == net.config.num_hidden_layers * 4  # qkv, proj and the two FFN matrices
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in original.items()), "the source model changed"
    pixels = images(4, 56, 56, seed=2)
    with torch.inference_mode():
        reference, out = net(pixels), int8(pixels)
    cos = torch.nn.functional.cosine_similarity(out.pooler_output, reference.pooler_output, dim=-1)
    assert cos.min() >= 0.98
    assert 0 < (out.last_hidden_state - reference.last_hidden_state).abs().max() < 1.0


def test_int8_backend_measures_its_distance_from_the_float_model_it_came_from():
    net = model(seed=3)
    backend = get_backend(net, "torch-int8")
    pixels = images(2, 84, 56, seed=4)
    out = backend(pixels)
    assert out.last_hidden_state.shape == (2, 1 + 6 * 4, 64)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    distance = backend.measure_distance(pixels)
    assert 0 < distance["max_abs_diff"] and distance["min_cosine"] >= 0.98  # measured against fp32, not itself
    assert get_backend(net, "torch-int8", per_channel=False).measure_distance(pixels)["min_cosine"] >= 0.98


def test_quantizing_inside_inference_mode_is_refused_with_the_fix():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        quantize_int8(model())


def test_int8_accuracy_checks_accept_backends():
    net = model(seed=5)
    pixels = images(6, 56, 56, seed=6)
    result = agreement(get_backend(net, "torch"), get_backend(net, "torch-int8"), pixels)
    assert result.images == 6 and 0.98 <= result.mean_cosine <= 1.0 and result.min_cosine <= result.mean_cosine


def test_int8_knn_check_on_real_images_stays_within_a_few_points():
    folder = require_dataset("imagenette", "val")
    net = model(seed=7, image_size=224)
    knn = knn_delta(get_backend(net, "torch"), get_backend(net, "torch-int8"), folder, per_class=4, size=112)
    assert knn.test == 20 and abs(knn.delta) <= 10.0


def test_the_engine_is_measured_on_the_models_largest_linear_and_remembered(monkeypatch):
    from dinokit.layers import kernel_choice

    engines = [e for e in ("x86", "onednn") if e in torch.backends.quantized.supported_engines]
    if len(engines) < 2:
        pytest.skip(f"this build has int8 engines {torch.backends.quantized.supported_engines}: nothing to choose")
    monkeypatch.delenv("DINOKIT_INT8_ENGINE", raising=False)
    kernel_choice.forget()
    net = model(seed=4)
    quantized = quantize_int8(net)
    made = {key.split(" :: ")[1]: value for key, value in kernel_choice.decisions().items()}
    assert made["int8-engine:2048:64:256"]["choice"] == quantized.int8_engine  # fc1: 64 -> 256, the largest
    assert set(made["int8-engine:2048:64:256"]["ms"]) == set(engines)


@pytest.mark.parametrize("engine", ["x86", "onednn"])
def test_each_engine_pinned_gives_the_float_models_features(monkeypatch, engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine} engine in this build")
    monkeypatch.setenv("DINOKIT_INT8_ENGINE", engine)
    net = model(seed=5)
    quantized = quantize_int8(net)
    assert quantized.int8_engine == engine
    pixels = images(2, 56, 56, seed=2)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(quantized(pixels).pooler_output, net(pixels).pooler_output)
    assert cosine.min() > 0.98
