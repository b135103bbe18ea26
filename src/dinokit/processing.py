"""Image preprocessing for DINOv2: transformers' `BitImageProcessor` (its PIL path), bit for bit, without transformers.

Every facebook/dinov2-* repo ships a `preprocessor_config.json` for `BitImageProcessor`: convert to RGB, resize the
SHORT side to 256 with PIL bicubic on uint8 (long side `int(256 * long / short)`, truncated), centre crop 224x224 with
floor offsets (zero-padding an image that is smaller), rescale by 1/255 in float64 then cast to float32, normalise with
the ImageNet mean/std, channels first, stacked. `Dinov2ImageProcessor` reproduces the PIL path of transformers 5.x
(`AutoImageProcessor.from_pretrained(..., backend="pil")`, class `BitImageProcessorPil`) exactly, with PIL and numpy
only. `backend="torchvision"` is a faster batched tensor path that is close to it but NOT bit-identical.
`eval_transform()` gives the same PIL path as a torchvision-style transform for datasets and DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit import atomic
from dinokit.data.images import pil_to_rgb, read_image
from dinokit.hub import resolve_file

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
CHANNELS_FIRST, CHANNELS_LAST = "channels_first", "channels_last"

# transformers' BitImageProcessor class defaults (CLIP statistics, 224): what a config file that omits a key means.
_BIT_CLASS_DEFAULTS = {"size": {"shortest_edge": 224}, "image_mean": (0.48145466, 0.4578275, 0.40821073),
                       "image_std": (0.26862954, 0.26130258, 0.27577711)}
# `image_processor_type` values whose configs mean exactly this pipeline.
_COMPATIBLE_TYPES = {"BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast", "Dinov2ImageProcessor"}
_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
             "do_normalize", "image_mean", "image_std", "do_convert_rgb")
_BACKENDS = ("pil", "torchvision")


# ----------------------------------------------------------------------------------------------------------------
# Inputs: files, PIL images, arrays and tensors -> a flat list of single images
# ----------------------------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB through dinokit's one reader, `dinokit.data.images.read_image`: EXIF orientation
    applied, transparency composited onto white (as for PIL images given to the processor), 16-bit scaled to 8
    bits, files over PIL's pixel limit refused before decoding; `ImageReadError` (a ValueError) naming the file
    otherwise. Unlike transformers' `load_image`, which drops alpha and clips 16-bit values to white."""
    return read_image(path)


def _is_image(item: Any) -> bool:
    return isinstance(item, (Image.Image, np.ndarray, torch.Tensor))


def _flat_list_of_images(images: Any) -> list:
    """One list of single images (PIL, 2-D/3-D array or tensor), loading paths; batches (4-D) and nested lists are
    split as transformers' `make_flat_list_of_images` does."""
    if isinstance(images, (str, os.PathLike)):
        return [load_image(images)]
    if _is_image(images):
        if isinstance(images, Image.Image) or images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"An image array must have 2 (H, W), 3 (HWC or CHW) or 4 (a batch) dimensions; got shape "
                         f"{tuple(images.shape)}.")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("No images were given (empty list).")
        flat = []
        for item in images:
            if isinstance(item, (list, tuple, str, os.PathLike)) or (_is_image(item) and not isinstance(
                    item, Image.Image) and item.ndim == 4):
                flat.extend(_flat_list_of_images(item))
            elif _is_image(item):
                if not isinstance(item, Image.Image) and item.ndim not in (2, 3):
                    raise ValueError(f"An image array must have 2, 3 or 4 dimensions; got shape {tuple(item.shape)}.")
                flat.append(item)
            else:
                raise TypeError(f"Unsupported image type {type(item).__name__}: pass PIL images, numpy arrays, torch "
                                f"tensors or file paths (a single one or a list).")
        return flat
    raise TypeError(f"Unsupported image type {type(images).__name__}: pass PIL images, numpy arrays, torch tensors "
                    f"or file paths (a single one or a list).")


def _infer_channel_format(shape: Sequence[int]) -> str:
    """transformers' `infer_channel_dimension_format(num_channels=(1, 3, 4))`: channels first when ambiguous."""
    first, last = shape[-3], shape[-1]
    if first in (1, 3, 4):
        if last in (1, 3, 4):
            logger.warning("The channel dimension of an image of shape %s is ambiguous; assuming channels first. "
                           "Pass input_data_format='channels_last' if that is wrong.", tuple(shape))
        return CHANNELS_FIRST
    if last in (1, 3, 4):
        return CHANNELS_LAST
    raise ValueError(f"Cannot find the channel axis of an image of shape {tuple(shape)}: expected 1, 3 or 4 channels "
                     f"in the first (CHW) or last (HWC) axis. Pass an RGB/greyscale/RGBA image, or set "
                     f"input_data_format='channels_first' or 'channels_last'.")


def _check_data_format(input_data_format: Any) -> str | None:
    value = getattr(input_data_format, "value", input_data_format)  # accepts transformers' ChannelDimension
    if value not in (None, CHANNELS_FIRST, CHANNELS_LAST):
        raise ValueError(f"input_data_format must be 'channels_first', 'channels_last' or None, got {value!r}.")
    return value


def _array_to_rgb(hwc: np.ndarray) -> np.ndarray:
    """transformers 5.x `convert_to_rgb` on a channels-last array: grey is repeated, RGBA composited onto white."""
    channels = hwc.shape[-1]
    if channels == 1:
        return np.repeat(hwc, 3, axis=-1)
    if channels == 4:
        if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
            raise ValueError(f"A floating-point RGBA image must have values in [0, 1] to be composited onto white; "
                             f"got [{hwc.min()}, {hwc.max()}].")
        white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
        alpha = hwc[..., 3:4] / white
        composite = alpha * hwc[..., :3] + (1 - alpha) * white
        return np.round(composite).astype(hwc.dtype) if white == 255 else composite.astype(hwc.dtype)
    return hwc


def _to_channels_first(image: Any, do_convert_rgb: bool, input_data_format: str | None) -> np.ndarray:
    """A single image -> (C, H, W) numpy array, as transformers' `PilBackend.process_image`."""
    if isinstance(image, Image.Image):
        array = np.array(pil_to_rgb(image) if do_convert_rgb else image)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:  # (H, W) greyscale; transformers rejects it, here it is the 1-channel image it means
        array, input_data_format = array[None], CHANNELS_FIRST
    data_format = input_data_format or _infer_channel_format(array.shape)
    if data_format == CHANNELS_FIRST:
        array = np.moveaxis(array, 0, -1)
    if do_convert_rgb:
        array = _array_to_rgb(array)
    return np.moveaxis(array, -1, 0)


# ----------------------------------------------------------------------------------------------------------------
# The PIL path, one (C, H, W) image at a time
# ----------------------------------------------------------------------------------------------------------------

def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """(height, width) after resizing: the short side to `shortest_edge` and the long side `int(size * long / short)`
    (truncated, as torchvision and transformers do), or exactly `height` x `width`."""
    if "shortest_edge" in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
    """transformers' `_rescale_for_pil_conversion`: floats in [0, 1] are scaled by 255 for PIL; integer-valued
    data must already be in [0, 255]."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(f"Image values must be in [0, 255] (or [0, 1] for floats); got [{image.min()}, "
                         f"{image.max()}].")
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(f"Floating-point image values must be in [0, 1] (or integers in [0, 255]); got [{image.min()}, "
                     f"{image.max()}].")


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    return (image.astype(np.float64) * scale).astype(np.float32)  # float64 first: transformers' order of rounding


def _to_pil(chw: np.ndarray) -> tuple[Image.Image, bool]:
    """A (C, H, W) image as a uint8 PIL image, as transformers' `resize` makes one; True if floats in [0, 1] were
    scaled to [0, 255] on the way (and must be scaled back)."""
    rescaled = _needs_rescale_for_pil(chw)
    hwc = np.moveaxis(chw, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    if rescaled:
        hwc = _rescale(hwc, 255)
    return Image.fromarray(hwc.astype(np.uint8)), rescaled


def _from_pil(image: Image.Image, rescaled: bool) -> np.ndarray:
    array = np.array(image)
    array = np.moveaxis(array[..., None] if array.ndim == 2 else array, -1, 0)
    return _rescale(array, 1 / 255) if rescaled else array


def _pil_resize(chw: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize through PIL on uint8, as transformers' `resize`: floats in [0, 1] go through uint8 and come back."""
    image, rescaled = _to_pil(chw)
    return _from_pil(image.resize((width, height), resample=resample), rescaled)


def crop_box(height: int, width: int, crop_height: int, crop_width: int) -> tuple[tuple[int, int, int, int], int, int]:
    """Centre-crop geometry of transformers' `center_crop`: zero padding (top, bottom, left, right) that makes the
    image at least crop-sized (the extra pixel of an odd padding goes top/left), then the FLOOR offsets (top, left)
    of the crop in the padded image."""
    pad_h, pad_w = max(crop_height - height, 0), max(crop_width - width, 0)
    top_pad, left_pad = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
    padding = (top_pad, pad_h - top_pad, left_pad, pad_w - left_pad)
    return padding, (height - crop_height) // 2 + top_pad, (width - crop_width) // 2 + left_pad


def _center_crop(chw: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    (top_pad, bottom_pad, left_pad, right_pad), top, left = crop_box(*chw.shape[-2:], crop_height, crop_width)
    if top_pad or bottom_pad or left_pad or right_pad:
        chw = np.pad(chw, ((0, 0), (top_pad, bottom_pad), (left_pad, right_pad)))
    # Contiguous (C, H, W): the channels-first view of PIL's (H, W, C) pixels makes every later float pass ~3x
    # slower, and copying the small uint8 crop costs less than that.
    return np.ascontiguousarray(chw[:, top:top + crop_height, left:left + crop_width])


# Resized images larger than this (50 MB of uint8 RGB) are not made whole before a centre crop: only the region
# the crop keeps is resized. Only thin strips reach it (at short side 256, an aspect ratio over 250:1), which the
# full resize would blow up to gigabytes (a 1 x 20,000 PNG: 256 x 5,120,000 pixels, 13.5 GB peak).
MAX_RESIZED_PIXELS = 1 << 24


def _resize_center_crop(chw: np.ndarray, height: int, width: int, resample: int, crop_height: int,
                        crop_width: int) -> np.ndarray:
    """`_center_crop(_pil_resize(chw, height, width), ...)` for an image whose resized size is over
    MAX_RESIZED_PIXELS, without making the whole resized image: PIL's two passes (horizontal, then vertical)
    are run one at a time, each on the source region (PIL's `box`) under the crop window; zero padding where the
    window overhangs. Close to the whole resize, not bit-identical: the box's coordinates are float32 in PIL,
    and PIL may run the whole resize's passes in the other order. Measured on random-noise images, the worst
    case: thin strips (the images that come here) differ by at most 2 levels in 0.1% of values; a 30:1 image
    (1500 x 50, forced here) by 0.4 levels on average, up to 20."""
    (top_pad, _, left_pad, _), top, left = crop_box(height, width, crop_height, crop_width)
    r0, c0 = top - top_pad, left - left_pad  # the crop window in resized coordinates (negative: padding)
    rows, cols = (max(r0, 0), min(r0 + crop_height, height)), (max(c0, 0), min(c0 + crop_width, width))
    in_h, in_w = chw.shape[-2:]

    def edge(index: int, source: int, resized: int) -> float:  # exact at both ends of the image
        return float(source) if index == resized else index * source / resized

    y0, y1 = edge(rows[0], in_h, height), edge(rows[1], in_h, height)
    reach = 3 * max(1.0, in_h / height) + 2  # source rows beyond the window that a vertical filter can use
    first, last = max(0, math.floor(y0 - reach)), min(in_h, math.ceil(y1 + reach))
    image, rescaled = _to_pil(chw[:, first:last])
    out_w = cols[1] - cols[0]
    across = image.resize((out_w, last - first), resample=resample,
                          box=(edge(cols[0], in_w, width), 0, edge(cols[1], in_w, width), last - first))
    region = _from_pil(across.resize((out_w, rows[1] - rows[0]), resample=resample,
                                     box=(0, y0 - first, out_w, y1 - first)), rescaled)
    out = np.zeros((chw.shape[0], crop_height, crop_width), dtype=region.dtype)
    out[:, rows[0] - r0:rows[1] - r0, cols[0] - c0:cols[1] - c0] = region
    return out


def _normalize(chw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    if len(mean) != chw.shape[0] or len(std) != chw.shape[0]:
        raise ValueError(f"image_mean and image_std have {len(mean)} and {len(std)} values but the image has "
                         f"{chw.shape[0]} channels. Keep do_convert_rgb=True for non-RGB images.")
    if not np.issubdtype(chw.dtype, np.floating):
        chw = chw.astype(np.float32)
    mean, std = np.array(mean, dtype=chw.dtype), np.array(std, dtype=chw.dtype)
    return (chw - mean[:, None, None]) / std[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------------

def _size_dict(size: int | dict[str, int], name: str, default_to_square: bool) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        size = {key: int(value) for key, value in size.items() if value is not None}
        if set(size) == {"shortest_edge"} and not default_to_square:
            return size
        if set(size) == {"height", "width"}:
            return size
    allowed = "{'height': H, 'width': W}" + ("" if default_to_square else " or {'shortest_edge': S}")
    raise ValueError(f"{name} must be an int or a dict {allowed}; got {size!r}.")


class BatchFeature(dict):
    """The processor's output: a dict (`out["pixel_values"]`) whose keys are also attributes (`out.pixel_values`),
    like transformers' `BatchFeature`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> BatchFeature:
        """Move (or cast) the tensors, as `tensor.to(...)`."""
        return BatchFeature({k: v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class Dinov2ImageProcessor:
    """DINOv2 preprocessing with the API of transformers' `BitImageProcessor`; defaults are those of the
    facebook/dinov2-* `preprocessor_config.json`.

    `backend="pil"` (the default) is bit-identical to transformers 5.x's PIL path (`BitImageProcessorPil`, i.e.
    `AutoImageProcessor.from_pretrained(..., backend="pil")`) for PIL images, numpy arrays and torch tensors (HWC or
    CHW, channels inferred as transformers does), and ordinary (8-bit, opaque) image files, single or batched:

    - PIL images: transparency (RGBA, LA, PA, P with a transparent colour) is composited onto white, other modes
      (L, P, I;16, CMYK, 1, ...) go through PIL's `convert("RGB")`.
    - File paths are read by dinokit's one reader (`dinokit.data.images.read_image`, shared with every command):
      EXIF orientation applied, transparency composited onto white exactly as for a PIL image (transformers drops
      the alpha of a path instead), 16-bit greyscale scaled to 8 bits (transformers clips it to white), files over
      PIL's pixel limit refused before decoding.
    - Arrays/tensors: 1 channel is repeated, 4 channels (RGBA) are composited onto white. uint8 or integer-valued
      data in [0, 255] is used as is; other floats in [0, 1] are taken through uint8 for PIL's resize (x255,
      truncated) and come back in [0, 1], after which `do_rescale` still divides by 255, as in transformers: pass
      `do_rescale=False` for images already in [0, 1]. A 2-D array is read as a greyscale image (transformers
      rejects it).
    - Images smaller than the crop are zero-padded (before normalisation) as transformers does.

    Differences of transformers 4.x (slow `BitImageProcessor`): RGBA/LA/P-with-transparency PIL images were
    converted with `convert("RGB")` (alpha dropped, not composited onto white); arrays and tensors were not
    converted at all (1-channel arrays failed at normalisation, 4-channel ones could not be read); file paths were
    not accepted; the channel layout of the whole batch was inferred from its first image. For 3-channel uint8
    images the numbers are the same as 5.x. transformers 5.x's default `AutoImageProcessor` (without
    `backend="pil"`) is its torchvision path: the same as `backend="torchvision"` below.

    `backend="torchvision"` resizes with `torchvision.transforms.v2.functional.resize` (bicubic, antialias) on
    batches of equal-sized uint8 tensors, on any device; a (B, 3, H, W) uint8 tensor is processed as one batch with
    no per-image work (about 1 ms/image on 2 CPU cores vs 2-5 ms for the PIL path). It is NOT bit-identical to the
    PIL path. Measured max abs difference of `pixel_values`: 0.0350 (2 uint8 levels / std) when downscaling (300
    Imagenette photos at 640x427, 0.3% of values differ; scikit-image's sample photos: the same 0.0350), and
    4.8e-7 (float rounding only) when upscaling (1,139 Imagenette 224x224 images). It matches transformers 5.x's
    default (torchvision) `BitImageProcessor` to <= 2.4e-7 on RGB uint8 input.
    """

    model_input_names = ["pixel_values"]
    processor_type = "BitImageProcessor"  # what `preprocessor_config.json` names
    compatible_types = _COMPATIBLE_TYPES  # the `image_processor_type` values whose configs mean this pipeline
    class_defaults = _BIT_CLASS_DEFAULTS  # what a key missing from a config means (transformers' class defaults)

    def __init__(self, do_resize: bool = True, size: int | dict[str, int] | None = None,
                 resample: int = Image.Resampling.BICUBIC, do_center_crop: bool = True,
                 crop_size: int | dict[str, int] | None = None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 do_convert_rgb: bool = True, backend: str = "pil"):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
        self.backend = backend
        self.do_resize = bool(do_resize)
        self.size = _size_dict(256 if size is None else size, "size", default_to_square=False)
        self.resample = int(resample)
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size", default_to_square=True)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.do_convert_rgb = bool(do_convert_rgb)

    # -- config -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings, as transformers writes them to `preprocessor_config.json`."""
        settings = {name: getattr(self, name) for name in _SETTINGS}
        settings = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                    for k, v in settings.items()}
        return {**settings, "image_processor_type": self.processor_type}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}) {self.to_json_string()}"

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[Path]:
        """Write `preprocessor_config.json` (readable by transformers' `AutoImageProcessor.from_pretrained`)."""
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained needs a directory, but {str(directory)!r} is a file.")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / PREPROCESSOR_CONFIG_NAME
        atomic.write_text(target, self.to_json_string())  # never leave a half-written config behind
        return [target]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any) -> Dinov2ImageProcessor:
        """Settings of a `preprocessor_config.json`; a key it omits takes transformers' `BitImageProcessor` class
        default (CLIP mean/std, shortest edge 224), as in transformers. Keyword arguments override."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type")
        if kind is not None and kind not in cls.compatible_types:
            raise ValueError(f"This preprocessor config is for {kind!r}; dinokit's {cls.__name__} implements the "
                             f"{cls.processor_type} pipeline only ({', '.join(sorted(cls.compatible_types))}).")
        settings = {**cls.class_defaults, **{k: v for k, v in config.items() if k in _SETTINGS}, **kwargs}
        if config.get("do_pad") and not settings.get("do_center_crop", True):
            raise ValueError("do_pad=True without the centre crop is not supported by dinokit's processor.")
        ignored = sorted(set(config) - set(_SETTINGS) - {"image_processor_type", "feature_extractor_type", "do_pad"})
        if ignored:
            logger.info("Dinov2ImageProcessor ignores the config keys %s", ignored)
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, backend: str = "pil",
                        use_fast: bool | None = None, revision: str | None = None, cache_dir: str | None = None,
                        **kwargs: Any) -> Dinov2ImageProcessor:
        """Read `preprocessor_config.json` from a directory or a Hub id; keyword arguments override its settings.
        `use_fast=True` is accepted as transformers' spelling of `backend="torchvision"`."""
        if use_fast is not None:
            backend = "torchvision" if use_fast else "pil"
        path = resolve_file(pretrained_model_name_or_path, PREPROCESSOR_CONFIG_NAME, revision=revision,
                            cache_dir=cache_dir)
        try:
            config = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}). Re-save it with save_pretrained().") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object of settings.")
        return cls.from_dict(config, backend=backend, **kwargs)

    # -- preprocessing ------------------------------------------------------------------------------------------

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(_SETTINGS) - {"input_data_format"}
        if unknown:
            raise TypeError(f"Unknown preprocessing arguments {sorted(unknown)}; accepted: {list(_SETTINGS)} and "
                            f"input_data_format.")
        options = {name: getattr(self, name) for name in _SETTINGS}
        options.update({k: v for k, v in overrides.items() if v is not None})
        options["size"] = _size_dict(options["size"], "size", default_to_square=False)
        options["crop_size"] = _size_dict(options["crop_size"], "crop_size", default_to_square=True)
        options["input_data_format"] = _check_data_format(overrides.get("input_data_format"))
        return options

    def _process_one(self, image: Any, options: dict[str, Any] | None = None) -> np.ndarray:
        """One image through the PIL path -> (C, H, W) numpy array (float32 with the default settings)."""
        o = options if options is not None else self._options({})
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        chw = _to_channels_first(image, o["do_convert_rgb"], o["input_data_format"])
        if chw.shape[-1] == 0 or chw.shape[-2] == 0:
            raise ValueError(f"Empty image of shape {chw.shape}.")
        crop = o["crop_size"]["height"], o["crop_size"]["width"]
        cropped = False
        if o["do_resize"]:
            height, width = resize_output_size(*chw.shape[-2:], o["size"])
            if o["do_center_crop"] and height * width > MAX_RESIZED_PIXELS:
                chw, cropped = _resize_center_crop(chw, height, width, o["resample"], *crop), True
            else:
                chw = _pil_resize(chw, height, width, o["resample"])
        if o["do_center_crop"] and not cropped:
            chw = _center_crop(chw, *crop)
        if o["do_rescale"]:
            chw = _rescale(chw, o["rescale_factor"])
        if o["do_normalize"]:
            chw = _normalize(chw, o["image_mean"], o["image_std"])
        return chw

    def __call__(self, images: Any, return_tensors: str | None = None, device: str | torch.device | None = None,
                 **overrides: Any) -> BatchFeature:
        """Preprocess one image or a batch -> `BatchFeature` with `pixel_values`.

        `images`: a PIL image, a numpy array or torch tensor (HWC or CHW; 4-D = a batch), a file path (str or
        Path), or a list of these. `return_tensors`: "pt" (a torch tensor), "np" (a numpy array), or None (a list
        of per-image arrays, as transformers). Settings of the constructor can be overridden per call (e.g.
        `do_rescale=False`); `input_data_format="channels_first"|"channels_last"` resolves ambiguous arrays.
        """
        return_tensors = getattr(return_tensors, "value", return_tensors)
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        options = self._options(overrides)
        if self.backend == "torchvision":
            pixel_values = self._torchvision_batch(images, options, device)
        else:
            pixel_values = [self._process_one(image, options) for image in _flat_list_of_images(images)]
        return BatchFeature(pixel_values=_as_return_type(pixel_values, return_tensors, device))

    preprocess = __call__

    def post_process_semantic_segmentation(self, outputs, target_sizes=None) -> list[torch.Tensor]:
        """Segmentation logits -> one (H, W) class map per image, as transformers' processors do."""
        return post_process_semantic_segmentation(outputs, target_sizes)

    # -- the torchvision tensor path ------------------------------------------------------------------------------

    def _torchvision_batch(self, images: Any, o: dict[str, Any], device: Any) -> torch.Tensor | list[torch.Tensor]:
        """Run `preprocess_tensor_batch` once per group of equal-sized images; a (B, N, H, W) tensor of outputs when
        they all have one size (always, with the centre crop), else a list."""
        settings = {k: o[k] for k in _SETTINGS if k != "do_convert_rgb"}
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 and o["do_convert_rgb"] \
                and o["input_data_format"] in (None, CHANNELS_FIRST):  # already an RGB batch: no per-image work
            return preprocess_tensor_batch(images.to(device) if device is not None else images, **settings)
        arrays = [_to_channels_first(load_image(image) if isinstance(image, (str, os.PathLike)) else image,
                                     o["do_convert_rgb"], o["input_data_format"])
                  for image in _flat_list_of_images(images)]
        cropped = set()  # thin strips: the crop region resized on the PIL path (MAX_RESIZED_PIXELS)
        if o["do_resize"] and o["do_center_crop"]:
            crop = o["crop_size"]["height"], o["crop_size"]["width"]
            for index, array in enumerate(arrays):
                height, width = resize_output_size(*array.shape[-2:], o["size"])
                if height * width > MAX_RESIZED_PIXELS:
                    arrays[index] = _resize_center_crop(array, height, width, o["resample"], *crop)
                    cropped.add(index)
        by_shape: dict[tuple, list[int]] = {}
        for index, array in enumerate(arrays):
            by_shape.setdefault((array.shape, array.dtype, index in cropped), []).append(index)
        outputs = []
        for (*_, done), indices in by_shape.items():
            # np.stack, not torch.stack: torch's CPU stack of uint8 tensors is ~100x slower here.
            batch = torch.from_numpy(np.stack([arrays[i] for i in indices]))
            options = {**settings, "do_resize": False, "do_center_crop": False} if done else settings
            outputs.append((indices, preprocess_tensor_batch(batch.to(device) if device is not None else batch,
                                                             **options)))
        if len({tuple(out.shape[1:]) for _, out in outputs}) == 1:
            first = outputs[0][1]
            result = first.new_empty((len(arrays), *first.shape[1:]))
            for indices, out in outputs:
                result[indices] = out
            return result
        ordered: list[Any] = [None] * len(arrays)
        for indices, out in outputs:
            for i, image in zip(indices, out):
                ordered[i] = image
        return ordered


# transformers' `post_process_semantic_segmentation` (its BEiT / DPT / SegFormer image processors).
def post_process_semantic_segmentation(outputs, target_sizes=None) -> list[torch.Tensor]:
    """`outputs.logits` (B, K, h, w) -> list of B (H, W) long tensors (argmax over classes).

    `target_sizes`: None (maps at the logits' resolution) or B (height, width) pairs (list or (B, 2) tensor):
    each image's logits are resized there (bilinear, align_corners=False) before the argmax.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
    if target_sizes is None:
        return list(logits.argmax(dim=1))
    if torch.is_tensor(target_sizes):
        target_sizes = target_sizes.tolist()
    if len(logits) != len(target_sizes):
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
    maps = []
    for logit, size in zip(logits, target_sizes):
        resized = F.interpolate(logit.unsqueeze(0), size=tuple(int(s) for s in size), mode="bilinear",
                                align_corners=False)
        maps.append(resized[0].argmax(dim=0))
    return maps


def preprocess_tensor_batch(images: torch.Tensor, *, do_resize: bool = True, size: int | dict[str, int] = 256,
                            resample: int = Image.Resampling.BICUBIC, do_center_crop: bool = True,
                            crop_size: int | dict[str, int] = 224, do_rescale: bool = True,
                            rescale_factor: float = 1 / 255, do_normalize: bool = True,
                            image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                            image_std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """The fast tensor path on a (B, C, H, W) batch of equal-sized images (uint8, or float used as is), on any
    device: torchvision bicubic antialiased resize, the same centre crop and zero padding as the PIL path, rescale
    and normalise in float32. NOT bit-identical to the PIL path (see `Dinov2ImageProcessor`)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    if images.ndim != 4:
        raise ValueError(f"preprocess_tensor_batch expects a (B, C, H, W) tensor, got shape {tuple(images.shape)}.")
    interpolation = {0: InterpolationMode.NEAREST_EXACT, 2: InterpolationMode.BILINEAR,
                     3: InterpolationMode.BICUBIC}.get(int(resample))
    if interpolation is None:
        raise ValueError(f"resample={resample} is not available on the torchvision backend (nearest 0, bilinear 2 "
                         f"and bicubic 3 are); use backend='pil'.")
    if do_resize:
        height, width = resize_output_size(*images.shape[-2:], _size_dict(size, "size", default_to_square=False))
        images = tvF.resize(images, [height, width], interpolation=interpolation, antialias=True)
    if do_center_crop:
        crop = _size_dict(crop_size, "crop_size", default_to_square=True)
        (top_pad, bottom_pad, left_pad, right_pad), top, left = crop_box(*images.shape[-2:], crop["height"],
                                                                         crop["width"])
        if top_pad or bottom_pad or left_pad or right_pad:
            images = torch.nn.functional.pad(images, (left_pad, right_pad, top_pad, bottom_pad))
        images = images[..., top:top + crop["height"], left:left + crop["width"]]
    images = images.to(torch.float32) if not images.is_floating_point() else images.clone()
    if do_rescale and do_normalize:  # fused, in place: (x - mean / s) / (std / s) is (x * s - mean) / std
        mean = torch.tensor(image_mean, dtype=torch.float64) / rescale_factor
        std = torch.tensor(image_std, dtype=torch.float64) / rescale_factor
        return images.sub_(mean.to(images)[:, None, None]).div_(std.to(images)[:, None, None])
    if do_rescale:
        return images.mul_(rescale_factor)
    if do_normalize:
        return tvF.normalize(images, list(image_mean), list(image_std), inplace=True)
    return images


def _as_return_type(pixel_values: torch.Tensor | list, return_tensors: str | None, device: Any) -> Any:
    """A list of per-image arrays (None), one numpy array ("np") or one torch tensor ("pt")."""
    if isinstance(pixel_values, torch.Tensor):  # a batch from the torchvision path
        if return_tensors is None:
            return list(pixel_values)
        return pixel_values.cpu().numpy() if return_tensors == "np" else pixel_values
    if return_tensors is None:
        return pixel_values
    shapes = {tuple(p.shape) for p in pixel_values}
    if len(shapes) > 1:
        raise ValueError(f"Cannot stack images of different sizes {sorted(shapes)} into one tensor: keep "
                         f"do_center_crop=True, or use return_tensors=None for a list.")
    if isinstance(pixel_values[0], torch.Tensor):
        stacked = torch.stack(pixel_values)
        return stacked.cpu().numpy() if return_tensors == "np" else stacked
    stacked = np.stack(pixel_values)
    if return_tensors == "np":
        return stacked
    tensor = torch.from_numpy(stacked)
    return tensor.to(device) if device is not None else tensor


class DINOv3ViTImageProcessor(Dinov2ImageProcessor):
    """transformers' `DINOv3ViTImageProcessor` (its torchvision pipeline, the only one it has), bit for bit, for
    PIL images, numpy arrays and torch tensors: RGB conversion as `Dinov2ImageProcessor`, then **rescale (x 1/255)
    before resizing**, a bilinear antialiased torchvision resize of the float image to 224x224 (squashed, no crop),
    and ImageNet normalisation (spec dinov3.md §3.4). Used by every DINOv3 repo, ViT and ConvNeXt, LVD and SAT (the
    SAT repos carry ImageNet statistics too; pass Meta's SAT mean/std to match Meta's README instead)."""

    processor_type = "DINOv3ViTImageProcessor"
    compatible_types = {"DINOv3ViTImageProcessor", "DINOv3ViTImageProcessorFast"}
    class_defaults = {"size": {"height": 224, "width": 224}, "resample": Image.Resampling.BILINEAR,
                      "do_center_crop": False, "image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}

    def __init__(self, do_resize: bool = True, size: int | dict[str, int] | None = None,
                 resample: int = Image.Resampling.BILINEAR, do_center_crop: bool = False,
                 crop_size: int | dict[str, int] | None = None, **kwargs: Any):
        size = {"height": size, "width": size} if isinstance(size, int) else size
        super().__init__(do_resize=do_resize, size=size or {"height": 224, "width": 224}, resample=resample,
                         do_center_crop=do_center_crop, crop_size=crop_size or 224, **kwargs)

    def _process_one(self, image: Any, options: dict[str, Any] | None = None) -> np.ndarray:
        """One image through transformers' order: rescale -> resize (float, antialiased) -> crop -> normalise."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        o = options if options is not None else self._options({})
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        x = torch.from_numpy(np.ascontiguousarray(_to_channels_first(image, o["do_convert_rgb"],
                                                                     o["input_data_format"])))
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"Empty image of shape {tuple(x.shape)}.")
        if o["do_rescale"]:
            x = x * o["rescale_factor"]  # uint8 * float -> float32, as transformers' `rescale`
        if o["do_resize"]:
            modes = {0: InterpolationMode.NEAREST_EXACT, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
            if int(o["resample"]) not in modes:
                raise ValueError(f"resample={o['resample']} is not supported (nearest 0, bilinear 2, bicubic 3 are)")
            height, width = resize_output_size(*x.shape[-2:], o["size"])
            x = tvF.resize(x, [height, width], interpolation=modes[int(o["resample"])], antialias=True)
        if o["do_center_crop"]:
            (top_pad, bottom_pad, left_pad, right_pad), top, left = crop_box(*x.shape[-2:], o["crop_size"]["height"],
                                                                             o["crop_size"]["width"])
            x = F.pad(x, (left_pad, right_pad, top_pad, bottom_pad))
            x = x[..., top:top + o["crop_size"]["height"], left:left + o["crop_size"]["width"]]
        if o["do_normalize"]:
            x = tvF.normalize(x.to(torch.float32), list(o["image_mean"]), list(o["image_std"]))
        return x.numpy()

    def _torchvision_batch(self, images: Any, o: dict[str, Any], device: Any) -> list[np.ndarray]:
        # One pipeline whatever the backend: transformers' (there is no PIL variant of this processor).
        return [self._process_one(image, o) for image in _flat_list_of_images(images)]


# Note: constructed directly, it has the DINOv2 defaults, not transformers' class defaults (CLIP mean/std, 224);
# from_pretrained() reads a config exactly as transformers does.
BitImageProcessor = Dinov2ImageProcessor


class AutoImageProcessor:
    """`AutoImageProcessor.from_pretrained(dir_or_hub_id)` -> `Dinov2ImageProcessor` or `DINOv3ViTImageProcessor`
    by the config's `image_processor_type`, as in transformers."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise TypeError("AutoImageProcessor is not instantiated directly: use AutoImageProcessor.from_pretrained("
                        "dir_or_hub_id), or Dinov2ImageProcessor(...).")

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Dinov2ImageProcessor:
        """The processor class named by the config's `image_processor_type` (DINOv2's Bit, or DINOv3's)."""
        path = resolve_file(pretrained_model_name_or_path, PREPROCESSOR_CONFIG_NAME,
                            revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
        try:
            kind = json.loads(Path(path).read_text()).get("image_processor_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None  # the class's own reader gives the full error
        cls = DINOv3ViTImageProcessor if kind in DINOv3ViTImageProcessor.compatible_types else Dinov2ImageProcessor
        return cls.from_pretrained(pretrained_model_name_or_path, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# A transform for datasets
# ----------------------------------------------------------------------------------------------------------------

class EvalTransform:
    """PIL image (or array/tensor/path) -> normalised (3, crop, crop) float32 tensor, through exactly the same
    function as `Dinov2ImageProcessor` (bit-identical). Picklable, so DataLoader workers can use it."""

    def __init__(self, processor: Dinov2ImageProcessor):
        self.processor = processor
        self._options = processor._options({})

    def __call__(self, image: Any) -> torch.Tensor:
        return torch.from_numpy(self.processor._process_one(image, self._options))

    def __repr__(self) -> str:  # names everything that changes the pixels (feature caches are keyed by it)
        o = self._options
        imagenet = (tuple(o["image_mean"]), tuple(o["image_std"])) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        normalization = "ImageNet mean/std" if imagenet else f"mean {list(o['image_mean'])}, std {list(o['image_std'])}"
        return (f"EvalTransform(resize shortest_edge={o['size'].get('shortest_edge', o['size'])}, "
                f"crop={o['crop_size']['height']}x{o['crop_size']['width']}, bicubic PIL, {normalization})")


def model_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a model's inputs are normalised with: its config's `image_mean` / `image_std` where it has them
    (the DINOv3 SAT-493M models have their own), else ImageNet's (DINOv2 and the other DINOv3 models)."""
    config = getattr(model, "config", model)
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    if mean is None or std is None:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def eval_transform(resize: int = 256, crop: int | tuple[int, int] = 224,
                   image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   image_std: Sequence[float] = IMAGENET_DEFAULT_STD) -> EvalTransform:
    """The DINOv2 evaluation transform (resize short side to `resize`, bicubic, centre crop `crop`, normalise) for
    torchvision datasets and DataLoaders; bit-identical to `Dinov2ImageProcessor` with the same settings."""
    return EvalTransform(Dinov2ImageProcessor(size={"shortest_edge": resize}, crop_size=crop, image_mean=image_mean,
                                              image_std=image_std))
