"""Auto classes with transformers' semantics, dispatching on `model_type` (`dinov2`, `dinov2_with_registers`,
`dinov3_vit`); `dinokit.load_model`, in `loading`, is the tools' entry point."""

from __future__ import annotations

import json
import os

from dinokit.config import CONFIG_CLASSES, Dinov2Config
from dinokit.hf import Dinov2Backbone, Dinov2ForImageClassification, Dinov2Model, Dinov2PreTrainedModel
from dinokit.models.dinov3_vit import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel

CONFIGS: dict[str, type[Dinov2Config]] = {**CONFIG_CLASSES, DINOv3ViTConfig.model_type: DINOv3ViTConfig}

# family -> task -> model class
MODELS: dict[str, dict[str, type[Dinov2PreTrainedModel]]] = {
    "dinov2": {"base": Dinov2Model, "classification": Dinov2ForImageClassification, "backbone": Dinov2Backbone},
    "dinov3_vit": {"base": DINOv3ViTModel, "backbone": DINOv3ViTBackbone},
}


def config_from_dict(data: dict) -> Dinov2Config:
    model_type = data.get("model_type", "dinov2")
    if model_type not in CONFIGS:
        raise ValueError(f"config has model_type {model_type!r}; dinokit reads {sorted(CONFIGS)}")
    return CONFIGS[model_type].from_dict(data)


def model_class(config: Dinov2Config, task: str) -> type[Dinov2PreTrainedModel]:
    classes = MODELS[config.family]
    if task not in classes:
        raise ValueError(f"{config.model_type} models have no {task!r} class; they have {sorted(classes)}")
    return classes[task]


def read_config(path_or_id: str | os.PathLike, **kwargs) -> Dinov2Config:
    """The config.json of a directory or hub id, as the config class of its model_type."""
    from dinokit.hub import resolve_file

    path = resolve_file(path_or_id, "config.json", **kwargs)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-save the model's config.json") from None
    return config_from_dict(data)


class AutoConfig:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **overrides) -> Dinov2Config:
        config = read_config(path_or_id)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    @staticmethod
    def for_model(model_type: str, **kwargs) -> Dinov2Config:
        if model_type not in CONFIGS:
            raise ValueError(f"unknown model_type {model_type!r}; dinokit has {sorted(CONFIGS)}")
        return CONFIGS[model_type](**kwargs)


class _AutoModelBase:
    task: str

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *args, config: Dinov2Config | None = None,
                        **kwargs) -> Dinov2PreTrainedModel:
        config_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir") if k in kwargs}
        if config is None:
            config = read_config(path_or_id, **config_kwargs)
        return model_class(config, cls.task).from_pretrained(path_or_id, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config: Dinov2Config) -> Dinov2PreTrainedModel:
        return model_class(config, cls.task)(config)


class AutoModel(_AutoModelBase):
    """The base model of each family (a classifier checkpoint loads without its head)."""

    task = "base"


class AutoModelForImageClassification(_AutoModelBase):
    task = "classification"


class AutoBackbone(_AutoModelBase):
    task = "backbone"
