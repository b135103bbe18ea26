"""DINOv3 ViT (dinov3.md): `DINOv3ViTConfig`, `DINOv3ViTModel`, `DINOv3ViTBackbone` with transformers 5.x's
fields and outputs, and Meta's `forward_features` / keyword-only `get_intermediate_layers` on the same objects.

The backbone is dinokit's `DinoVisionTransformer` with `pos_encoding="rope"`: the same blocks, attention and CPU
fast paths as DINOv2; what differs is the position encoding (axial RoPE on the patch tokens, no table), 4
registers, LayerNorm eps 1e-5, the FFN width taken from the config, the key bias fixed at zero, and the optional
`local_cls_norm` (7B, SAT-L; training only).

RoPE periods (`rope_periods`): "fp32" computes them as transformers and timm do; "bf16" uses the bfloat16-rounded
values stored in Meta's `.pth` files, with which Meta's own models run. A model loaded from a Meta file takes that
file's choice; transformers/timm files get "fp32"; either can be overridden (`rope_periods=...`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dinokit import checkpoints_dinov3 as ckpt3
from dinokit.config import _COMMON_DEFAULTS, Dinov2Config
from dinokit.hf import Dinov2Backbone, Dinov2ForImageClassification, Dinov2Model, Dinov2PreTrainedModel
from dinokit.models import dinov3_license
from dinokit.outputs import ModelOutput
from dinokit.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

# The heads a task model's file holds under dinokit's names (classification, semantic segmentation).
HEAD_PREFIXES = ("classifier.", "decode_head.")

_DINOV3_VIT_DEFAULTS: dict[str, Any] = {
    # transformers' DINOv3ViTConfig fields and defaults (ViT-S/16 shape)
    "patch_size": 16,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "hidden_act": "gelu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "rope_theta": 100.0,
    "image_size": 224,
    "num_channels": 3,
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_gated_mlp": False,
    "num_register_tokens": 0,
    "pos_embed_shift": None,
    "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
    "apply_layernorm": True,
    "reshape_hidden_states": True,
    # dinokit: which RoPE period values the model runs with ("fp32" or "bf16", see the module docstring), and
    # Meta's untied norm for the local crops' CLS (7B, SAT-L)
    "rope_periods": "fp32",
    "untie_global_and_local_cls_norm": False,
}


class DINOv3ViTConfig(Dinov2Config):
    model_type = "dinov3_vit"
    family = "dinov3_vit"
    _defaults = {**_COMMON_DEFAULTS, **_DINOV3_VIT_DEFAULTS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> DINOv3ViTConfig:
        data = {**data, **overrides}
        if data.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"config has model_type {data.get('model_type')!r}, not {cls.model_type!r}")
        return cls(**data)

    @property
    def num_positions(self) -> int:  # no position table; the nominal grid
        size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        return (size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("use_mask_token", "mlp_ratio", "use_swiglu_ffn", "interpolate_offset", "interpolate_antialias",
                    "qkv_bias", "num_classifier_layers"):
            out.pop(key, None)
        return out


def build_dinov3_vit(config: DINOv3ViTConfig) -> DinoV3VisionTransformer:
    if config.key_bias:
        raise ValueError("DINOv3 models have no key bias (key_bias=True is not a DINOv3 architecture)")
    if config.query_bias != config.value_bias:
        raise ValueError("dinokit's fused qkv needs query_bias == value_bias (every DINOv3 model has both or none)")
    if config.use_gated_mlp and config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"the gated (SwiGLU) MLP uses SiLU; got hidden_act={config.hidden_act!r}")
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return DinoV3VisionTransformer(
        img_size=image_size, patch_size=config.patch_size, in_chans=config.num_channels,
        embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        qkv_bias=config.query_bias, mask_k_bias=config.query_bias, proj_bias=config.proj_bias,
        ffn_bias=config.mlp_bias, drop_path_rate=config.drop_path_rate, init_values=config.layerscale_value,
        ffn_layer="swiglu" if config.use_gated_mlp else "mlp", ffn_hidden=config.intermediate_size,
        act_layer=config.hidden_act, num_register_tokens=config.num_register_tokens,
        norm_eps=config.layer_norm_eps, pos_encoding="rope", rope_base=config.rope_theta,
        rope_shift_coords=config.pos_embed_shift, rope_jitter_coords=config.pos_embed_jitter,
        rope_rescale_coords=config.pos_embed_rescale, rope_periods_dtype=config.rope_periods,
        untie_global_and_local_cls_norm=config.untie_global_and_local_cls_norm,
    )


class DinoV3VisionTransformer(DinoVisionTransformer):
    """The DINOv3 backbone: Meta's DINOv3 API (keyword-only `get_intermediate_layers`, `return_extra_tokens`)."""

    def get_intermediate_layers(self, x: torch.Tensor, *, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True):
        """Patch tokens of the last `n` blocks (or of the listed 0-based blocks); with the flags, per block
        (patches, cls), (patches, registers) or (patches, cls, registers)."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        first_patch = 1 + self.num_register_tokens
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:first_patch] for out in outputs]
        outputs = [out[:, first_patch:] for out in outputs]
        if reshape:
            B, _, H, W = x.shape
            gh, gw = H // self.patch_size, W // self.patch_size
            outputs = [out.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token and return_extra_tokens:
            return tuple(zip(outputs, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        if return_extra_tokens:
            return tuple(zip(outputs, extra_tokens))
        return tuple(outputs)


class DINOv3ViTPreTrainedModel(Dinov2PreTrainedModel):
    config_class = DINOv3ViTConfig
    base_model_prefix = "model"

    @classmethod
    def build_backbone(cls, config: DINOv3ViTConfig) -> DinoV3VisionTransformer:
        return build_dinov3_vit(config)

    @classmethod
    def read_config(cls, source, revision=None, cache_dir=None) -> DINOv3ViTConfig:
        from dinokit.hub import resolve_file

        return DINOv3ViTConfig.from_json_file(resolve_file(source, "config.json", revision=revision,
                                                          cache_dir=cache_dir))

    @classmethod
    def base_model_class(cls) -> type[DINOv3ViTModel]:
        return DINOv3ViTModel

    @classmethod
    def normal_form_from_file(cls, state: Mapping[str, torch.Tensor]):
        """(backbone in the normal form, head): a task model's file holds the backbone under `dinov3_vit.` and
        its head (`classifier.*`, `decode_head.*`) under dinokit's names."""
        prefix = DINOv3ViTConfig.model_type + "."
        head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
        backbone = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        normal, _ = ckpt3.to_normal(backbone)
        return normal, head

    def get_intermediate_layers(self, x: torch.Tensor, *, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True):
        return self.vit_module.get_intermediate_layers(x, n=n, reshape=reshape, return_class_token=return_class_token,
                                                       return_extra_tokens=return_extra_tokens, norm=norm)

    def load_meta_state_dict(self, backbone: Mapping[str, torch.Tensor], head=None, strict: bool = True,
                             source: str = "checkpoint") -> None:
        """Load a normal-form state dict. The periods are the config's choice (a Meta file's own values were
        read into the config when it was inferred), so the file's buffer never silently overrides it."""
        vit = self.vit_module
        backbone = dict(backbone)
        backbone["rope_embed.periods"] = vit.rope_embed.periods.detach().clone()
        if vit.local_cls_norm is not None and "local_cls_norm.weight" not in backbone:
            # transformers and timm files drop it; it only acts on local crops in training
            logger.info("%s has no local_cls_norm (its layout drops it): kept at its initial values; it is "
                        "used only for local crops in training", source)
            backbone.update({f"local_cls_norm.{k}": v.detach().clone()
                             for k, v in vit.local_cls_norm.state_dict().items()})
        super().load_meta_state_dict(backbone, head, strict=strict, source=source)
        vit._unmasked_bias_fixup()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """transformers' names; a task model (no transformers class exists) keeps its backbone under
        `dinov3_vit.`, as transformers' task models of other families do, and its head under dinokit's names."""
        backbone, head = self.meta_state_dict()
        hf = ckpt3.normal_to_hf(backbone)
        if self.base_model_prefix_in_checkpoint:
            hf = {f"{self.config.model_type}.{k}": v for k, v in hf.items()}
        return {**hf, **head}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' layout (`model.layer.N.*`), the config, and the DINOv3 License notice of the weights."""
        super().save_pretrained(save_directory, *args, **kwargs)
        dinov3_license.write_notice_dir(save_directory)


class DINOv3ViTModel(DINOv3ViTPreTrainedModel, Dinov2Model):
    """`last_hidden_state` (final-normed [CLS, 4 registers, patches]), `pooler_output` (its CLS),
    `hidden_states` (embeddings, then each block, un-normed), `attentions`; `bool_masked_pos` [B, HW]."""


class DINOv3ViTForImageClassification(DINOv3ViTPreTrainedModel, Dinov2ForImageClassification):
    """A linear head on `[CLS, mean of the patch tokens]` (registers excluded), as DINOv2's and as Meta's DINOv3
    linear probes; transformers has no DINOv3 classifier, so the file is dinokit's (backbone under
    `dinov3_vit.`, transformers' names; `classifier.*`)."""


class DINOv3ViTBackboneOutput(ModelOutput):
    _fields = ("feature_maps", "hidden_states", "attentions", "cls_tokens")


class DINOv3ViTBackbone(DINOv3ViTPreTrainedModel, Dinov2Backbone):
    """Patch-token maps of the selected stages as transformers 5.x: the last stage always normed, the others
    iff `apply_layernorm`; prefix tokens dropped; (B, D, H/16, W/16) iff `reshape_hidden_states`; the CLS of
    each stage in `cls_tokens` when the config sets `return_class_token`."""

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs):
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict)
        _, hidden_states, attentions = self._encode(pixel_values, None, None, output_attentions)
        batch, _, height, width = pixel_values.shape
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        first_patch = 1 + self.config.num_register_tokens
        return_class_token = getattr(self.config, "return_class_token", False)
        last = len(self.stage_names) - 1
        feature_maps, cls_tokens, sequence_output = [], [], None
        for idx, (stage, hidden) in enumerate(zip(self.stage_names, hidden_states)):
            if idx == last or self.config.apply_layernorm:
                hidden = self.vit.norm(hidden)
            if idx == last:
                sequence_output = hidden
            if stage not in self.out_features:
                continue
            if return_class_token:
                cls_tokens.append(hidden[:, 0])
            patches = hidden[:, first_patch:]
            if self.config.reshape_hidden_states:
                patches = patches.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
            feature_maps.append(patches)
        output = DINOv3ViTBackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions, cls_tokens=tuple(cls_tokens) if return_class_token else None)
        output.last_hidden_state = sequence_output
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------- presets
_ARCH: dict[str, dict[str, Any]] = {
    "vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vits16plus": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       use_gated_mlp=True, hidden_act="silu"),
    "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "vith16plus": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                       use_gated_mlp=True, hidden_act="silu"),
    "vit7b16": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, intermediate_size=8192,
                    use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False,
                    untie_global_and_local_cls_norm=True),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # the SAT-493M models' normalisation
HUB_IDS = {
    **{f"dinov3_{arch}": f"facebook/dinov3-{arch}-pretrain-lvd1689m" for arch in _ARCH},
    "dinov3_vitl16_sat493m": "facebook/dinov3-vitl16-pretrain-sat493m",
    "dinov3_vit7b16_sat493m": "facebook/dinov3-vit7b16-pretrain-sat493m",
}
PRESETS = sorted(HUB_IDS)


def preset_config(name: str, **overrides: Any) -> DINOv3ViTConfig:
    """Config of a released DINOv3 ViT: `dinov3_vits16`, ..., `dinov3_vit7b16`, the SAT-493M `dinov3_vitl16_sat493m`
    and `dinov3_vit7b16_sat493m` (also their hub ids). `image_mean`/`image_std` carry the model's normalisation."""
    key = {v: k for k, v in HUB_IDS.items()}.get(name, name)
    key = key if key.startswith("dinov3_") else f"dinov3_{key}"
    if key not in HUB_IDS:
        raise ValueError(f"unknown DINOv3 preset {name!r}; choose one of {PRESETS}")
    arch = key.removeprefix("dinov3_").removesuffix("_sat493m")
    sat = key.endswith("_sat493m")
    kwargs = dict(num_register_tokens=4, layerscale_value=1e-5, **_ARCH[arch])
    if sat:
        kwargs["untie_global_and_local_cls_norm"] = True
    kwargs.update(image_mean=list(SAT_MEAN if sat else IMAGENET_MEAN), image_std=list(SAT_STD if sat else IMAGENET_STD))
    kwargs.update(overrides)
    return DINOv3ViTConfig(**kwargs)


MODEL_CLASSES = {"base": DINOv3ViTModel, "classification": DINOv3ViTForImageClassification,
                 "backbone": DINOv3ViTBackbone}

__all__ = ["DINOv3ViTConfig", "DINOv3ViTPreTrainedModel", "DINOv3ViTModel", "DINOv3ViTBackbone",
           "DINOv3ViTForImageClassification",
           "DINOv3ViTBackboneOutput", "DinoV3VisionTransformer", "build_dinov3_vit", "preset_config", "PRESETS",
           "HUB_IDS"]
