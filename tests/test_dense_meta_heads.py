"""Meta's released dense head layouts load into dinokit, and the outputs equal Meta's formulas computed here
independently from the backbone's `get_intermediate_layers` (dinov2/hub/depth, dinov2/eval/segmentation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit.checkpoints import CheckpointError
from dinokit.dense.layouts import load_meta_depth_head, load_meta_segmentation_head

from helpers import images, max_diff, randomize_

TOL = 1e-5


def _backbone(blocks=4, dim=32):
    config = dinokit.Dinov2Config(hidden_size=dim, num_hidden_layers=blocks, num_attention_heads=2, image_size=28,
                                  patch_size=14)
    return randomize_(dinokit.Dinov2Model(config), seed=0).eval()


def _pad_like_meta(x):
    # CenterPadding(14) of dinov2/hub/utils.py, written out: 30 x 45 -> 42 x 56 = top 6, bottom 6, left 5, right 6
    assert x.shape[-2:] == (30, 45)
    return F.pad(x, (5, 6, 6, 6))


def _save_head(path, state):
    torch.save({"meta": {"note": "test head in Meta's layout"}, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("kind, blocks", [("linear", 1), ("ms", 4)])
def test_meta_segmentation_head_file_gives_bnhead_logits(tmp_path, kind, blocks):
    model, k = _backbone(), 3
    d = model.config.hidden_size * blocks
    gen = torch.Generator().manual_seed(1)
    head = {"decode_head.conv_seg.weight": torch.randn(k, d, 1, 1, generator=gen),
            "decode_head.conv_seg.bias": torch.randn(k, generator=gen),
            "decode_head.bn.weight": 1 + 0.1 * torch.randn(d, generator=gen),
            "decode_head.bn.bias": 0.1 * torch.randn(d, generator=gen),
            "decode_head.bn.running_mean": 0.1 * torch.randn(d, generator=gen),
            "decode_head.bn.running_var": 0.5 + torch.rand(d, generator=gen),
            "decode_head.bn.num_batches_tracked": torch.tensor(40000)}
    path = _save_head(tmp_path / f"dinov2_vits14_voc2012_{kind}_head.pth", head)
    segmenter = load_meta_segmentation_head(path, model)
    assert segmenter.head_type == kind and segmenter.config.num_labels == k
    x = images(2, 30, 45, seed=2)
    with torch.no_grad():
        got = segmenter(x).logits
        # Meta: get_intermediate_layers(n=last 4, reshape=True) (final norm on, no CLS), in_index [3] or [0..3]
        maps = model.get_intermediate_layers(_pad_like_meta(x), n=4, reshape=True)
        features = torch.cat(maps[4 - blocks:], dim=1)
        bn = ((features - head["decode_head.bn.running_mean"][:, None, None])
              / torch.sqrt(head["decode_head.bn.running_var"][:, None, None] + 1e-5)
              * head["decode_head.bn.weight"][:, None, None] + head["decode_head.bn.bias"][:, None, None])
        expected = (torch.einsum("kc,bchw->bkhw", head["decode_head.conv_seg.weight"][:, :, 0, 0], bn)
                    + head["decode_head.conv_seg.bias"][:, None, None])
    assert got.shape == (2, k, 3, 4)  # output stride 14 on the padded 42 x 56 image
    assert max_diff(got, expected) < TOL


def test_segmentation_head_of_the_wrong_width_is_refused_with_the_reason(tmp_path):
    path = _save_head(tmp_path / "dinov2_vits14_ade20k_linear_head.pth",
                      {"decode_head.conv_seg.weight": torch.zeros(150, 48, 1, 1),
                       "decode_head.conv_seg.bias": torch.zeros(150)})
    with pytest.raises(CheckpointError, match="does not fit a 32-wide backbone"):
        load_meta_segmentation_head(path, _backbone())


@pytest.mark.parametrize("layers, dataset, max_depth", [(1, "nyu", 10.0), (4, "kitti", 80.0)])
def test_meta_linear_depth_head_file_gives_binned_depth(tmp_path, layers, dataset, max_depth):
    model = _backbone()
    d = 2 * model.config.hidden_size * layers
    gen = torch.Generator().manual_seed(3)
    head = {"decode_head.conv_depth.weight": torch.randn(256, d, 1, 1, generator=gen) * d ** -0.5,
            "decode_head.conv_depth.bias": 0.1 * torch.randn(256, generator=gen)}
    suffix = "linear4" if layers == 4 else "linear"
    depther = load_meta_depth_head(_save_head(tmp_path / f"dinov2_vits14_{dataset}_{suffix}_head.pth", head), model)
    assert depther.depth_range == (0.001, max_depth)
    x = images(1, 30, 45, seed=4)
    with torch.no_grad():
        got = depther(x).predicted_depth
        # Meta: blocks [last] or 4 spread ones (4 blocks: S/B rule i*L/4-1 = [0, 1, 2, 3]), norm=False, with CLS
        blocks = [3] if layers == 1 else [0, 1, 2, 3]
        outs = model.get_intermediate_layers(_pad_like_meta(x), n=blocks, reshape=True, return_class_token=True,
                                             norm=False)
        maps = [torch.cat([m, c[:, :, None, None].expand_as(m)], 1) for m, c in outs]
        maps = [F.interpolate(m, size=(12, 16), mode="bilinear", align_corners=False) for m in maps]  # upsample 4
        logit = F.conv2d(torch.cat(maps, 1), head["decode_head.conv_depth.weight"], head["decode_head.conv_depth.bias"])
        p = torch.relu(logit) + 0.1
        p = p / p.sum(1, keepdim=True)
        expected = torch.einsum("bkhw,k->bhw", p, torch.linspace(0.001, max_depth, 256))
    assert got.shape == (1, 12, 16)
    assert max_diff(got, expected) < TOL


def _meta_dpt_keys(hf_state):
    """transformers DPT names -> Meta's, written out per module (transformers' convert_dinov2_depth_to_hf.py)."""
    meta = {}
    for i in range(4):
        for kind in ("weight", "bias"):
            meta[f"decode_head.reassemble_blocks.projects.{i}.conv.{kind}"] = \
                hf_state[f"neck.reassemble_stage.layers.{i}.projection.{kind}"]
            meta[f"decode_head.reassemble_blocks.readout_projects.{i}.0.{kind}"] = \
                hf_state[f"neck.reassemble_stage.readout_projects.{i}.0.{kind}"]
            meta[f"decode_head.fusion_blocks.{i}.project.conv.{kind}"] = \
                hf_state[f"neck.fusion_stage.layers.{i}.projection.{kind}"]
            if i != 2:
                meta[f"decode_head.reassemble_blocks.resize_layers.{i}.{kind}"] = \
                    hf_state[f"neck.reassemble_stage.layers.{i}.resize.{kind}"]
        meta[f"decode_head.convs.{i}.conv.weight"] = hf_state[f"neck.convs.{i}.weight"]
        for unit in (1, 2):
            if i == 0 and unit == 1:
                continue  # Meta's first fusion block has no res_conv_unit1
            for conv in (1, 2):
                meta[f"decode_head.fusion_blocks.{i}.res_conv_unit{unit}.conv{conv}.conv.weight"] = \
                    hf_state[f"neck.fusion_stage.layers.{i}.residual_layer{unit}.convolution{conv}.weight"]
    for kind in ("weight", "bias"):
        meta[f"decode_head.project.conv.{kind}"] = hf_state[f"head.projection.{kind}"]
        for j in (0, 2, 4):
            meta[f"decode_head.conv_depth.head.{j}.{kind}"] = hf_state[f"head.head.{j}.{kind}"]
    return meta


def test_meta_dpt_head_file_gives_transformers_dpt_depth_plus_min_depth(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_dense_transformers_parity import _dpt_config, randomize_dense_

    theirs = randomize_dense_(transformers.DPTForDepthEstimation(_dpt_config()), seed=5).eval()
    theirs.save_pretrained(tmp_path / "hf")  # the file layout (transformers 5 renames attention in memory)
    state = dinokit.checkpoints.read_hf_weights(tmp_path / "hf")
    backbone_dir = tmp_path / "backbone"
    hf_backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model = _backbone()
    model.load_meta_state_dict(dinokit.checkpoints.hf_to_meta(hf_backbone), None)
    model.save_pretrained(backbone_dir)
    path = _save_head(tmp_path / "dinov2_vits14_nyu_dpt_head.pth", _meta_dpt_keys(state))
    depther = load_meta_depth_head(path, str(backbone_dir))
    x = images(1, 28, 42, seed=6)
    with torch.no_grad():
        expected = theirs(pixel_values=x).predicted_depth + 0.001  # Meta: relu(head(x)) + min_depth
        assert max_diff(depther(x).predicted_depth, expected) < 1e-4
