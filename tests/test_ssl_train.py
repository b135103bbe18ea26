"""`dinokit train`: end-to-end runs of a tiny DINOv2 on generated images (CPU, one thread, seconds each)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import main as cli_main
from dinokit.ssl.meta_arch import SSLMetaArch
from dinokit.ssl.train_config import load_train_config
from dinokit.ssl.trainer import TIMING_KEYS, Trainer, TrainingDiverged, read_checkpoint, train
from ssl_helpers import TINY, make_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread; module scope so the shared
    runs below use it too (a thread count change alters float sums, and resume equality is exact)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("ssl_images") / "images")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def full_run(images, tmp_path_factory) -> Path:
    """30 iterations, uninterrupted."""
    run = tmp_path_factory.mktemp("ssl_full") / "run"
    train("cpu_tiny_cifar", images, run, overrides=TINY + ["optim.epochs=3"], progress=False)
    return run


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def test_tiny_run_logs_finite_losses_that_fall_and_writes_checkpoint_and_export(full_run):
    records = _metrics(full_run)
    assert [r["iteration"] for r in records] == list(range(1, 31))
    terms = ["dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"]
    for r in records:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in terms + ["total_loss"])
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in terms), rel=1e-5)
        assert 0.0 <= r["teacher_batch_entropy"] <= 1.0 and 0.0 <= r["teacher_entropy"] <= 1.0
    # iBOT (masked patches predicted from context) and KoLeo (CLS features spread out) fall. The DINO terms are
    # cross-entropies to targets whose entropy rises as the centre settles (a 2-block model on 24 toy images
    # ends near uniform targets, which the teacher entropy shows), so they are bounded, not falling:
    # each is at most its share of log K plus the student's excess.
    for key in ("ibot_loss", "koleo_loss"):
        assert _mean(records[-5:], key) < 0.9 * _mean(records[:5], key)
    assert max(r["dino_local_loss"] + r["dino_global_loss"] for r in records) < 2 * math.log(64)
    checkpoint = read_checkpoint(full_run)
    assert checkpoint["iteration"] == 30
    assert {"model", "optimizer", "rng", "config"} <= set(checkpoint)
    assert "dino_loss.center" in checkpoint["model"] and "ibot_patch_loss.center" in checkpoint["model"]
    assert (full_run / "teacher" / "config.json").is_file()
    assert (full_run / "teacher" / "model.safetensors").is_file()
    assert not list(full_run.glob("*.tmp"))


def test_resume_continues_exactly_like_an_uninterrupted_run(images, full_run, tmp_path):
    run = tmp_path / "run"
    # Interrupted at iteration 13 (one DataLoader worker), resumed to the end (no worker): the data stream
    # depends only on the seed and the iteration.
    train("cpu_tiny_cifar", images, run, overrides=TINY + ["optim.epochs=3", "train.num_workers=1"],
          progress=False, max_iterations=13)
    assert read_checkpoint(run)["iteration"] == 13
    train(None, images, run, overrides=["train.num_workers=0"], resume=True, progress=False)
    resumed = [_without_timing(r) for r in _metrics(run)]
    uninterrupted = [_without_timing(r) for r in _metrics(full_run)]
    assert [r["iteration"] for r in resumed] == list(range(1, 31))
    assert resumed == uninterrupted


def test_exported_teacher_loads_in_transformers_and_dinokit_with_the_teachers_outputs(full_run):
    transformers = pytest.importorskip("transformers")
    from dinokit import AutoModel

    checkpoint = read_checkpoint(full_run)
    cfg = load_train_config(checkpoint["config"])
    arch = SSLMetaArch(cfg)
    arch.load_state_dict(checkpoint["model"])
    teacher = arch.teacher.backbone.eval()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher.forward_features(pixels)
        hf = transformers.Dinov2Model.from_pretrained(full_run / "teacher").eval()(pixel_values=pixels)
        ours = AutoModel.from_pretrained(full_run / "teacher")(pixel_values=pixels)
    reference = torch.cat([expected["x_norm_clstoken"][:, None], expected["x_norm_patchtokens"]], dim=1)
    torch.testing.assert_close(hf.last_hidden_state, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_hidden_state, reference, atol=1e-6, rtol=1e-6)


def test_teacher_is_an_ema_of_the_student_and_runs_without_drop_path():
    cfg = load_train_config("cpu_tiny_cifar", TINY)
    arch = SSLMetaArch(cfg).train()
    assert arch.student.training and not arch.teacher.training
    assert all(b.sample_drop_ratio == 0.0 for b in arch.teacher.backbone.blocks)
    assert all(b.sample_drop_ratio == 0.2 for b in arch.student.backbone.blocks)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in arch.teacher.parameters()]
    arch.update_teacher(0.9)
    for old, new, s in zip(before, arch.teacher.parameters(), arch.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    cfg = load_train_config("cpu_tiny_cifar", TINY + ["train.saveckp_freq=3"])
    trainer = Trainer(cfg, images, run, progress=False)
    forward = trainer.arch.forward_losses
    calls = []

    def poisoned(batch, teacher_temp):
        total, losses, stats = forward(batch, teacher_temp)
        calls.append(1)
        if len(calls) == 5:  # iteration index 4
            losses["dino_global_loss"] = losses["dino_global_loss"] * float("nan")
            total = sum(losses.values())
        return total, losses, stats

    trainer.arch.forward_losses = poisoned
    with pytest.raises(TrainingDiverged, match="not finite at iteration 4.*last good checkpoint"):
        trainer.run()
    checkpoint = read_checkpoint(run)
    assert checkpoint["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert not (run / "teacher").exists()  # no export that looks like a finished run


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli_main(["train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "out"), *TINY])
    assert code == 2
    assert "No image files" in capsys.readouterr().err


def test_folder_of_corrupt_files_is_a_clear_error(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for i in range(3):
        (folder / f"broken_{i}.jpg").write_bytes(b"not a jpeg" * i)
    with pytest.raises(ValueError, match="No readable image"):
        train("cpu_tiny_cifar", folder, tmp_path / "out", overrides=TINY, progress=False)


def test_single_image_batch_of_one_is_refused_because_koleo_needs_two(images, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(images.glob("*.png")).read_bytes())
    with pytest.raises(ValueError, match="KoLeo loss needs at least 2 images"):
        train("cpu_tiny_cifar", one, tmp_path / "out", overrides=TINY + ["train.batch_size_per_gpu=1"],
              progress=False)


def test_single_image_trains_with_a_batch_of_its_crops(images, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(images.glob("*.png")).read_bytes())
    record = train("cpu_tiny_cifar", one, tmp_path / "out", overrides=TINY + ["train.batch_size_per_gpu=4"],
                   progress=False, max_iterations=3)
    assert record["iteration"] == 3 and torch.isfinite(torch.tensor(record["total_loss"]))


def test_existing_run_needs_resume_or_another_output(images, full_run):
    with pytest.raises(ValueError, match="already holds a training run"):
        train("cpu_tiny_cifar", images, full_run, overrides=TINY, progress=False)


def test_unknown_setting_is_a_clear_error(images, tmp_path):
    with pytest.raises(ValueError, match="Unknown training setting 'optim.epoch'"):
        train("cpu_tiny_cifar", images, tmp_path / "out", overrides=TINY + ["optim.epoch=3"], progress=False)


def test_two_process_gloo_run_trains_and_only_rank_0_writes(images, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dinokit", "train", "--data", str(images), "--output", str(run), "--no-progress",
               *TINY, "train.max_iterations=4", "train.batch_size_per_gpu=4", "train.centering=sinkhorn_knopp"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]  # one writer, no duplicated lines
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    checkpoint = read_checkpoint(run)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert (run / "teacher" / "model.safetensors").is_file()


def test_two_process_run_with_a_separate_ibot_head_survives_steps_without_masked_patches(images, tmp_path):
    # No crop is masked, so iBOT is skipped on every step; the separate iBOT head must still take part in DDP's
    # backward (zero gradient) or the reducer fails. Also runs the batched (tensor) augmentation under DDP.
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dinokit", "train", "--data", str(images), "--output", str(run), "--no-progress",
               *TINY, "train.max_iterations=2", "train.batch_size_per_gpu=4", "ibot.separate_head=true",
               "ibot.mask_sample_probability=0.0", "crops.backend=tensor"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(run)
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["ibot_loss"] == 0.0 and math.isfinite(r["total_loss"]) for r in records)


def test_periodic_knn_evaluation_logs_the_teachers_accuracy(images, tmp_path):
    labelled = tmp_path / "labelled"
    for i, path in enumerate(sorted(images.glob("*.png"))):
        target = labelled / f"class_{i % 2}" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    overrides = TINY + ["evaluation.knn_every_iterations=2", f"evaluation.knn_train={labelled}",
                        f"evaluation.knn_test={labelled}", "evaluation.knn_k=3"]
    train("cpu_tiny_cifar", images, tmp_path / "run", overrides=overrides, progress=False, max_iterations=4)
    records = _metrics(tmp_path / "run")
    assert [r["iteration"] for r in records if "knn_top1" in r] == [2, 4]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in records if "knn_top1" in r)
