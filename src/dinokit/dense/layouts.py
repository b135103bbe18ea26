"""Meta's released dense head files -> dinokit models.

- Segmentation: `dinov2_vit{s,b,l,g}14_{ade20k,voc2012}_{linear,ms}_head.pth`: `decode_head.conv_seg.{weight
  [K, C, 1, 1], bias}` and `decode_head.bn.{weight, bias, running_mean, running_var, num_batches_tracked}`
  (under `state_dict`); C = D for linear, 4D for ms.
- Depth: `dinov2_vit*14_{nyu,kitti}_{linear,linear4}_head.pth`: `decode_head.conv_depth.{weight [256, 2DL, 1, 1],
  bias}`; `..._dpt_head.pth`: `decode_head.reassemble_blocks.*`, `decode_head.convs.*`,
  `decode_head.fusion_blocks.*`, `decode_head.project.conv.*`, `decode_head.conv_depth.head.*` (renamed here to
  transformers' names, as transformers' convert_dinov2_depth_to_hf.py does).

The depth range is the data set's (NYU 0.001-10 m, KITTI 0.001-80 m, from the file name or `dataset=`): Meta's
hub code passes max_depth=80 to every linear head, NYU ones included (docs/dense.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dinokit import checkpoints as ckpt
from dinokit.dense.depth import DepthConfig, Dinov2ForDepthEstimation
from dinokit.dense.segmentation import Dinov2ForSemanticSegmentation, segmentation_class

DEPTH_RANGES = {"nyu": (0.001, 10.0), "kitti": (0.001, 80.0)}


def read_meta_head(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `decode_head.*` tensors of a Meta head file (weights under `state_dict`, loaded without pickle code)."""
    state = ckpt.unwrap_state_dict(ckpt.torch_load(path, what="head file"), source=path)
    head = {k: v for k, v in state.items() if k.startswith("decode_head.")}
    if not head:
        raise ckpt.CheckpointError(f"{path} has no 'decode_head.*' weights: not a Meta dense head file "
                                   f"(first keys: {sorted(state)[:4]})")
    return head


def _backbone(model):
    import dinokit

    base = dinokit.load_model(model)
    return base.config, base.vit.state_dict()


def load_meta_segmentation_head(head_file: str | os.PathLike, model) -> Dinov2ForSemanticSegmentation:
    """A Meta segmentation head file on the backbone `model` (anything `dinokit.load_model` takes)."""
    head = read_meta_head(head_file)
    if "decode_head.conv_seg.weight" not in head:
        raise ckpt.CheckpointError(f"{head_file} is not a segmentation head (no decode_head.conv_seg.weight)")
    config, backbone = _backbone(model)
    weight = head["decode_head.conv_seg.weight"]
    ratio, rest = divmod(weight.shape[1], config.hidden_size)
    if rest or ratio not in (1, 4):
        raise ckpt.CheckpointError(f"{head_file}: a head of {weight.shape[1]} input channels does not fit a "
                                   f"{config.hidden_size}-wide backbone (linear: D, ms: 4D)")
    config = config.copy(segmentation_head="linear" if ratio == 1 else "ms", num_labels=weight.shape[0])
    segmenter = segmentation_class(config)(config)
    segmenter.load_meta_state_dict(backbone, head, source=str(head_file))
    return segmenter.eval()


_DPT_RENAMES = [
    (r"reassemble_blocks\.projects\.(\d+)\.conv\.", r"neck.reassemble_stage.layers.\1.projection."),
    (r"reassemble_blocks\.resize_layers\.(\d+)\.", r"neck.reassemble_stage.layers.\1.resize."),
    (r"reassemble_blocks\.readout_projects\.(\d+)\.0\.", r"neck.reassemble_stage.readout_projects.\1.0."),
    (r"convs\.(\d+)\.conv\.", r"neck.convs.\1."),
    (r"fusion_blocks\.(\d+)\.project\.conv\.", r"neck.fusion_stage.layers.\1.projection."),
    (r"fusion_blocks\.(\d+)\.res_conv_unit(\d)\.conv(\d)\.conv\.",
     r"neck.fusion_stage.layers.\1.residual_layer\2.convolution\3."),
    (r"project\.conv\.", r"head.projection."),
    (r"conv_depth\.head\.(\d+)\.", r"head.head.\1."),
]


def meta_dpt_to_hf(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's DPT head names -> transformers' (the unused first fusion block's residual unit 1 gets zeros)."""
    out = {}
    for key, value in head.items():
        name = key[len("decode_head."):]
        for pattern, replacement in _DPT_RENAMES:
            new, count = re.subn("^" + pattern, replacement, name)
            if count:
                out[new] = value
                break
        else:
            raise ckpt.CheckpointError(f"unexpected key {key!r} in a Meta DPT head file")
    template = "neck.fusion_stage.layers.{}.residual_layer1.convolution{}.weight"
    for conv in (1, 2):
        source = out.get(template.format(1, conv))
        if source is not None:
            out.setdefault(template.format(0, conv), torch.zeros_like(source))
    return out


def _dataset(head_file: Path, dataset: str | None) -> str:
    if dataset is None:
        dataset = next((name for name in DEPTH_RANGES if f"_{name}_" in head_file.name), "nyu")
    if dataset not in DEPTH_RANGES:
        raise ValueError(f"unknown depth data set {dataset!r}: use one of {sorted(DEPTH_RANGES)}")
    return dataset


def load_meta_depth_head(head_file: str | os.PathLike, model, dataset: str | None = None,
                         depth_range: tuple[float, float] | None = None) -> Dinov2ForDepthEstimation:
    """A Meta depth head file (`*_linear_head.pth`, `*_linear4_head.pth`, `*_dpt_head.pth`) on `model`."""
    head_file = Path(head_file)
    head = read_meta_head(head_file)
    min_depth, max_depth = depth_range or DEPTH_RANGES[_dataset(head_file, dataset)]
    config, backbone = _backbone(model)
    if "decode_head.conv_depth.weight" in head:
        width = head["decode_head.conv_depth.weight"].shape[1]
        layers, rest = divmod(width, 2 * config.hidden_size)
        if rest or layers not in (1, 4):
            raise ckpt.CheckpointError(f"{head_file}: a linear depth head of {width} input channels does not fit "
                                       f"a {config.hidden_size}-wide backbone (2D x 1 or 4 layers)")
        depther = Dinov2ForDepthEstimation(DepthConfig.linear(config, layers, min_depth, max_depth))
        state = {"head." + k[len("decode_head."):]: v for k, v in head.items()}
    elif any(k.startswith("decode_head.reassemble_blocks.") for k in head):
        depther = Dinov2ForDepthEstimation(DepthConfig.dpt(config, min_depth=min_depth))
        state = meta_dpt_to_hf(head)
    else:
        raise ckpt.CheckpointError(f"{head_file} is neither a linear (conv_depth) nor a DPT (reassemble_blocks) "
                                   f"depth head")
    state.update({"backbone." + k: v for k, v in ckpt.meta_to_hf(backbone).items()})
    depther.load_hf_state_dict(state, source=str(head_file))
    return depther.eval()
