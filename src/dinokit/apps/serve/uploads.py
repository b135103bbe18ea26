"""Bytes from the network (or a collection file) to an RGB image, or one clear refusal.

All image decoding of `dinokit serve` goes through `decode_upload`, written to the project's image-reading
policy (to be shared as `dinokit.data.images`; swap it in here when it lands):
- decompression bombs are refused from the header, before any pixel is decoded: more than PIL's
  MAX_IMAGE_PIXELS, including the zone where PIL itself only warns;
- EXIF orientation is applied;
- transparency is composited onto white, as `Dinov2ImageProcessor` does (`dinokit.processing._pil_to_rgb`);
- 16-bit greyscale is scaled to 8 bits instead of being clipped to white.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinokit.processing import _pil_to_rgb


class BadImage(ValueError):
    """An upload that is not an image we will decode; `status` is the HTTP status to answer with."""

    status = 400


class UnreadableImage(BadImage):
    """Not an image, an empty upload, or damaged/truncated image data (400)."""


class ImageTooLarge(BadImage):
    """A well-formed image with more pixels than the limit: a decompression bomb (422)."""

    status = 422


def _check_pixels(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                            f"{limit:,} (PIL's MAX_IMAGE_PIXELS): refused as a possible decompression bomb")


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    # convert("RGB") clips 16-bit values at 255, turning most of the picture white; scale 0..65535 to 0..255.
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(array / 257), 0, 255).astype(np.uint8), mode="L")
    return image


def decode_upload(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode the whole image in `data` to RGB, or raise UnreadableImage / ImageTooLarge saying why.

    draft_size: let JPEG decode at a reduced scale no smaller than this (for thumbnails).
    """
    if not data:
        raise UnreadableImage("the upload is empty (0 bytes)")
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; such files are decompression bombs to us too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise UnreadableImage(f"not an image file of a format PIL can read ({len(data):,} bytes; "
                                  f"send a JPEG, PNG, WebP, GIF, BMP or TIFF file)") from None
        except Exception as exc:  # a header PIL recognises but cannot parse
            raise UnreadableImage(f"the image header is damaged ({type(exc).__name__}: {exc})") from None
        _check_pixels(*image.size)
        try:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()  # decodes everything now, so truncated data fails here and not later
            image = ImageOps.exif_transpose(image)
            return _pil_to_rgb(_sixteen_bit_to_8(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"refused as a possible decompression bomb ({exc})") from None
        except Exception as exc:  # truncated or corrupt pixel data: PIL raises OSError, SyntaxError, ...
            raise UnreadableImage(f"the image data is damaged or truncated ({type(exc).__name__}: {exc})") from None
