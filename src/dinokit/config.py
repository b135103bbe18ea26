"""`PretrainedConfig` (what every family's config shares) and `Dinov2Config`: every field of transformers' Dinov2Config / Dinov2WithRegistersConfig, plus the
interpolation mode, read from and written to Hugging Face `config.json`.

Interpolation defaults (model.md §3): a transformers `config.json` without `interpolate_*` keys behaves like
transformers >= 4.45 — `dinov2`: bicubic to the target size; `dinov2_with_registers`: the same with antialiasing.
Meta checkpoints set `interpolate_offset=0.1` (no registers) as Meta's hub models do; see checkpoints.py.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"

# Fields every transformers PretrainedConfig carries, with their defaults.
_COMMON_DEFAULTS: dict[str, Any] = {
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "torchscript": False,
    "problem_type": None,
    "id2label": None,
    "label2id": None,
    "architectures": None,
}

_DINOV2_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-6,
    "image_size": 224,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_swiglu_ffn": False,
    "apply_layernorm": True,
    "reshape_hidden_states": True,
    "use_mask_token": True,
    "num_register_tokens": 0,
    "interpolate_offset": 0.0,
    "interpolate_antialias": False,
    # dinokit extension: 4 = Meta's `linear4` head (CLS of the last 4 blocks + mean patch token of the last).
    "num_classifier_layers": 1,
}

# Keys computed from others, never stored as independent state.
_DERIVED = {"stage_names", "out_features", "out_indices", "num_labels", "transformers_version", "model_type",
            "_name_or_path", "torch_dtype", "dtype"}


class PretrainedConfig:
    """What every dinokit model config shares with transformers' `PretrainedConfig`: the common fields, the label
    maps, the backbone stage selection (`out_features` / `out_indices` over `stage_names`), and `config.json`
    reading and writing. A model family sets `model_type`, `_defaults` and `stage_names`."""

    model_type = ""
    _defaults: dict[str, Any] = dict(_COMMON_DEFAULTS)

    def __init__(self, out_features: list[str] | None = None, out_indices: list[int] | None = None,
                 num_labels: int | None = None, **kwargs: Any) -> None:
        for key, default in self._defaults.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        for key in _DERIVED - {"model_type"}:
            kwargs.pop(key, None)
        kwargs.pop("model_type", None)
        # Unknown keys are kept and written back, as transformers does.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self._set_labels(num_labels)
        self.set_output_features_output_indices(out_features, out_indices)

    # ------------------------------------------------------------ labels
    def _set_labels(self, num_labels: int | None) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        if num_labels is not None and (self.id2label is None or len(self.id2label) != num_labels):
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        if self.id2label is None:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {k: int(v) for k, v in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self.id2label, self.label2id = None, None
        self._set_labels(value)

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.torchscript

    # ------------------------------------------------------------ backbone stages
    @property
    def stage_names(self) -> list[str]:
        raise NotImplementedError

    def set_output_features_output_indices(self, out_features=None, out_indices=None) -> None:
        names = self.stage_names
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_features is None:
            if any(not -len(names) <= i < len(names) for i in out_indices):
                raise ValueError(f"out_indices {out_indices} out of range for stages {names}")
            out_features = [names[i] for i in out_indices]
        unknown = [f for f in (out_features or []) if f not in names]
        if unknown:
            raise ValueError(f"out_features {unknown} are not stages of this model; choose from {names}")
        if out_indices is None:
            out_indices = [names.index(f) for f in out_features]
        if any(not -len(names) <= i < len(names) for i in out_indices):
            raise ValueError(f"out_indices {out_indices} out of range for stages {names}")
        if [names[i] for i in out_indices] != list(out_features):
            raise ValueError(f"out_features {out_features} and out_indices {out_indices} do not agree")
        self._out_features, self._out_indices = list(out_features), list(out_indices)

    @property
    def out_features(self) -> list[str]:
        return self._out_features

    @out_features.setter
    def out_features(self, value) -> None:
        self.set_output_features_output_indices(value, None)

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, value) -> None:
        self.set_output_features_output_indices(None, value)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["out_features"] = list(self._out_features)
        out["out_indices"] = list(self._out_indices)
        out["stage_names"] = self.stage_names
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        from dinokit import atomic

        atomic.write_text(path / CONFIG_NAME, self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        data = {**data, **overrides}
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config has model_type {model_type!r}, not {cls.model_type!r}: read it with "
                             f"dinokit.AutoConfig, which picks the config class by model_type")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PretrainedConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); re-save the model's config.json") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        from dinokit.hub import resolve_file

        config = cls.from_json_file(resolve_file(path_or_id, CONFIG_NAME))
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def copy(self, **changes: Any) -> PretrainedConfig:
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class Dinov2Config(PretrainedConfig):
    model_type = "dinov2"
    family = "dinov2"  # which model classes take this config (DINOv3 ViT's config subclasses it and says "dinov3_vit")
    _defaults = {**_COMMON_DEFAULTS, **_DINOV2_DEFAULTS}

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        return (size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.model_type == "dinov2_with_registers":
            out.pop("use_mask_token", None)  # not a field of transformers' with-registers config
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> Dinov2Config:
        data = {**data, **overrides}
        model_type = data.get("model_type", cls.model_type)
        target = CONFIG_CLASSES.get(model_type)
        if target is None:
            raise ValueError(f"config has model_type {model_type!r}; Dinov2Config reads 'dinov2' and "
                             f"'dinov2_with_registers' (use dinokit.AutoConfig for the other families)")
        return target(**data)


class Dinov2WithRegistersConfig(Dinov2Config):
    model_type = "dinov2_with_registers"
    # transformers' class defaults (patch 16 is its default too); the hub configs set 14 and 518.
    _defaults = {**Dinov2Config._defaults, "num_register_tokens": 4, "patch_size": 16,
                 "interpolate_antialias": True}


CONFIG_CLASSES: dict[str, type[Dinov2Config]] = {
    "dinov2": Dinov2Config,
    "dinov2_with_registers": Dinov2WithRegistersConfig,
}

# The facebook/dinov2-* hub configs (518 px, patch 14).
_ARCH = {
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
HUB_IDS = {
    "vits14": "facebook/dinov2-small",
    "vitb14": "facebook/dinov2-base",
    "vitl14": "facebook/dinov2-large",
    "vitg14": "facebook/dinov2-giant",
    "vits14_reg4": "facebook/dinov2-with-registers-small",
    "vitb14_reg4": "facebook/dinov2-with-registers-base",
    "vitl14_reg4": "facebook/dinov2-with-registers-large",
    "vitg14_reg4": "facebook/dinov2-with-registers-giant",
}
PRESETS = sorted(HUB_IDS)


def preset_config(name: str, **overrides: Any) -> Dinov2Config:
    """Config of a released model: `vits14`, ..., `vitg14_reg4` (also accepts `dinov2_vits14[_reg]` and hub ids)."""
    key = name.replace("dinov2_", "").replace("_reg4", "_reg").replace("_reg", "_reg4")
    by_hub = {v: k for k, v in HUB_IDS.items()}
    key = by_hub.get(name, key)
    if key not in HUB_IDS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    arch = _ARCH[key.split("_")[0]]
    common = dict(image_size=518, patch_size=14, architectures=None, **arch)
    if key.endswith("_reg4"):
        config = Dinov2WithRegistersConfig(num_register_tokens=4, interpolate_offset=0.0,
                                           interpolate_antialias=True, **common)
    else:
        config = Dinov2Config(**common)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config
