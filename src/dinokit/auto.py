"""Auto classes with transformers' semantics (`dinokit.load_model`, in `loading`, is the tools' entry point)."""

from __future__ import annotations

import os

from dinokit.config import CONFIG_CLASSES, Dinov2Config
from dinokit.hf import Dinov2Backbone, Dinov2ForImageClassification, Dinov2Model, Dinov2PreTrainedModel


class AutoConfig:
    @staticmethod
    def from_pretrained(path_or_id: str | os.PathLike, **overrides) -> Dinov2Config:
        return Dinov2Config.from_pretrained(path_or_id, **overrides)

    @staticmethod
    def for_model(model_type: str, **kwargs) -> Dinov2Config:
        if model_type not in CONFIG_CLASSES:
            raise ValueError(f"unknown model_type {model_type!r}; dinokit has {sorted(CONFIG_CLASSES)}")
        return CONFIG_CLASSES[model_type](**kwargs)


class _AutoModelBase:
    model_class: type[Dinov2PreTrainedModel]

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated with from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *args, **kwargs) -> Dinov2PreTrainedModel:
        return cls.model_class.from_pretrained(path_or_id, *args, **kwargs)

    @classmethod
    def from_config(cls, config: Dinov2Config) -> Dinov2PreTrainedModel:
        return cls.model_class(config)


class AutoModel(_AutoModelBase):
    """The base model for `dinov2` and `dinov2_with_registers` (a classifier checkpoint loads without its head)."""

    model_class = Dinov2Model


class AutoModelForImageClassification(_AutoModelBase):
    model_class = Dinov2ForImageClassification


class AutoBackbone(_AutoModelBase):
    model_class = Dinov2Backbone
