"""AnomalyDINO (memory bank, foreground mask, scores, heat maps), its metrics, and `dinokit anomaly fit|score`."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.zeroshot.anomaly import (
    MemoryBank,
    fit,
    foreground_mask,
    heat_map,
    image_score,
    resized_size,
    score,
)
from dinokit.zeroshot.anomaly_metrics import au_pro, image_auroc, pro_curve

from helpers import save_tiny_model


# ----------------------------------------------------------------------------------------------- metrics
def test_au_pro_on_a_hand_computed_case():
    truth = np.array([[1, 1, 0, 0, 0],
                      [0, 0, 0, 0, 1]], bool)  # two 8-connected regions: sizes 2 and 1; 7 anomaly-free pixels
    scores = np.array([[0.9, 0.4, 0.8, 0.3, 0.2],
                       [0.1, 0.05, 0.02, 0.01, 0.7]])
    # Thresholds, high to low: 0.9 -> PRO 1/4 at FPR 0; 0.8 -> FPR 1/7; 0.7 -> PRO 3/4; 0.4 -> PRO 1; 0.3 -> FPR
    # 2/7. Area to FPR 0.3: 1/4 * 1/7 + 1 * (0.3 - 1/7) = 0.3 - 0.75/7, normalised by 0.3.
    assert au_pro([scores], [truth]) == pytest.approx(1 - 0.75 / 7 / 0.3)
    fpr, pro = pro_curve([scores], [truth])
    assert fpr[0] == pro[0] == 0 and fpr[-1] == pro[-1] == 1


def reference_au_pro(maps, masks, limit=0.3):
    """AU-PRO by the definition, threshold by threshold: regions are 8-connected components of each mask."""
    from scipy import ndimage

    regions, ok = [], []
    for m, t in zip(maps, masks):
        labels, n = ndimage.label(t, structure=np.ones((3, 3)))
        regions += [m[labels == k] for k in range(1, n + 1)]
        ok.append(m[~t])
    ok = np.concatenate(ok)
    points = [(0.0, 0.0)]
    for threshold in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        points.append(((ok >= threshold).mean(), np.mean([(r >= threshold).mean() for r in regions])))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    grid = np.linspace(0, limit, 200001)
    return np.trapezoid(np.interp(grid, x, y), grid) / limit


def test_au_pro_equals_the_definition_on_random_maps():
    rng = np.random.default_rng(0)
    masks = [rng.random((12, 12)) > 0.85 for _ in range(3)] + [np.zeros((12, 12), bool)]
    maps = [np.round(rng.random((12, 12)) + 0.5 * m, 2) for m in masks]  # rounded: ties between pixels
    assert au_pro(maps, masks) == pytest.approx(reference_au_pro(maps, masks), abs=1e-6)


def test_image_auroc_on_a_hand_computed_case():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0, 0], [0.1, 0.2])


# ------------------------------------------------------------------------------------------- the pieces
def test_image_score_is_the_mean_of_the_top_one_percent_or_the_max():
    distances = np.arange(250, dtype=float)  # 1 % of 250 = 2.5 -> the top 2
    assert image_score(distances) == pytest.approx((249 + 248) / 2)
    assert image_score(np.arange(50, dtype=float)) == 49  # under 100 patches: the max


def test_resize_keeps_the_shorter_side_at_the_resolution_and_truncates_the_longer():
    assert resized_size(300, 400, 448) == (448, 597)
    assert resized_size(500, 3, 448) == (74666, 448)


def test_foreground_mask_keeps_the_centre_whichever_sign_the_component_has():
    grid = (12, 12)
    for sign in (1, -1):
        features = np.zeros((12, 12, 4))
        features[..., 0] = 40.0 * sign
        features[3:9, 3:9, 0] = -40.0 * sign  # the object: 36 of the 49 central patches
        mask = foreground_mask(features.reshape(144, 4), grid)
        expected = np.zeros(grid, bool)
        expected[2:10, 2:10] = True  # the object dilated by one patch (the closing changes nothing here)
        assert np.array_equal(mask, expected)


def test_foreground_mask_closing_does_not_erode_from_the_image_edge_as_opencv():
    features = np.zeros((10, 10, 4))
    features[..., 0] = 40.0
    features[3:9, 3:9, 0] = -40.0  # touches the last row and column once dilated
    mask = foreground_mask(features.reshape(100, 4), (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[2:, 2:] = True
    assert np.array_equal(mask, expected)


def test_heat_map_is_the_bilinear_upsampling_smoothed_by_a_gaussian_of_sigma_4():
    from scipy.ndimage import gaussian_filter

    distances = np.zeros((2, 2))
    distances[0, 0] = 1.0
    heat = heat_map(distances, (8, 8))
    up = np.interp((np.arange(8) + 0.5) / 4 - 0.5, [0, 1], [1, 0])  # half-pixel centres, clamped at the edges
    assert np.allclose(heat, gaussian_filter(np.outer(up, up).astype(np.float32), sigma=4), atol=1e-6)


def test_bank_distances_are_one_minus_the_best_cosine():
    rng = np.random.default_rng(1)
    normal, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    bank = MemoryBank.build(normal, {"format": "x"})
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = 1 - (unit(queries) @ unit(normal).T).max(axis=1)
    assert np.allclose(bank.distances(queries), expected, atol=1e-6)


class RawPixels(torch.nn.Module):
    """A toy 'ViT' whose patch tokens are the patch's raw normalised pixels: defects that change pixels show."""

    def __init__(self, patch: int = 8):
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch, hidden_size=3 * patch * patch, num_register_tokens=0)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device and dtype
        self.__dict__["vit_module"] = self  # what `_model` checks for; not registered as a submodule (a cycle)

    def forward(self, pixel_values):
        p = self.config.patch_size
        patches = torch.nn.functional.unfold(pixel_values, p, stride=p).transpose(1, 2)
        tokens = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
        return SimpleNamespace(last_hidden_state=tokens + self.anchor)


def stripes(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    phase = rng.uniform(0, 2 * np.pi)
    base = 127 + 100 * np.sin(x / 3 + phase)[..., None] * np.array([1.0, 0.6, 0.3])
    return Image.fromarray(np.clip(base + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8))


def test_a_planted_defect_scores_higher_than_normal_images_and_lights_up_the_heat_map():
    model = RawPixels()
    bank = fit([stripes(s) for s in range(3)], model, resolution=64, device="cpu")
    defect = np.asarray(stripes(10)).copy()
    defect[16:32, 40:56] = (20, 220, 20)
    results = score([stripes(11), stripes(12), Image.fromarray(defect)], bank, model, device="cpu")
    normal_scores, defect_score = [r.score for r in results[:2]], results[2].score
    assert defect_score > max(normal_scores)
    heat = results[2].heat
    assert heat.shape == (64, 64)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 12 <= row < 36 and 36 <= col < 60


def test_rotation_adds_eight_views_of_each_normal_image():
    model = RawPixels()
    plain = fit([stripes(0)], model, resolution=32, device="cpu")
    rotated = fit([stripes(0)], model, resolution=32, rotate=True, device="cpu")
    assert rotated.size == 8 * plain.size == 8 * 16


# ---------------------------------------------------------------------------------------------- the bank
def test_a_bank_refuses_another_model_and_damaged_files(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    other = save_tiny_model(tmp_path / "other", seed=1)
    bank = fit([stripes(0, 28)], model, resolution=28, device="cpu")
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.size == bank.size == 4 and loaded.manifest["model"]["spec"] == model
    with pytest.raises(ValueError, match="whose weights differ"):
        score([stripes(1, 28)], loaded, other, device="cpu")
    with pytest.raises(ValueError, match="features of dimension 32, patch 14.*dimension 48"):
        score([stripes(1, 28)], loaded, RawPixels(4), device="cpu")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    (tmp_path / "bank" / "manifest.json").write_text(json.dumps({**manifest, "dim": 64}))
    with pytest.raises(ValueError, match="do not belong together"):
        MemoryBank.load(tmp_path / "bank")
    with pytest.raises(FileNotFoundError, match="is not a memory bank"):
        MemoryBank.load(tmp_path)
    with pytest.raises(ValueError, match="memory bank would be empty"):
        MemoryBank.build(np.zeros((0, 8)), {})


# ---------------------------------------------------------------------------------------------- commands
def mvtec_folder(root, size=28):
    """<root>/train/good (3), test/good (2), test/spot (2) with ground_truth/spot/<stem>_mask.png."""
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        stripes(i, size).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        stripes(10 + i, size).save(root / "test" / "good" / f"{i:03d}.png")
        image = np.asarray(stripes(20 + i, size)).copy()
        image[4:12, 14:22] = (10, 240, 10)
        mask = np.zeros((size, size), np.uint8)
        mask[4:12, 14:22] = 255
        Image.fromarray(image).save(root / "test" / "spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "spot" / f"{i:03d}_mask.png")
    return root


def test_anomaly_commands_fit_a_bank_then_score_an_mvtec_folder(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = mvtec_folder(tmp_path / "obj")
    bank, out = tmp_path / "bank", tmp_path / "out"
    assert main(["anomaly", "fit", str(data / "train" / "good"), "--model", model, "-o", str(bank), "--shots", "2",
                 "--resolution", "28", "--quiet", "--device", "cpu"]) == 0
    assert json.loads((bank / "manifest.json").read_text())["images"] == [str(data / "train/good/000.png"),
                                                                           str(data / "train/good/001.png")]
    assert main(["anomaly", "score", str(data / "test"), "--bank", str(bank), "-o", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["name"] for r in rows] == ["good/000", "good/001", "spot/000", "spot/001"]
    assert all((out / "heatmaps" / f"{r['name']}.png").is_file() for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = image_auroc([0, 0, 1, 1], [float(r["score"]) for r in rows])
    assert metrics["image_auroc"] == pytest.approx(expected, abs=1e-5)
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["au_pro"] <= 1
    assert "image AUROC" in capsys.readouterr().out


def test_anomaly_score_refuses_another_models_bank_and_wrong_masks_without_output(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    other = save_tiny_model(tmp_path / "other", seed=3)
    data = mvtec_folder(tmp_path / "obj")
    bank, out = tmp_path / "bank", tmp_path / "out"
    assert main(["anomaly", "fit", str(data / "train" / "good"), "--model", model, "-o", str(bank),
                 "--resolution", "28", "--quiet", "--device", "cpu"]) == 0
    argv = ["anomaly", "score", str(data / "test"), "--bank", str(bank), "-o", str(out), "--quiet", "--device", "cpu"]
    assert main([*argv, "--model", other]) == 2
    assert "whose weights differ" in capsys.readouterr().err and not out.exists()
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(data / "ground_truth" / "spot" / "001_mask.png")
    assert main(argv) == 2
    assert "is 28 x 20 pixels but its image" in capsys.readouterr().err and not out.exists()
    assert main(["anomaly", "score", str(data / "test"), "--bank", str(tmp_path), "-o", str(out)]) == 2
    assert "is not a memory bank" in capsys.readouterr().err and not out.exists()


def test_anomaly_score_skips_an_unreadable_image_and_lists_it(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = mvtec_folder(tmp_path / "obj")
    (data / "test" / "good" / "broken.png").write_bytes(b"not an image")
    bank, out = tmp_path / "bank", tmp_path / "out"
    assert main(["anomaly", "fit", str(data / "train" / "good"), "--model", model, "-o", str(bank),
                 "--resolution", "28", "--quiet", "--device", "cpu"]) == 0
    assert main(["anomaly", "score", str(data / "test"), "--bank", str(bank), "-o", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    errors = json.loads((out / "errors.json").read_text())
    assert [e["path"].endswith("broken.png") for e in errors] == [True]
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 4 and json.loads((out / "metrics.json").read_text())["skipped"] == 1
