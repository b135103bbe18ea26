"""DINOv3 ConvNeXt-T/S/B/L: the config, Meta's module (`DINOv3ConvNeXt`, Meta's names and API) and the
transformers classes `DINOv3ConvNextModel` / `DINOv3ConvNextBackbone` over it.

The network (spec dinov3.md §1.2): stem Conv 4x4/4 + channels-first LayerNorm; stages 2-4 start with a
channels-first LayerNorm + Conv 2x2/2; `depths` ConvNeXt blocks per stage; output stride 32, no registers. The
"CLS token" is the global average of the last map; it and the flattened map go through the final LayerNorm
together. Any input size works: the strided convs drop the remainder, as in all three references.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.checkpoints import CheckpointError
from dinokit.config import PretrainedConfig
from dinokit.layers.convnext_block import ConvNeXtBlock, LayerNorm2d
from dinokit.models import dinov3_convnext_keys as keys
from dinokit.models.pretrained import PreTrainedModel
from dinokit.outputs import BackboneOutput, BaseModelOutputWithPoolingAndNoAttention

logger = logging.getLogger(__name__)

# The four released variants (LVD-1689M, distilled from ViT-7B) and their gated transformers repos.
PRESETS = {
    "convnext_tiny": dict(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768]),
    "convnext_small": dict(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768]),
    "convnext_base": dict(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]),
    "convnext_large": dict(depths=[3, 3, 27, 3], hidden_sizes=[192, 384, 768, 1536]),
}
HUB_IDS = {name: f"facebook/dinov3-{name.replace('_', '-')}-pretrain-lvd1689m" for name in PRESETS}


class DINOv3ConvNextConfig(PretrainedConfig):
    """transformers' `DINOv3ConvNextConfig`: the same fields, defaults (ConvNeXt-T) and `config.json`."""

    model_type = "dinov3_convnext"
    _defaults = {**PretrainedConfig._defaults, "num_channels": 3, "hidden_sizes": [96, 192, 384, 768],
                 "depths": [3, 3, 9, 3], "hidden_act": "gelu", "initializer_range": 0.02, "layer_norm_eps": 1e-6,
                 "layer_scale_init_value": 1e-6, "drop_path_rate": 0.0, "image_size": 224}

    def __init__(self, **kwargs: Any) -> None:
        for key in ("hidden_sizes", "depths"):  # transformers' None means the default
            if kwargs.get(key, 0) is None:
                kwargs.pop(key)
        super().__init__(**kwargs)
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} must have one entry per "
                             f"stage")

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def hidden_size(self) -> int:
        """Width of the output tokens (the last stage's)."""
        return self.hidden_sizes[-1]

    @property
    def patch_size(self) -> int:
        """Pixels per output token: the last stage's stride (32 for four stages). The commands size token grids
        with a ViT's patch size, so they size the ConvNeXt's [pooled, map] tokens the same way."""
        return 4 * 2 ** (self.num_stages - 1)


def preset_config(name: str, **overrides: Any) -> DINOv3ConvNextConfig:
    """`convnext_tiny` ... `convnext_large` (also `dinov3_convnext_*` and the hub ids)."""
    key = {v: k for k, v in HUB_IDS.items()}.get(name, name.removeprefix("dinov3_"))
    if key not in PRESETS:
        raise ValueError(f"unknown DINOv3 ConvNeXt preset {name!r}; choose one of {sorted(PRESETS)}")
    return DINOv3ConvNextConfig(**{**PRESETS[key], **overrides})


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "gelu_new": lambda: nn.GELU("tanh")}


# ---------------------------------------------------------------------------------------------------- Meta's module
class DINOv3ConvNeXt(nn.Module):
    """Meta's `ConvNeXt` of dinov3: its parameter names (`state_dict()` is a Meta `.pth`, `norms.3` included) and
    its API (`forward_features`, keyword-only `get_intermediate_layers`, `forward` = normed pooled token)."""

    def __init__(self, in_chans: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, norm_eps: float = 1e-6, act: str = "gelu") -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=norm_eps))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1], eps=norm_eps), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
               for i in range(1, len(dims))])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dims[i], rates[starts[i] + j], layer_scale_init_value, norm_eps,
                                          act_layer=_ACTIVATIONS[act]) for j in range(depths[i])))
            for i in range(len(dims)))
        self.norm = nn.LayerNorm(dims[-1], eps=norm_eps)
        # Meta's per-stage output norms for get_intermediate_layers: identity except the last, which IS `norm`
        # (so Meta's state dicts carry it twice, as `norm` and `norms.3`).
        self.norms = nn.ModuleList([nn.Identity() for _ in dims[:-1]] + [self.norm])
        self.embed_dim, self.embed_dims, self.n_blocks = dims[-1], list(dims), len(dims)
        self.n_storage_tokens = 0
        self.init_weights()

    def init_weights(self) -> None:
        """Meta's init: truncated-normal(0.02) convs and linears with zero bias, unit norms, gamma = init value."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every stage, NCHW (strides 4, 8, 16, 32)."""
        maps = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            maps.append(x)
        return maps

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """Global average of an NCHW map -> (B, C), the way transformers pools (adaptive average pooling)."""
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed `[pooled, flattened map]` tokens (B, 1 + HW, C) of the last stage's map."""
        return self.norm(torch.cat([self.pool(x)[:, None], x.flatten(2).transpose(1, 2)], dim=1))

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        last = self.forward_stages(x)[-1]
        normed = self.tokens(last)
        return {"x_norm_clstoken": normed[:, 0], "x_storage_tokens": normed[:, 1:1],
                "x_norm_patchtokens": normed[:, 1:], "x_prenorm": last.flatten(2).transpose(1, 2), "masks": masks}

    def forward(self, x: torch.Tensor, is_training: bool = False):
        features = self.forward_features(x)
        return features if is_training else features["x_norm_clstoken"]

    def get_intermediate_layers(self, x: torch.Tensor, *, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True) -> tuple:
        """Meta's per-stage outputs: `n` = the last n stages or a list of 0-based stage indices. Patch tokens
        (B, HW, C), or NCHW maps with `reshape`; the class token is the stage's global average. With `norm`,
        stages 1-3 are returned as they are and the last through the final norm (Meta's `norms`). There are no
        registers: `return_extra_tokens` gives an empty (B, 0, C) tensor per stage."""
        indices = list(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else list(n)
        if not indices or any(not 0 <= i < self.n_blocks for i in indices):
            raise ValueError(f"stage indices {indices} out of range for {self.n_blocks} stages")
        maps = self.forward_stages(x)
        outputs = []
        for i in indices:
            stage_map = maps[i]
            cls_token, patches = self.pool(stage_map), stage_map.flatten(2).transpose(1, 2)
            if norm:
                cls_token, patches = self.norms[i](cls_token), self.norms[i](patches)
            if reshape:
                patches = patches.transpose(1, 2).reshape(stage_map.shape).contiguous()
            extra = patches.new_zeros(patches.shape[0], 0, stage_map.shape[1])
            out = (patches,) + ((cls_token,) if return_class_token else ()) + ((extra,) if return_extra_tokens else ())
            outputs.append(out if len(out) > 1 else patches)
        return tuple(outputs)


def build_convnext(config: DINOv3ConvNextConfig) -> DINOv3ConvNeXt:
    return DINOv3ConvNeXt(in_chans=config.num_channels, depths=config.depths, dims=config.hidden_sizes,
                          drop_path_rate=config.drop_path_rate, layer_scale_init_value=config.layer_scale_init_value,
                          norm_eps=config.layer_norm_eps, act=config.hidden_act)


# ---------------------------------------------------------------------------------------------------- transformers
class DINOv3ConvNextPreTrainedModel(PreTrainedModel):
    config_class = DINOv3ConvNextConfig
    base_model_prefix = "model"
    weights_license = "dinov3"
    has_final_norm = True  # the Backbone's transformers layout has no final LayerNorm

    def __init__(self, config: DINOv3ConvNextConfig) -> None:
        super().__init__(config)
        self.convnext = build_convnext(config)

    # Meta's API on the same weights
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.convnext.forward_features(x, masks)

    def get_intermediate_layers(self, x: torch.Tensor, **kwargs) -> tuple:
        return self.convnext.get_intermediate_layers(x, **kwargs)

    def _stages(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(pixel_values, stage1..stage4): transformers' `hidden_states`, the input image first."""
        if not torch.is_tensor(pixel_values):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; use the "
                            f"image processor with return_tensors='pt'")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (batch, {self.config.num_channels}, height, width); got shape "
                             f"{tuple(pixel_values.shape)}")
        smallest = 4 * 2 ** (self.config.num_stages - 1)  # the output stride: 32 for four stages
        if min(pixel_values.shape[-2:]) < smallest:
            raise ValueError(f"images must be at least {smallest}x{smallest} pixels for this ConvNeXt (output "
                             f"stride {smallest}); got {tuple(pixel_values.shape[-2:])}")
        pixel_values = pixel_values.to(self.convnext.downsample_layers[0][0].weight.dtype)
        return (pixel_values, *self.convnext.forward_stages(pixel_values))

    # weights
    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Meta's `.pth` layout, `norms.3` included."""
        state = {k: v for k, v in self.convnext.state_dict().items() if not k.startswith("norms.")}
        return keys.from_meta(state, "meta")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.convnext.state_dict().items() if not k.startswith("norms.")}
        if not self.has_final_norm:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        return keys.from_meta(state, "hf")

    def load_state_dict_any(self, state: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "checkpoint") -> None:
        """Weights of any layout (Meta, transformers 4.56-5.x, timm). A checkpoint of another model, or of a
        ConvNeXt of other widths or depths, fails with one error naming what does not fit."""
        layout = keys.detect_layout(state)
        if layout is None:
            raise CheckpointError(
                f"{source} is not a DINOv3 ConvNeXt checkpoint (first keys: {list(state)[:4]}); a DINOv2 or "
                f"DINOv3 ViT checkpoint loads with dinokit.load_model / the ViT classes instead")
        meta, _ = keys.to_meta(state, layout)
        expected = {k: v for k, v in self.convnext.state_dict().items() if not k.startswith("norms.")}
        optional = set() if self.has_final_norm else {"norm.weight", "norm.bias"}
        if not self.has_final_norm:
            meta = {k: v for k, v in meta.items() if k not in optional}
        missing = sorted(set(expected) - set(meta) - optional)
        unexpected = sorted(set(meta) - set(expected))
        mismatched = [f"{k}: checkpoint {tuple(meta[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in expected.items() if k in meta and meta[k].shape != v.shape]
        problems = [f"{what} {items[:6]}{' ...' if len(items) > 6 else ''}"
                    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", mismatched)) if items]
        if problems:
            found = keys.infer_architecture(meta) if "downsample_layers.0.0.weight" in meta else {}
            message = (f"{source} does not fit {type(self).__name__} (depths {self.config.depths}, widths "
                       f"{self.config.hidden_sizes})" + (f"; the checkpoint has depths {found['depths']}, "
                                                         f"widths {found['hidden_sizes']}" if found else "")
                       + ": " + "; ".join(problems))
            if strict:
                raise CheckpointError(message + ". Load it with dinokit.load_checkpoint (which reads the "
                                      "architecture from the weights), or pass strict=False.")
            logger.warning("loading non-strictly: %s", message)
        loadable = {k: v for k, v in meta.items() if k in expected and v.shape == expected[k].shape}
        self.convnext.load_state_dict(loadable, strict=False)


class DINOv3ConvNextModel(DINOv3ConvNextPreTrainedModel):
    """`last_hidden_state` = final-normed `[pooled, flattened last map]` (B, 1 + HW/32², C); `pooler_output` = its
    first token (Meta's `x_norm_clstoken`); `hidden_states` = (pixel_values, stage1..stage4) maps, NCHW."""

    def forward(self, pixel_values: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        output_hidden_states, return_dict = self._resolve_flags(output_hidden_states, return_dict)
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        hidden_states = self._stages(pixel_values)
        sequence_output = self.convnext.tokens(hidden_states[-1])
        pooled_output = sequence_output[:, 0]
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled_output, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=sequence_output,
                                                        pooler_output=pooled_output, hidden_states=hidden_states)


class DINOv3ConvNextBackbone(DINOv3ConvNextPreTrainedModel):
    """transformers' AutoBackbone: the un-normed maps of the selected stages (`stem` is the input image itself,
    as in transformers), `num_features = [num_channels] + hidden_sizes`."""

    has_final_norm = False

    def __init__(self, config: DINOv3ConvNextConfig) -> None:
        super().__init__(config)
        self.num_features = [config.num_channels] + list(config.hidden_sizes)

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @property
    def channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    def get_input_embeddings(self) -> None:
        return None

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        output_hidden_states, return_dict = self._resolve_flags(output_hidden_states, return_dict)
        hidden_states = self._stages(pixel_values)
        feature_maps = tuple(h for name, h in zip(self.stage_names, hidden_states) if name in self.out_features)
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (feature_maps, hidden_states) if v is not None)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


# The model class of each `load_model(task=...)` for this family.
MODEL_CLASSES = {"base": DINOv3ConvNextModel, "backbone": DINOv3ConvNextBackbone}
