"""`make demo`: the SSL pretraining demo (k-NN trained vs random init, PCA picture) and the inference part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dinokit import demo
from dinokit.ssl.demo import run_demo, write_digits

TINY = ["student.depth=1", "train.batch_size_per_gpu=8", "train.num_workers=0", "dino.head_n_prototypes=64",
        "ibot.head_n_prototypes=64", "optim.epochs=2", "crops.local_crops_number=2"]


def _two_class_folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in {"red": (220, 30, 30), "blue": (20, 40, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


def test_run_demo_reports_knn_for_trained_and_random_init_and_writes_the_pca_picture(tmp_path, capsys):
    data = _two_class_folder(tmp_path / "images")
    result = run_demo(tmp_path / "demo", data=data, minutes=0.05, threads=1, overrides=TINY)
    assert 0.0 <= result["knn_random_init"] <= 100.0 and 0.0 <= result["knn_trained"] <= 100.0
    assert result["iterations"] >= 1
    picture = Image.open(result["pca_picture"])
    assert picture.size[0] > 128 and picture.mode == "RGB"
    assert (tmp_path / "demo" / "run" / "teacher" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "random init" in out and "patch-feature PCA picture" in out


def test_run_demo_on_an_unlabelled_folder_trains_and_draws_without_knn(tmp_path, capsys):
    data = _two_class_folder(tmp_path / "images")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(data.rglob("*.png"))):
        path.rename(flat / f"{i:02d}.png")
    result = run_demo(tmp_path / "demo", data=flat, minutes=0.05, threads=1, overrides=TINY)
    assert "knn_trained" not in result
    assert Path(result["pca_picture"]).is_file()
    assert "k-NN skipped" in capsys.readouterr().out


def test_digits_are_written_once_as_an_imagefolder_of_ten_classes(tmp_path):
    folder = write_digits(tmp_path / "digits")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in folder.rglob("*.png")) == 1797
    first = next(folder.rglob("*.png"))
    assert Image.open(first).size == (32, 32)
    mtime = first.stat().st_mtime_ns
    write_digits(tmp_path / "digits")
    assert first.stat().st_mtime_ns == mtime


def test_inference_part_of_the_demo_runs_offline(tmp_path, capsys):
    assert demo.main(["--skip-training", "--output", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "last_hidden_state" in out and "x_norm_clstoken == pooler_output: True" in out
    assert (tmp_path / "model" / "config.json").is_file()
