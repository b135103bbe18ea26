"""The bad-input corpus (tests/bad_inputs.py) through the one reader and through every command that reads images.

Each case ends, in each command, in exactly one of: the file is read (it is in the command's output); a logged
skip listed in the command's errors output (embed: errors.parquet; eval: the report's skipped_files; finetune:
training_log.json; train: a warning naming the file, counted in metrics.jsonl); or one clear error naming the
file (exit status 2). Never a traceback, never output that looks complete without the file. Commands run in
this process (`dinokit.cli.main`) with a tiny saved model, on folders of five good images plus the case.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_inputs import CASES, constant_png, deny_reading, smooth_rgb
from dinokit import Dinov2Config, Dinov2Model
from dinokit.cli import main
from dinokit.data.images import ImageReadError, display_path, read_image
from ssl_helpers import TINY
from zeroshot_bad_inputs import ZEROSHOT_CHECKS

from helpers import randomize_

COMMANDS = ["embed", "eval knn", "eval linear", "eval logreg", "pca", "search", "classify", "finetune", "train",
            "segment predict", "depth predict", "track", "match"]
CROP = ["--resize", "32", "--crop", "28"]
TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
WHITE = (1 - 0.406) / 0.225  # the largest normalised value: the blue channel of a white pixel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny backbone, a tiny two-class classifier and an index of five images, shared by the whole matrix."""
    from dinokit import Dinov2ForImageClassification

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    randomize_(Dinov2Model(Dinov2Config(**TINY_CONFIG))).save_pretrained(root / "backbone")
    labels = dict(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    Dinov2ForImageClassification(Dinov2Config(**TINY_CONFIG, **labels)).save_pretrained(root / "classifier")
    good = _good_images(root / "good")
    embedded = root / "embedded"
    assert main(["embed", str(good), "--model", str(root / "backbone"), "-o", str(embedded), "--image-size", "28",
                 "--num-workers", "0", "--quiet", "--device", "cpu"]) == 0
    assert main(["index", str(embedded)]) == 0
    dense = _dense_heads(root, root / "backbone")
    return {"backbone": str(root / "backbone"), "classifier": str(root / "classifier"), "index": str(embedded),
            **dense}


def _dense_heads(root: Path, backbone: Path) -> dict[str, str]:
    """A tiny segmentation and a tiny depth head trained on generated data (what `segment/depth predict` load)."""
    from dense_helpers import depth_dataset, seg_dataset

    fast = ["--size", "28", "--iterations", "2", "--batch-size", "2", "--quiet", "--cache-dir", str(root / "c")]
    seg, depth = root / "segmenter", root / "depther"
    data = seg_dataset(root / "seg")
    assert main(["segment", "train", "--model", str(backbone), "--train", str(data), "--val", str(data),
                 "--output", str(seg), *fast]) == 0
    data = depth_dataset(root / "depth")
    assert main(["depth", "train", "--model", str(backbone), "--train", str(data), "--val", str(data),
                 "--output", str(depth), "--layers", "1", *fast]) == 0
    return {"segmenter": str(seg), "depther": str(depth)}


def _good_images(folder: Path, count: int = 5) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        smooth_rgb(40, 32, seed=100 + i).save(folder / f"good_{i}.png")
    return folder


def make_case(name: str, root: Path, monkeypatch) -> tuple[str, Path, Path]:
    """(kind, case file, folder): <root>/train/{a,b} and <root>/val/{a,b} of good images, the case in train/a."""
    seed = 200
    for split, counts in (("train", (2, 2)), ("val", (1, 1))):
        for label, count in zip("ab", counts):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                smooth_rgb(40, 32, seed=seed).save(folder / f"{label}{i}.png")
    kind, make = CASES[name]
    path = make(root / "train" / "a")
    if name == "unreadable_chmod_000" and os.geteuid() == 0:
        deny_reading(monkeypatch, path)  # root reads mode-000 files: simulate what any other user gets
    return kind, path, root


# ---------------------------------------------------------------------------------------------- each command
def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _refused_naming_the_file(code: int, err: str, path: Path) -> None:
    assert code == 2, err
    assert "error: Cannot read image file" in err and display_path(path) in err, err


def check_embed(kind, path, root, models, tmp_path, capsys, caplog):
    import pyarrow.parquet as pq

    out = tmp_path / "emb"
    code, _, err = _run(["embed", str(root / "train"), "--model", models["backbone"], "-o", str(out),
                         "--image-size", "28", "--num-workers", "0", "--batch-size", "3", "--quiet",
                         "--device", "cpu"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    embedded = [p for f in sorted((out / "metadata").glob("*.parquet")) for p in pq.read_table(f)["path"].to_pylist()]
    errors = pq.read_table(out / "errors.parquet").to_pylist() if (out / "errors.parquet").exists() else []
    assert manifest["complete"] and manifest["num_files"] == 5
    if kind == "good":
        assert display_path(path) in embedded and not errors and manifest["num_embedded"] == 5
        return "read"
    assert display_path(path) not in embedded and manifest["num_embedded"] == 4
    assert [e["path"] for e in errors] == [display_path(path)] and errors[0]["reason"]
    return f"skipped, listed in errors.parquet ({errors[0]['reason'].split(' (')[0]})"


def _check_eval(protocol, options):
    def check(kind, path, root, models, tmp_path, capsys, caplog):
        report = tmp_path / "report.json"
        code, out, err = _run(["eval", protocol, "--model", models["backbone"], "--train", str(root / "train"),
                             "--val", str(root / "val"), "--no-cache", "--num-workers", "0", "--batch-size", "3",
                             "--quiet", "--device", "cpu", "--output", str(report), *CROP, *options], capsys)
        assert code == 0, err
        train = json.loads(report.read_text())["data"]["train"]
        skipped = [display_path(item["path"]) for item in train.get("skipped_files", [])]
        assert train["listed"] == 5
        if kind == "good":
            assert train["skipped_unreadable"] == 0 and not skipped
            return "read"
        assert train["skipped_unreadable"] == 1 and skipped == [display_path(path)]
        assert f"skipped (train): {display_path(path)}: " in out  # named on screen as well
        return "skipped, listed in the report (skipped_files)"
    return check


def check_finetune(kind, path, root, models, tmp_path, capsys, caplog):
    out = tmp_path / "finetuned"
    code, _, err = _run(["finetune", "--model", models["backbone"], "--train", str(root / "train"), "--val",
                         str(root / "val"), "--output", str(out), "--epochs", "1", "--no-cache", "--num-workers",
                         "0", "--batch-size", "3", "--train-batch-size", "4", "--quiet", "--device", "cpu", *CROP],
                        capsys)
    assert code == 0, err
    log = json.loads((out / "training_log.json").read_text())
    skipped = [display_path(item["path"]) for item in log["skipped_files"]["train"]]
    if kind == "good":
        assert log["skipped_unreadable"]["train"] == 0 and not skipped
        return "read"
    assert log["skipped_unreadable"]["train"] == 1 and skipped == [display_path(path)]
    return "skipped, listed in training_log.json"


def check_train(kind, path, root, models, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="dinokit.data.datasets")
    code, _, err = _run(["train", "--data", str(root / "train"), "--output", str(out), "--no-progress", *TINY,
                         "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.warmup_epochs=0"], capsys)
    assert code == 0, err
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping unreadable image")]
    counted = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["bad_files_skipped"]
    if kind == "good":
        assert not skips and counted == 0
        return "read"
    assert any(display_path(path) in message for message in skips) and counted == 1, skips
    return "skipped, logged (warning naming the file; bad_files_skipped in metrics.jsonl)"


def check_pca(kind, path, root, models, tmp_path, capsys, caplog):
    picture = tmp_path / "pca.png"
    code, out, err = _run(["pca", str(root / "val" / "a" / "a0.png"), str(path), "-o", str(picture), "--model",
                           models["backbone"], "--size", "28", "--device", "cpu"], capsys)
    if kind == "good":
        assert code == 0 and "2 rows" in out, err
        return "read"
    _refused_naming_the_file(code, err, path)
    assert not picture.exists()
    return "error: Cannot read image file ...: <problem>"


def check_search(kind, path, root, models, tmp_path, capsys, caplog):
    code, out, err = _run(["search", models["index"], str(path), "-k", "2", "--json", "--device", "cpu"], capsys)
    if kind == "good":
        assert code == 0, err
        (result,) = json.loads(out)
        assert len(result["results"]) == 2
        return "read"
    _refused_naming_the_file(code, err, path)
    assert not out
    return "error: Cannot read image file ...: <problem>"


def check_classify(kind, path, root, models, tmp_path, capsys, caplog):
    code, out, err = _run(["classify", str(path), "--model", models["classifier"], "--top-k", "1", "--json",
                           "--device", "cpu"], capsys)
    if kind == "good":
        assert code == 0, err
        (prediction,) = json.loads(out)
        assert prediction["top_k"][0]["label"] in ("a", "b")
        return "read"
    _refused_naming_the_file(code, err, path)
    assert not out
    return "error: Cannot read image file ...: <problem>"


def _check_dense_predict(command: str, model: str, outputs):
    """Predictions for every readable image; an unreadable one is skipped, logged and listed in errors.json."""
    def check(kind, path, root, models, tmp_path, capsys, caplog):
        pred = tmp_path / "pred"
        folder = root / "train" / "a"
        code, _, err = _run([command.split()[0], "predict", str(folder), "--model", models[model], "-o", str(pred),
                             "--quiet"], capsys)
        assert code == 0, err
        stems = sorted(p.stem for p in folder.iterdir() if p != path and not p.is_dir())
        errors = json.loads((pred / "errors.json").read_text()) if (pred / "errors.json").exists() else []
        for stem in stems:
            assert all((pred / name.format(stem)).is_file() for name in outputs), stem
        if kind == "good":
            assert not errors and all((pred / name.format(path.stem)).is_file() for name in outputs)
            return "read"
        assert [e["path"] for e in errors] == [display_path(path)] and errors[0]["reason"]
        assert not any((pred / name.format(path.stem)).exists() for name in outputs)
        return f"skipped, listed in errors.json ({errors[0]['reason'].split(' (')[0]})"
    return check


def check_track(kind, path, root, models, tmp_path, capsys, caplog):
    """The case as the first of two frames of one size (the other frames of its folder removed)."""
    folder, out = path.parent, tmp_path / "tracked"
    for other in ("a0.png", "a1.png"):
        (folder / other).unlink()
    width, height = read_image(path).size if kind == "good" else _header_size_or(path, (40, 32))
    smooth_rgb(width, height, seed=7).save(folder / "zz_next.png")
    mask = np.zeros((height, width), np.uint8)
    mask[0, 0] = 1
    Image.fromarray(mask, mode="P").save(tmp_path / "first.png")
    code, _, err = _run(["track", str(folder), "--mask", str(tmp_path / "first.png"), "--model", models["backbone"],
                         "-o", str(out), "--preset", "dinov3", "--short-side", "28", "--quiet", "--device", "cpu"],
                        capsys)
    if kind == "good":
        assert code == 0, err
        assert (out / f"{path.stem}.png").is_file() and (out / "zz_next.png").is_file()
        return "read"
    _refused_naming_the_file(code, err, path)
    assert not out.exists()
    return "error: Cannot read image file ...: <problem>"


def _header_size_or(path: Path, default: tuple[int, int]) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Exception:
        return default


def check_match(kind, path, root, models, tmp_path, capsys, caplog):
    out = tmp_path / "matched"
    code, _, err = _run(["match", str(root / "val" / "a" / "a0.png"), str(path), "--model", models["backbone"],
                         "-o", str(out), "--size", "28", "--device", "cpu"], capsys)
    if kind == "good":
        assert code == 0 and (out / "matches.json").is_file() and (out / "matches.png").is_file(), err
        return "read"
    _refused_naming_the_file(code, err, path)
    assert not out.exists()
    return "error: Cannot read image file ...: <problem>"


CHECKS = {
    "embed": check_embed,
    "eval knn": _check_eval("knn", ["--ks", "1"]),
    "eval linear": _check_eval("linear", ["--iterations", "4", "--learning-rates", "0.01", "--n-last-blocks", "1",
                                          "--avgpool", "no", "--train-batch-size", "4"]),
    "eval logreg": _check_eval("logreg", ["--max-iter", "5"]),
    "pca": check_pca,
    "search": check_search,
    "classify": check_classify,
    "finetune": check_finetune,
    "train": check_train,
    "segment predict": _check_dense_predict("segment predict", "segmenter", ["{}.png", "{}_overlay.png"]),
    "depth predict": _check_dense_predict("depth predict", "depther", ["{}_depth.png", "{}_depth16.png"]),
    "track": check_track,
    "match": check_match,
}
COMMANDS += list(ZEROSHOT_CHECKS)  # discover, anomaly score: tests/zeroshot_bad_inputs.py
CHECKS.update(ZEROSHOT_CHECKS)
BEHAVIOURS: dict[tuple[str, str], str] = {}  # (case, command) -> behaviour, for the README table


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_command_reads_or_cleanly_refuses_every_bad_input(case, command, models, tmp_path, monkeypatch,
                                                                 capsys, caplog):
    kind, path, root = make_case(case, tmp_path / "data", monkeypatch)
    BEHAVIOURS[case, command] = CHECKS[command](kind, path, root, models, tmp_path, capsys, caplog)


@pytest.fixture(scope="module", autouse=True)
def behaviour_table():
    """With DINOKIT_BAD_INPUT_TABLE=<file>, write the case x command table of this run (markdown) there."""
    yield
    target = os.environ.get("DINOKIT_BAD_INPUT_TABLE")
    if target and BEHAVIOURS:
        cases = list(dict.fromkeys(case for case, _ in BEHAVIOURS))
        lines = ["| case | " + " | ".join(f"`{c}`" for c in COMMANDS) + " |", "|---" * (len(COMMANDS) + 1) + "|"]
        for case in cases:
            cells = [BEHAVIOURS.get((case, command), "not run") for command in COMMANDS]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        Path(target).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- the reader itself
@pytest.mark.parametrize("case", list(CASES))
def test_the_reader_reads_good_cases_and_refuses_bad_ones_naming_the_file(case, tmp_path, monkeypatch):
    kind, path, _ = make_case(case, tmp_path / "data", monkeypatch)
    if kind == "good":
        image = read_image(path)
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        return
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert display_path(path) in str(caught.value) and caught.value.reason


def test_exif_orientation_and_the_first_gif_frame_are_what_the_reader_returns(tmp_path, monkeypatch):
    _, rotated, _ = make_case("exif_rotated_jpeg", tmp_path / "one", monkeypatch)
    assert read_image(rotated).size == (32, 48)  # stored 48 x 32, displayed turned a quarter
    _, gif, _ = make_case("animated_gif", tmp_path / "two", monkeypatch)
    with Image.open(gif) as image:
        first = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.asarray(read_image(gif)), first)


def test_16bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """transformers' convert("RGB") clips every value over 255: the 16-bit ramp would embed as a white image."""
    from dinokit.apps.embed import ImageFiles, eval_transform

    values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    Image.fromarray(values).save(tmp_path / "ramp16.png")
    rgb = np.asarray(read_image(tmp_path / "ramp16.png"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert np.array_equal(rgb[..., 0], np.round(values * (255 / 65535)).astype(np.uint8))
    _, pixels, _, _, error = ImageFiles([str(tmp_path / "ramp16.png")], eval_transform(224))[0]
    assert error is None and pixels.max() > 0 and pixels.min() < 0  # not a white image (all at the top)
    assert (pixels[2] < WHITE - 1e-3).float().mean() > 0.5


def test_embed_reads_an_rgba_file_with_exactly_the_processors_pixels(tmp_path):
    """The processor composites alpha onto white; embed used to drop it (max diff 2.1)."""
    from dinokit import Dinov2ImageProcessor
    from dinokit.apps.embed import ImageFiles, eval_transform

    _, path, _ = make_case("png_alpha", tmp_path / "data", None)
    _, pixels, _, _, error = ImageFiles([str(path)], eval_transform(224))[0]
    with Image.open(path) as image:
        expected = Dinov2ImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
    assert error is None and torch.equal(pixels, expected)
    assert torch.equal(Dinov2ImageProcessor()(path, return_tensors="pt")["pixel_values"][0], expected)


def test_pixel_limit_is_pil_max_image_pixels_including_the_zone_where_pil_only_warns(tmp_path, monkeypatch):
    path = constant_png(tmp_path / "warn_zone.png", 150, 100)  # 15,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 1.5x the limit: PIL itself would only warn
    with pytest.raises(ImageReadError, match="15,000 pixels is over the limit of 10,000"):
        read_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    assert read_image(path).size == (150, 100)


MEASURE = """
import sys
from PIL import Image
from dinokit.data.images import ImageReadError, read_image
if sys.argv[2] == "no-limit":
    Image.MAX_IMAGE_PIXELS = None

def high_water_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

# Reset the peak so that import-time transients (freed and reused later) do not hide the decode's growth.
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = high_water_mb()
try:
    read_image(sys.argv[1])
    outcome = "read"
except ImageReadError as exc:
    outcome = "refused: " + str(exc)
print(outcome)
print(high_water_mb() - before)
"""


def test_a_12000_square_png_is_refused_with_bounded_memory(tmp_path):
    path = constant_png(tmp_path / "huge.png", 12_000, 12_000)
    assert path.stat().st_size < 1_000_000

    def peak_growth_mb(mode: str) -> tuple[str, float]:
        result = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert result.returncode == 0, result.stderr
        outcome, growth = result.stdout.strip().splitlines()
        return outcome, float(growth)

    outcome, growth = peak_growth_mb("default")
    assert outcome.startswith("refused") and "144,000,000 pixels" in outcome and "huge.png" in outcome
    assert growth < 30, f"peak memory grew by {growth:.0f} MB while refusing"
    outcome, growth = peak_growth_mb("no-limit")  # the control: decoding it really costs 144 MB (L) + 432 (RGB)
    assert outcome == "read" and growth > 140
