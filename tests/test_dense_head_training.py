"""Fast dense-head training (issue 26): resizes as precomputed matrices equal F.interpolate / to_image, the
cell-count loss at the patch size equals the full-resolution loss, the step count follows the data (epochs, cap,
plateau stop and cooldown), and the commands accept the new options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense_helpers import depth_dataset, seg_dataset, tiny_backbone
from dinokit.cli import main
from dinokit.dense.depth_train import _predict, fit_depth_head
from dinokit.dense.features import DenseFeatures, to_image
from dinokit.dense.head_training import HeadTrainConfig, fit, plan
from dinokit.dense.interpolation import bilinear_weights, resize_separable, to_image_weights
from dinokit.dense.linear_depth import LinearDepthHead
from dinokit.dense.pixel_loss import PixelCrossEntropy, cell_counts, label_cells
from dinokit.dense.upsampled_bins import upsampled_bin_sums


@pytest.mark.parametrize("n_in,n_out", [(5, 70), (37, 518), (49, 686), (7, 3), (518, 180), (1, 5), (6, 6)])
def test_bilinear_weight_matrices_equal_f_interpolate(n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in + 2, dtype=torch.float64)
    # float64 reference: F.interpolate in float32 itself rounds its source indices (errors up to ~2e-5 at 37 -> 518)
    expected = F.interpolate(x, size=(n_out, n_out + 1), mode="bilinear", align_corners=False)
    got = resize_separable(x, bilinear_weights(n_in, n_out).double(), bilinear_weights(n_in + 2, n_out + 1).double())
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(bilinear_weights(n_in, n_out).sum(1), torch.ones(n_out))  # a blend: rows sum to 1


@pytest.mark.parametrize("out_size", [(60, 90), (180, 270), (30, 45), (13, 19), (60, 45)])
def test_to_image_weights_equal_to_image_upsample_crop_and_resize(out_size):
    maps = torch.randn(4, 5, 7, dtype=torch.float64)  # a 5 x 7 patch grid of a 60 x 90 image padded to 70 x 98
    rows, cols = to_image_weights((5, 7), (60, 90), 14, out_size)
    assert torch.allclose(resize_separable(maps, rows.double(), cols.double()), to_image(maps, (60, 90), 14, out_size),
                          atol=1e-5, rtol=0)
    fine = torch.randn(4, 20, 28, dtype=torch.float64)  # the depth head's x4 map of the same grid
    rows, cols = to_image_weights((5, 7), (60, 90), 14, out_size, maps=(20, 28))
    assert torch.allclose(resize_separable(fine, rows.double(), cols.double()),
                          to_image(fine, (60, 90), 14, out_size, grid=(5, 7)), atol=1e-5, rtol=0)


def _seg_features(n=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    resized, grid = (60, 90), (5, 7)
    tokens = rng.normal(size=(n * 35, 8)).astype(np.float16)
    masks = [rng.integers(0, classes, size=(45, 67)) for _ in range(n)]  # original size: resized (nearest) for the loss
    for mask in masks:
        mask[:3] = 255
    return DenseFeatures(tokens, np.array([[*grid, *resized]] * n), [f"s{i}" for i in range(n)]), masks


def test_cell_count_loss_at_the_patch_size_equals_the_full_resolution_loss_and_gradient():
    features, masks = _seg_features()
    weight = torch.randn(3, 8, requires_grad=True)
    results = {}
    for resolution in (None, 14):
        criterion = PixelCrossEntropy(features, masks, 14, 255, resolution)
        total, count = 0.0, 0
        for i in range(len(features)):
            loss, labelled = criterion(i, features.tokens(i) @ weight.T)
            total, count = total + loss, count + labelled
        (grad,) = torch.autograd.grad(total / count, weight)
        results[resolution] = (total / count, grad, count)
    (full, full_grad, full_count), (cells, cells_grad, cells_count) = results[None], results[14]
    assert full_count == cells_count
    assert torch.allclose(cells, full, rtol=1e-5, atol=0)
    assert torch.allclose(cells_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_coarser_loss_counts_every_labelled_pixel_of_a_cell_by_class():
    mask = np.array([[0, 1, 1, 1], [0, 1, 255, 255]])
    cell, label, count = cell_counts(mask, (1, 2), 255)
    assert sorted(zip(cell.tolist(), label.tolist(), count.tolist())) == [(0, 0, 2), (0, 1, 2), (1, 1, 2)]
    assert label_cells((60, 90), 14, 7) == (30, 45) and label_cells((60, 90), 14, 14) == (60, 90)


def test_loss_resolution_above_the_patch_size_is_refused():
    features, masks = _seg_features(n=1)
    with pytest.raises(ValueError, match="--loss-resolution 15 is out of range"):
        PixelCrossEntropy(features, masks, 14, 255, 15)


def test_step_count_follows_the_data_size_with_a_cap_and_iterations_win():
    assert plan(HeadTrainConfig(), 48) == (600, 6, "epochs")  # 100 epochs of ceil(48 / 8) batches
    assert plan(HeadTrainConfig(epochs=2.5), 50) == (18, 7, "epochs")
    assert plan(HeadTrainConfig(), 20_000) == (40_000, 2500, "max_steps")
    assert plan(HeadTrainConfig(iterations=7, epochs=3), 48) == (7, 6, "iterations")
    assert plan(HeadTrainConfig(batch_size=8), 3) == (100, 1, "epochs")  # a batch is at most the whole set


def _fit_constant_then(loss_of_step, config, n_items=12):
    parameter = torch.zeros(1, requires_grad=True)
    calls = []

    def batch_loss(batch):
        calls.append(batch)
        return parameter.sum() * 0 + loss_of_step(len(calls))

    return fit([parameter], n_items, batch_loss, config), calls


def test_plateau_stop_ends_training_after_patience_epochs_without_improvement():
    config = HeadTrainConfig(epochs=50, batch_size=4, patience=3, cooldown=0)
    log, calls = _fit_constant_then(lambda step: 1.0, config)
    assert log.stop_reason == "plateau" and log.steps == 4 * 3 and len(log.epoch_losses) == 4
    assert sorted(i for batch in calls[:3] for i in batch) == list(range(12))  # an epoch sees every image once
    log, _ = _fit_constant_then(lambda step: 1.0, HeadTrainConfig(epochs=10, batch_size=4, patience=None))
    assert log.stop_reason == "epochs" and log.steps == 30
    log, _ = _fit_constant_then(lambda step: 1.0 / step, HeadTrainConfig(epochs=10, batch_size=4, patience=3))
    assert log.stop_reason == "epochs" and log.steps == 30  # still improving: runs every epoch
    log, _ = _fit_constant_then(lambda step: 1.0, HeadTrainConfig(iterations=25, batch_size=4, patience=3))
    assert log.stop_reason == "iterations" and log.steps == 25  # a fixed step count never stops early


def test_after_a_plateau_the_learning_rate_falls_linearly_to_zero_over_the_cooldown_epochs():
    config = HeadTrainConfig(epochs=50, batch_size=4, patience=3, cooldown=2, lr=1.0, warmup_fraction=0.0)
    log, _ = _fit_constant_then(lambda step: 1.0, config)
    assert log.stop_reason == "plateau" and log.steps == 4 * 3 + 2 * 3 and log.planned_steps == 150
    at_plateau = 1 - 12 / 150  # the poly rate where the plateau was seen
    assert log.learning_rates[11] == pytest.approx(1 - 11 / 150)
    assert log.learning_rates[12:] == pytest.approx([at_plateau * (1 - k / 6) for k in range(6)])
    config = HeadTrainConfig(epochs=5, batch_size=4, patience=3, cooldown=10)  # 15 steps planned
    log, _ = _fit_constant_then(lambda step: 1.0, config)
    assert log.steps == 15  # the cooldown never runs past the planned steps
    with pytest.raises(ValueError, match="--cooldown -1"):
        HeadTrainConfig(cooldown=-1)


def _depth_levels(grids, width=4, layers=2, seed=0):
    """Per image, Meta's depth-head input (patch map, CLS) per block, and the same as DepthFeatures' cached tokens."""
    generator = torch.Generator().manual_seed(seed)
    images = [[(torch.randn(1, width, *grid, generator=generator), torch.randn(1, width, generator=generator))
               for _ in range(layers)] for grid in grids]
    tokens = [torch.cat([torch.cat([x, c[:, :, None, None].expand_as(x)], 1) for x, c in levels], 1)[0]
              for levels in images]
    tokens = np.concatenate([t.flatten(1).T.numpy() for t in tokens])
    resized = [(grid[0] * 14 - 5, grid[1] * 14 - 9) for grid in grids]
    features = DenseFeatures(tokens, np.array([[*g, *r] for g, r in zip(grids, resized)]), ["a", "b"][:len(grids)])
    return images, features


def test_training_depth_prediction_equals_metas_head_then_to_image():
    grids, sizes = [(5, 7), (13, 17)], [(45, 67), (150, 200)]  # 13 x 17 x 16 = 3,536 pixels: two bands
    images, features = _depth_levels(grids)
    torch.manual_seed(0)
    head = LinearDepthHead(4, 2, 0.001, 10.0)
    got = _predict(head, features, [0, 1], 14, sizes)
    for i, (levels, size) in enumerate(zip(images, sizes)):
        reference = to_image(head(levels)[0], features.resized(i), 14, size, grid=grids[i])[0]
        assert torch.allclose(got[i], reference, atol=1e-5, rtol=1e-5)


def test_upsampled_bin_depth_and_its_gradient_equal_metas_upsample_then_normalise_then_sum():
    torch.manual_seed(0)
    head = LinearDepthHead(4, 1, 0.001, 80.0)
    grids = [(6, 9), (13, 17), (1, 2)]
    maps = [(torch.randn(1, 256, *g, dtype=torch.float64) * 2).requires_grad_() for g in grids]  # half below 0
    weights = [torch.rand(g[0] * 4, g[1] * 4, dtype=torch.float64) for g in grids]
    reference = [head.depth_from_logits(F.interpolate(m, scale_factor=4, mode="bilinear", align_corners=False))[0, 0]
                 for m in maps]
    sum(((d * w).sum() for d, w in zip(reference, weights))).backward()
    expected = [m.grad for m in maps]
    logits = torch.cat([m[0].detach().flatten(1).T for m in maps]).requires_grad_()
    got = head.depth_from_grid_logits(logits, grids)
    sum(((d * w).sum() for d, w in zip(got, weights))).backward()
    for d, r in zip(got, reference):
        assert torch.allclose(d, r, atol=1e-12, rtol=1e-12)  # float64: the same function
    grads = logits.grad.split([h * w for h, w in grids])
    for grad, e, g in zip(grads, expected, grids):
        assert torch.allclose(grad.T.reshape(256, *g), e[0], atol=1e-12, rtol=1e-9)
    assert (logits.grad == 0).any()  # the relu's dead bins pass no gradient in both forms


@pytest.mark.parametrize("band_pixels", [1, 13, 64, 10_000])
def test_upsampled_bin_sums_are_the_same_for_any_band_size(band_pixels):
    torch.manual_seed(1)
    logits = torch.randn(5 * 7 + 2 * 3, 16, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(3, 16, dtype=torch.float64)
    got = upsampled_bin_sums(logits, [(5, 7), (2, 3)], 4, rows, band_pixels)
    (sum(s.sum() for s in got)).backward()
    maps = [logits[:35].T.reshape(1, 16, 5, 7), logits[35:].T.reshape(1, 16, 2, 3)]
    reference = [torch.einsum("khw,rk->hwr", F.interpolate(m, scale_factor=4, mode="bilinear")[0].relu(), rows)
                 for m in maps]
    expected = torch.autograd.grad(sum(r.sum() for r in reference), logits)[0]
    for s, r in zip(got, reference):
        assert s.shape == r.shape and torch.allclose(s, r, atol=1e-12)
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_depth_training_refuses_features_whose_cls_channels_vary_over_the_grid():
    _, features = _depth_levels([(5, 7)])
    features.features[3, 6] += 1.0  # a CLS channel of one patch (channels 4-7 of level 0)
    head = LinearDepthHead(4, 2, 0.001, 10.0)
    with pytest.raises(ValueError, match="not Meta's depth input"):
        fit_depth_head(head, features, [np.ones((45, 67), np.float32)], 14, HeadTrainConfig(iterations=1))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("backbone") / "model", layers=1)


def test_segment_and_depth_train_by_epochs_log_steps_and_stop_reason(backbone, tmp_path, capsys):
    common = ["--model", str(backbone), "--size", "28", "--batch-size", "2", "--quiet", "--no-cache"]
    train, val = seg_dataset(tmp_path / "train"), seg_dataset(tmp_path / "val", seed=1)
    out = tmp_path / "seg"
    assert main(["segment", "train", *common, "--train", str(train), "--val", str(val), "--output", str(out),
                 "--epochs", "3", "--loss-resolution", "4"]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 6 and log["stop_reason"] == "epochs" and log["config"]["loss_resolution"] == 4
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 6
    train, val = depth_dataset(tmp_path / "dtrain"), depth_dataset(tmp_path / "dval", seed=1)
    out = tmp_path / "depth"
    assert main(["depth", "train", *common, "--train", str(train), "--val", str(val), "--output", str(out),
                 "--layers", "1", "--epochs", "2", "--no-early-stop", "--cooldown", "3"]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 4 and log["config"]["patience"] is None and log["config"]["cooldown"] == 3


@pytest.mark.parametrize("value,message", [("0", "at least 1 label cell"), ("half", "'half' is not a number"),
                                           ("20", "--loss-resolution 20 is out of range")])
def test_bad_loss_resolution_is_one_clear_error(backbone, tmp_path, capsys, value, message):
    train = seg_dataset(tmp_path / "train", n=2)
    try:  # a malformed value is refused by argparse (SystemExit 2), one out of range by the command (exit 2)
        code = main(["segment", "train", "--model", str(backbone), "--train", str(train), "--val", str(train),
                     "--output", str(tmp_path / "out"), "--size", "28", "--quiet", "--no-cache",
                     "--loss-resolution", value])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_float32_copy_of_training_features_has_the_same_tokens_and_respects_its_memory_bound():
    _, features = _depth_levels([(5, 7), (3, 4)])
    features = DenseFeatures(features.features.astype(np.float16), features.grids, features.stems)
    copy = features.in_float32()
    assert copy.features.dtype == np.float32 and copy.stems == features.stems
    for i in range(2):
        assert torch.equal(copy.tokens(i), features.tokens(i))
    assert features.in_float32(max_bytes=copy.features.nbytes - 1) is features  # too big: converted per read
    assert copy.in_float32() is copy


def test_the_command_line_defaults_are_the_training_configs_defaults():
    from dinokit.dense import cli
    from dinokit.dense.depth_train import DepthTrainConfig
    from dinokit.dense.pixel_loss import DEFAULT_RESOLUTION
    from dinokit.dense.segment import SegTrainConfig

    assert cli.DEFAULT_LOSS_RESOLUTION == DEFAULT_RESOLUTION == SegTrainConfig().loss_resolution
    assert cli.SEGMENT_LR == SegTrainConfig().lr == 1e-3
    assert cli.DEPTH_LR == DepthTrainConfig().lr == 3e-3
