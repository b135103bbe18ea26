"""dinokit's depth models vs transformers' DPTForDepthEstimation (Dinov2 backbone, the facebook/dpt-dinov2-*
layout) and DepthAnythingForDepthEstimation: a checkpoint saved by transformers (random weights, tiny config)
loads into dinokit with `predicted_depth` within 1e-4, and a checkpoint saved by dinokit loads into transformers."""

from __future__ import annotations

import pytest
import torch

from dinokit.dense.depth import DepthConfig, Dinov2ForDepthEstimation

from helpers import images, max_diff, randomize_


def randomize_dense_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """helpers.randomize_ for the backbone; conv and linear weights of the neck and head scaled by their whole
    fan-in (kernel included), so that depth values stay O(1) through the fusion stack."""
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("neck.", "head.")) and param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * param[0].numel() ** -0.5)
    return model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
BACKBONE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28, patch_size=14,
                layerscale_value=1.0)


def _dpt_config():
    # facebook/dpt-dinov2-small-nyu scaled down: Meta's blocks (HF stage = Meta block + 1), no final norm,
    # CLS readout "project", neck sizes D/8..D, fusion 256 without bias, head projection.
    backbone = transformers.Dinov2Config(out_indices=[1, 2, 3, 4], apply_layernorm=False,
                                         reshape_hidden_states=False, **BACKBONE)
    return transformers.DPTConfig(backbone_config=backbone, neck_hidden_sizes=[4, 8, 16, 32],
                                  fusion_hidden_size=256, readout_type="project", use_bias_in_fusion_residual=False,
                                  add_projection=True, reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False)


def _depth_anything_config(kind="relative"):
    backbone = transformers.Dinov2Config(out_indices=[1, 2, 3, 4], apply_layernorm=True,
                                         reshape_hidden_states=False, **BACKBONE)
    return transformers.DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[4, 8, 16, 32],
                                            fusion_hidden_size=16, head_hidden_size=8, reassemble_hidden_size=32,
                                            patch_size=14, depth_estimation_type=kind, max_depth=20)


HF_MODELS = {
    "dpt": lambda: transformers.DPTForDepthEstimation(_dpt_config()),
    "depth_anything": lambda: transformers.DepthAnythingForDepthEstimation(_depth_anything_config()),
    "depth_anything_metric": lambda: transformers.DepthAnythingForDepthEstimation(_depth_anything_config("metric")),
}


@pytest.mark.parametrize("kind", sorted(HF_MODELS))
def test_transformers_checkpoint_loads_into_dinokit_with_the_same_predicted_depth(tmp_path, kind):
    theirs = randomize_dense_(HF_MODELS[kind](), seed=1).eval()
    theirs.save_pretrained(tmp_path)
    ours = Dinov2ForDepthEstimation.from_pretrained(tmp_path)
    x = images(2, 28, 42, seed=2)  # non-square patch grid (2 x 3)
    with torch.no_grad():
        expected = theirs(pixel_values=x).predicted_depth
        got = ours(x).predicted_depth
    assert got.shape == expected.shape
    assert expected.abs().max() > 0  # random weights give a non-trivial depth map
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("kind", sorted(HF_MODELS))
def test_dinokit_checkpoint_loads_into_transformers_with_the_same_predicted_depth(tmp_path, kind):
    source = randomize_dense_(HF_MODELS[kind](), seed=3).eval()
    source.save_pretrained(tmp_path / "hf")
    ours = Dinov2ForDepthEstimation.from_pretrained(tmp_path / "hf")
    randomize_dense_(ours, seed=4)  # new weights, so transformers can only match by reading dinokit's file
    ours.save_pretrained(tmp_path / "dinokit")
    loader = (transformers.DPTForDepthEstimation if kind == "dpt"
              else transformers.DepthAnythingForDepthEstimation)
    theirs = loader.from_pretrained(str(tmp_path / "dinokit")).eval()
    x = images(1, 42, 28, seed=5)
    with torch.no_grad():
        assert max_diff(ours(x).predicted_depth, theirs(pixel_values=x).predicted_depth) <= TOL


def test_dpt_built_by_dinokit_from_a_dinokit_backbone_is_loadable_by_transformers(tmp_path):
    import dinokit

    backbone = dinokit.Dinov2Config(**BACKBONE)
    ours = randomize_dense_(Dinov2ForDepthEstimation(DepthConfig.dpt(backbone)), seed=6).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.DPTForDepthEstimation.from_pretrained(str(tmp_path)).eval()
    assert theirs.config.backbone_config.out_indices == [1, 2, 3, 4]
    x = images(1, 28, 28, seed=7)
    with torch.no_grad():
        assert max_diff(ours(x).predicted_depth, theirs(pixel_values=x).predicted_depth) <= TOL
