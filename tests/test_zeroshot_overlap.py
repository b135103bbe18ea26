"""`dinokit match --facet keys|tokens --stride S`: last-block keys and overlapping patches (Amir et al.'s tricks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit import Dinov2Model
from dinokit.cli import main
from dinokit.layers.rope import patch_coordinates
from dinokit.models.dinov3_vit import DINOv3ViTModel
from dinokit.zeroshot.features import extract
from dinokit.zeroshot.matching import Side, image_pixels, match, patch_foreground, planned_size
from dinokit.zeroshot.tracking import ModelEncoder, PixelEncoder, track

from helpers import images, randomize_, save_tiny_model, small_config, tiny_dinov3_config


def dinov2_amir():  # Meta's / DINO's position rule (scale factor with the +0.1 offset), as Amir's extractor
    return randomize_(Dinov2Model(small_config(interpolate_offset=0.1)), seed=3).eval()


def dinov2_registers():  # transformers' size rule, registers
    return randomize_(Dinov2Model(small_config(registers=4)), seed=1).eval()


def dinov3():  # RoPE, 4 registers, patch 16
    return randomize_(DINOv3ViTModel(tiny_dinov3_config()), seed=2).eval()


MODELS = pytest.mark.parametrize("make", [dinov2_amir, dinov2_registers, dinov3],
                                 ids=["dinov2-offset", "dinov2-registers", "dinov3"])


@MODELS
@pytest.mark.parametrize("facet", ["tokens", "keys"])
def test_stride_equal_to_the_patch_size_is_the_plain_path_bit_for_bit(make, facet):
    model = make()
    p = model.config.patch_size
    pixels = images(2, 3 * p, 4 * p, seed=4)
    plain, strided = extract(model, pixels, facet), extract(model, pixels, facet, stride=p)
    assert torch.equal(plain.features, strided.features) and torch.equal(plain.cls, strided.cls)
    assert strided.grid == (3, 4) and torch.equal(plain.centers(), strided.centers())


@MODELS
def test_a_smaller_stride_gives_the_denser_grid_with_centres_stride_apart(make):
    model = make()
    p = model.config.patch_size
    s = p // 2
    pixels = images(1, 3 * p, 4 * p, seed=5)
    for facet in ("tokens", "keys"):
        out = extract(model, pixels, facet, stride=s)
        assert out.grid == (1 + (3 * p - p) // s, 1 + (4 * p - p) // s) == (5, 7)
        assert out.features.shape == (1, 5, 7, model.config.hidden_size) and torch.isfinite(out.features).all()
    centres = out.centers()
    assert centres[0, 0].tolist() == [p / 2, p / 2] and centres[1, 2].tolist() == [s + p / 2, 2 * s + p / 2]
    assert out.input_size == (3 * p, 4 * p)


@pytest.mark.parametrize("make", [dinov2_amir, dinov2_registers], ids=["dinov2-offset", "dinov2-registers"])
def test_dinov2_strided_tokens_equal_amirs_recipe_written_out(make):
    """Patch embedding as a strided unfold, the trained position grid resized bicubically to the token grid
    (DINO's scale factor (n + 0.1) / M when the model has the offset, else the size), then the blocks."""
    model = make()
    vit, config = model.vit_module, model.config
    p, s = config.patch_size, config.patch_size // 2
    pixels = images(1, 3 * p, 4 * p, seed=6)
    gh, gw = 5, 7
    with torch.no_grad():
        patches = F.unfold(pixels, p, stride=s)  # (1, 3 p p, gh gw)
        weight = vit.patch_embed.proj.weight.reshape(config.hidden_size, -1)
        tokens = (weight @ patches).transpose(1, 2) + vit.patch_embed.proj.bias
        M = int((vit.pos_embed.shape[1] - 1) ** 0.5)
        grid = vit.pos_embed[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        if vit.interpolate_offset:
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / M, (gw + 0.1) / M), mode="bicubic",
                                 align_corners=False, recompute_scale_factor=False)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False,
                                 antialias=vit.interpolate_antialias)
        positions = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        x = torch.cat((vit.cls_token + vit.pos_embed[:, :1], tokens + positions), dim=1)
        if vit.register_tokens is not None:
            x = torch.cat((x[:, :1], vit.register_tokens, x[:, 1:]), dim=1)
        for block in vit.blocks:
            x = block(x)
        expected = vit.norm(x)[:, 1 + config.num_register_tokens:].reshape(1, gh, gw, -1)
    assert torch.allclose(extract(model, pixels, stride=s).features, expected, atol=1e-5)


def test_dinov3_rotary_coordinates_sit_at_each_overlapping_tokens_own_centre():
    p, s, gh, gw = 16, 4, 5, 9
    H, W = (gh - 1) * s + p, (gw - 1) * s + p
    coords = patch_coordinates(gh, gw, "separate", step=s / p).reshape(gh, gw, 2)
    ys = (torch.arange(gh) * s + p / 2) / H * 2 - 1
    xs = (torch.arange(gw) * s + p / 2) / W * 2 - 1
    assert torch.allclose(coords[:, 0, 0], ys) and torch.allclose(coords[0, :, 1], xs)
    # step 1 is the trained grid, bit for bit: (i + 0.5) / n
    assert torch.equal(patch_coordinates(gh, gw, "separate", step=1.0), patch_coordinates(gh, gw, "separate"))
    wide = patch_coordinates(gh, gw, "max", step=s / p).reshape(gh, gw, 2)
    assert torch.allclose(wide[:, 0, 0], (torch.arange(gh) * s + p / 2) / W * 2 - 1)  # the longer side: W


def test_keys_facet_is_the_keys_the_discover_path_uses():
    model = dinov2_registers()
    p = model.config.patch_size
    pixels = images(1, 2 * p, 3 * p, seed=7)
    keys = extract(model, pixels, "keys").features[0]  # what `dinokit discover --facet keys` reads
    assert torch.equal(ModelEncoder(model, "keys")(pixels), keys)
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    result = match(a, a, model, size=2 * p, facet="keys")
    size = planned_size(40, 60, 2 * p, p)
    encoder = ModelEncoder(model)
    expected = extract(model, image_pixels(a, size, encoder.mean, encoder.std), "keys").features[0]
    assert torch.equal(result.a.features, F.normalize(expected, dim=-1))
    assert not torch.equal(result.a.features, match(a, a, model, size=2 * p).a.features)  # tokens differ


def test_strided_sides_map_tokens_to_pixels_and_foreground_by_their_overlapping_footprints():
    p, s = 14, 7
    side = Side(torch.zeros(3, 5, 4), image_size=(84, 56), patch_size=p, stride=s)  # resized 42 x 28, x2
    assert side.resized() == (42, 28)
    assert side.centres(np.array([0, 6])).tolist() == [[14.0, 14.0], [28.0, 28.0]]  # (c s + p/2) x 2
    points = np.array([[28.0, 28.0], [0.0, 0.0], [83.9, 55.9], [34.0, 14.0]])
    assert side.patch_of(points).tolist() == [6, 0, 14, 1]  # the token with the nearest centre
    mask = np.zeros((28, 42), np.float32)
    mask[:, :21] = 1  # left half: tokens at columns [0, 14) and [7, 21) are inside, [14, 28) half (not > 0.5)
    assert patch_foreground(mask, (3, 5), p, s).tolist() == [[True, True, False, False, False]] * 3
    plain = Side(torch.zeros(2, 3, 4), image_size=(84, 56), patch_size=p)
    assert plain.step == p and plain.centres(np.array([4])).tolist() == [[42.0, 42.0]]


def test_stride_bounds_the_planned_size_by_the_denser_grid(monkeypatch):
    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "100")
    assert planned_size(100, 100, 140, 14) == (140, 140)  # 10 x 10 patches: at the bound
    rows, cols = planned_size(100, 100, 140, 14, stride=7)  # about 4x the tokens: scaled to a quarter
    assert (rows // 14) * (cols // 14) <= 25


def test_bad_strides_and_models_without_patches_are_refused_in_one_line():
    model = dinov2_registers()
    for stride in (5, 0, -7, 28):
        with pytest.raises(ValueError, match=rf"--stride {stride} must divide the patch size 14: use one of "
                                             r"1, 2, 7, 14 \(14 = no overlap\)"):
            ModelEncoder(model, stride=stride)

    class NotAViT(torch.nn.Module):
        pass

    for facet, stride, what in (("tokens", 7, "--stride"), ("keys", None, "the keys facet")):
        with pytest.raises(ValueError, match=f"{what} needs a ViT .*NotAViT is not a dinokit ViT"):
            ModelEncoder(NotAViT(), facet, stride)
    with pytest.raises(ValueError, match="an encoder has its own"):
        match(Image.new("RGB", (28, 28)), Image.new("RGB", (28, 28)), PixelEncoder(14), size=28, stride=7)
    with pytest.raises(ValueError, match="track propagates labels on the model's own patch grid"):
        list(track([Image.new("RGB", (28, 28))], np.zeros((28, 28), np.uint8), ModelEncoder(model, stride=7)))


def test_match_command_with_keys_and_a_stride_writes_the_denser_grid(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = ["match", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--model", model, "-o", str(out),
            "--size", "28"]
    assert main([*argv, "--facet", "keys", "--stride", "7"]) == 0
    record = json.loads((out / "matches.json").read_text())
    # 28 x 42 resized pixels (2 x 3 patches of 14) -> 1 + (28 - 14) / 7 = 3 rows, 1 + (42 - 14) / 7 = 5 columns
    assert record["grid_a"] == [3, 5] and record["stride"] == 7 and record["facet"] == "keys"
    assert record["matches"][0]["a"] == [round(7 * 96 / 42, 2), round(7 * 64 / 28, 2)]  # (0 s + p/2) x scale
    assert main(argv) == 0 and json.loads((out / "matches.json").read_text())["stride"] == 14  # rerun replaces
    capsys.readouterr()
    code = main([*argv, "--stride", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--stride 5 must divide the patch size 14" in err and len(err.strip().splitlines()) == 1
