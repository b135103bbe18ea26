"""Distillation: train a (smaller) student from a frozen pretrained teacher (`dinokit train --distill-from`).

Two modes, chosen from what the teacher carries (`distill.mode: auto`):
- `heads` (the paper's recipe, training.md §8) for a dinokit training run or checkpoint, which holds the DINO /
  iBOT heads: the frozen teacher (its EMA weights and heads) gives softmax-centred (or Sinkhorn-Knopp) targets
  for the DINO loss on every crop and the iBOT loss on every patch of the global crops; the student has heads
  with the teacher's prototypes, no masking and no stochastic depth; an EMA copy of the student is the result.
- `features` for backbone-only teachers (the released weights: their heads were never published; any model
  `dinokit.load_model` accepts): the student's CLS and patch tokens go through linear projections to the
  teacher's width and are pulled to the teacher's tokens with a cosine loss; patch grids are interpolated when
  they differ. An EMA copy of the student backbone is the result.

Teacher input: the student's global crops, resized to `distill.teacher_image_size`, by default the size that
gives the teacher the student's patch grid (e.g. 32-px crops with 4-px patches -> 8x8 -> 112 px for a /14
teacher). Student and teacher architectures may differ (width, depth, patch size).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.hf import Dinov2Model, build_vit
from dinokit.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinokit.ssl.meta_arch import (
    SSLMetaArch,
    autocast_context,
    backbone_config,
    build_ssl_model,
    resolve_precision,
)
from dinokit.ssl.train_config import load_train_config

logger = logging.getLogger(__name__)


def read_training_checkpoint(spec) -> dict | None:
    """The dinokit training checkpoint at `spec` (a run directory or its checkpoint.pth), or None when `spec` is
    something else (a model directory, hub id, Meta/timm file...). Read without running pickled code: a file
    that carries some is an error, never executed."""
    from dinokit.ssl.trainer import CHECKPOINT_NAME, read_checkpoint

    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file() or path.suffix != ".pth":
        return None
    data = read_checkpoint(path)
    if "model" in data and "config" in data and data.get("kind") == "ssl":
        return data
    return None


def build_distill_arch(cfg, device):
    """The distillation arch for `cfg.distill.teacher` (mode `heads` or `features`, see the module doc)."""
    spec = cfg.distill.teacher
    if not spec:
        raise ValueError("Distillation needs a teacher: --distill-from <dinokit run dir, checkpoint or model>.")
    checkpoint = read_training_checkpoint(spec)
    mode = cfg.distill.mode
    if mode == "auto":
        mode = "heads" if checkpoint is not None else "features"
    if mode == "heads":
        if checkpoint is None:
            raise ValueError(f"distill.mode=heads needs a dinokit training run or checkpoint.pth with DINO heads; "
                             f"{spec} is not one. Use distill.mode=features for backbone-only teachers.")
        return HeadDistillArch(cfg, checkpoint, device)
    if mode != "features":
        raise ValueError(f"distill.mode={mode!r}: use auto, heads or features.")
    from dinokit.loading import load_model

    return FeatureDistillArch(cfg, load_model(spec), device)


def _teacher_view(crops: torch.Tensor, size: int) -> torch.Tensor:
    if crops.shape[-1] == size and crops.shape[-2] == size:
        return crops
    return F.interpolate(crops, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def _default_teacher_size(cfg, teacher_patch: int) -> int:
    if cfg.distill.teacher_image_size:
        return int(cfg.distill.teacher_image_size)
    return cfg.crops.global_crops_size // cfg.student.patch_size * teacher_patch


def _ema_copy(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module)
    ema.requires_grad_(False)
    return ema.eval()


class HeadDistillArch(SSLMetaArch):
    """Frozen teacher with heads -> student; `update_teacher(m)` updates the student's EMA copy."""

    checkpoint_kind = "distill_heads"

    def __init__(self, cfg, checkpoint: dict, device="cpu"):
        nn.Module.__init__(self)
        teacher_cfg = load_train_config(checkpoint["config"])
        # The student predicts the teacher's prototypes; no masking, no stochastic depth (training.md §8).
        cfg.dino.head_n_prototypes = teacher_cfg.dino.head_n_prototypes
        cfg.ibot.separate_head = teacher_cfg.ibot.separate_head
        cfg.ibot.head_n_prototypes = teacher_cfg.ibot.head_n_prototypes
        cfg.student.drop_path_rate = 0.0
        cfg.ibot.mask_sample_probability = 0.0
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = resolve_precision(cfg.compute_precision, self.device)
        self.student = build_ssl_model(cfg, drop_path_rate=0.0)
        self.teacher = build_ssl_model(teacher_cfg, drop_path_rate=0.0)
        prefix = "teacher."
        self.teacher.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items()
                                      if k.startswith(prefix)})
        self.teacher.requires_grad_(False)
        self.ema = _ema_copy(self.student)
        self.teacher_size = _default_teacher_size(cfg, teacher_cfg.student.patch_size)

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_k)
        self.koleo_loss = KoLeoLoss()
        self.to(self.device)
        object.__setattr__(self, "student_forward", self.student)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ema.eval()
        return self

    def prepare_batch(self, batch: dict) -> dict:
        """No masks: iBOT runs on every patch of the global crops (each image's patches weigh 1/N)."""
        device = self.device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        teacher_crops = _teacher_view(global_crops, self.teacher_size)
        grid_student = global_crops.shape[-1] // self.cfg.student.patch_size
        grid_teacher = teacher_crops.shape[-1] // self.teacher.backbone.patch_size
        n_images = global_crops.shape[0]
        n_patches = grid_student * grid_student
        ibot_indices = None
        if self.do_ibot:
            if grid_student != grid_teacher:
                raise ValueError(f"Distillation with heads needs the same patch grid for both models to pair the "
                                 f"iBOT targets (student {grid_student}x{grid_student}, teacher "
                                 f"{grid_teacher}x{grid_teacher}); leave distill.teacher_image_size unset or set "
                                 "ibot.loss_weight=0.")
            ibot_indices = torch.arange(n_images * n_patches, device=device)
        return {
            "global_crops": global_crops,
            "teacher_crops": teacher_crops,
            "local_crops": batch["collated_local_crops"].to(device, non_blocking=True),
            "student_masks": None,
            "ibot_indices": ibot_indices,
            "masks_flat": torch.ones(n_images, n_patches, dtype=torch.bool, device=device),
            "masks_weight": torch.full((n_images * n_patches,), 1.0 / n_patches, device=device),
            "n_masked_total": torch.tensor([n_images * n_patches], device=device),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema, student = list(self.ema.parameters()), list(self.student.parameters())
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, student, alpha=1 - momentum)

    def result_backbone(self) -> nn.Module:
        return self.ema.backbone

    def export_model(self) -> Dinov2Model:
        return _export(self.cfg, self.ema.backbone)


def _export(cfg, backbone: nn.Module) -> Dinov2Model:
    model = Dinov2Model(backbone_config(cfg.student, cfg.crops.global_crops_size, 0.0))
    model.load_meta_state_dict({k: v.detach().cpu() for k, v in backbone.state_dict().items()},
                               source="distilled student")
    return model.eval()


class FeatureStudent(nn.Module):
    """Student backbone + linear projections of its CLS and patch tokens to the teacher's width."""

    def __init__(self, backbone: nn.Module, teacher_dim: int):
        super().__init__()
        self.backbone = backbone
        self.cls_proj = nn.Linear(backbone.embed_dim, teacher_dim)
        self.patch_proj = nn.Linear(backbone.embed_dim, teacher_dim)

    def forward(self, crops: torch.Tensor):
        out = self.backbone.forward_features(crops)
        return self.cls_proj(out["x_norm_clstoken"]), self.patch_proj(out["x_norm_patchtokens"])


def resize_patch_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, g*g, D) tokens on a square grid -> (B, grid*grid, D), bilinear."""
    b, n, d = tokens.shape
    side = int(round(n ** 0.5))
    if side == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(b, d, side, side)
    x = F.interpolate(x.float(), size=(grid, grid), mode="bilinear", align_corners=False).to(tokens.dtype)
    return x.flatten(2).transpose(1, 2)


class FeatureDistillArch(nn.Module):
    """Backbone-only teacher -> student through projections (cosine losses on CLS and patch tokens)."""

    checkpoint_kind = "distill_features"

    def __init__(self, cfg, teacher_model: nn.Module, device="cpu"):
        super().__init__()
        cfg.ibot.mask_sample_probability = 0.0  # the collate still runs; no masks are drawn
        cfg.student.drop_path_rate = 0.0
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = resolve_precision(cfg.compute_precision, self.device)
        teacher = teacher_model.vit_module if hasattr(teacher_model, "vit_module") else teacher_model
        self.teacher = teacher.eval().requires_grad_(False)
        backbone = build_vit(backbone_config(cfg.student, cfg.crops.global_crops_size, 0.0))
        self.student = FeatureStudent(backbone, self.teacher.embed_dim)
        self.ema = _ema_copy(self.student.backbone)
        self.teacher_size = _default_teacher_size(cfg, self.teacher.patch_size)
        self.to(self.device)
        object.__setattr__(self, "student_forward", self.student)

    def wrap_student(self, wrapper) -> None:
        object.__setattr__(self, "student_forward", wrapper)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.ema.eval()
        return self

    def forward_losses(self, batch: dict, teacher_temp: float):
        crops = batch["collated_global_crops"].to(self.device, non_blocking=True)
        with torch.no_grad(), autocast_context(self.precision, self.device):
            t = self.teacher.forward_features(_teacher_view(crops, self.teacher_size))
        t_cls, t_patch = t["x_norm_clstoken"].float(), t["x_norm_patchtokens"].float()
        with autocast_context(self.precision, self.device):
            s_cls, s_patch = self.student_forward(crops)
        grid = int(round(t_patch.shape[1] ** 0.5))
        s_patch = resize_patch_tokens(s_patch, grid)
        cls_loss = (1 - F.cosine_similarity(s_cls.float(), t_cls, dim=-1)).mean()
        patch_loss = (1 - F.cosine_similarity(s_patch.float(), t_patch, dim=-1)).mean()
        losses = {"cls_distill_loss": self.cfg.distill.cls_weight * cls_loss,
                  "patch_distill_loss": self.cfg.distill.patch_weight * patch_loss}
        return sum(losses.values()), losses, {}

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        return {name: float(nn.utils.clip_grad_norm_(list(module.parameters()), max_norm))
                for name, module in self.student.named_children()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema, student = list(self.ema.parameters()), list(self.student.backbone.parameters())
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, student, alpha=1 - momentum)

    def result_backbone(self) -> nn.Module:
        return self.ema

    def export_model(self) -> Dinov2Model:
        return _export(self.cfg, self.ema)
