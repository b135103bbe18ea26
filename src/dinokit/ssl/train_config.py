"""Training configuration: Meta's nested keys (`optim.base_lr`, `crops.local_crops_number`, ...) from YAML.

`load_train_config(spec, overrides)` starts from `configs/default.yaml` (Meta's ssl_default_config), merges a
preset (`vits14`, `cpu_tiny_cifar`, ...) or a YAML file on top, then `key.sub=value` overrides (values parsed as
YAML, so `optim.epochs=2`, `crops.global_crops_scale=[0.5,1.0]`, `student.pretrained_weights=null` work).
Unknown keys are an error: a typo must not silently train with a default.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class TrainConfig(dict):
    """A nested dict whose keys are also attributes (`cfg.optim.epochs`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, TrainConfig) else copy.deepcopy(v) for k, v in self.items()}


def _wrap(data: Any) -> Any:
    if isinstance(data, dict):
        return TrainConfig({k: _wrap(v) for k, v in data.items()})
    return data


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:  # not a ValueError: name the file or setting rather than show a traceback
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}{at}") from exc


def _read_yaml(path) -> dict:
    text = Path(path).read_text() if not hasattr(path, "read_text") else path.read_text()
    data = _yaml(text, f"training config {path}") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a YAML mapping of training settings.")
    return data


def preset_names() -> list[str]:
    folder = resources.files("dinokit") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != "default.yaml")


def _preset_or_file(spec: str | Path) -> dict:
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"Training config {path} does not exist. Pass a preset name "
                                    f"({', '.join(preset_names())}) or a YAML file.")
        return _read_yaml(path)
    preset = resources.files("dinokit") / "configs" / f"{spec}.yaml"
    if not preset.is_file():
        raise ValueError(f"Unknown training preset {spec!r}; choose one of {', '.join(preset_names())} or pass a "
                         "YAML file.")
    return _read_yaml(preset)


def _merge(base: dict, update: dict, where: str = "") -> None:
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in base:
            raise ValueError(f"Unknown training setting {name!r}. Known keys here: {', '.join(sorted(base))}.")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"Training setting {name!r} is a section; set its keys ({name}.<key>=...).")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.epochs=2", "train.centering=sinkhorn_knopp"]` -> nested dict with YAML-parsed values."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not of the form section.key=value (e.g. optim.epochs=2).")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _yaml(raw, f"override {item!r}") if raw.strip() else None
    return nested


def load_train_config(spec: str | Path | dict | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Defaults, then the preset / YAML file / dict `spec`, then `overrides`; returns a TrainConfig."""
    config = _read_yaml(resources.files("dinokit") / "configs" / "default.yaml")
    if spec is not None:
        _merge(config, spec if isinstance(spec, dict) else _preset_or_file(spec))
    if overrides:
        _merge(config, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    cfg = _wrap(config)
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"train.centering={cfg.train.centering!r}: use 'centering' or 'sinkhorn_knopp'.")
    if cfg.compute_precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"compute_precision={cfg.compute_precision!r}: use auto, fp32, bf16 or fp16.")
    if cfg.distributed.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"distributed.strategy={cfg.distributed.strategy!r}: use 'ddp' or 'fsdp'.")
    if cfg.crops.global_crops_size % cfg.student.patch_size:
        raise ValueError(f"crops.global_crops_size ({cfg.crops.global_crops_size}) must be a multiple of "
                         f"student.patch_size ({cfg.student.patch_size}).")
    if cfg.crops.local_crops_number and cfg.crops.local_crops_size % cfg.student.patch_size:
        raise ValueError(f"crops.local_crops_size ({cfg.crops.local_crops_size}) must be a multiple of "
                         f"student.patch_size ({cfg.student.patch_size}).")
    if cfg.crops.backend not in ("pil", "tensor"):
        raise ValueError(f"crops.backend={cfg.crops.backend!r}: use 'pil' (Meta's per-crop transforms) or 'tensor' "
                         "(batched).")
    if cfg.train.batch_size_per_gpu < 1:
        raise ValueError("train.batch_size_per_gpu must be at least 1.")
