"""The bad-input corpus: every kind of awkward image file, generated into a folder on demand.

`CASES` maps a case name to `(kind, make)`: `make(folder)` writes the file into `folder` and returns its path;
kind "good" means every command must read it, "bad" that every command must refuse it cleanly (a listed skip, or
one error naming the file). Huge images are written as PNGs by hand (`constant_png`): an image of identical rows
compresses to a few hundred KB, so a 12,000 x 12,000 or 20,000 x 20,000 file costs almost nothing to make, and
PIL only learns its size from the header.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import DATASETS

NON_UTF8_NAME = b"\xff\xfe.png"  # not valid UTF-8: Python sees it as the surrogate-escaped str '\udcff\udcfe.png'


def smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful picture (gradients plus a block), so resizing and models see structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    pixels = np.stack([(x * 255 // max(width, 1) + base[0]) % 256, (y * 255 // max(height, 1) + base[1]) % 256,
                       ((x + y) * 2 + base[2]) % 256], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def constant_png(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit greyscale PNG of `width` x `height` zeros, written row by row (bounded memory, ~KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []  # filter byte 0 + the row
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def _zero_byte(folder: Path) -> Path:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def _truncated_jpeg(folder: Path) -> Path:
    whole = folder / "whole.tmp"
    smooth_rgb(64, 48).save(whole, format="JPEG", quality=95)
    path = folder / "truncated.jpg"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return path


def _text_as_jpg(folder: Path) -> Path:
    path = folder / "notes.jpg"
    path.write_text("These are my notes, not a photograph.\n" * 20)
    return path


def _png_alpha(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    rgba = np.concatenate([np.asarray(smooth_rgb(40, 30)), rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)], -1)
    path = folder / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _png_16bit_grey(folder: Path) -> Path:
    y, x = np.mgrid[0:30, 0:40]
    values = (1000 + (x * 40 + y * 800)).astype(np.uint16)  # 1,000 .. 25,760 of 65,535: a mid-grey ramp
    path = folder / "grey16.png"
    Image.fromarray(values).save(path)
    return path


def _cmyk_jpeg(folder: Path) -> Path:
    path = folder / "cmyk.jpg"
    smooth_rgb(40, 30, seed=2).convert("CMYK").save(path, format="JPEG")
    return path


def _palette_png(folder: Path) -> Path:
    path = folder / "palette.png"
    smooth_rgb(40, 30, seed=3).quantize(colors=16).save(path)
    return path


def _one_by_one(folder: Path) -> Path:
    path = folder / "one_pixel.png"
    Image.new("RGB", (1, 1), (200, 30, 40)).save(path)
    return path


def _three_by_five_hundred(folder: Path) -> Path:
    path = folder / "thin.png"
    smooth_rgb(3, 500, seed=4).save(path)
    return path


def _exif_rotated_jpeg(folder: Path) -> Path:
    path = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    smooth_rgb(48, 32, seed=5).save(path, format="JPEG", exif=exif)
    return path


def _animated_gif(folder: Path) -> Path:
    path = folder / "animated.gif"
    frames = [smooth_rgb(40, 30, seed=s).convert("P") for s in (6, 7, 8)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _webp(folder: Path) -> Path:
    path = folder / "picture.webp"
    smooth_rgb(40, 30, seed=9).save(path, format="WEBP")
    return path


def _bomb(folder: Path) -> Path:
    return constant_png(folder / "bomb.png", 20_000, 20_000)  # 400 M pixels: over twice PIL's limit


def _huge_12k(folder: Path) -> Path:
    return constant_png(folder / "huge_12k.png", 12_000, 12_000)  # 144 M pixels: in PIL's warn-only zone


def _symlink_loop(folder: Path) -> Path:
    path = folder / "loop.jpg"
    os.symlink(path.name, path)  # loop.jpg -> loop.jpg
    (folder / "cycle").mkdir()
    os.symlink("..", folder / "cycle" / "up")  # a folder link back up: listing must not recurse forever
    return path


def _unreadable(folder: Path) -> Path:
    """A valid PNG with mode 000. Under root that still reads: the test then makes the reader's open() raise
    PermissionError for this file (see `deny_reading`)."""
    path = folder / "locked.png"
    smooth_rgb(40, 30, seed=10).save(path)
    path.chmod(0)
    return path


def _non_utf8_name(folder: Path) -> Path:
    raw = os.fsencode(folder) + b"/" + NON_UTF8_NAME
    smooth_rgb(40, 30, seed=11).save(os.fsdecode(raw), format="PNG")
    return Path(os.fsdecode(raw))


def _dataset_file(*parts: str, pattern: str):
    def make(folder: Path) -> Path:
        import pytest

        root = DATASETS.joinpath(*parts)
        files = sorted(root.glob(pattern))[:1] if root.is_dir() else []
        if not files:
            pytest.skip(f"dataset {root} is not available (expected ../shared/datasets beside the repository)")
        path = folder / f"dataset_{files[0].name}"
        path.write_bytes(files[0].read_bytes())
        return path
    return make


CASES = {
    "zero_byte": ("bad", _zero_byte),
    "truncated_jpeg": ("bad", _truncated_jpeg),
    "text_renamed_jpg": ("bad", _text_as_jpg),
    "png_alpha": ("good", _png_alpha),
    "png_16bit_grey": ("good", _png_16bit_grey),
    "cmyk_jpeg": ("good", _cmyk_jpeg),
    "palette_png": ("good", _palette_png),
    "1x1": ("good", _one_by_one),
    "3x500": ("good", _three_by_five_hundred),
    "exif_rotated_jpeg": ("good", _exif_rotated_jpeg),
    "animated_gif": ("good", _animated_gif),
    "webp": ("good", _webp),
    "decompression_bomb": ("bad", _bomb),
    "png_12000x12000": ("bad", _huge_12k),
    "symlink_loop": ("bad", _symlink_loop),
    "unreadable_chmod_000": ("bad", _unreadable),
    "non_utf8_name": ("good", _non_utf8_name),
    "imagenette_jpeg": ("good", _dataset_file("imagenette", "val", "n01440764", pattern="*.JPEG")),
    "pennfudan_mask_png": ("good", _dataset_file("pennfudan", "masks", pattern="*.png")),
    "cifar10_jpg": ("good", _dataset_file("cifar10", "test", "airplane", pattern="*.jpg")),
}


def deny_reading(monkeypatch, path: Path) -> None:
    """Make `path` unreadable to dinokit's reader even under root (where mode 000 does not stop reads): its
    `open` raises PermissionError for that one file, as the kernel would for another user."""
    import builtins
    import errno

    from dinokit.data import images

    target = os.fsencode(path)

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsencode(file) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(target))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(images, "open", guarded_open, raising=False)
