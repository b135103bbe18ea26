"""The transformers-style API: `Dinov2Model`, `Dinov2ForImageClassification`, `Dinov2Backbone`.

Same constructor, forward signatures and outputs as transformers (model.md §2), over dinokit's
`DinoVisionTransformer` (fused qkv, SDPA, cached position embeddings). Weights are stored internally under
Meta's names and converted to the Hugging Face layout only when saving or loading.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinokit import atomic
from dinokit import checkpoints as ckpt
from dinokit.config import CONFIG_CLASSES, Dinov2Config, Dinov2WithRegistersConfig
from dinokit.outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from dinokit.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)


def build_vit(config: Dinov2Config) -> DinoVisionTransformer:
    if config.family != "dinov2":
        raise TypeError(f"build_vit builds DINOv2 backbones; this is a {type(config).__name__}")
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return DinoVisionTransformer(
        img_size=image_size, patch_size=config.patch_size, in_chans=config.num_channels,
        embed_dim=config.hidden_size, depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path_rate=config.drop_path_rate,
        init_values=config.layerscale_value, ffn_layer="swiglu" if config.use_swiglu_ffn else "mlp",
        act_layer=config.hidden_act, num_register_tokens=config.num_register_tokens,
        interpolate_offset=config.interpolate_offset, interpolate_antialias=config.interpolate_antialias,
        norm_eps=config.layer_norm_eps, use_mask_token=True,
    )


class Dinov2PreTrainedModel(nn.Module):
    """The shared machinery of dinokit's transformers-style models. A second family (models/dinov3_vit.py)
    overrides only what differs: its config class, `build_backbone`, and the checkpoint layouts
    (`normal_form_from_file`, `hf_state_dict`)."""

    config_class = Dinov2Config
    base_model_prefix = "dinov2"
    main_input_name = "pixel_values"

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        if type(config).family != self.config_class.family or not isinstance(config, Dinov2Config):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                            f"{type(config).__name__}; AutoModel.from_config picks the class of a config")
        self.config = config

    @classmethod
    def build_backbone(cls, config: Dinov2Config) -> DinoVisionTransformer:
        return build_vit(config)

    @classmethod
    def read_config(cls, source, revision=None, cache_dir=None) -> Dinov2Config:
        return _load_config(source, revision, cache_dir)

    @classmethod
    def base_model_class(cls) -> type[Dinov2Model]:
        """The family's bare encoder, which task models (classification, segmentation) wrap."""
        return Dinov2Model

    @classmethod
    def normal_form_from_file(cls, state: Mapping[str, torch.Tensor]):
        """A checkpoint's tensors (any layout) -> (backbone state dict in dinokit's names, classifier head)."""
        backbone, head, _ = ckpt.to_meta(state, layout=ckpt.detect_layout(state))
        return backbone, head

    # ------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @property
    def vit_module(self) -> DinoVisionTransformer:
        return self.vit if hasattr(self, "vit") else self.dinov2.vit

    # ------------------------------------------------------------ Meta's API on the same weights
    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        return self.vit_module.forward_features(x, masks)

    def get_intermediate_layers(self, x: torch.Tensor, n=1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        return self.vit_module.get_intermediate_layers(x, n, reshape, return_class_token, norm)

    # ------------------------------------------------------------ shared forward pieces
    def _resolve_flags(self, output_attentions, output_hidden_states, return_dict):
        config = self.config
        return (config.output_attentions if output_attentions is None else output_attentions,
                config.output_hidden_states if output_hidden_states is None else output_hidden_states,
                config.use_return_dict if return_dict is None else return_dict)

    def _encode(self, pixel_values, bool_masked_pos=None, head_mask=None, output_attentions=False):
        """Embeddings + blocks: returns (pre-norm sequence, all hidden states, attentions or None)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        vit = self.vit_module
        if not torch.is_tensor(pixel_values):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
                            f"use the image processor with return_tensors='pt'")
        pixel_values = pixel_values.to(dtype=vit.patch_embed.proj.weight.dtype)
        rope = vit.rope_for(pixel_values)
        x = vit.prepare_tokens_with_masks(pixel_values, bool_masked_pos)
        head_masks = _expand_head_mask(head_mask, len(vit.blocks))
        hidden_states, attentions = [x], []
        for i, block in enumerate(vit.blocks):
            if output_attentions or head_masks[i] is not None:
                x, attn = block(x, return_attention=True, head_mask=head_masks[i], rope=rope)
                attentions.append(attn)
            else:
                x = block(x, rope=rope)
            hidden_states.append(x)
        return x, tuple(hidden_states), (tuple(attentions) if output_attentions else None)

    # ------------------------------------------------------------ weights in the normal (Meta) form
    def meta_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        backbone = self.vit_module.state_dict()
        head = {}
        classifier = getattr(self, "classifier", None)
        if isinstance(classifier, nn.Linear):
            head = {"classifier.weight": classifier.weight.data, "classifier.bias": classifier.bias.data}
        return dict(backbone), head

    def load_meta_state_dict(self, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None = None,
                             strict: bool = True, source: str = "checkpoint") -> None:
        vit = self.vit_module
        backbone = dict(backbone)
        expected = vit.state_dict()
        if "mask_token" in expected and "mask_token" not in backbone:
            backbone["mask_token"] = torch.zeros_like(expected["mask_token"])  # timm drops it; zeros = Meta init
        missing = sorted(set(expected) - set(backbone))
        unexpected = sorted(set(backbone) - set(expected))
        mismatched = [f"{k}: checkpoint {tuple(backbone[k].shape)} vs model {tuple(expected[k].shape)}"
                      for k in expected if k in backbone and backbone[k].shape != expected[k].shape]
        classifier = getattr(self, "classifier", None)
        head = dict(head or {})
        if isinstance(classifier, nn.Linear) and head:
            for name, param in (("classifier.weight", classifier.weight), ("classifier.bias", classifier.bias)):
                if name not in head:
                    missing.append(name)
                elif head[name].shape != param.shape:
                    mismatched.append(f"{name}: checkpoint {tuple(head[name].shape)} vs model {tuple(param.shape)}")
        problems = []
        if missing:
            problems.append(f"missing keys {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_short(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches {_short(mismatched)}")
        if problems and strict:
            raise ckpt.CheckpointError(
                f"{source} does not fit {type(self).__name__} ({self.config.hidden_size}-d, "
                f"{self.config.num_hidden_layers} blocks, {self.config.num_register_tokens} registers): "
                + "; ".join(problems)
                + ". Check that the checkpoint and the config describe the same model; pass strict=False to "
                  "load the matching tensors anyway.")
        if problems:
            logger.warning("loading %s non-strictly: %s", source, "; ".join(problems))
        loadable = {k: v for k, v in backbone.items() if k in expected and v.shape == expected[k].shape}
        vit.load_state_dict(loadable, strict=False)
        vit.position_embedding.clear()
        if vit.rope_embed is not None:
            vit.rope_embed.clear()
        if isinstance(classifier, nn.Linear):
            if head and not any("classifier" in m for m in mismatched):
                with torch.no_grad():
                    classifier.weight.copy_(head["classifier.weight"])
                    classifier.bias.copy_(head["classifier.bias"])
            elif not head:
                logger.warning("%s has no classifier weights: the classification head of %d labels is newly "
                               "initialised; train it before use", source, self.config.num_labels)
        elif head:
            logger.warning("ignoring the classifier weights of %s: %s has no classification head",
                           source, type(self).__name__)

    # ------------------------------------------------------------ Hugging Face layout
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        backbone, head = self.meta_state_dict()
        hf = ckpt.meta_to_hf(backbone)
        if self.base_model_prefix_in_checkpoint:
            prefix = self.config.model_type + "."
            hf = {prefix + k: v for k, v in hf.items()}
        hf.update(head)
        return hf

    base_model_prefix_in_checkpoint = False

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write `model.safetensors` (sharded with an index past `max_shard_size`) and then `config.json`, each to
        a temporary name first, so an interrupted save never looks complete."""
        directory = write_weights(self.hf_state_dict(), save_directory, max_shard_size, safe_serialization)
        config = self.config.copy(architectures=[self._hf_architecture()])
        config.save_pretrained(directory)

    def _hf_architecture(self) -> str:
        name = type(self).__name__
        if self.config.model_type == "dinov2_with_registers" and "WithRegisters" not in name:
            name = name.replace("Dinov2", "Dinov2WithRegisters")
        return name

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: Dinov2Config | None = None, strict: bool = True, revision: str | None = None,
                        cache_dir: str | None = None, torch_dtype: torch.dtype | str | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        **config_overrides):
        """Load from a Hugging Face directory or hub id (config.json + model.safetensors / pytorch_model.bin)."""
        if model_args:
            raise TypeError("from_pretrained takes the model path and keyword arguments only")
        from dinokit.hub import resolve_file

        source = pretrained_model_name_or_path
        if config is None:
            config = cls.read_config(source, revision, cache_dir)
        for key, value in config_overrides.items():
            if key.startswith("attn_implementation") or key in ("low_cpu_mem_usage", "trust_remote_code"):
                continue
            setattr(config, key, value)
        if isinstance(config, Dinov2Config) and config.model_type not in (*CONFIG_CLASSES, cls.config_class.model_type):
            raise ValueError(f"unsupported model_type {config.model_type!r}")
        state = _load_weights(source, revision, cache_dir, resolve_file)
        backbone, head = cls.normal_form_from_file(state)
        model = cls(config)
        model.load_meta_state_dict(backbone, head, strict=strict, source=str(source))
        dtype = dtype or torch_dtype
        if dtype is not None and dtype != "auto":
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


def write_weights(state: Mapping[str, torch.Tensor], save_directory: str | os.PathLike,
                  max_shard_size: int | str = "5GB", safe_serialization: bool = True) -> Path:
    """Write a Hugging Face weights file (`model.safetensors`, sharded with an index past `max_shard_size`; or
    `pytorch_model.bin`) into `save_directory`, each file to a temporary name first; returns the directory."""
    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"{directory} is a file; save_pretrained() needs a directory")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = _shard(state, _parse_size(max_shard_size))
    suffix = ".safetensors" if safe_serialization else ".bin"
    stem = "model" if safe_serialization else "pytorch_model"
    for stale in list(directory.glob("model*.safetensors*")) + list(directory.glob("pytorch_model*.bin*")):
        stale.unlink()
    if len(shards) == 1:
        names = [stem + suffix]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        if safe_serialization:
            ckpt.save_file_atomic(shard, directory / name)
        else:
            atomic.torch_save(shard, directory / name)
    if len(shards) > 1:
        import json

        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic.write_text(directory / (stem + suffix + ".index.json"), json.dumps(index, indent=2, sort_keys=True))
    return directory


def _load_config(source, revision, cache_dir) -> Dinov2Config:
    from dinokit.hub import resolve_file

    return Dinov2Config.from_json_file(resolve_file(source, "config.json", revision=revision, cache_dir=cache_dir))


def _load_weights(source, revision, cache_dir, resolve_file) -> dict[str, torch.Tensor]:
    local = Path(source).expanduser()
    if local.is_dir():
        return ckpt.read_hf_weights(local)
    for name in (ckpt.SAFE_WEIGHTS_INDEX_NAME, ckpt.SAFE_WEIGHTS_NAME, ckpt.WEIGHTS_INDEX_NAME, ckpt.WEIGHTS_NAME):
        path = resolve_file(source, name, required=False, revision=revision, cache_dir=cache_dir)
        if path is None:
            continue
        if name.endswith(".index.json"):
            import json

            for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                resolve_file(source, shard, revision=revision, cache_dir=cache_dir)
            return ckpt.read_hf_weights(path.parent)
        return ckpt.read_state_dict(path)
    raise FileNotFoundError(f"Hub repo {source!r} has no model.safetensors or pytorch_model.bin")


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... (+{len(items) - limit} more)' if len(items) > limit else ''}]"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.upper().strip()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += nbytes
    shards.append(current)
    return shards


def _expand_head_mask(head_mask, num_layers: int) -> list[torch.Tensor | None]:
    """transformers 4.x semantics: (heads,) or (layers, heads) multiplies the attention probabilities."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask.unsqueeze(0).expand(num_layers, -1)
    return [m.view(1, -1, 1, 1) for m in head_mask]


# ---------------------------------------------------------------------------------------------------- models
class Dinov2Model(Dinov2PreTrainedModel):
    """Bare DINOv2 encoder: `last_hidden_state` (final-normed), `pooler_output` (its CLS)."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.vit = self.build_backbone(config)

    def get_input_embeddings(self) -> nn.Module:
        return self.vit.patch_embed

    def forward(self, pixel_values: torch.Tensor | None = None, bool_masked_pos: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict)
        x, hidden_states, attentions = self._encode(pixel_values, bool_masked_pos, head_mask, output_attentions)
        sequence_output = self.vit.norm(x)
        pooled_output = sequence_output[:, 0, :]
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (sequence_output, pooled_output, hidden_states, attentions) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                          hidden_states=hidden_states, attentions=attentions)


class Dinov2ForImageClassification(Dinov2PreTrainedModel):
    """Linear head on `[CLS, mean(patch tokens)]` (registers excluded); with `num_classifier_layers=4`, Meta's
    linear4 head on `[CLS of the last 4 blocks, mean patch tokens of the last]`."""

    base_model_prefix_in_checkpoint = True

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dinov2 = self.base_model_class()(config)
        width = config.hidden_size * (5 if getattr(config, "num_classifier_layers", 1) == 4 else 2)
        self.classifier = nn.Linear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        if isinstance(self.classifier, nn.Linear):
            nn.init.trunc_normal_(self.classifier.weight, std=config.initializer_range)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, pixel_values: torch.Tensor | None = None, head_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict)
        vit = self.dinov2.vit
        x, hidden_states, attentions = self.dinov2._encode(pixel_values, None, head_mask, output_attentions)
        first_patch = 1 + vit.num_register_tokens
        if getattr(self.config, "num_classifier_layers", 1) == 4:
            last4 = [vit.norm(h) for h in hidden_states[-4:]]
            linear_input = torch.cat([h[:, 0] for h in last4] + [last4[-1][:, first_patch:].mean(dim=1)], dim=1)
        else:
            sequence_output = vit.norm(x)
            linear_input = torch.cat([sequence_output[:, 0], sequence_output[:, first_patch:].mean(dim=1)], dim=1)
        logits = self.classifier(linear_input)
        loss = self.loss_function(labels, logits) if labels is not None else None
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            output = tuple(v for v in (logits, hidden_states, attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    def loss_function(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """transformers' rule: 1 label -> MSE; integer labels -> cross-entropy (ignore_index -100); else BCE."""
        labels = labels.to(logits.device)
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
            self.config.problem_type = problem_type
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


class Dinov2Backbone(Dinov2PreTrainedModel):
    """Feature maps of the selected stages (`stem`, `stage1..L`), normed and reshaped to (B, D, H/14, W/14)."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__(config)
        self.vit = self.build_backbone(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @property
    def channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs):
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict)
        _, hidden_states, attentions = self._encode(pixel_values, None, None, output_attentions)
        batch_size, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        first_patch = 1 + self.config.num_register_tokens
        feature_maps = []
        for stage, hidden_state in zip(self.stage_names, hidden_states):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                hidden_state = self.vit.norm(hidden_state)
            if self.config.reshape_hidden_states:
                hidden_state = hidden_state[:, first_patch:]
                hidden_state = hidden_state.reshape(batch_size, height // patch, width // patch, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
            feature_maps.append(hidden_state)
        feature_maps = tuple(feature_maps)
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (feature_maps, hidden_states, attentions) if v is not None)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=attentions)


# transformers exposes the with-registers family under its own names; here they are the same classes,
# selected by the config's model_type.
Dinov2WithRegistersModel = Dinov2Model
Dinov2WithRegistersForImageClassification = Dinov2ForImageClassification
Dinov2WithRegistersBackbone = Dinov2Backbone

__all__ = ["Dinov2PreTrainedModel", "Dinov2Model", "Dinov2ForImageClassification", "Dinov2Backbone",
           "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersBackbone",
           "Dinov2WithRegistersConfig", "build_vit"]


# The model class of each `load_model(task=...)`.
MODEL_CLASSES = {"base": Dinov2Model, "classification": Dinov2ForImageClassification, "backbone": Dinov2Backbone}
