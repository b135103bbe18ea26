"""The image processor against transformers 5.x's BitImageProcessor PIL path (the judge).

The issue asks for max abs diff <= 1e-6; the PIL path is checked for exact equality (0.0), which is what it
achieves and what catches float32-vs-float64 rounding slips (one ulp, well under 1e-6).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.processing import (
    AutoImageProcessor,
    BitImageProcessor,
    Dinov2ImageProcessor,
    eval_transform,
    preprocess_tensor_batch,
    resize_output_size,
)

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the reference is the PIL path of transformers 5.x (backend='pil')", allow_module_level=True)

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
IMAGENETTE_VAL = DATASETS / "imagenette" / "val"
TOLERANCE = 0.0  # bit-identical (the bound is 1e-6)
TRANSFORMERS_TORCHVISION_TOLERANCE = 1e-6
ONE_LEVEL = 1 / 255 / 0.224  # one uint8 step after normalisation, largest over the three channels

# The preprocessor_config.json of every facebook/dinov2-* repo.
DINOV2_CONFIG = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("dinov2_config")
    (directory / "preprocessor_config.json").write_text(json.dumps(DINOV2_CONFIG))
    return directory


@pytest.fixture(scope="module")
def reference(dinov2_dir):
    """transformers' PIL path, loaded the way a user gets it."""
    processor = transformers.AutoImageProcessor.from_pretrained(dinov2_dir, backend="pil")
    assert processor.backend == "pil"
    return processor


@pytest.fixture(scope="module")
def ours(dinov2_dir):
    return AutoImageProcessor.from_pretrained(dinov2_dir)


def max_diff(a, b) -> float:
    a = np.stack([np.asarray(x) for x in a]) if isinstance(a, list) else np.asarray(a)
    b = np.stack([np.asarray(x) for x in b]) if isinstance(b, list) else np.asarray(b)
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def assert_same_as_reference(ours, reference, images, reference_images=None, **kwargs):
    got = ours(images, return_tensors="np", **kwargs)["pixel_values"]
    want = reference(images if reference_images is None else reference_images, return_tensors="np",
                     **kwargs)["pixel_values"]
    assert got.dtype == want.dtype
    assert max_diff(got, want) <= TOLERANCE


def noise_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic random image in `mode`, with varied alpha where the mode has one."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode in ("I", "F"):
        values = rng.integers(-1000, 70000, (height, width))
        return Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=None)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(colors=64)
    if mode == "1":
        return rgba.convert("L").convert("1")
    return rgba.convert(mode)


def photo(size=(640, 427)) -> Image.Image:
    """A smooth test picture of any size (a real photograph, resized, when the dataset is present)."""
    files = sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[:1]
    if files:
        with Image.open(files[0]) as image:
            return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return Image.fromarray(np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Real images
# ----------------------------------------------------------------------------------------------------------------

def test_every_image_of_three_imagenette_classes_matches_transformers(ours, reference):
    if not IMAGENETTE_VAL.is_dir():
        pytest.skip(f"Imagenette not found at {IMAGENETTE_VAL}")
    classes = sorted(path for path in IMAGENETTE_VAL.iterdir() if path.is_dir())[:3]
    files = sorted(file for folder in classes for file in folder.iterdir())
    assert len(files) > 1000
    worst, modes = 0.0, set()
    for start in range(0, len(files), 128):
        images = []
        for file in files[start:start + 128]:
            with Image.open(file) as image:
                image.load()
                images.append(image)
                modes.add(image.mode)
        got = ours(images, return_tensors="np")["pixel_values"]
        want = reference(images, return_tensors="np")["pixel_values"]
        assert got.shape == want.shape == (len(images), 3, 224, 224)
        worst = max(worst, max_diff(got, want))
    assert modes == {"RGB", "L"}  # the dataset's greyscale JPEGs are covered too
    assert worst <= TOLERANCE


def test_file_paths_match_transformers(ours, reference, tmp_path):
    files = sorted(IMAGENETTE_VAL.glob("*/*.JPEG"))[:8]
    if not files:
        pytest.skip(f"Imagenette not found at {IMAGENETTE_VAL}")
    assert_same_as_reference(ours, reference, files, [str(file) for file in files])  # Path objects for us
    assert_same_as_reference(ours, reference, str(files[0]))


# ----------------------------------------------------------------------------------------------------------------
# Modes, sizes and array layouts
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "PA", "P", "L", "I;16", "I", "F", "CMYK", "1", "YCbCr",
                                  "LAB", "HSV"])
def test_pil_mode_matches_transformers(ours, reference, mode):
    image = noise_image(mode, 61, 47)
    assert image.mode == mode
    assert_same_as_reference(ours, reference, image)


def test_palette_image_with_a_transparent_colour_matches_transformers(ours, reference, tmp_path):
    image = noise_image("P", 40, 30)
    image.info["transparency"] = 5  # one palette index is see-through: composited onto white in 5.x
    assert_same_as_reference(ours, reference, image)
    image.save(tmp_path / "transparent.png", transparency=5)
    path = tmp_path / "transparent.png"
    assert_same_as_reference(ours, reference, path, str(path))


def test_rgba_png_path_is_composited_on_white_like_the_same_image_given_as_pil(ours, reference, tmp_path):
    """dinokit's one reader composites a file's alpha onto white, as transformers does for a PIL image; transformers'
    own path loader drops alpha instead (a documented divergence)."""
    path = tmp_path / "rgba.png"
    noise_image("RGBA", 300, 260).save(path)
    with Image.open(path) as image:
        image.load()
        assert_same_as_reference(ours, reference, path, image)  # transformers given the PIL image
    dropped = reference(str(path), return_tensors="np")["pixel_values"]
    assert max_diff(dropped, ours(path, return_tensors="np")["pixel_values"]) > 0.1


def test_exif_orientation_of_a_file_is_applied_like_transformers(ours, reference, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo((400, 300)).save(path, exif=exif)
    assert_same_as_reference(ours, reference, path, str(path))
    upright = ours(path, do_center_crop=False, return_tensors="np")["pixel_values"]
    assert upright.shape[-2:] == (int(256 * 400 / 300), 256)  # portrait after rotation


# (resized long side - 224) = 3 (mod 4): torchvision's CenterCrop rounds the offset here, transformers floors it.
ODD_OFFSET_SIZES = [(259, 256), (256, 259), (390, 333), (333, 390), (640, 427), (427, 640)]


@pytest.mark.parametrize("width,height", [(1, 1), (3, 500), (500, 3), (223, 224), (224, 223), (224, 224),
                                          (257, 301), (999, 333), (640, 480), (1000, 872), (2, 2), *ODD_OFFSET_SIZES])
def test_image_size_matches_transformers(ours, reference, width, height):
    image = photo((width, height))
    assert_same_as_reference(ours, reference, image)
    assert_same_as_reference(ours, reference, noise_image("RGB", width, height, seed=width * height))


def test_odd_offset_sizes_are_the_ones_the_spec_warns_about():
    for width, height in ODD_OFFSET_SIZES:
        assert (max(resize_output_size(height, width, {"shortest_edge": 256})) - 224) % 4 == 3


@pytest.mark.parametrize("overrides,width,height", [
    ({"size": {"shortest_edge": 227}}, 300, 400),       # crop offset 3/2 in the short side too
    ({"size": {"shortest_edge": 200}}, 300, 251),       # resized smaller than the crop: zero padding
    ({"do_resize": False}, 100, 51),                      # padding on both axes, odd amounts
    ({"do_resize": False}, 223, 224),
    ({"do_resize": False}, 500, 100),                     # crop one axis, pad the other
    ({"size": {"height": 250, "width": 230}}, 301, 199),
    ({"crop_size": {"height": 97, "width": 131}}, 333, 271),
    ({"do_center_crop": False, "size": {"shortest_edge": 64}}, 100, 100),
    ({"do_normalize": False}, 120, 90),
    ({"resample": 2}, 320, 240),
])
def test_setting_overrides_match_transformers(ours, reference, overrides, width, height):
    image = photo((width, height))
    assert_same_as_reference(ours, reference, image, **overrides)
    configured = Dinov2ImageProcessor.from_dict(DINOV2_CONFIG, **overrides)
    assert max_diff(configured(image, return_tensors="np")["pixel_values"],
                    reference(image, return_tensors="np", **overrides)["pixel_values"]) <= TOLERANCE


def numpy_cases():
    rng = np.random.default_rng(1)
    hwc = np.array(photo((53, 41)))
    rgba = np.concatenate([hwc, rng.integers(0, 256, (41, 53, 1), dtype=np.uint8)], -1)
    return {
        "hwc_uint8": hwc,
        "chw_uint8": np.moveaxis(hwc, -1, 0).copy(),
        "grey_hwc1": hwc[..., :1].copy(),
        "grey_1hw": np.moveaxis(hwc[..., :1], -1, 0).copy(),
        "rgba_hwc_uint8": rgba,
        "rgba_chw_uint8": np.moveaxis(rgba, -1, 0).copy(),
        "float32_unit_range": hwc.astype(np.float32) / 255,       # taken through uint8, rescaled twice as in HF
        "float64_integer_valued": hwc.astype(np.float64),
        "float_rgba_unit_range": rgba.astype(np.float32) / 255,
        "uint16_small_values": hwc.astype(np.uint16),
        "batch_bhwc": np.stack([hwc, hwc[::-1]]),
        "batch_bchw": np.stack([np.moveaxis(hwc, -1, 0)] * 3),
    }


@pytest.mark.parametrize("case", list(numpy_cases()))
def test_numpy_input_matches_transformers(ours, reference, case):
    array = numpy_cases()[case]
    assert_same_as_reference(ours, reference, array)
    assert_same_as_reference(ours, reference, [array] if array.ndim == 3 else list(array))


@pytest.mark.parametrize("case", ["hwc_uint8", "chw_uint8", "rgba_chw_uint8", "float32_unit_range", "batch_bchw"])
def test_torch_tensor_input_matches_transformers(ours, reference, case):
    tensor = torch.from_numpy(numpy_cases()[case])
    assert_same_as_reference(ours, reference, tensor)


def test_ambiguous_channel_layout_follows_input_data_format(ours, reference):
    hwc = np.asarray(photo((3, 3)))  # (3, 3, 3): read as channels first unless told otherwise, as transformers
    for layout in (None, "channels_last", "channels_first"):
        assert_same_as_reference(ours, reference, hwc, input_data_format=layout)


def test_two_dimensional_array_is_a_greyscale_image(ours, reference):
    grey = np.asarray(photo((70, 50)).convert("L"))
    assert_same_as_reference(ours, reference, grey, grey[..., None])


def test_mixed_and_nested_lists_match_transformers(ours, reference, tmp_path):
    path = tmp_path / "small.png"
    noise_image("LA", 31, 29).save(path)
    pil, array = photo((300, 200)), np.asarray(photo((90, 120)))
    tensor = torch.from_numpy(np.moveaxis(array, -1, 0).copy())
    with Image.open(path) as image:  # an alpha file: compared with transformers given the decoded image (see above)
        image.load()
        assert_same_as_reference(ours, reference, [pil, array, tensor, path], [pil, array, tensor, image])
    assert_same_as_reference(ours, reference, [[pil, array], [tensor]])


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_return_tensors_types_and_values_match_transformers(ours, reference, return_tensors):
    images = [photo((300, 200)), noise_image("RGBA", 250, 260)]
    got = ours(images, return_tensors=return_tensors)
    want = reference(images, return_tensors=return_tensors)
    assert type(got["pixel_values"]) is type(want["pixel_values"])
    if return_tensors is None:
        assert [type(x) for x in got["pixel_values"]] == [type(x) for x in want["pixel_values"]]
    assert got.pixel_values is got["pixel_values"]
    assert max_diff(got["pixel_values"], want["pixel_values"]) <= TOLERANCE


def test_output_moves_to_a_device_like_batch_feature(ours):
    out = ours(photo((300, 200)), return_tensors="pt").to(torch.float64)
    assert out.pixel_values.dtype == torch.float64 and out.pixel_values.shape == (1, 3, 224, 224)


# ----------------------------------------------------------------------------------------------------------------
# Config round trips
# ----------------------------------------------------------------------------------------------------------------

def test_defaults_are_the_dinov2_hub_config():
    assert Dinov2ImageProcessor().to_dict() == DINOV2_CONFIG
    assert BitImageProcessor is Dinov2ImageProcessor


def test_transformers_reads_our_saved_config(tmp_path):
    settings = {"size": {"shortest_edge": 300}, "crop_size": {"height": 252, "width": 280}, "resample": 2,
                "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]}
    ours = Dinov2ImageProcessor(**settings)
    ours.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.to_dict().items()}
    assert theirs == ours.to_dict()
    image = photo((500, 400))
    assert max_diff(ours(image, return_tensors="np")["pixel_values"],
                    loaded(image, return_tensors="np")["pixel_values"]) <= TOLERANCE


def test_we_read_a_config_transformers_saved(tmp_path):
    theirs = transformers.AutoImageProcessor.from_pretrained(
        _write_config(tmp_path / "src", DINOV2_CONFIG), backend="pil", size={"shortest_edge": 240},
        crop_size={"height": 210, "width": 210}, image_mean=[0.45, 0.45, 0.45], do_convert_rgb=True)
    theirs.save_pretrained(tmp_path / "saved")
    ours = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert isinstance(ours, Dinov2ImageProcessor)
    assert ours.to_dict() == {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.to_dict().items()}
    image = noise_image("RGBA", 333, 250)
    assert max_diff(ours(image, return_tensors="np")["pixel_values"],
                    theirs(image, return_tensors="np")["pixel_values"]) <= TOLERANCE


def test_keys_missing_from_a_config_take_transformers_class_defaults(tmp_path):
    partial = {"image_processor_type": "BitImageProcessor", "crop_size": {"height": 200, "width": 200}}
    directory = _write_config(tmp_path, partial)
    ours = AutoImageProcessor.from_pretrained(directory)
    theirs = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
    assert ours.size == {"shortest_edge": 224} and ours.image_mean[0] == pytest.approx(0.48145466)  # CLIP stats
    image = photo((300, 260))
    assert max_diff(ours(image, return_tensors="np")["pixel_values"],
                    theirs(image, return_tensors="np")["pixel_values"]) <= TOLERANCE


def test_from_pretrained_applies_keyword_overrides_and_backend(dinov2_dir):
    processor = AutoImageProcessor.from_pretrained(dinov2_dir, crop_size=196, backend="torchvision")
    assert processor.crop_size == {"height": 196, "width": 196} and processor.backend == "torchvision"
    assert AutoImageProcessor.from_pretrained(dinov2_dir, use_fast=True).backend == "torchvision"


def test_config_of_another_processor_type_is_refused(tmp_path):
    directory = _write_config(tmp_path, {**DINOV2_CONFIG, "image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="CLIPImageProcessor"):
        AutoImageProcessor.from_pretrained(directory)


def test_missing_or_broken_config_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        AutoImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AutoImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoImageProcessor()


def _write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def test_corrupt_and_truncated_files_raise_one_value_error_naming_the_file(ours, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.jpg"):
        ours(garbage)
    truncated = tmp_path / "truncated.jpg"
    photo((300, 200)).save(tmp_path / "whole.jpg")
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])
    with pytest.raises(ValueError, match="truncated.jpg"):
        ours([str(tmp_path / "whole.jpg"), str(truncated)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ours(tmp_path / "missing.png")


@pytest.mark.parametrize("shape", [(5, 5, 2), (2, 40, 40), (7, 20, 30), (1, 2, 3, 4, 5), (6,)])
def test_wrong_shapes_and_channel_counts_raise_value_error(ours, shape):
    with pytest.raises(ValueError, match="shape"):
        ours(np.zeros(shape, dtype=np.uint8))


def test_values_out_of_range_empty_input_and_unknown_options_are_refused(ours):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours(np.full((20, 20, 3), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match="No images"):
        ours([])
    with pytest.raises(ValueError, match="return_tensors"):
        ours(photo((50, 50)), return_tensors="tf")
    with pytest.raises(TypeError, match="Unsupported image type"):
        ours(42)
    with pytest.raises(ValueError, match="different sizes"):
        ours([photo((50, 50)), photo((60, 50))], do_center_crop=False, return_tensors="pt")
    with pytest.raises(TypeError, match="crop"):
        Dinov2ImageProcessor(crop=224)  # a misspelt setting is not silently ignored
    with pytest.raises(TypeError, match="Unknown preprocessing arguments"):
        ours(photo((50, 50)), crop=224)


# ----------------------------------------------------------------------------------------------------------------
# eval_transform and the torchvision backend
# ----------------------------------------------------------------------------------------------------------------

def test_eval_transform_is_bit_identical_to_the_processor(ours):
    transform = pickle.loads(pickle.dumps(eval_transform()))  # as DataLoader workers receive it
    images = [photo((640, 427)), noise_image("RGBA", 259, 256), noise_image("L", 3, 500), noise_image("CMYK", 99, 99)]
    for image in images:
        assert torch.equal(transform(image), ours(image, return_tensors="pt")["pixel_values"][0])
    small = eval_transform(resize=64, crop=56)(images[0])
    assert torch.equal(small, ours(images[0], size=64, crop_size=56, return_tensors="pt")["pixel_values"][0])


def test_eval_transform_works_in_dataloader_workers(ours, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    for index, size in enumerate([(300, 200), (200, 300), (257, 259), (64, 48)]):
        (tmp_path / f"class_{index % 2}").mkdir(exist_ok=True)
        noise_image("RGB", *size, seed=index).save(tmp_path / f"class_{index % 2}" / f"{index}.png")
    dataset = torchvision.datasets.ImageFolder(tmp_path, transform=eval_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    batches = torch.cat([images for images, _ in loader])
    expected = ours([path for path, _ in dataset.samples], return_tensors="pt")["pixel_values"]
    assert torch.equal(batches, expected)


def skimage_photos() -> list[Image.Image]:
    data = pytest.importorskip("skimage.data")
    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]


def test_torchvision_backend_is_close_to_the_pil_path_and_equals_transformers_default(dinov2_dir):
    """Not bit-identical: the antialiased tensor resize differs by at most a few uint8 levels when downscaling."""
    fast = Dinov2ImageProcessor(backend="torchvision")
    pil = Dinov2ImageProcessor()
    transformers_default = transformers.AutoImageProcessor.from_pretrained(dinov2_dir)
    assert transformers_default.backend == "torchvision"
    images = skimage_photos() + [photo((224, 224)), photo((500, 375)), noise_image("L", 259, 256)]
    got = fast(images, return_tensors="pt")["pixel_values"]
    assert got.shape == (len(images), 3, 224, 224) and got.dtype == torch.float32
    assert max_diff(got, pil(images, return_tensors="pt")["pixel_values"]) <= 3 * ONE_LEVEL
    for image, row in zip(images, got):  # one at a time: transformers batches equal sizes only
        want = transformers_default(image, return_tensors="pt")["pixel_values"]
        assert max_diff(row[None], want) <= TRANSFORMERS_TORCHVISION_TOLERANCE


def test_torchvision_backend_takes_a_uint8_batch_tensor_directly():
    fast = Dinov2ImageProcessor(backend="torchvision")
    images = [photo((320, 240)), photo((320, 240)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batch = torch.from_numpy(np.stack([np.moveaxis(np.asarray(image), -1, 0) for image in images]))
    direct = fast(batch, return_tensors="pt")["pixel_values"]
    assert torch.equal(direct, fast(images, return_tensors="pt")["pixel_values"])
    assert torch.equal(direct, preprocess_tensor_batch(batch))


def test_torchvision_backend_keeps_the_order_of_mixed_sizes():
    fast = Dinov2ImageProcessor(backend="torchvision")
    images = [photo((300, 200)), photo((200, 300)), photo((300, 200)).rotate(180), noise_image("RGBA", 90, 70)]
    together = fast(images, return_tensors="np")["pixel_values"]
    one_by_one = np.concatenate([fast(image, return_tensors="np")["pixel_values"] for image in images])
    assert np.array_equal(together, one_by_one)
