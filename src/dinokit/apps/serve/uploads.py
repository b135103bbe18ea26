"""Bytes from the network (or a collection file) to an RGB image, or one clear refusal.

All image decoding of `dinokit serve` goes through `decode_upload`, which is the project's one image reader
(`dinokit.data.images`: bombs refused from the header, full decode, EXIF orientation, transparency on white,
16-bit scaled), with its refusals sorted into the HTTP statuses the API answers with.
"""

from __future__ import annotations

from PIL import Image

from dinokit.data.images import ImageReadError, ImageTooLargeError, read_image_bytes


class BadImage(ValueError):
    """An upload that is not an image we will decode; `status` is the HTTP status to answer with."""

    status = 400


class UnreadableImage(BadImage):
    """Not an image, an empty upload, or damaged/truncated image data (400)."""


class ImageTooLarge(BadImage):
    """A well-formed image with more pixels than the limit: a decompression bomb (422)."""

    status = 422


def decode_upload(data: bytes, *, draft_size: int | None = None, name: str = "upload") -> Image.Image:
    """Decode the whole image in `data` to RGB, or raise UnreadableImage (400) / ImageTooLarge (422) saying why.

    draft_size: let JPEG decode at a reduced scale no smaller than this (for thumbnails).
    """
    try:
        return read_image_bytes(data, name, draft_size=draft_size)
    except ImageTooLargeError as exc:
        raise ImageTooLarge(f"the {name}: {exc.reason}") from None
    except ImageReadError as exc:
        raise UnreadableImage(f"the {name}: {exc.reason}") from None
