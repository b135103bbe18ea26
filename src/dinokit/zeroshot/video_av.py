"""MP4 / AVI / MOV / MKV / WebM frames for `dinokit track`, decoded with PyAV (the `video` extra).

PyAV is used directly rather than through imageio: imageio's video plugin is itself a wrapper of PyAV (or of an
ffmpeg subprocess), and going direct gives what the checks below need and imageio hides -- the container's own
frame count, the display-matrix rotation of each frame and FFmpeg's error types -- with one dependency less.

`probe` decodes the whole video once, one frame at a time (nothing is kept), before anything is written:
- the frame count is the number of frames that decode, so a container that records no count (MKV and WebM often
  do not) still gets an exact one;
- a container that records a count but decodes fewer frames is a truncated file (an MP4 whose index sits at the
  front survives being cut and silently decodes only its first frames): refused, not tracked half-way;
- every frame must share the first one's size.
`frames` then decodes it again, one frame at a time, and refuses a video that no longer matches its probe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image

# FFmpeg's display-matrix angle (counter-clockwise, what players apply) -> the PIL transpose that shows it upright
_ROTATIONS = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
              -180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270, -270: Image.Transpose.ROTATE_90}


def _av(path: Path):
    from dinokit.extras import optional_import

    return optional_import("av", purpose=f"decoding the {path.suffix} video {path.name} (or give a folder of its "
                                         f"frames: ffmpeg -i {path.name} frames/%05d.png)")


def _decoded(path: Path) -> Iterator:
    """PyAV's video frames of `path`, as decoded (no colour conversion yet)."""
    from dinokit.data.images import display_path

    av = _av(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{display_path(path)} has no video stream (audio only?): give a video file")
        yield from container.decode(container.streams.video[0])


def _listed_count(path: Path) -> int:
    """The frame count the container records (0: none recorded)."""
    av = _av(path)
    with av.open(str(path)) as container:
        return int(container.streams.video[0].frames or 0) if container.streams.video else 0


def _upright(frame) -> Image.Image:
    image = frame.to_image()  # RGB24 by FFmpeg's swscale, as every PyAV reader gets it
    # phones store portrait video as landscape pixels plus this angle; PyAV releases without `VideoFrame.rotation`
    # read as 0 (not turned). A mirroring display matrix (rare) is not applied.
    turn = _ROTATIONS.get(int(round(getattr(frame, "rotation", 0) or 0)))
    return image.transpose(turn) if turn is not None else image


def _upright_size(frame) -> tuple[int, int]:
    turned = int(round(getattr(frame, "rotation", 0) or 0)) in (90, -90, 270, -270)
    return (frame.height, frame.width) if turned else (frame.width, frame.height)


def _refusal(path: Path, exc: Exception) -> ValueError:
    from dinokit.data.images import display_path

    reason = getattr(exc, "strerror", None) or str(exc)  # FFmpeg's own words, without the path repeated
    return ValueError(f"cannot decode the video {display_path(path)} ({type(exc).__name__}: {reason}): re-encode it "
                      f"or extract its frames to a folder (ffmpeg -i {path.name} frames/%05d.png)")


def probe(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height) upright) of a video file; every problem is one ValueError (see the notes)."""
    from dinokit.data.images import display_path

    av = _av(path)  # a missing PyAV is MissingExtraError, naming the extra, not "cannot decode"
    count, size = 0, None
    try:
        listed = _listed_count(path)
        for frame in _decoded(path):
            if size is None:
                size = _upright_size(frame)
            elif _upright_size(frame) != size:
                raise ValueError(f"{display_path(path)}: frame {count} is {frame.width} x {frame.height}, the first "
                                 f"{size[0]} x {size[1]}: re-encode it at one size")
            count += 1
    except (av.FFmpegError, OSError, EOFError, RuntimeError) as exc:  # PyAV's errors subclass ValueError too
        raise _refusal(path, exc) from None
    if count == 0:
        raise ValueError(f"the video {display_path(path)} has no frames that decode: re-encode it")
    if count < listed:
        raise ValueError(f"the video {display_path(path)} is truncated: its container lists {listed} frames but "
                         f"only {count} decode; re-encode or re-download it")
    return count, size


def frames(path: Path, count: int) -> Iterator[Image.Image]:
    """The `count` frames `probe` found, upright RGB, decoded one at a time."""
    from dinokit.data.images import display_path

    av = _av(path)
    seen = 0
    try:
        for frame in _decoded(path):
            seen += 1
            if seen > count:
                break
            yield _upright(frame)
    except (av.FFmpegError, OSError, EOFError, RuntimeError) as exc:
        raise _refusal(path, exc) from None
    if seen != count:  # the file changed since it was probed
        raise ValueError(f"the video {display_path(path)} decoded {seen} frames, not the {count} found before "
                         f"tracking started: was it modified? Run again")
