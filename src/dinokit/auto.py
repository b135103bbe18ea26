"""Auto classes with transformers' semantics (`dinokit.load_model`, in `loading`, is the tools' entry point):
the config's `model_type` picks the family (`dinov2`, `dinov2_with_registers`, `dinov3_vit`, `dinov3_convnext`)."""

from __future__ import annotations

import json
import os

from dinokit.config import CONFIG_CLASSES, CONFIG_NAME, PretrainedConfig
from dinokit.hf import MODEL_CLASSES as DINOV2_CLASSES
from dinokit.models import dinov3_convnext, dinov3_vit

# model_type -> its config class, and its model class per task (`base`, `classification`, `backbone`).
CONFIGS: dict[str, type[PretrainedConfig]] = {
    **CONFIG_CLASSES,
    dinov3_vit.DINOv3ViTConfig.model_type: dinov3_vit.DINOv3ViTConfig,
    dinov3_convnext.DINOv3ConvNextConfig.model_type: dinov3_convnext.DINOv3ConvNextConfig,
}
MODELS: dict[str, dict[str, type]] = {
    "dinov2": DINOV2_CLASSES,
    "dinov2_with_registers": DINOV2_CLASSES,
    dinov3_vit.DINOv3ViTConfig.model_type: dinov3_vit.MODEL_CLASSES,
    dinov3_convnext.DINOv3ConvNextConfig.model_type: dinov3_convnext.MODEL_CLASSES,
}


def config_class(model_type: str) -> type[PretrainedConfig]:
    if model_type not in CONFIGS:
        raise ValueError(f"unsupported model_type {model_type!r}; dinokit reads {sorted(CONFIGS)}")
    return CONFIGS[model_type]


def model_class(model_type: str, task: str = "base") -> type:
    """The class for `task` of a model family, with a clear error for a task the family does not have."""
    classes = MODELS[config_class(model_type).model_type]
    if task not in classes:
        raise ValueError(f"{model_type} has no {task!r} model (transformers has none either); it offers "
                         f"{sorted(classes)}")
    return classes[task]


def read_config(path_or_id: str | os.PathLike, revision: str | None = None,
                cache_dir: str | None = None) -> PretrainedConfig:
    """The config.json of a directory or hub id, as the config class of its model_type."""
    from dinokit.hub import resolve_file

    path = resolve_file(path_or_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
    try:
        model_type = json.loads(path.read_text()).get("model_type", "dinov2")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a JSON object of config settings ({exc}); re-save the model's "
                         f"config.json") from None
    return config_class(model_type).from_json_file(path)


class AutoConfig:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
                        **overrides) -> PretrainedConfig:
        config = read_config(path_or_id, revision=revision, cache_dir=cache_dir)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    @staticmethod
    def for_model(model_type: str, **kwargs) -> PretrainedConfig:
        return config_class(model_type)(**kwargs)


class _AutoModelBase:
    task: str

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *args, config: PretrainedConfig | None = None,
                        **kwargs):
        if config is None:
            config = read_config(path_or_id, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
        return model_class(config.model_type, cls.task).from_pretrained(path_or_id, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config: PretrainedConfig):
        return model_class(config.model_type, cls.task)(config)


class AutoModel(_AutoModelBase):
    """The base model of each family (a DINOv2 classifier checkpoint loads without its head)."""

    task = "base"


class AutoModelForImageClassification(_AutoModelBase):
    task = "classification"


class AutoBackbone(_AutoModelBase):
    task = "backbone"


__all__ = ["AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone"]
