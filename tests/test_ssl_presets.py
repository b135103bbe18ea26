"""Every training preset loads and describes a valid model; the CPU presets train a step on their crop sizes."""

from __future__ import annotations

import math

import pytest
import torch

from dinokit.ssl.loader import build_dataset, build_loader
from dinokit.ssl.meta_arch import SSLMetaArch, backbone_config
from dinokit.ssl.train_config import load_train_config, preset_names
from ssl_helpers import make_images


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_describes_a_backbone(name):
    cfg = load_train_config(name)
    config = backbone_config(cfg.student, cfg.crops.global_crops_size)
    assert config.image_size % config.patch_size == 0


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("cpu_")])
def test_cpu_preset_trains_one_step_on_its_own_crops(name, tmp_path):
    cfg = load_train_config(name, ["train.batch_size_per_gpu=4", "train.num_workers=0"])
    cfg.optim.lr = 1e-4
    dataset = build_dataset(cfg, make_images(tmp_path / "images", n=8, size=32))
    batch = next(iter(build_loader(cfg, dataset)))
    size = cfg.crops.global_crops_size
    assert batch["collated_global_crops"].shape == (8, 3, size, size)
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg).train()
    total, losses, _ = arch.forward_losses(batch, cfg.teacher.teacher_temp)
    total.backward()
    assert math.isfinite(total.detach().item()) and set(losses) >= {"dino_local_loss", "dino_global_loss", "koleo_loss"}
