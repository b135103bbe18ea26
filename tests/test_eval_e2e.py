"""End to end on real photographs (a few Imagenette classes) with a tiny random model: CLI, finetune, classify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dinokit import Dinov2Config, Dinov2Model
from dinokit.cli import main

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
CLASSES = 3
CROP = ["--resize", "64", "--crop", "56"]


def require_dataset(*parts: str) -> Path:
    path = DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"dataset {path} is not available (expected ../shared/datasets beside the repository)")
    return path


def write_file_list(root: Path, split: str, per_class: int, target: Path) -> Path:
    """A '<path> <class>' list of the first images of the first classes (the data stay where they are)."""
    lines = []
    for name in sorted(os.listdir(root / split))[:CLASSES]:
        files = sorted(os.listdir(root / split / name))[:per_class]
        lines += [f"{root / split / name / f} {name}" for f in files]
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = require_dataset("imagenette")
    tmp = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, image_size=56))
    model.save_pretrained(tmp / "model")
    return {"model": str(tmp / "model"), "tmp": tmp,
            "train": str(write_file_list(root, "train", 30, tmp / "train.txt")),
            "val": str(write_file_list(root, "val", 15, tmp / "val.txt"))}


def run_eval(setup, protocol: str, *extra: str) -> dict:
    output = setup["tmp"] / f"{protocol}.json"
    code = main(["eval", protocol, "--model", setup["model"], "--train", setup["train"], "--val", setup["val"],
                 "--cache-dir", str(setup["tmp"] / "cache"), "--num-workers", "0", "--quiet", "--output",
                 str(output), *CROP, *extra])
    assert code == 0
    return json.loads(output.read_text())


def test_eval_commands_write_complete_reports_and_share_the_feature_cache(setup, capsys):
    knn = run_eval(setup, "knn", "--ks", "5", "10", "20")
    assert "| all | 10 |" in capsys.readouterr().out
    assert [row["k"] for row in knn["results"]["rows"]] == [5, 10, 20]
    assert all(0 <= row["top1"] <= row["top5"] <= 100 for row in knn["results"]["rows"])
    assert knn["data"]["train"]["images"] == 90 and knn["data"]["val"]["images"] == 45
    assert knn["data"]["train"]["skipped_unreadable"] == 0 and not knn["data"]["train"]["from_cache"]
    assert knn["model"]["spec"] == setup["model"] and knn["settings"]["temperature"] == 0.07
    assert "resize shortest_edge=64, crop=56x56" in knn["settings"]["transform"]
    assert knn["wall_time_seconds"]["total"] > 0

    linear = run_eval(setup, "linear", "--iterations", "100", "--train-batch-size", "32")
    assert linear["data"]["train"]["from_cache"] and linear["data"]["val"]["from_cache"]
    assert linear["results"]["best_head"].startswith("classifier_") and len(linear["results"]["heads"]) == 52
    assert linear["settings"]["iterations"] == 100 and "no augmentation" in linear["results"]["mode"]

    logreg = run_eval(setup, "logreg", "--max-iter", "50")
    assert logreg["data"]["train"]["from_cache"]
    assert len(logreg["results"]["sweep"]) == 45 and 0 <= logreg["results"]["top1"] <= 100


def test_reference_linear_protocol_trains_on_augmented_images(setup):
    report = run_eval(setup, "linear", "--mode", "reference", "--iterations", "4", "--train-batch-size", "16",
                      "--learning-rates", "0.01", "0.1")
    assert "augmented" in report["results"]["mode"] and len(report["results"]["heads"]) == 8
    assert report["settings"]["crop_size"] == 56 and report["results"]["train_skipped_unreadable"] == 0


def test_finetune_improves_on_its_first_epoch_and_transformers_loads_the_checkpoint(setup, capsys):
    from transformers import AutoModelForImageClassification

    import dinokit

    output = setup["tmp"] / "classifier"
    code = main(["finetune", "--model", setup["model"], "--train", setup["train"], "--val", setup["val"],
                 "--output", str(output), "--epochs", "6", "--train-batch-size", "16", "--num-workers", "0",
                 "--cache-dir", str(setup["tmp"] / "cache"), "--quiet", *CROP])
    assert code == 0
    log = json.loads((output / "training_log.json").read_text())
    accuracies = [epoch["val_top1"] for epoch in log["epochs"]]
    assert len(accuracies) == 6 and max(accuracies) > accuracies[0]
    assert log["best_epoch"] == accuracies.index(max(accuracies)) + 1

    theirs = AutoModelForImageClassification.from_pretrained(output).eval()
    ours = dinokit.load_model(output, task="classification")
    assert theirs.config.id2label == ours.config.id2label
    assert sorted(theirs.config.id2label.values()) == sorted(os.listdir(require_dataset("imagenette", "train")))[:3]
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixels).logits, ours(pixel_values=pixels).logits,
                                   atol=1e-5, rtol=1e-5)

    image = Path(setup["val"]).read_text().split()[0]
    capsys.readouterr()
    assert main(["classify", image, "--model", str(output), "--top-k", "2", "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)
    assert prediction["image"] == image and len(prediction["top_k"]) == 2
    assert prediction["top_k"][0]["score"] >= prediction["top_k"][1]["score"]
    assert prediction["top_k"][0]["label"] in theirs.config.id2label.values()


def test_unfrozen_finetune_updates_the_backbone(setup):
    import dinokit
    from dinokit.eval.finetune import FinetuneConfig, finetune

    output = setup["tmp"] / "unfrozen"
    result = finetune(setup["model"], setup["train"], setup["val"], output,
                      FinetuneConfig(epochs=1, batch_size=16, unfreeze=True), resize_size=64, crop_size=56,
                      progress=False)
    assert result["best_epoch"] == 1 and len(result["history"]) == 1
    before = dinokit.load_model(setup["model"]).state_dict()
    after = dinokit.load_model(output, task="classification").dinov2.state_dict()
    assert not torch.equal(before["vit.blocks.0.attn.qkv.weight"], after["vit.blocks.0.attn.qkv.weight"])


def test_classify_rejects_an_unreadable_image(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code = main(["classify", str(bad), "--model", setup["model"]])
    assert code == 2
    assert "bad.jpg" in capsys.readouterr().err
