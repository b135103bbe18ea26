"""DINOv3 ConvNeXt weight layouts: Meta `.pth`, transformers, timm; detection and conversion through Meta's names.

Meta (the normal form; `DINOv3ConvNeXt.state_dict()` holds it):
    downsample_layers.0.{0 conv 4x4, 1 LN}   downsample_layers.{1,2,3}.{0 LN, 1 conv 2x2}
    stages.i.j.{dwconv, norm, pwconv1, pwconv2, gamma}   norm   norms.3 (the same LayerNorm under a second name)
transformers (what 4.56-5.x write to disk; 5.x also reads `model.stages.*`, its in-memory names):
    stages.i.downsample_layers.k   stages.i.layers.j.{depthwise_conv, layer_norm, pointwise_conv1/2, gamma}
    layer_norm (DINOv3ConvNextModel only; the Backbone has no final norm)
timm (`convnext_*.dinov3_lvd1689m`):
    stem.k   stages.i.downsample.k   stages.i.blocks.j.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}   head.norm
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from dinokit.checkpoints import CheckpointError, meta_normalize

logger = logging.getLogger(__name__)

LAYOUTS = ("meta", "hf", "timm")

# One row per parameter family: its name in (Meta, transformers, timm). {i} stage, {j} block, {k} sub-layer,
# {p} weight/bias. The first row that matches wins (stage 0's downsampling is timm's stem).
_ROWS = [
    ("downsample_layers.0.{k}.{p}", "stages.0.downsample_layers.{k}.{p}", "stem.{k}.{p}"),
    ("downsample_layers.{i}.{k}.{p}", "stages.{i}.downsample_layers.{k}.{p}", "stages.{i}.downsample.{k}.{p}"),
    ("stages.{i}.{j}.gamma", "stages.{i}.layers.{j}.gamma", "stages.{i}.blocks.{j}.gamma"),
    ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.layers.{j}.depthwise_conv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
    ("stages.{i}.{j}.norm.{p}", "stages.{i}.layers.{j}.layer_norm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
    ("stages.{i}.{j}.pwconv1.{p}", "stages.{i}.layers.{j}.pointwise_conv1.{p}", "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("stages.{i}.{j}.pwconv2.{p}", "stages.{i}.layers.{j}.pointwise_conv2.{p}", "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("norm.{p}", "layer_norm.{p}", "head.norm.{p}"),
]
_FIELD = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "k": r"(?P<k>\d+)", "p": r"(?P<p>weight|bias)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # text, field, text, field, ...
    return re.compile("^" + "".join(re.escape(t) if n % 2 == 0 else _FIELD[t] for n, t in enumerate(parts)) + "$")


_PATTERNS = {layout: [_pattern(row[n]) for row in _ROWS] for n, layout in enumerate(LAYOUTS)}


def _rename(state: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    column = LAYOUTS.index(target)
    for key, value in state.items():
        for row, pattern in zip(_ROWS, _PATTERNS[source]):
            match = pattern.match(key)
            if match:
                out[row[column].format(**match.groupdict())] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a {source}-layout DINOv3 ConvNeXt state dict: {unknown[:8]}"
                              + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return out


# ---------------------------------------------------------------------------------------------------- detection
def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """'meta', 'hf' or 'timm' for a DINOv3 ConvNeXt state dict (training prefixes allowed for Meta); None when it
    is not a ConvNeXt checkpoint of any of these layouts."""
    keys = set(state)
    if any(re.match(r"^(model\.)?stages\.\d+\.(downsample_layers|layers)\.", k) for k in keys):
        return "hf"
    if "stem.0.weight" in keys and any(k.startswith("stages.0.blocks.0.conv_dw.") for k in keys):
        return "timm"
    if any(re.match(r"^([\w.]*\.)?downsample_layers\.0\.0\.weight$", k) for k in keys):
        return "meta"
    return None


def is_convnext_state(state: Mapping[str, torch.Tensor]) -> bool:
    return detect_layout(state) is not None


# ---------------------------------------------------------------------------------------------------- conversion
def to_meta(state: Mapping[str, torch.Tensor], layout: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Any layout -> (Meta-normal state dict without the `norms.3` duplicate, the layout it came from)."""
    layout = layout or detect_layout(state)
    if layout is None:
        raise CheckpointError(f"this is not a DINOv3 ConvNeXt checkpoint: none of the Meta "
                              f"('downsample_layers.0.0.weight'), transformers ('stages.0.downsample_layers...') "
                              f"or timm ('stem.0.weight') keys are there (first keys: {list(state)[:5]})")
    if layout == "meta":
        state = {k: v for k, v in meta_normalize(state).items() if not k.startswith("norms.")}
        return _rename(state, "meta", "meta"), layout
    if layout == "hf":
        state = {k.removeprefix("model."): v for k, v in state.items()}
        return _rename(state, "hf", "meta"), layout
    if layout == "timm":
        dropped = sorted(k for k in state if k.startswith(("head.fc.", "head.pre_logits.")))
        if dropped:
            logger.warning("ignoring the classifier weights of a timm ConvNeXt checkpoint (%s): the DINOv3 "
                           "backbone has no classification head", ", ".join(dropped))
        state = {k: v for k, v in state.items() if k not in dropped and not k.startswith("norm_pre.")}
        return _rename(state, "timm", "meta"), layout
    raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")


def from_meta(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Meta-normal state dict -> `layout`. Meta files keep `norms.3` (a copy of `norm`, as Meta's own files
    have it); transformers and timm drop it. A state dict without `norm` (a backbone) gives none in any layout."""
    state = {k: v for k, v in state.items() if not k.startswith("norms.")}
    if layout == "meta":
        out = _rename(state, "meta", "meta")
        out.update({"norms.3." + k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")})
        return out
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    return _rename(state, "meta", layout)


def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict:
    """`depths`, `hidden_sizes` and `num_channels` of a Meta-normal ConvNeXt state dict (what its shapes say)."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"^downsample_layers\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"incomplete ConvNeXt checkpoint: downsampling layers {stages}")
    hidden_sizes = [state["downsample_layers.0.0.weight"].shape[0]]
    hidden_sizes += [state[f"downsample_layers.{i}.1.weight"].shape[0] for i in stages[1:]]
    depths = [1 + max((int(m.group(1)) for k in state if (m := re.match(rf"^stages\.{i}\.(\d+)\.", k))), default=-1)
              for i in stages]
    return {"depths": depths, "hidden_sizes": hidden_sizes,
            "num_channels": state["downsample_layers.0.0.weight"].shape[1],
            "layer_scale_init_value": 1e-6 if "stages.0.0.gamma" in state else 0.0}
