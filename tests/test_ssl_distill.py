"""`dinokit train --distill-from`: both distillation modes on a tiny setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinokit import Dinov2Config, Dinov2Model
from dinokit.ssl.distill import FeatureDistillArch, HeadDistillArch, build_distill_arch, resize_patch_tokens
from dinokit.ssl.train_config import load_train_config
from dinokit.ssl.trainer import read_checkpoint, train
from ssl_helpers import TINY, make_images

# A student of another shape than the TINY teacher (wider, one block).
STUDENT = ["student.embed_dim=48", "student.depth=1", "student.num_heads=3", "optim.base_lr=0.02",
           "optim.warmup_epochs=0", "optim.epochs=3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("distill_images") / "images")


@pytest.fixture(scope="module")
def teacher_run(images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    train("cpu_tiny_cifar", images, run, overrides=TINY, progress=False, max_iterations=5)
    return run


def _losses(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_with_heads_selects_head_distillation_with_the_teachers_prototypes(teacher_run):
    cfg = load_train_config("cpu_tiny_cifar", TINY + STUDENT + ["dino.head_n_prototypes=32",
                                                                "distill.teacher=" + str(teacher_run)])
    arch = build_distill_arch(cfg, "cpu")
    assert isinstance(arch, HeadDistillArch)
    assert cfg.dino.head_n_prototypes == 64  # taken from the teacher
    assert cfg.ibot.mask_sample_probability == 0.0 and cfg.student.drop_path_rate == 0.0
    teacher_state = read_checkpoint(teacher_run)["model"]
    for name, value in arch.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state["teacher." + name])
    assert not any(p.requires_grad for p in arch.teacher.parameters())
    assert arch.student.backbone.embed_dim == 48


def test_head_distillation_trains_the_student_and_exports_its_ema(teacher_run, images, tmp_path):
    run = tmp_path / "student"
    train("cpu_tiny_cifar", images, run, overrides=TINY + STUDENT, distill_from=teacher_run, progress=False)
    losses = _losses(run, "total_loss")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    checkpoint = read_checkpoint(run)
    assert checkpoint["kind"] == "distill_heads"
    from dinokit import AutoModel

    exported = AutoModel.from_pretrained(run / "teacher")
    assert exported.config.hidden_size == 48
    ema = {k[len("ema.backbone."):]: v for k, v in checkpoint["model"].items() if k.startswith("ema.backbone.")}
    torch.testing.assert_close(exported.meta_state_dict()[0]["blocks.0.mlp.fc1.weight"],
                               ema["blocks.0.mlp.fc1.weight"])


@pytest.fixture(scope="module")
def backbone_teacher(tmp_path_factory) -> Path:
    """A released-style teacher: backbone only, Hugging Face layout, patch 14."""
    folder = tmp_path_factory.mktemp("hf_teacher") / "model"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_backbone_only_teacher_selects_feature_distillation(backbone_teacher):
    cfg = load_train_config("cpu_tiny_cifar", TINY + STUDENT + ["distill.teacher=" + str(backbone_teacher)])
    arch = build_distill_arch(cfg, "cpu")
    assert isinstance(arch, FeatureDistillArch)
    assert arch.teacher_size == 56  # 16-px crops, 4-px patches: a 4x4 grid, i.e. 4 x 14 px for the teacher
    assert arch.student.cls_proj.out_features == 64


@pytest.mark.parametrize("teacher_size", [None, 28])  # 28 px: a 2x2 teacher grid, the student's is resampled
def test_feature_distillation_reduces_its_loss(backbone_teacher, images, tmp_path, teacher_size):
    run = tmp_path / "student"
    extra = [] if teacher_size is None else [f"distill.teacher_image_size={teacher_size}"]
    train("cpu_tiny_cifar", images, run, overrides=TINY + STUDENT + extra, distill_from=backbone_teacher,
          progress=False)
    cls_losses = _losses(run, "cls_distill_loss")
    patch_losses = _losses(run, "patch_distill_loss")
    assert cls_losses[-1] < 0.5 * cls_losses[0]
    assert patch_losses[-1] < 0.8 * patch_losses[0]
    assert read_checkpoint(run)["kind"] == "distill_features"
    assert (run / "teacher" / "model.safetensors").is_file()


def test_patch_grid_resampling_keeps_a_constant_field_constant():
    tokens = torch.ones(2, 16, 5) * torch.arange(5.0)
    resized = resize_patch_tokens(tokens, 2)
    assert resized.shape == (2, 4, 5)
    torch.testing.assert_close(resized, torch.ones(2, 4, 5) * torch.arange(5.0))


def test_head_mode_for_a_backbone_only_teacher_is_a_clear_error(backbone_teacher):
    cfg = load_train_config("cpu_tiny_cifar", TINY + ["distill.mode=heads", "distill.teacher=" + str(backbone_teacher)])
    with pytest.raises(ValueError, match="needs a dinokit training run"):
        build_distill_arch(cfg, "cpu")
