"""`dinokit track VIDEO` on container files (MP4, MKV) decoded with PyAV: the `video` extra."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.zeroshot.video import open_frames

from helpers import save_tiny_model

av = pytest.importorskip("av", reason="MP4 input needs the `video` extra: pip install 'dinokit[video]'")

WIDTH, HEIGHT, FRAMES = 64, 48, 10
PALETTE = [0, 0, 0, 10, 200, 30]


def encoder() -> str:
    for codec in ("mpeg4", "libx264"):
        if codec in av.codecs_available:
            try:
                av.codec.Codec(codec, "w")
                return codec
            except Exception:  # listed but built without its encoder
                continue
    pytest.skip("this PyAV build has neither an mpeg4 nor an libx264 encoder to write the test video")


def square_frames():
    """A red square moving 4 px right per frame over a fixed random texture, and its first-frame mask."""
    texture = np.random.default_rng(0).integers(40, 160, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = []
    for t in range(FRAMES):
        image = texture.copy()
        image[12:28, 4 + 4 * t:20 + 4 * t] = (230, 20, 20)
        frames.append(image)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[12:28, 4:20] = 1
    return frames, mask


def write_mp4(path, frames, rotation=None, options=None):
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(encoder(), rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_mask(path, mask):
    image = Image.fromarray(mask, mode="P")
    image.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
    image.save(path)
    return path


def track(source, first, model, out):
    return main(["track", str(source), "--mask", str(first), "--model", model, "-o", str(out), "--short-side", "28",
                 "--preset", "dinov3", "--quiet"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    frames, mask = square_frames()
    return {"video": write_mp4(folder / "clip.mp4", frames), "first": write_mask(folder / "first.png", mask),
            "model": save_tiny_model(folder / "model"), "folder": folder}


def test_track_on_an_mp4_writes_one_mask_per_frame_at_its_size_with_the_first_masks_palette(clip, tmp_path):
    assert track(clip["video"], clip["first"], clip["model"], tmp_path / "out") == 0
    written = sorted(p.name for p in (tmp_path / "out").glob("0*.png"))
    assert written == [f"{i:05d}.png" for i in range(FRAMES)]
    for name in written:
        with Image.open(tmp_path / "out" / name) as mask:
            assert mask.mode == "P" and mask.size == (WIDTH, HEIGHT)
            assert mask.getpalette()[:6] == PALETTE


def test_masks_of_an_mp4_equal_those_of_its_frames_decoded_to_png(clip, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    with av.open(str(clip["video"])) as container:  # the same decoder, read independently of dinokit's reader
        for i, frame in enumerate(container.decode(video=0)):
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(frames / f"{i:05d}.png")
    assert i == FRAMES - 1
    assert track(clip["video"], clip["first"], clip["model"], tmp_path / "from_video") == 0
    assert track(frames, clip["first"], clip["model"], tmp_path / "from_frames") == 0
    for i in range(FRAMES):
        with Image.open(tmp_path / "from_video" / f"{i:05d}.png") as a, \
                Image.open(tmp_path / "from_frames" / f"{i:05d}.png") as b:
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"frame {i}"


def refused(capsys, argv, message, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "dinokit track: error:" in err and argv[1] in err  # names the file
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("faststart", [False, True], ids=["index-at-end", "index-at-front"])
def test_a_truncated_mp4_is_one_error_line_and_no_output_folder(clip, tmp_path, capsys, faststart):
    # index at the front: the cut file still opens and lists 10 frames, but decodes fewer
    whole = write_mp4(tmp_path / "whole.mp4", square_frames()[0], options={"movflags": "faststart"} if faststart
                      else None).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    message = "is truncated: its container lists 10 frames" if faststart else "cannot decode the video"
    refused(capsys, ["track", str(tmp_path / "cut.mp4"), "--mask", str(clip["first"]), "--model", clip["model"],
                     "-o", str(out)], message, out)


def test_a_file_named_mp4_that_is_not_a_video_is_one_error_line_and_no_output_folder(clip, tmp_path, capsys):
    (tmp_path / "notes.mp4").write_text("these are notes, not a video\n")
    out = tmp_path / "out"
    refused(capsys, ["track", str(tmp_path / "notes.mp4"), "--mask", str(clip["first"]), "--model", clip["model"],
                     "-o", str(out)], "cannot decode the video", out)


def test_a_container_without_a_frame_count_is_counted_by_decoding(tmp_path):
    frames, _ = square_frames()
    path = write_mp4(tmp_path / "clip.mkv", frames[:7])
    with av.open(str(path)) as container:
        listed = container.streams.video[0].frames
    source = open_frames(path)
    assert listed == 0 and len(source) == 7 and source.size == (WIDTH, HEIGHT)
    assert [image.size for image in source] == [(WIDTH, HEIGHT)] * 7


def test_a_rotated_phone_video_is_read_upright_as_ffmpeg_shows_it(tmp_path):
    if not hasattr(av.VideoFrame, "rotation"):
        pytest.skip("this PyAV release does not read the display matrix (no VideoFrame.rotation)")
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[:8, :8] = 255  # the stored top-left corner
    path = write_mp4(tmp_path / "portrait.mp4", [frame] * 3, rotation=90)  # 90 degrees counter-clockwise
    source = open_frames(path)
    assert source.size == (HEIGHT, WIDTH) and len(source) == 3
    upright = np.asarray(next(iter(source)))[..., 0] > 200
    assert upright.shape == (WIDTH, HEIGHT)
    assert upright[-8:, :8].all() and upright.sum() == 64  # turned counter-clockwise: now bottom-left
