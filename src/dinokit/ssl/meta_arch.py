"""Student, EMA teacher and one DINOv2 training step (Meta's dinov2/train/ssl_meta_arch.py; training.md §4).

`SSLMetaArch.forward_losses(batch, teacher_temp)` runs the teacher on the two global crops (eval mode, no
drop-path, no masks), turns its head outputs into targets (softmax centering with a one-step-late centre, or
Sinkhorn-Knopp), runs the student on the masked global crops and the local crops, and returns the total loss
DINO(local) + DINO(global) + KoLeo + iBOT with every term already weighted. The caller does backward,
`clip_gradients()` (each module separately), the optimizer step and `update_teacher(momentum)`.

Logged terms are the contributions to the total (Meta's logs show KoLeo and iBOT divided by 2).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from dinokit.config import Dinov2Config, Dinov2WithRegistersConfig
from dinokit.hf import Dinov2Model, build_vit
from dinokit.ssl.dino_head import DINOHead
from dinokit.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, multicrop_dino_loss

logger = logging.getLogger(__name__)

# embed_dim, depth, num_heads of Meta's factories (vit_tiny is dinokit's CPU-scale addition).
ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def _int_if_whole(value):
    """4.0 -> 4: transformers' Dinov2Config declares mlp_ratio an int and rejects 4.0."""
    return int(value) if float(value).is_integer() else value


def backbone_config(student_cfg, image_size: int, drop_path_rate: float = 0.0) -> Dinov2Config:
    """The Hugging Face config of the backbone described by the `student` section of a training config."""
    if student_cfg.arch not in ARCHS:
        raise ValueError(f"student.arch={student_cfg.arch!r}: use one of {', '.join(ARCHS)}.")
    embed_dim, depth, num_heads = ARCHS[student_cfg.arch]
    embed_dim = student_cfg.embed_dim or embed_dim
    depth = student_cfg.depth or depth
    num_heads = student_cfg.num_heads or num_heads
    if embed_dim % num_heads:
        raise ValueError(f"student.embed_dim ({embed_dim}) must be divisible by student.num_heads ({num_heads}).")
    ffn = str(student_cfg.ffn_layer)
    if ffn not in ("mlp", "swiglu", "swiglufused"):
        raise ValueError(f"student.ffn_layer={ffn!r}: use 'mlp' or 'swiglu'.")
    fields = dict(
        hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads,
        mlp_ratio=_int_if_whole(student_cfg.mlp_ratio), image_size=image_size, patch_size=student_cfg.patch_size,
        layerscale_value=student_cfg.layerscale, drop_path_rate=drop_path_rate,
        use_swiglu_ffn=ffn.startswith("swiglu"), num_register_tokens=student_cfg.num_register_tokens,
        interpolate_offset=student_cfg.interpolate_offset, interpolate_antialias=student_cfg.interpolate_antialias,
    )
    if student_cfg.num_register_tokens:
        return Dinov2WithRegistersConfig(**fields)
    return Dinov2Config(**fields)


class SSLModel(nn.Module):
    """Backbone + DINO head (+ separate iBOT head). The same forward serves student and teacher.

    forward(global_crops, local_crops=None, masks=None, mask_indices=None) -> dict:
      cls_tokens (2B, D): final-normed CLS of the global crops (KoLeo's input);
      global_cls_head (2B, K), local_cls_head (nB, K) or None;
      masked_patch_head (M, K_ibot): head outputs of the patch tokens at `mask_indices` (flat indices into the
      2B x N global patch grid), or None without mask_indices.
    The DINO head runs once on all its inputs concatenated (Meta concatenates them for xFormers).
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head

    def forward(self, global_crops, local_crops=None, masks=None, mask_indices=None):
        crops, crop_masks = [global_crops], [masks]
        if local_crops is not None and local_crops.numel():
            crops.append(local_crops)
            crop_masks.append(None)
        outputs = self.backbone.forward_features_list(crops, crop_masks)
        global_out = outputs[0]
        head_inputs = [global_out["x_norm_clstoken"]]
        if len(outputs) > 1:
            head_inputs.append(outputs[1]["x_norm_clstoken"])
        patches = None
        if mask_indices is not None:
            patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_head is None:
                head_inputs.append(patches)
        sizes = [t.shape[0] for t in head_inputs]
        head_outputs = self.dino_head(torch.cat(head_inputs)).split(sizes)
        result = {
            "cls_tokens": global_out["x_norm_clstoken"],
            "global_cls_head": head_outputs[0],
            "local_cls_head": head_outputs[1] if len(outputs) > 1 else None,
            "masked_patch_head": None,
        }
        if patches is not None:
            result["masked_patch_head"] = self.ibot_head(patches) if self.ibot_head is not None else head_outputs[-1]
        return result


def build_ssl_model(cfg, drop_path_rate: float) -> SSLModel:
    backbone = build_vit(backbone_config(cfg.student, cfg.crops.global_crops_size, drop_path_rate))
    embed_dim = backbone.embed_dim
    dino_head = DINOHead(embed_dim, cfg.dino.head_n_prototypes, nlayers=cfg.dino.head_nlayers,
                         hidden_dim=cfg.dino.head_hidden_dim, bottleneck_dim=cfg.dino.head_bottleneck_dim)
    ibot_head = None
    if cfg.ibot.separate_head:
        ibot_head = DINOHead(embed_dim, cfg.ibot.head_n_prototypes, nlayers=cfg.ibot.head_nlayers,
                             hidden_dim=cfg.ibot.head_hidden_dim, bottleneck_dim=cfg.ibot.head_bottleneck_dim)
    return SSLModel(backbone, dino_head, ibot_head)


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("compute_precision=fp16 needs a CUDA device; use fp32 (or bf16) on CPU.")
    return precision


def _all_ranks_min(value: int, device) -> int:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return value


@torch.no_grad()
def target_statistics(targets: torch.Tensor) -> dict[str, float]:
    """Collapse indicators of teacher targets (rows = distributions over K prototypes), in [0, 1]:
    teacher_entropy = mean per-sample entropy / log K (-> 1: uniform collapse, every output the same flat
    distribution); teacher_batch_entropy = entropy of the batch-mean distribution / log K (-> 0: every sample
    on the same prototype)."""
    p = targets.float()
    log_k = math.log(p.shape[-1])
    per_sample = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    batch = -(mean * mean.clamp_min(1e-12).log()).sum()
    return {"teacher_entropy": float(per_sample / log_k), "teacher_batch_entropy": float(batch / log_k)}


class SSLMetaArch(nn.Module):
    """Student and EMA teacher with DINOv2's losses. `student_forward` may be replaced by a DDP/FSDP wrapper of
    `student` (see `wrap_student`); the teacher always runs unwrapped."""

    def __init__(self, cfg, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = resolve_precision(cfg.compute_precision, self.device)
        self.student = build_ssl_model(cfg, drop_path_rate=cfg.student.drop_path_rate)
        self.teacher = build_ssl_model(cfg, drop_path_rate=0.0)  # no drop-path in the teacher
        if cfg.student.pretrained_weights:
            self._load_pretrained_backbone(cfg.student.pretrained_weights)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_k)
        self.koleo_loss = KoLeoLoss()
        self.to(self.device)
        object.__setattr__(self, "student_forward", self.student)  # not a submodule: keeps state_dict keys stable

    def _load_pretrained_backbone(self, spec) -> None:
        from dinokit.loading import load_model

        backbone, _ = load_model(spec).meta_state_dict()
        missing, unexpected = self.student.backbone.load_state_dict(backbone, strict=False)
        if missing or unexpected:
            raise ValueError(f"student.pretrained_weights={spec!r} does not fit the student backbone (missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}). Make student.arch/patch_size and "
                             "crops.global_crops_size match the pretrained model.")
        self.student.backbone.position_embedding.clear()

    def wrap_student(self, wrapper) -> None:
        object.__setattr__(self, "student_forward", wrapper)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # Meta: the teacher always runs in eval mode
        return self

    def autocast(self):
        return autocast_context(self.precision, self.device)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def teacher_targets(self, teacher_out: dict, teacher_temp: float, n_masked_total):
        """(DINO targets (2B, K) in crop order, iBOT targets (M, K) or None) from the teacher's head outputs."""
        cls = teacher_out["global_cls_head"]
        patches = teacher_out["masked_patch_head"]
        ibot_targets = None
        if self.cfg.train.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls, teacher_temp)
            self.dino_loss.update_center(cls)
            if patches is not None:
                patches = patches.unsqueeze(0)  # (1, M, K): Meta's iBOT centre is a mean over patches
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(patches, teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(patches)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls, teacher_temp)
            if patches is not None:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(patches, teacher_temp, n_masked_total)
        return dino_targets, ibot_targets

    def prepare_batch(self, batch: dict) -> dict:
        """Tensors of one step on the device: the crops, the student's masks, the flat indices of the patches
        iBOT trains on (None: no iBOT this step), their weights and the total masked count."""
        device = self.device
        masks = batch["collated_masks"].to(device, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(device, non_blocking=True)
        # Every rank must take the same branch (the centres are all-reduced): iBOT only if all have masked patches.
        do_ibot = self.do_ibot and _all_ranks_min(int(mask_indices.shape[0]), device) > 0
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        return {
            "global_crops": global_crops,
            "teacher_crops": global_crops,
            "local_crops": batch["collated_local_crops"].to(device, non_blocking=True),
            "student_masks": masks,
            "ibot_indices": mask_indices if do_ibot else None,
            "masks_flat": masks,
            "masks_weight": batch["masks_weight"].to(device, non_blocking=True),
            "n_masked_total": batch["n_masked_patches"].to(device),
        }

    def forward_losses(self, batch: dict, teacher_temp: float):
        """(total loss, {term: weighted loss tensor}, {statistic: float}) of one batch from
        `collate_data_and_cast`. Updates the loss centres (one step late)."""
        cfg = self.cfg
        inputs = self.prepare_batch(batch)
        global_crops, local_crops = inputs["global_crops"], inputs["local_crops"]
        ibot_indices = inputs["ibot_indices"]
        n_local_crops = local_crops.shape[0] // (global_crops.shape[0] // 2) if local_crops.numel() else 0

        with torch.no_grad(), self.autocast():
            teacher_out = self.teacher(inputs["teacher_crops"], mask_indices=ibot_indices)
        dino_targets, ibot_targets = self.teacher_targets(teacher_out, teacher_temp, inputs["n_masked_total"])

        student_indices = ibot_indices
        if student_indices is None and self.do_ibot and self.student.ibot_head is not None:
            # No masked patch on some rank this step: run the separate iBOT head on zero patches anyway, so
            # every parameter takes part in backward (DDP's reducer requires it) and gets a zero gradient.
            student_indices = global_crops.new_zeros(0, dtype=torch.long)
        with self.autocast():
            student_out = self.student_forward(global_crops, local_crops, inputs["student_masks"], student_indices)

        losses: dict[str, torch.Tensor] = {}
        if self.do_dino:
            dino = multicrop_dino_loss(self.dino_loss, student_out["global_cls_head"], student_out["local_cls_head"],
                                       dino_targets, n_local_crops)
            for name, value in dino.items():
                losses[name.replace("_crops", "")] = cfg.dino.loss_weight * value
        if self.do_koleo:
            losses["koleo_loss"] = cfg.dino.koleo_loss_weight * sum(
                self.koleo_loss(p) for p in student_out["cls_tokens"].chunk(2))
        if ibot_indices is not None:
            losses["ibot_loss"] = cfg.ibot.loss_weight * self.ibot_patch_loss.forward_masked(
                student_out["masked_patch_head"], ibot_targets, student_masks_flat=inputs["masks_flat"],
                n_masked_patches=int(ibot_indices.shape[0]), masks_weight=inputs["masks_weight"])
        elif self.do_ibot:
            unused = student_out["masked_patch_head"]
            losses["ibot_loss"] = (unused if unused is not None else student_out["global_cls_head"]).sum() * 0.0
        total = sum(losses.values())
        stats = target_statistics(dino_targets)
        if cfg.train.centering == "centering":
            stats["center_norm"] = float(self.dino_loss.center.norm())
        return total, losses, stats

    # ------------------------------------------------------------------ after backward
    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each part of the student (backbone, DINO head, iBOT head) separately (Meta); returns the norms."""
        norms = {}
        for name, module in self.student.named_children():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[name] = float(nn.utils.clip_grad_norm_(params, max_norm))
        return norms

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, over all parameters (backbone and heads)."""
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)

    # ------------------------------------------------------------------ result
    def result_backbone(self) -> nn.Module:
        """The backbone the run produces (the teacher's), for monitoring."""
        return self.teacher.backbone

    def teacher_config(self) -> Dinov2Config:
        """The config of the teacher backbone (drop-path 0), as exported."""
        return backbone_config(self.cfg.student, self.cfg.crops.global_crops_size, 0.0)

    def export_model(self) -> Dinov2Model:
        """The teacher backbone as a dinokit `Dinov2Model` (Hugging Face API, drop-path 0)."""
        model = Dinov2Model(self.teacher_config())
        model.load_meta_state_dict({k: v.detach().cpu() for k, v in self.teacher.backbone.state_dict().items()},
                                   source="teacher backbone")
        return model.eval()
