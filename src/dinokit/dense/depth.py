"""`Dinov2ForDepthEstimation`: a dinokit DINOv2 backbone with one of three depth heads.

- `dpt`: transformers' `DPTForDepthEstimation` on a Dinov2 backbone (Meta's `*_dd` depthers, converted):
  config.json is transformers' (`model_type: dpt`), so a checkpoint saved by either library loads in the other.
- `depth_anything`: transformers' `DepthAnythingForDepthEstimation` (`model_type: depth_anything`), likewise.
- `linear`: Meta's linear depth head (`*_ld`, `dense.linear_depth`) on 1 or 4 blocks; config.json has
  `model_type: dinov2_linear_depth` (transformers has no such model).

`predicted_depth` is (B, h, w) at the head's resolution (DPT: 16/14 of the input; linear: 4x the patch grid), as
transformers returns it; `predict()` gives Meta's inference output (clamped to the depth range, resized to the
input). Inputs whose sides are not multiples of the patch size are centre-padded, as Meta's depthers do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinokit import atomic
from dinokit import checkpoints as ckpt
from dinokit.config import CONFIG_CLASSES, Dinov2Config
from dinokit.dense.dpt import DPTNeck, DPTSettings, build_head
from dinokit.dense.linear_depth import LinearDepthHead
from dinokit.dense.losses import sigloss
from dinokit.dense.padding import center_pad
from dinokit.hf import Dinov2Backbone
from dinokit.models.dinov3_vit import DINOv3ViTBackbone, DINOv3ViTConfig
from dinokit.outputs import ModelOutput

LINEAR_MODEL_TYPE = "dinov2_linear_depth"
BACKBONE_PREFIX = "backbone."
# The ViT backbones a depth model runs on: config class and backbone class per backbone_config model_type.
BACKBONE_CONFIGS = {**CONFIG_CLASSES, DINOv3ViTConfig.model_type: DINOv3ViTConfig}
BACKBONE_CLASSES = {"dinov2": Dinov2Backbone, "dinov3_vit": DINOv3ViTBackbone}


class DepthEstimatorOutput(ModelOutput):
    _fields = ("loss", "predicted_depth", "hidden_states", "attentions")


def meta_layer_indices(num_layers: int, n: int) -> list[int]:
    """0-based blocks of Meta's depthers: the last block, or 4 spread blocks (S/B [2,5,8,11], L [4,11,17,23],
    g [9,19,29,39]); other depths get the S/B rule, i*L/4 - 1."""
    if n == 1:
        return [num_layers - 1]
    table = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}
    return table.get(num_layers, [max(0, round(i * num_layers / 4) - 1) for i in range(1, 5)])


def _check_backbone_type(model_type: str) -> str:
    if model_type not in BACKBONE_CONFIGS:
        raise ValueError(f"depth model backbone is {model_type!r}; depth heads read ViT patch tokens, which "
                         f"dinokit has for {', '.join(sorted(BACKBONE_CONFIGS))}")
    return model_type


class DepthConfig:
    """The model's settings as the config.json dict of transformers (dpt / depth_anything) or dinokit (linear)."""

    def __init__(self, data: dict):
        self.data = dict(data)
        self.model_type = self.data.get("model_type")
        backbone = dict(self.data.get("backbone_config") or {})
        if not backbone:
            raise ValueError("depth config has no backbone_config")
        backbone_type = _check_backbone_type(backbone.get("model_type", "dinov2"))
        self.backbone_config: Dinov2Config = BACKBONE_CONFIGS[backbone_type](**backbone)
        d = self.data
        if self.model_type == "dpt":
            if d.get("is_hybrid") or d.get("use_batch_norm_in_fusion_residual"):
                raise ValueError("DPT-Hybrid and batch-norm fusion are not DINOv2 DPT heads; dinokit does not run them")
            bias = d.get("use_bias_in_fusion_residual")
            self.settings = DPTSettings(
                kind="dpt", hidden_size=self.backbone_config.hidden_size, patch_size=self.backbone_config.patch_size,
                neck_hidden_sizes=list(d.get("neck_hidden_sizes", [96, 192, 384, 768])),
                reassemble_factors=list(d.get("reassemble_factors", [4, 2, 1, 0.5])),
                fusion_hidden_size=d.get("fusion_hidden_size", 256), readout_type=d.get("readout_type", "ignore"),
                fusion_residual_bias=True if bias is None else bool(bias),
                add_projection=bool(d.get("add_projection", False)), head_in_index=d.get("head_in_index", -1),
                min_depth=float(d.get("dinokit_min_depth", 0.0)))
        elif self.model_type == "depth_anything":
            self.settings = DPTSettings(
                kind="depth_anything", hidden_size=d.get("reassemble_hidden_size", self.backbone_config.hidden_size),
                patch_size=d.get("patch_size", 14), neck_hidden_sizes=list(d.get("neck_hidden_sizes", [96, 192, 384, 768])),
                reassemble_factors=list(d.get("reassemble_factors", [4, 2, 1, 0.5])),
                fusion_hidden_size=d.get("fusion_hidden_size", 64), readout_type="ignore", fusion_residual_bias=True,
                add_projection=False, head_in_index=d.get("head_in_index", -1),
                head_hidden_size=d.get("head_hidden_size", 32),
                depth_estimation_type=d.get("depth_estimation_type", "relative"), max_depth=d.get("max_depth") or 1.0)
        elif self.model_type == LINEAR_MODEL_TYPE:
            self.settings = None
        else:
            raise ValueError(f"unknown depth model_type {self.model_type!r}: dinokit reads dpt, depth_anything and "
                             f"{LINEAR_MODEL_TYPE}")

    @property
    def head_type(self) -> str:
        return "linear" if self.model_type == LINEAR_MODEL_TYPE else self.model_type

    def to_dict(self) -> dict:
        out = dict(self.data)
        out["backbone_config"] = self.backbone_config.to_dict()
        return out

    # ------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, backbone_config: Dinov2Config, n_layers: int = 4, min_depth: float = 0.001,
               max_depth: float = 10.0) -> DepthConfig:
        _check_backbone_type(backbone_config.model_type)
        blocks = meta_layer_indices(backbone_config.num_hidden_layers, n_layers)
        return cls({"model_type": LINEAR_MODEL_TYPE, "architectures": ["Dinov2ForDepthEstimation"],
                    "backbone_config": _backbone_dict(backbone_config, blocks, apply_layernorm=False),
                    "n_layers": n_layers, "n_bins": 256, "bins_strategy": "UD", "norm_strategy": "linear",
                    "min_depth": min_depth, "max_depth": max_depth})

    @classmethod
    def dpt(cls, backbone_config: Dinov2Config, min_depth: float = 0.0) -> DepthConfig:
        """Meta's DPT head as transformers converts it (facebook/dpt-dinov2-*): CLS readout, 4 Meta blocks."""
        _check_backbone_type(backbone_config.model_type)
        d = backbone_config.hidden_size
        blocks = meta_layer_indices(backbone_config.num_hidden_layers, 4)
        data = {"model_type": "dpt", "architectures": ["DPTForDepthEstimation"], "is_hybrid": False,
                "backbone_config": _backbone_dict(backbone_config, blocks, apply_layernorm=False),
                "neck_hidden_sizes": [d // 8, d // 4, d // 2, d], "reassemble_factors": [4, 2, 1, 0.5],
                "fusion_hidden_size": 256, "readout_type": "project", "use_bias_in_fusion_residual": False,
                "use_batch_norm_in_fusion_residual": False, "add_projection": True, "head_in_index": -1,
                "hidden_act": "gelu", "neck_ignore_stages": [], "backbone": None, "use_pretrained_backbone": False,
                "use_timm_backbone": False}
        if min_depth:
            data["dinokit_min_depth"] = min_depth
        return cls(data)


def _backbone_dict(config: Dinov2Config, blocks: list[int], apply_layernorm: bool) -> dict:
    out = config.to_dict()
    for key in ("out_features", "stage_names", "num_classifier_layers", "architectures"):
        out.pop(key, None)
    out.update(out_indices=[b + 1 for b in blocks], apply_layernorm=apply_layernorm, reshape_hidden_states=False)
    return out


class Dinov2ForDepthEstimation(nn.Module):
    main_input_name = "pixel_values"

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.config = config
        bc = config.backbone_config
        self.backbone = BACKBONE_CLASSES[bc.family](bc)
        if config.head_type == "linear":
            d = config.data
            self.head = LinearDepthHead(bc.hidden_size, len(bc.out_indices), d.get("min_depth", 0.001),
                                        d.get("max_depth", 10.0), d.get("n_bins", 256))
            self.neck = None
        else:
            self.neck = DPTNeck(config.settings)
            self.head = build_head(config.settings)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def depth_range(self) -> tuple[float, float]:
        if self.config.head_type == "linear":
            return self.head.min_depth, self.head.max_depth
        if self.config.head_type == "depth_anything":
            return 0.0, float(self.config.settings.max_depth)
        return float(self.config.settings.min_depth), float("inf")

    def levels(self, pixel_values: torch.Tensor):
        """(patch tokens (B, N, D), CLS (B, D)) of the selected blocks (final-normed iff the backbone config's
        `apply_layernorm`), the patch grid, all hidden states. Read from the blocks directly, the same way for
        both ViT families (their Backbone classes differ in what they norm and drop)."""
        bc = self.config.backbone_config
        _, hidden_states, _ = self.backbone._encode(pixel_values)
        first_patch = 1 + bc.num_register_tokens
        grid = (pixel_values.shape[-2] // bc.patch_size, pixel_values.shape[-1] // bc.patch_size)
        levels = []
        for index in bc.out_indices:
            h = self.backbone.vit.norm(hidden_states[index]) if bc.apply_layernorm else hidden_states[index]
            levels.append((h[:, first_patch:], h[:, 0]))
        return levels, grid, hidden_states

    def head_forward(self, levels, grid) -> torch.Tensor:
        if self.neck is None:
            maps = [(t.transpose(1, 2).reshape(t.shape[0], -1, *grid), cls) for t, cls in levels]
            return self.head(maps).squeeze(1)
        return self.head(self.neck(levels, grid), grid)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        pixel_values = center_pad(pixel_values, self.config.backbone_config.patch_size)
        levels, grid, _ = self.levels(pixel_values)
        depth = self.head_forward(levels, grid)
        loss = None
        if labels is not None:
            resized = F.interpolate(depth.unsqueeze(1), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = sigloss(resized.squeeze(1), labels, max_depth=self.depth_range[1])
        if return_dict is False:
            return (loss, depth) if loss is not None else (depth,)
        return DepthEstimatorOutput(loss=loss, predicted_depth=depth)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Meta's inference: depth clamped to the head's range and resized to the input (B, H, W)."""
        depth = self(pixel_values).predicted_depth
        low, high = self.depth_range
        depth = depth.clamp(min=low, max=high)
        return F.interpolate(depth.unsqueeze(1), size=pixel_values.shape[-2:], mode="bilinear",
                             align_corners=False).squeeze(1)

    # ------------------------------------------------------------ weights
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """transformers' names: `backbone.embeddings...`, `neck...`, `head...` (linear: `head.conv_depth.*`)."""
        out = {BACKBONE_PREFIX + k: v for k, v in self.backbone.hf_state_dict().items()}
        for name, module in (("neck.", self.neck), ("head.", self.head)):
            if module is not None:
                out.update({name + k: v for k, v in module.state_dict().items()})
        return out

    def load_hf_state_dict(self, state, source: str = "checkpoint") -> None:
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        rest = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
        normal, _ = self.backbone.normal_form_from_file(backbone)
        self.backbone.load_meta_state_dict(normal, None, source=source)
        heads = nn.ModuleDict({"head": self.head, **({"neck": self.neck} if self.neck is not None else {})})
        expected = heads.state_dict()
        missing = sorted(set(expected) - set(rest))
        unexpected = sorted(set(rest) - set(expected))
        mismatched = [k for k in expected if k in rest and rest[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise ckpt.CheckpointError(
                f"the depth head in {source} does not fit its config ({self.config.head_type}): missing "
                f"{missing[:6]}, unexpected {unexpected[:6]}, shape mismatches {mismatched[:6]}")
        heads.load_state_dict(rest)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """model.safetensors, then config.json (each written atomically): loadable by transformers for dpt and
        depth_anything heads."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        ckpt.save_file_atomic(self.hf_state_dict(), directory / ckpt.SAFE_WEIGHTS_NAME)
        atomic.write_text(directory / "config.json", json.dumps(self.config.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Dinov2ForDepthEstimation:
        directory = Path(path).expanduser()
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} has no config.json: not a depth model directory")
        model = cls(DepthConfig(json.loads(config_file.read_text())))
        model.load_hf_state_dict(ckpt.read_hf_weights(directory), source=str(directory))
        return model.eval()
