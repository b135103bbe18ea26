"""Building blocks of DINOv2's self-supervised training, with the signatures of Meta's classes of the same names."""

from dinokit.ssl.dino_head import DINOHead, weight_norm_keys_to_meta
from dinokit.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, multicrop_dino_loss, sinkhorn_knopp
from dinokit.ssl.masking import MaskingGenerator
from dinokit.ssl.param_groups import apply_optim_scheduler, fuse_params_groups, get_params_groups_with_decay
from dinokit.ssl.schedules import CosineScheduler, scaled_lr

__all__ = [
    "CosineScheduler",
    "DINOHead",
    "DINOLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "apply_optim_scheduler",
    "fuse_params_groups",
    "get_params_groups_with_decay",
    "iBOTPatchLoss",
    "multicrop_dino_loss",
    "scaled_lr",
    "sinkhorn_knopp",
    "weight_norm_keys_to_meta",
]
