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
from dinokit import checkpoints_dinov3 as ckpt3
from dinokit.config import HUB_IDS, PRESETS, preset_config
from dinokit.hf import MODEL_CLASSES, Dinov2ForImageClassification, Dinov2Model, Dinov2PreTrainedModel
from dinokit.models import dinov3_convnext, dinov3_license, dinov3_vit
from dinokit.models import dinov3_convnext_keys as convnext_keys
from dinokit.models.pretrained import PreTrainedModel

ALL_PRESETS = sorted(PRESETS + list(dinov3_convnext.PRESETS) + dinov3_vit.PRESETS)

logger = logging.getLogger(__name__)


def preset_name(spec) -> str | None:
    """`spec` when it names a preset (an architecture with random weights: `vits14`, `dinov2_vits14`,
    `dinov3_vits16`, `convnext_tiny`, ...) and no file of that name exists; else None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    name = str(spec)
    if Path(name).expanduser().exists():
        return None
    known = (name in dinov3_vit.HUB_IDS or name.removeprefix("dinov3_") in dinov3_convnext.PRESETS
             or name in HUB_IDS or name.replace("dinov2_", "") in HUB_IDS)
    return name if known else None


def load_checkpoint(path: str | os.PathLike, head: str | os.PathLike | None = None, strict: bool = True,
                    **config_overrides):
    """Load a Meta, timm, Hugging Face or dinokit training checkpoint file as a dinokit model.

    `head` is a Meta linear-head file (`*_linear_head.pth`: layers=1, `*_linear4_head.pth`: layers=4); with it,
    the result is a `Dinov2ForImageClassification` with Meta's classifier semantics. `config_overrides`
    (e.g. `num_attention_heads=3`) set what the weights cannot tell, over any config carried by the file.
    """
    state, known = ckpt.read_checkpoint(path)
    if ckpt3.detect_layout(state) is not None:
        return _load_dinov3_vit(path, state, known, head, strict, task="base", **config_overrides)
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


def _load_dinov3_vit(path, state, known, head, strict: bool, task: str = "base", **config_overrides):
    """A DINOv3 ViT file in any layout. The RoPE periods follow the file (a Meta file's own bf16 values;
    float32 for transformers/timm files) unless `rope_periods` is given."""
    if head is not None:
        raise ckpt.CheckpointError("DINOv3 has no Meta linear-head files for its ViTs in dinokit: load the backbone "
                                   "alone and train a head (dinokit classify/finetune)")
    normal, layout = ckpt3.to_normal(state)
    fields = set(dinov3_vit._DINOV3_VIT_DEFAULTS) | {"image_mean", "image_std"}
    known = {k: v for k, v in (known or {}).items() if k in fields}
    if layout == "meta" and "sat493m" in Path(path).name.lower() and "image_mean" not in {**known, **config_overrides}:
        # Meta's SAT-493M files (`dinov3_*_pretrain_sat493m-<hash>.pth`) are named so; Meta's README normalises
        # their inputs with the satellite statistics, as the SAT presets do (the commands read them from the config)
        logger.info("%s: a SAT-493M file; its inputs get the SAT mean/std (pass image_mean/image_std to change)", path)
        known.update(image_mean=list(dinov3_vit.SAT_MEAN), image_std=list(dinov3_vit.SAT_STD))
    config = dinov3_vit.DINOv3ViTConfig(**ckpt3.infer_config_kwargs(normal, layout, {**known, **config_overrides}))
    model = dinov3_vit.MODEL_CLASSES[task](config)
    model.load_meta_state_dict(normal, strict=strict, source=str(path))
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
    name = str(spec) if isinstance(spec, (str, os.PathLike)) else ""
    if name in dinov3_vit.HUB_IDS and not Path(name).expanduser().exists():
        logger.warning("%s is a preset: the DINOv3 architecture with RANDOMLY INITIALISED weights. For the "
                       "pretrained model pass its Hugging Face id (%s) or a checkpoint file.",
                       name, dinov3_vit.HUB_IDS[name])
        config = dinov3_vit.preset_config(name, **kwargs)
        return auto.model_class(config.model_type, task)(config).eval()
    if isinstance(spec, (Dinov2PreTrainedModel, PreTrainedModel)):
        return spec
    if isinstance(spec, nn.Module):
        raise TypeError(f"load_model takes dinokit models; got {type(spec).__name__}. Save it with its state dict "
                        f"and load the file, or wrap it with dinokit.Dinov2Model")
    path = Path(spec).expanduser()
    if path.is_file():
        state, known = ckpt.read_checkpoint(path)
        if ckpt3.detect_layout(state) is not None:
            return _load_dinov3_vit(path, state, known, kwargs.pop("head", None), kwargs.pop("strict", True),
                                    task=task if task == "backbone" else "base", **kwargs)
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
    _normalization_from_processor(config, spec, kwargs.get("revision"), kwargs.get("cache_dir"))
    return auto.model_class(config.model_type, task).from_pretrained(spec, config=config, **kwargs)


def _normalization_from_processor(config, spec, revision, cache_dir) -> None:
    """DINOv3's released folders state their normalisation (LVD-1689M: ImageNet's; SAT-493M: its own) only in
    preprocessor_config.json: carry it into the config (`image_mean` / `image_std`), where the commands read it
    (`processing.model_normalization`). A config that states it already keeps its own."""
    import json

    from dinokit.hub import resolve_file

    if not config.model_type.startswith("dinov3") or getattr(config, "image_mean", None) is not None:
        return
    path = resolve_file(spec, "preprocessor_config.json", required=False, revision=revision, cache_dir=cache_dir)
    if path is None:
        return
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # the model still loads
        logger.warning("%s: preprocessor_config.json is unreadable (%s); its inputs get ImageNet's normalisation",
                       spec, exc)
        return
    if isinstance(settings, dict) and settings.get("image_mean") and settings.get("image_std"):
        config.image_mean, config.image_std = list(settings["image_mean"]), list(settings["image_std"])


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Convert a checkpoint (file or HF directory) to `hf` (directory), `meta` or `timm` (file).

    Single files get the model's config beside them (`<stem>.config.json`; inside a `.safetensors`), so the
    head count and interpolation mode survive the round trip."""
    if to not in ("hf", "meta", "timm", "hf-legacy"):
        raise ValueError(f"unknown target layout {to!r}: use hf, meta or timm")
    model = load_model(src)
    dst = Path(dst)
    if isinstance(model, dinov3_vit.DINOv3ViTPreTrainedModel):
        return _convert_dinov3_vit(model, dst, to)
    if to == "hf-legacy":
        raise ValueError("--to hf-legacy is for DINOv3 (transformers 4.56-5.3 keys); use --to hf")
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


def _convert_dinov3_vit(model, dst: Path, to: str) -> Path:
    """DINOv3 weights in another layout, with the DINOv3 License notice beside them (they are Meta's weights or
    a derivative, never dinokit's): a directory for hf, a file (+ its config, + the notice) for meta/timm."""
    if to == "hf":
        model.save_pretrained(dst)
        return dst
    backbone, _ = model.meta_state_dict()
    layout = "hf-legacy" if to == "hf-legacy" else to
    state = ckpt3.from_normal(backbone, layout)
    config = {k: v for k, v in model.config.to_dict().items()
              if k in dinov3_vit._DINOV3_VIT_DEFAULTS or k in ("image_mean", "image_std", "model_type")}
    config["license"] = dinov3_license.LICENSE_NAME
    ckpt.save_file_atomic(state, dst, config=config)
    dinov3_license.write_notice_beside(dst)
    return dst


# ---------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a checkpoint between Hugging Face, Meta and timm layouts")
    p.add_argument("src", help="checkpoint file (.pth/.bin/.safetensors) or Hugging Face directory / hub id")
    p.add_argument("dst", help="output: a directory for --to hf, a file for --to meta|timm")
    p.add_argument("--to", choices=["hf", "meta", "timm", "hf-legacy"], required=True,
                   help="target layout (hf-legacy: DINOv3 with transformers 4.56-5.3 keys, in a file)")
    p.set_defaults(func=_convert_command)


def _convert_command(args) -> int:
    out = convert(args.src, args.dst, args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
