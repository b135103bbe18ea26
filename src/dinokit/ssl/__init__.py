"""DINOv2's self-supervised training: the building blocks, with the signatures of Meta's classes of the same names,
and the method assembled (`SSLMetaArch`: student, EMA teacher and losses; `Trainer` / `train`: the loop behind
`dinokit train`; `run_demo`: the `make demo` pretraining job)."""

from dinokit.param_groups import apply_optim_scheduler, fuse_params_groups, get_params_groups_with_decay
from dinokit.ssl.demo import run_demo
from dinokit.ssl.dino_head import DINOHead, weight_norm_keys_to_meta
from dinokit.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, multicrop_dino_loss, sinkhorn_knopp
from dinokit.ssl.masking import MaskingGenerator
from dinokit.ssl.meta_arch import SSLMetaArch
from dinokit.ssl.schedules import CosineScheduler, scaled_lr
from dinokit.ssl.trainer import Trainer, train

__all__ = [
    "CosineScheduler",
    "DINOHead",
    "DINOLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "SSLMetaArch",
    "Trainer",
    "apply_optim_scheduler",
    "fuse_params_groups",
    "get_params_groups_with_decay",
    "iBOTPatchLoss",
    "multicrop_dino_loss",
    "run_demo",
    "scaled_lr",
    "sinkhorn_knopp",
    "train",
    "weight_norm_keys_to_meta",
]
