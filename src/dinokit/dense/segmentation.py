"""`Dinov2ForSemanticSegmentation`: a DINOv2 backbone with Meta's linear or multi-scale ("ms") BNHead, in the
shape of transformers' semantic-segmentation models (`pixel_values`, `labels` -> `loss`, `logits`).

- `logits` are (B, num_labels, H/14, W/14): one logit vector per patch (output stride 14), as transformers'
  segmentation models return them before `post_process_semantic_segmentation`.
- `labels` (B, H, W) class indices: the logits are upsampled bilinearly to the labels' size and scored with
  cross-entropy, ignoring `config.semantic_loss_ignore_index` (255).
- Inputs whose sides are not multiples of the patch size are centre-padded with zeros, as Meta's segmentors do.
- Config keys: `segmentation_head` ("linear" | "ms"), `semantic_loss_ignore_index`, the label maps.

Saved with `save_pretrained` as a Hugging Face-style directory: config.json and model.safetensors holding the
backbone under `dinov2.` (transformers' names) and the head under Meta's names (`decode_head.bn.*`,
`decode_head.conv_seg.*`), so Meta's released head files and dinokit's share one head layout.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dinokit import checkpoints as ckpt
from dinokit.dense.padding import center_pad
from dinokit.dense.seg_head import HEAD_BLOCKS, BNSegHead
from dinokit.hf import Dinov2PreTrainedModel, _load_weights
from dinokit.models.dinov3_vit import DINOv3ViTPreTrainedModel
from dinokit.outputs import ModelOutput

IGNORE_INDEX = 255
HEAD_PREFIX = "decode_head."


class SemanticSegmenterOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class Dinov2ForSemanticSegmentation(Dinov2PreTrainedModel):
    base_model_prefix_in_checkpoint = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.head_type = getattr(config, "segmentation_head", "linear")
        if self.head_type not in HEAD_BLOCKS:
            raise ValueError(f"unknown segmentation_head {self.head_type!r}: use one of {sorted(HEAD_BLOCKS)}")
        config.segmentation_head = self.head_type
        if not hasattr(config, "semantic_loss_ignore_index"):
            config.semantic_loss_ignore_index = IGNORE_INDEX
        self.num_labels = config.num_labels
        self.dinov2 = self.base_model_class()(config)
        self.decode_head = BNSegHead(self.feature_channels, config.num_labels)

    @property
    def n_blocks(self) -> int:
        return min(HEAD_BLOCKS[self.head_type], self.config.num_hidden_layers)

    @property
    def feature_channels(self) -> int:
        return self.config.hidden_size * self.n_blocks

    def patch_features(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        """The head's input: the last `n_blocks` blocks' final-normed patch maps, concatenated (B, nD, h, w);
        plus all hidden states and the attentions, for the outputs."""
        vit = self.dinov2.vit
        pixel_values = center_pad(pixel_values, self.config.patch_size)
        _, hidden_states, attentions = self.dinov2._encode(pixel_values, None, None, output_attentions)
        b, _, height, width = pixel_values.shape
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        first_patch = 1 + vit.num_register_tokens
        maps = [vit.norm(h)[:, first_patch:].transpose(1, 2).reshape(b, -1, *grid)
                for h in hidden_states[-self.n_blocks:]]
        return BNSegHead.concat(maps), hidden_states, attentions

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict)
        features, hidden_states, attentions = self.patch_features(pixel_values, output_attentions)
        logits = self.decode_head(features)
        loss = self.loss_function(logits, labels) if labels is not None else None
        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            output = tuple(v for v in (logits, hidden_states, attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    def loss_function(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(upsampled, labels.long().to(logits.device),
                               ignore_index=self.config.semantic_loss_ignore_index)

    # ------------------------------------------------------------ weights
    def meta_state_dict(self):
        backbone = dict(self.dinov2.vit.state_dict())
        head = {HEAD_PREFIX + k: v for k, v in self.decode_head.state_dict().items()}
        return backbone, head

    def load_meta_state_dict(self, backbone, head=None, strict: bool = True, source: str = "checkpoint") -> None:
        self.dinov2.load_meta_state_dict(backbone, None, strict=strict, source=source)
        if head:
            load_head_state(self.decode_head, head, source)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config=None, strict: bool = True,
                        revision: str | None = None, cache_dir: str | None = None, **overrides):
        """A segmentation folder of either ViT family: the class follows the config (DINOv2 or DINOv3)."""
        from dinokit.auto import read_config
        from dinokit.hub import resolve_file

        source = pretrained_model_name_or_path
        config = config or read_config(source, revision, cache_dir)
        for key, value in overrides.items():
            setattr(config, key, value)
        cls = segmentation_class(config)
        state = _load_weights(source, revision, cache_dir, resolve_file)
        head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        if not head:
            raise ckpt.CheckpointError(f"{source} has no segmentation head (no '{HEAD_PREFIX}*' weights): it is "
                                       f"not a segmentation checkpoint")
        backbone, _ = cls.normal_form_from_file({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
        model = cls(config)
        model.load_meta_state_dict(backbone, head, strict=strict, source=str(source))
        return model.eval()


class DINOv3ViTForSemanticSegmentation(DINOv3ViTPreTrainedModel, Dinov2ForSemanticSegmentation):
    """The same heads on DINOv3 ViT patch features (output stride 16). Saved as dinokit's file: the backbone
    under `dinov3_vit.` (transformers' names), the head under Meta's names."""


SEGMENTATION_CLASSES = {"dinov2": Dinov2ForSemanticSegmentation, "dinov3_vit": DINOv3ViTForSemanticSegmentation}
ARCHITECTURES = tuple(c.__name__ for c in SEGMENTATION_CLASSES.values())


def segmentation_class(config) -> type[Dinov2ForSemanticSegmentation]:
    """The segmentation model class for a backbone config; a backbone without patch tokens is refused."""
    family = getattr(config, "family", None)
    if family not in SEGMENTATION_CLASSES:
        raise ValueError(f"segmentation heads read ViT patch tokens; a {getattr(config, 'model_type', family)!r} "
                         f"backbone has none. Use a DINOv2 or DINOv3 ViT")
    return SEGMENTATION_CLASSES[family]


def load_head_state(head: BNSegHead, state, source: str = "head") -> None:
    """Load `decode_head.*` weights (Meta's names) into `head`, with one error naming what does not fit."""
    state = {k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX) else k: v for k, v in state.items()}
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state) - {"bn.num_batches_tracked"})
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs head {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ckpt.CheckpointError(
            f"the segmentation head in {source} does not fit this model: "
            + "; ".join(p for p in (f"missing {missing}" if missing else "",
                                    f"unexpected {unexpected}" if unexpected else "",
                                    f"shape mismatches {mismatched}" if mismatched else "") if p)
            + ". A linear head takes the last block's D channels, an ms head 4 x D; the class count must match.")
    state.setdefault("bn.num_batches_tracked", torch.tensor(0))
    head.load_state_dict(state)
