"""Auto classes with transformers' semantics, and `load_model`, the one entry point the tools use."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from dinokit.config import CONFIG_CLASSES, HUB_IDS, Dinov2Config, preset_config
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


MODEL_CLASSES = {"base": Dinov2Model, "classification": Dinov2ForImageClassification, "backbone": Dinov2Backbone}


def load_model(spec: str | os.PathLike | nn.Module, task: str = "base", **kwargs) -> Dinov2PreTrainedModel:
    """Any model reference -> a dinokit model in eval mode.

    `spec`: a dinokit model (returned as is); a Hugging Face directory or hub id; a Meta / timm / HF checkpoint
    file (`.pth`, `.bin`, `.safetensors`); or a preset name (`vits14`, `vitb14_reg4`, ...: random weights).
    `task`: `base` (Dinov2Model), `classification` or `backbone`.
    """
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(MODEL_CLASSES)}")
    if isinstance(spec, Dinov2PreTrainedModel):
        return spec
    if isinstance(spec, nn.Module):
        raise TypeError(f"load_model takes dinokit models; got {type(spec).__name__}. Save it with its state dict "
                        f"and load the file, or wrap it with dinokit.Dinov2Model")
    path = Path(spec).expanduser()
    if path.is_file():
        from dinokit.checkpoints import load_checkpoint

        model = load_checkpoint(path, **kwargs)
        if task == "base" and isinstance(model, Dinov2ForImageClassification):
            return model.dinov2
        return model
    if not path.exists():
        name = str(spec)
        if name in HUB_IDS or name.replace("dinov2_", "") in HUB_IDS:
            return MODEL_CLASSES[task](preset_config(name, **kwargs)).eval()
    return MODEL_CLASSES[task].from_pretrained(spec, **kwargs)
