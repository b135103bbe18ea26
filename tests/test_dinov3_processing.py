"""DINOv3 preprocessing: `DINOv3ViTImageProcessor` is bit-identical to transformers' for PIL, numpy and tensor
inputs, and AutoImageProcessor picks it by the config; timm's DINOv3 ConvNeXt transform is the Bit pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.processing import AutoImageProcessor, Dinov2ImageProcessor, DINOv3ViTImageProcessor

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

SHAPES = [(300, 451, 3), (97, 131, 3), (224, 224, 3), (64, 40, 1)]


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in SHAPES]


@pytest.mark.parametrize("kind", ["pil", "numpy", "tensor"])
def test_bit_identical_to_transformers(kind):
    convert = {"pil": lambda a: Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), "numpy": lambda a: a,
               "tensor": lambda a: torch.from_numpy(a).permute(2, 0, 1)}[kind]
    ours, theirs = DINOv3ViTImageProcessor(), transformers.DINOv3ViTImageProcessor()
    for array in images():
        image = convert(array)
        mine = ours(image, return_tensors="pt").pixel_values
        ref = theirs(image, return_tensors="pt").pixel_values
        assert mine.shape == (1, 3, 224, 224) and torch.equal(mine, ref)
    batch = [convert(a) for a in images()]
    assert torch.equal(ours(batch, return_tensors="pt").pixel_values, theirs(batch, return_tensors="pt").pixel_values)


def test_rescale_comes_before_the_float_resize():
    """transformers' DINOv3 order (rescale -> resize -> normalize) differs from resizing the uint8 image."""
    image = Image.fromarray(images()[0])
    ours = DINOv3ViTImageProcessor()(image, return_tensors="pt").pixel_values
    uint8_first = DINOv3ViTImageProcessor(do_rescale=False, do_normalize=False)(image, return_tensors="pt")
    assert not torch.equal(ours, uint8_first.pixel_values)
    settings = dict(size={"height": 256, "width": 320}, image_mean=(0.430, 0.411, 0.296), image_std=(0.213, 0.156, 0.143))
    mine = DINOv3ViTImageProcessor(**settings)(image, return_tensors="pt").pixel_values
    ref = transformers.DINOv3ViTImageProcessor(**settings)(image, return_tensors="pt").pixel_values
    assert mine.shape == (1, 3, 256, 320) and torch.equal(mine, ref)


def test_config_round_trips_and_auto_dispatch(tmp_path):
    transformers.DINOv3ViTImageProcessor().save_pretrained(tmp_path / "theirs")
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "theirs")
    assert isinstance(loaded, DINOv3ViTImageProcessor)
    DINOv3ViTImageProcessor(size=256).save_pretrained(tmp_path / "ours")
    back = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours")
    assert type(back).__name__ == "DINOv3ViTImageProcessor" and back.size.height == 256
    image = Image.fromarray(images()[1])
    assert torch.equal(AutoImageProcessor.from_pretrained(tmp_path / "ours")(image, return_tensors="pt").pixel_values,
                       back(image, return_tensors="pt").pixel_values)
    with pytest.raises(ValueError, match="DINOv3ViTImageProcessor pipeline only"):
        DINOv3ViTImageProcessor.from_dict({"image_processor_type": "BitImageProcessor"})


@pytest.mark.parametrize("timm_name", ["convnext_tiny.dinov3_lvd1689m", "vit_small_patch16_dinov3.lvd1689m",
                                       "vit_large_patch16_dinov3_qkvb.sat493m"])
def test_timm_dinov3_transform_is_the_bit_pipeline(timm_name):
    """timm's transform for each DINOv3 config (ConvNeXt 224; ViT 256 with ImageNet or the SAT statistics: short
    side bicubic, centre crop) is Dinov2ImageProcessor with that size, crop and mean/std, bit for bit."""
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(timm_name).to_dict())
    transform = timm.data.create_transform(**config)
    size = config["input_size"][1]
    assert config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"
    ours = Dinov2ImageProcessor(size={"shortest_edge": size}, crop_size=size, image_mean=config["mean"],
                                image_std=config["std"])
    for array in images()[:3]:
        image = Image.fromarray(array)
        assert torch.equal(ours(image, return_tensors="pt").pixel_values[0], transform(image))
