"""The PCA picture of patch features and the attention maps, from synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinokit.apps.pca import GAP, attention_maps, pca_colours, render, resize_to_patches


def _planted_object(grid, box, dim=32, seed=0):
    """Patch features: one direction for the background, another (with structure) inside `box`."""
    rng = np.random.default_rng(seed)
    h, w = grid
    features = np.tile(rng.normal(size=dim), (h, w, 1)) + 0.05 * rng.normal(size=(h, w, dim))
    top, left, bottom, right = box
    inside = np.zeros((h, w), dtype=bool)
    inside[top:bottom, left:right] = True
    object_part = np.random.default_rng(1).normal(size=(2, dim)) * 3
    ramp = np.linspace(0, 1, right - left)[None, :, None]
    features[inside] = (object_part[0] + ramp * object_part[1]).repeat(bottom - top, axis=0).reshape(-1, dim)
    return features, inside


def test_first_component_separates_a_planted_object_whatever_its_sign():
    a, inside_a = _planted_object((6, 8), (2, 2, 5, 6))
    b, inside_b = _planted_object((7, 7), (1, 2, 5, 5), seed=2)
    for sign in (1, -1):  # flipping every feature flips the component; the border rule must undo it
        colours, masks = pca_colours([sign * a, sign * b], threshold=0.0)
        np.testing.assert_array_equal(masks[0], inside_a)
        np.testing.assert_array_equal(masks[1], inside_b)
        assert np.all(colours[0][~inside_a] == 0) and colours[0][inside_a].max() > 0.5


def test_no_threshold_colours_every_patch():
    features, _ = _planted_object((4, 4), (1, 1, 3, 3))
    colours, masks = pca_colours([features], threshold=None)
    assert masks[0].all() and colours[0].shape == (4, 4, 3)
    assert colours[0].min() == 0.0 and colours[0].max() == 1.0  # min-max per channel


def test_picture_has_one_row_per_input_with_the_map_beside_it():
    sizes = [(8 * 14, 6 * 14), (7 * 14, 7 * 14), (5 * 14, 9 * 14)]  # (width, height)
    images = [Image.new("RGB", s, "red") for s in sizes]
    features = [_planted_object((h // 14, w // 14), (1, 1, 3, 3), seed=i)[0] for i, (w, h) in enumerate(sizes)]
    picture = render(images, features)
    assert len(picture.boxes) == 3 and all(len(row) == 2 for row in picture.boxes)
    assert picture.image.size == (max(2 * w + GAP for w, _ in sizes), sum(h for _, h in sizes) + 2 * GAP)
    for (w, h), (input_box, map_box) in zip(sizes, picture.boxes):
        assert input_box[2] - input_box[0] == w and map_box[3] - map_box[1] == h and map_box[0] == w + GAP
        assert picture.image.getpixel((input_box[0], input_box[1])) == (255, 0, 0)


def test_attention_maps_drop_cls_and_register_columns():
    heads, registers, grid = 3, 4, (2, 3)
    tokens = 1 + registers + 6
    attn = np.random.default_rng(0).random((heads, tokens, tokens))
    attn[:, 0, 1:1 + registers] = 100.0  # registers attract the most attention: they must not leak into maps
    attn[:, 0, 1 + registers:] = np.arange(6) + np.arange(heads)[:, None]
    maps = attention_maps(attn, grid)
    assert maps.shape == (3, 2, 3)
    np.testing.assert_allclose(maps[1], np.arange(6).reshape(2, 3) / 5)
    picture = render([Image.new("RGB", (42, 28))], attentions=[maps])
    assert len(picture.boxes[0]) == 1 + heads


@pytest.mark.parametrize("size", [224, 448, 518])
def test_inputs_are_resized_to_whole_patches_keeping_the_aspect(size):
    image = resize_to_patches(Image.new("RGB", (640, 480)), size)
    assert image.height == size and image.width % 14 == 0 and abs(image.width / image.height - 4 / 3) < 0.05


def test_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        resize_to_patches(Image.new("RGB", (10, 10)), 100)
