"""`load_model` and `load_checkpoint`: any model reference -> a dinokit model; and `dinokit convert`.

The top of the loading stack: layouts and file reading (`checkpoints`) are below, the model classes (`hf`) and
the Auto classes (`auto`) in between; nothing below imports this module.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from torch import nn

from dinokit import auto
from dinokit import checkpoints as ckpt
from dinokit.config import HUB_IDS, PRESETS, preset_config
from dinokit.hf import MODEL_CLASSES, Dinov2ForImageClassification, Dinov2Model, Dinov2PreTrainedModel
from dinokit.models import dinov3_convnext, dinov3_license
from dinokit.models import dinov3_convnext_keys as convnext_keys
from dinokit.models.pretrained import PreTrainedModel

ALL_PRESETS = sorted(PRESETS + list(dinov3_convnext.PRESETS))

logger = logging.getLogger(__name__)


def load_checkpoint(path: str | os.PathLike, head: str | os.PathLike | None = None, strict: bool = True,
                    **config_overrides):
    """Load a Meta, timm, Hugging Face or dinokit training checkpoint file as a dinokit model.

    `head` is a Meta linear-head file (`*_linear_head.pth`: layers=1, `*_linear4_head.pth`: layers=4); with it,
    the result is a `Dinov2ForImageClassification` with Meta's classifier semantics. `config_overrides`
    (e.g. `num_attention_heads=3`) set what the weights cannot tell, over any config carried by the file.
    """
    state, known = ckpt.read_checkpoint(path)
    if convnext_keys.is_convnext_state(state):
        if head is not None:
            raise ckpt.CheckpointError(f"{path} is a DINOv3 ConvNeXt checkpoint; Meta's linear heads are for the "
                                       f"DINOv2 ViTs (no classification head exists for the ConvNeXt)")
        return _load_convnext(state, {**(known or {}), **config_overrides}, strict, str(path))
    backbone, head_state, layout = ckpt.to_meta(state)
    config = ckpt.infer_config(backbone, layout, known={**(known or {}), **config_overrides})
    if head is not None:
        linear = ckpt.read_state_dict(head)
        if set(linear) != {"weight", "bias"}:
            raise ckpt.CheckpointError(f"{head} is not a Meta linear head (expected keys weight, bias; got "
                                       f"{sorted(linear)[:5]})")
        head_state = {"classifier.weight": linear["weight"], "classifier.bias": linear["bias"]}
        ratio = linear["weight"].shape[1] // config.hidden_size
        if ratio not in (2, 5) or linear["weight"].shape[1] % config.hidden_size:
            raise ckpt.CheckpointError(f"linear head of input width {linear['weight'].shape[1]} does not fit a "
                                       f"backbone of width {config.hidden_size} (expected 2x or 5x)")
        config.num_classifier_layers = 1 if ratio == 2 else 4
    if head_state:
        config.num_labels = head_state["classifier.weight"].shape[0]
        model = Dinov2ForImageClassification(config)
    else:
        model = Dinov2Model(config)
    model.load_meta_state_dict(backbone, head_state, strict=strict, source=str(path))
    return model.eval()


# What a config beside a DINOv3 ConvNeXt checkpoint may set (the rest comes from the weights' shapes).
CONVNEXT_CONFIG_KEYS = {"depths", "hidden_sizes", "num_channels", "hidden_act", "layer_norm_eps",
                        "layer_scale_init_value", "drop_path_rate", "image_size", "initializer_range"}


def _load_convnext(state, known: dict, strict: bool, source: str) -> dinov3_convnext.DINOv3ConvNextModel:
    meta, _ = convnext_keys.to_meta(state)
    architecture = convnext_keys.infer_architecture(meta)
    given = {k: v for k, v in known.items() if k in CONVNEXT_CONFIG_KEYS}
    for key in ("depths", "hidden_sizes"):
        if key in given and list(given[key]) != architecture[key]:
            raise ckpt.CheckpointError(f"the config given for {source} says {key}={list(given[key])}, but its "
                                       f"weights have {key}={architecture[key]}: pass the config of this checkpoint")
    config = dinov3_convnext.DINOv3ConvNextConfig(**{**architecture, **given})
    model = dinov3_convnext.DINOv3ConvNextModel(config)
    model.load_state_dict_any(state, strict=strict, source=source)
    return model.eval()


def load_model(spec: str | os.PathLike | nn.Module, task: str = "base", **kwargs):
    """Any model reference -> a dinokit model in eval mode.

    `spec`: a dinokit model (returned as is); a Hugging Face directory or hub id; a Meta / timm / HF / dinokit
    training checkpoint file (`.pth`, `.bin`, `.safetensors`); or a preset name (`vits14`, `vitb14_reg4`,
    `convnext_tiny`, ...: random weights, said in a warning). `task`: `base` (Dinov2Model, DINOv3ConvNextModel),
    `classification` or `backbone`.
    """
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(MODEL_CLASSES)}")
    if isinstance(spec, (Dinov2PreTrainedModel, PreTrainedModel)):
        return spec
    if isinstance(spec, nn.Module):
        raise TypeError(f"load_model takes dinokit models; got {type(spec).__name__}. Save it with its state dict "
                        f"and load the file, or wrap it with dinokit.Dinov2Model")
    path = Path(spec).expanduser()
    if path.is_file():
        model = load_checkpoint(path, **kwargs)
        if task == "base" and isinstance(model, Dinov2ForImageClassification):
            return model.dinov2
        if isinstance(model, dinov3_convnext.DINOv3ConvNextModel) and task != "base":
            other = auto.model_class(model.config.model_type, task)(model.config)
            other.load_state_dict_any(model.meta_state_dict(), source=str(path))
            return other.eval()
        return model
    if not path.exists():
        name = str(spec)
        convnext = name.removeprefix("dinov3_")
        if convnext in dinov3_convnext.PRESETS:
            logger.warning("%s is a preset: the DINOv3 %s architecture with RANDOMLY INITIALISED weights. For the "
                           "pretrained model pass its Hugging Face id (%s) or a checkpoint file.",
                           name, convnext, dinov3_convnext.HUB_IDS[convnext])
            config = dinov3_convnext.preset_config(convnext, **kwargs)
            return auto.model_class(config.model_type, task)(config).eval()
        preset = name if name in HUB_IDS else name.replace("dinov2_", "")
        if preset in HUB_IDS:
            logger.warning("%s is a preset: the %s architecture with RANDOMLY INITIALISED weights. For the "
                           "pretrained model pass its Hugging Face id (%s) or a checkpoint file.",
                           name, preset, HUB_IDS[preset])
            return MODEL_CLASSES[task](preset_config(name, **kwargs)).eval()
        if "/" not in name and not name.startswith((".", "~")):  # not a path and not an org/name hub id
            close = difflib.get_close_matches(preset, ALL_PRESETS, n=1, cutoff=0.6)
            raise ValueError(
                f"model {name!r} is not a file, a directory or a preset"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f". Presets: {', '.join(ALL_PRESETS)}; hub ids look like 'facebook/dinov2-small'.")
    config = kwargs.pop("config", None) or auto.AutoConfig.from_pretrained(
        spec, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
    return auto.model_class(config.model_type, task).from_pretrained(spec, config=config, **kwargs)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Convert a checkpoint (file or HF directory) to `hf` (directory), `meta` or `timm` (file).

    Single files get the model's config beside them (`<stem>.config.json`; inside a `.safetensors`), so the
    head count and interpolation mode survive the round trip."""
    if to not in ("hf", "meta", "timm"):
        raise ValueError(f"unknown target layout {to!r}: use hf, meta or timm")
    model = load_model(src)
    dst = Path(dst)
    if to == "hf":
        model.save_pretrained(dst)
        return dst
    if isinstance(model, dinov3_convnext.DINOv3ConvNextPreTrainedModel):
        state = model.meta_state_dict()
        if to == "timm":
            state = convnext_keys.from_meta(state, "timm")
        config = {k: v for k, v in model.config.to_dict().items() if k in CONVNEXT_CONFIG_KEYS}
        ckpt.save_file_atomic(state, dst, config=config)
        dinov3_license.write_notice_beside(dst)
        return dst
    backbone, head = model.meta_state_dict()
    state = ckpt.meta_to_timm(backbone) if to == "timm" else backbone
    config = {k: v for k, v in model.config.to_dict().items() if k in ckpt.CONFIG_KEYS}
    if head and to == "meta":
        head_path = dst.with_name(dst.stem + "_linear_head" + (dst.suffix or ".pth"))
        ckpt.save_file_atomic({"weight": head["classifier.weight"], "bias": head["classifier.bias"]}, head_path)
    ckpt.save_file_atomic(state, dst, config=config)
    return dst


# ---------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a checkpoint between Hugging Face, Meta and timm layouts")
    p.add_argument("src", help="checkpoint file (.pth/.bin/.safetensors) or Hugging Face directory / hub id")
    p.add_argument("dst", help="output: a directory for --to hf, a file for --to meta|timm")
    p.add_argument("--to", choices=["hf", "meta", "timm"], required=True, help="target layout")
    p.set_defaults(func=_convert_command)


def _convert_command(args) -> int:
    out = convert(args.src, args.dst, args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
