"""`make demo`: the SSL pretraining demo (k-NN trained vs random init, PCA picture) and the inference part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dinokit import demo
from dinokit.ssl.demo import DEMO_PRESET, run_demo, write_digits
from dinokit.ssl.train_config import load_train_config

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


def test_the_digits_demo_trains_the_digits_preset_and_prints_three_numbers_steps_and_both_pictures(tmp_path, capsys):
    result = run_demo(tmp_path / "demo", minutes=0.05, threads=1, overrides=TINY)
    assert result["preset"] == DEMO_PRESET == "cpu_demo_digits"
    # The run trained exactly the preset (plus the test's size overrides): its saved config says so.
    saved = yaml.safe_load((tmp_path / "demo" / "run" / "config.yaml").read_text())
    preset = load_train_config(DEMO_PRESET)
    for section, key in [("train", "centering"), ("teacher", "momentum_teacher"), ("teacher", "teacher_temp"),
                         ("crops", "global_crops_size"), ("student", "embed_dim"), ("optim", "base_lr")]:
        assert saved[section][key] == preset[section][key]
    assert result["iterations"] >= 1 and result["iterations_planned"] >= 40
    for key in ("knn_random_init", "knn_raw_pixels", "knn_trained"):
        assert 0.0 <= result[key] <= 100.0
    assert result["knn_raw_pixels"] > 90.0  # the digits are pixel-friendly: the text must say so
    out = capsys.readouterr().out
    assert f"Trained {result['iterations']} steps" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "random init" in line and "raw pixels" in line)
    assert f"DINOv2, 0.05 min ({result['iterations']} steps)" in lines[header]
    numbers = [float(v.rstrip("%")) for v in lines[header + 1].split()]
    assert numbers == [round(result[k], 1) for k in ("knn_random_init", "knn_raw_pixels", "knn_trained")]
    assert "Where pixels still win" in out
    neighbours = Image.open(result["neighbours_picture"])
    assert Path(result["neighbours_picture"]).parent == Path(result["pca_picture"]).parent == tmp_path / "demo"
    assert neighbours.mode == "RGB" and neighbours.size[0] > neighbours.size[1] > 10 * 40  # ten query rows
    assert "picture (query, then its 5 nearest" in out and result["neighbours_picture"] in out
    assert Image.open(result["pca_picture"]).size[0] > 128


def test_run_demo_on_a_labelled_folder_uses_the_photo_preset_and_reports_all_three_numbers(tmp_path, capsys):
    data = _two_class_folder(tmp_path / "images")
    result = run_demo(tmp_path / "demo", data=data, minutes=0.05, threads=1, overrides=TINY)
    assert result["preset"] == "cpu_micro_cifar"
    assert {"knn_random_init", "knn_raw_pixels", "knn_trained"} <= set(result)
    assert result["knn_raw_pixels"] == 100.0  # red vs blue: trivial for pixels
    assert Image.open(result["pca_picture"]).mode == "RGB"
    assert (tmp_path / "demo" / "run" / "teacher" / "config.json").is_file()
    assert "Where pixels still win" not in capsys.readouterr().out  # that text is about the digits


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
    assert Image.open(first).size == (16, 16)
    mtime = first.stat().st_mtime_ns
    write_digits(tmp_path / "digits")
    assert first.stat().st_mtime_ns == mtime


def test_the_demo_ends_with_a_summary_naming_the_three_numbers_and_both_pictures(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import dinokit.ssl.demo as ssl_demo

    real = ssl_demo.run_demo
    monkeypatch.setattr(ssl_demo, "run_demo", lambda out, data, minutes: real(out, data, minutes, overrides=TINY))
    assert demo.main(["--minutes", "0.05", "--output", str(tmp_path / "model")]) == 0
    tail = capsys.readouterr().out.split("Summary (")[-1]
    assert "k-NN top-1: random init" in tail and "raw pixels" in tail and "trained" in tail
    assert "dinokit_demo/neighbours.png" in tail and "dinokit_demo/pca.png" in tail
    assert (tmp_path / "dinokit_demo" / "neighbours.png").is_file()


def test_inference_part_of_the_demo_runs_offline(tmp_path, capsys):
    assert demo.main(["--skip-training", "--output", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "last_hidden_state" in out and "x_norm_clstoken == pooler_output: True" in out
    assert (tmp_path / "model" / "config.json").is_file()
