"""Frames of a video for `dinokit track`: a folder of image files (sorted by name, DAVIS's layout) or one video
file, read one frame at a time.

Video files: animated GIF / WebP / multi-page TIFF (and APNG) are decoded with Pillow; other containers (MP4,
AVI, MOV, MKV, WebM) with PyAV (`video_av`, the `video` extra), else refused with the install command.
Everything is checked before the first output is written: every frame file's size from its header (all must be
equal); a video file is decoded once, frame by frame, for its exact frame count and size."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageSequence

from dinokit.zeroshot import video_av

PIL_VIDEOS = (".gif", ".webp", ".tif", ".tiff", ".png", ".apng")
OTHER_VIDEOS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
_EXIF_ORIENTATION = 0x0112


@dataclass
class FrameSource:
    """Names (output stems) and a lazy reader of the frames of one video."""

    path: Path
    names: list[str]
    size: tuple[int, int]  # (width, height)
    files: list[Path] | None = None  # for a folder

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Image.Image]:
        if self.files is not None:
            yield from _read_files(self.files, self.size)
        elif self.path.suffix.lower() in PIL_VIDEOS:
            yield from _pil_frames(self.path)
        else:
            yield from video_av.frames(self.path, len(self.names))


def open_frames(path: str | os.PathLike) -> FrameSource:
    """The frames of a folder of images or of a video file; every problem found here is one ValueError."""
    from dinokit.data.images import display_path, find_image_files

    path = Path(path).expanduser()
    if path.is_dir():
        files = find_image_files(path)
        if not files:
            raise ValueError(f"{display_path(path)} holds no image files: give a folder of frames (e.g. "
                             f"00000.jpg, 00001.jpg, ...) or a video file")
        sizes = {}
        for file in files:
            sizes.setdefault(_header_size(file), []).append(file)
        if len(sizes) > 1:
            (first_size, _), *others = sorted(sizes.items(), key=lambda item: -len(item[1]))
            odd = [f"{display_path(f.name)} ({s[0]} x {s[1]})" for s, fs in others for f in fs][:5]
            more = " ..." if sum(len(f) for _, f in others) > 5 else ""
            raise ValueError(f"the frames in {display_path(path)} have different sizes: most are {first_size[0]} x "
                             f"{first_size[1]} but {', '.join(odd)}{more} differ; resize them to one size (a video's "
                             f"frames share one size)")
        names = [f.stem for f in files]
        if len(set(names)) != len(names):
            raise ValueError(f"two frames in {display_path(path)} share a name stem: output masks are named by stem")
        return FrameSource(path, names, next(iter(sizes)), files)
    if not path.exists():
        raise FileNotFoundError(f"{display_path(path)} does not exist: give a folder of frames or a video file")
    suffix = path.suffix.lower()
    if suffix not in PIL_VIDEOS + OTHER_VIDEOS:
        raise ValueError(f"{display_path(path)} is neither a folder of frames nor a video file "
                         f"({', '.join(PIL_VIDEOS + OTHER_VIDEOS)})")
    count, size = _probe(path)
    return FrameSource(path, [f"{i:05d}" for i in range(count)], size)


def _header_size(file: Path) -> tuple[int, int]:
    """(width, height) as `read_image` will return it (EXIF orientation applied), from the header only."""
    from dinokit.data.images import ImageReadError, read_image

    try:
        with warnings.catch_warnings():  # the reader applies the pixel limit itself, when it decodes
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except Exception as exc:
        read_image(file)  # names the file and the problem, as every command does
        raise ImageReadError(file, f"unreadable header ({type(exc).__name__})") from None
    return width, height


def _read_files(files: list[Path], size: tuple[int, int]) -> Iterator[Image.Image]:
    from dinokit.data.images import display_path, read_image

    for file in files:
        image = read_image(file)
        if image.size != size:  # a header that lied (cannot happen with well-formed files)
            raise ValueError(f"{display_path(file)} decodes to {image.width} x {image.height}, not {size[0]} x "
                             f"{size[1]} like the other frames")
        yield image


def _pil_frames(path: Path) -> Iterator[Image.Image]:
    with Image.open(path) as video:
        for frame in ImageSequence.Iterator(video):
            yield frame.convert("RGB")


def _probe(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) of a video file, decoding its frames once (sizes are checked too)."""
    from dinokit.data.images import display_path

    if path.suffix.lower() not in PIL_VIDEOS:
        return video_av.probe(path)
    count, size = 0, None
    try:
        for frame in _pil_frames(path):
            if size is None:
                size = frame.size
            elif frame.size != size:
                raise ValueError(f"{display_path(path)}: frame {count} is {frame.width} x {frame.height}, the first "
                                 f"{size[0]} x {size[1]}")
            count += 1
    except ValueError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, EOFError, struct.error, RuntimeError...
        raise ValueError(f"cannot decode the video {display_path(path)} ({type(exc).__name__}: {exc}): re-encode "
                         f"it or extract its frames to a folder") from None
    if count == 0:
        raise ValueError(f"the video {display_path(path)} has no frames")
    return count, size
