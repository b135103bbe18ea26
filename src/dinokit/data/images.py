"""The one image-file reader of dinokit, and the one way of listing image files in a folder.

Every command that reads image files (embed, eval, finetune, classify, pca, search, train, the processor given
paths) goes through `read_image`, so one file gives the same pixels, and the same refusal, everywhere.

Policy of `read_image(path)` -> an RGB `PIL.Image`, or `ImageReadError` (a ValueError) naming the file, the problem
and, where there is one, the fix. `ImageReadError.reason` is the problem alone (for error lists that have a path
column already).
- Size first: `Image.open` only reads the header, so width x height is checked before any pixel is decoded. More
  than `pixel_limit()` pixels (PIL's `Image.MAX_IMAGE_PIXELS`, 89,478,485 by default) is refused as a possible
  decompression bomb -- also between 1x and 2x the limit, where PIL itself only warns. A 12,000 x 12,000 PNG is
  therefore refused after reading a few header bytes. Raise `PIL.Image.MAX_IMAGE_PIXELS` to accept larger files.
- Then the whole file is decoded (`load()`), so a truncated JPEG fails here rather than turning grey later.
  (Unless something set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`: PIL then fills the missing part.)
- The EXIF orientation is applied (`ImageOps.exif_transpose`), as transformers' `load_image` does.
- 16-bit and wider greyscale (modes I;16, I;16B, I;16L, I;16N, I) is scaled to 8 bits as round(v * 255 / 65535)
  -- the PNG specification's recommended sample-depth scaling (exact at 0 and 65535, never off by more than half
  a level, unlike v >> 8 which always rounds down). Mode I values are taken as 16-bit samples (what PIL gives for
  16-bit files in some formats) and clipped to [0, 65535]. Float images (mode F) are taken as [0, 1], clipped.
  This DIVERGES from transformers: its `load_image` calls `convert("RGB")`, which clips every value above 255,
  so an ordinary 16-bit photograph comes out (almost) all white.
- Transparency (an alpha band, or a palette/`transparency` entry) is composited onto WHITE by `pil_to_rgb`, the
  function `Dinov2ImageProcessor` applies to PIL images (transformers 5.x `convert_to_rgb`), so a file read here
  gives exactly the pixels the processor gives for the same image opened with PIL. This DIVERGES from
  transformers' `load_image` for paths, which drops the alpha band (`convert("RGB")`), showing whatever colour
  the transparent pixels happen to hold.
- Multi-frame files (animated GIF, multi-page TIFF): the first frame.

Listing (`find_image_files`): a folder is walked recursively without following symbolic links to folders (so a
link loop cannot recurse); hidden files and folders are skipped; every entry with an image extension is kept,
including broken or looping links and unreadable files, so that reading them fails with a reason that ends up in
the command's error list instead of the file silently vanishing. A sub-folder that cannot be listed is logged.

File names that are not valid UTF-8 (on POSIX, bytes such as b'\\xff\\xfe.jpg') are read like any other file;
where a name has to become text (Parquet columns, printed lines), `display_path` writes each undecodable byte as
`\\xNN`, e.g. '\\xff\\xfe.jpg': readable, storable, but not a name you can open as it is.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# The image extensions every command lists in a folder (lower case). Files named explicitly are tried whatever
# their extension.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I")


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file, the problem and the fix."""

    def __init__(self, path, reason: str, fix: str = ""):
        self.path, self.reason, self.fix = display_path(path), reason, fix
        super().__init__(f"Cannot read image file '{self.path}': {reason}." + (f" {fix}" if fix else ""))


class ImageTooLargeError(ImageReadError):
    """More pixels than the limit: refused as a possible decompression bomb, before decoding."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The image file does not exist (also a FileNotFoundError)."""


def display_path(path) -> str:
    """`path` as printable, storable text: bytes that are not UTF-8 are written `\\xNN` (see the module notes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def pixel_limit() -> int | None:
    """The most pixels a file may have: PIL's `Image.MAX_IMAGE_PIXELS` (None: no limit), read at each call."""
    return Image.MAX_IMAGE_PIXELS


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers 5.x `convert_to_rgb`: transparency (an alpha band or a `transparency` entry, e.g. a palette
    image) is composited onto white; every other mode goes through PIL's `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def to_eight_bits(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale scaled to 8-bit "L" (see the module notes); other modes are returned as they are."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.float64), 0, 65535) * (255 / 65535)
    elif image.mode == "F":
        values = np.clip(np.asarray(image).astype(np.float64), 0.0, 1.0) * 255
    else:
        return image
    return Image.fromarray(np.round(values).astype(np.uint8), "L")


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as RGB, decoded completely, or `ImageReadError` (see the module notes)."""
    path = os.path.expanduser(path) if isinstance(path, (str, Path)) else path
    try:
        size = os.stat(path).st_size
        handle = open(path, "rb")  # noqa: SIM115 -- closed below; opened here so permission errors are ours
    except FileNotFoundError:
        raise ImageNotFoundError(path, "the file does not exist", "Check the path.") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied", "Make the file readable by this user (chmod).") from None
    except IsADirectoryError:
        raise ImageReadError(path, "it is a folder, not a file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(path, "symbolic link loop", "Fix or remove the link.") from None
        raise ImageReadError(path, f"cannot open it ({exc.strerror or exc})") from None
    with handle:
        if size == 0:
            raise ImageReadError(path, "empty file (0 bytes)", "Re-copy the file or remove it from the input.")
        return _decode(handle, path)


def read_image_bytes(data: bytes, name: str, *, draft_size: int | None = None) -> Image.Image:
    """An encoded image held in memory (e.g. a member of a WebDataset tar shard, an upload) as RGB, under exactly
    the policy of `read_image`; `name` (e.g. 'shard.tar#key.jpg') is what an `ImageReadError` names.

    draft_size: let a JPEG decode at a reduced scale no smaller than this (thumbnails); None decodes it whole."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)", "Re-copy the file or remove it from the input.")
    return _decode(io.BytesIO(data), name, draft_size)


def _decode(handle, path, draft_size: int | None = None) -> Image.Image:
    """Header check, full decode, EXIF orientation, 8 bits, transparency on white (the module notes)."""
    image = _open_checked(handle, path)
    with image:
        try:
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()  # decode everything now: truncation and corruption surface here
            upright = ImageOps.exif_transpose(image)
            return pil_to_rgb(to_eight_bits(upright))
        except MemoryError:
            raise ImageReadError(path, f"not enough memory to decode {image.width} x {image.height} pixels",
                                 "Downscale the file.") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError...
            kind = f"{image.format} " if image.format else ""
            raise ImageReadError(path, f"truncated or corrupt {kind}data ({type(exc).__name__}: {exc})",
                                 "Re-encode the file or remove it from the input.") from None


def _open_checked(handle, path) -> Image.Image:
    """`Image.open` (header only), refusing files over the pixel limit before anything is decoded."""
    limit = pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below, at 1x
            image = Image.open(handle)
    except Image.DecompressionBombError as exc:  # PIL's own refusal, above 2x the limit
        raise ImageTooLargeError(path, f"refused as a possible decompression bomb ({exc})", _bomb_fix()) from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (PIL cannot identify image file: unknown format, or a "
                                   "file of another kind with an image extension)",
                             "Remove it from the input or convert it to PNG/JPEG.") from None
    except Exception as exc:  # a header so broken that the format's parser fails
        raise ImageReadError(path, f"corrupt image header ({type(exc).__name__}: {exc})",
                             "Re-encode the file or remove it from the input.") from None
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageTooLargeError(path, f"{width} x {height} = {width * height:,} pixels is over the limit of "
                                   f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS): refused as a possible decompression "
                                   f"bomb, without decoding it", _bomb_fix())
    return image


def _bomb_fix() -> str:
    return "Downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."


def find_image_files(root: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    """Sorted image files below the folder `root` (see the module notes: links to folders are not followed,
    hidden entries are skipped, broken and looping links are kept so that reading them reports them)."""
    extensions = tuple(e.lower() for e in extensions)
    found = []

    def unlistable(error: OSError) -> None:
        logger.warning("Skipping folder %s: it cannot be listed (%s)", display_path(error.filename or "?"),
                       error.strerror or error)

    for folder, subfolders, files in os.walk(root, onerror=unlistable):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder) / f for f in files if not f.startswith(".") and f.lower().endswith(extensions)]
    return sorted(found)
