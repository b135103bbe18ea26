"""The shared patch-feature extractor of the training-free jobs: output tokens and last-block keys, both families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinokit import Dinov2Model
from dinokit.models.dinov3_vit import DINOv3ViTModel
from dinokit.zeroshot.features import extract, normalize_image, pad_to_multiple

from helpers import images, randomize_, small_config, tiny_dinov3_config


def dinov2_with_registers():
    return randomize_(Dinov2Model(small_config(registers=4)), seed=1).eval()


def dinov3():
    return randomize_(DINOv3ViTModel(tiny_dinov3_config()), seed=2).eval()


def independent_keys(model, pixels):
    """Keys recomputed from the hidden state entering the last block: its norm1, then the key rows of qkv."""
    with torch.no_grad():
        entering = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        block = model.vit_module.blocks[-1]
        C = entering.shape[-1]
        return F.linear(block.norm1(entering), block.attn.qkv.weight[C:2 * C], block.attn.qkv.bias[C:2 * C])


@pytest.mark.parametrize("make", [dinov2_with_registers, dinov3], ids=["dinov2-registers", "dinov3"])
def test_tokens_are_the_final_normed_patch_tokens_with_cls_and_registers_dropped(make):
    model = make()
    p = model.config.patch_size
    pixels = images(2, 3 * p, 4 * p)
    out = extract(model, pixels, "tokens")
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert out.grid == (3, 4) and out.input_size == (3 * p, 4 * p)
    assert torch.equal(out.features.reshape(2, 12, -1), hidden[:, 1 + model.config.num_register_tokens:])
    assert torch.equal(out.cls, hidden[:, 0])


@pytest.mark.parametrize("make", [dinov2_with_registers, dinov3], ids=["dinov2-registers", "dinov3"])
def test_keys_are_the_last_blocks_qkv_key_rows_on_its_first_norm(make):
    model = make()
    p = model.config.patch_size
    pixels = images(2, 2 * p, 3 * p, seed=3)
    out = extract(model, pixels, "keys")
    expected = independent_keys(model, pixels)
    prefix = 1 + model.config.num_register_tokens
    assert out.features.shape == (2, 2, 3, model.config.hidden_size)
    assert torch.allclose(out.features.reshape(2, 6, -1), expected[:, prefix:], atol=1e-5)
    assert not torch.allclose(out.features, extract(model, pixels, "tokens").features, atol=1e-2)


def test_sizes_off_the_patch_grid_are_zero_padded_right_and_bottom_or_refused():
    model = dinov2_with_registers()
    pixels = images(1, 30, 44)
    padded = pad_to_multiple(pixels, 14)
    assert padded.shape[-2:] == (42, 56)
    assert torch.equal(padded[..., :30, :44], pixels) and padded[..., 30:, :].abs().sum() == 0
    assert torch.equal(extract(model, pixels).features, extract(model, padded).features)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        extract(model, pixels, pad=False)
    with pytest.raises(ValueError, match="unknown facet 'values'"):
        extract(model, padded, "values")


def test_patch_centres_sit_at_half_a_patch_and_normalised_tokens_have_unit_norm():
    out = extract(dinov3(), images(1, 32, 48))
    centres = out.centers()
    assert centres.shape == (2, 3, 2)
    assert centres[0, 0].tolist() == [8.0, 8.0] and centres[1, 2].tolist() == [24.0, 40.0]
    assert torch.allclose(out.normalized().norm(dim=-1), torch.ones(1, 2, 3))


def test_images_are_normalised_with_the_models_mean_and_std():
    from PIL import Image

    image = Image.new("RGB", (3, 2), (255, 0, 128))
    x = normalize_image(image, dinov2_with_registers())
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std
    assert x.shape == (1, 3, 2, 3) and torch.allclose(x[0, :, 1, 2], expected)
