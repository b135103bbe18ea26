"""report.html's pictures: thumbnails fill their cells whatever the image size, selected ones framed."""

from __future__ import annotations

from PIL import Image

from dinokit.curate import report


def test_thumbnails_of_small_and_wide_images_fill_their_cells_centred_and_selected_ones_are_framed(tmp_path):
    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(small)  # CIFAR-sized: scaled up, not left in a corner
    Image.new("RGB", (128, 64), (0, 0, 255)).save(wide)  # scaled down to 64 x 32, centred vertically
    assert report.thumbnails_png(tmp_path / "t.png", [str(small), str(wide)], [("row", [0, 1], {0})], size=64)
    picture = Image.open(tmp_path / "t.png").convert("RGB")
    x0, x1, y = 150, 150 + 64 + 6, 6  # cell origins (labels take the first 150 px; 6 px between cells)
    for dx, dy in ((2, 2), (32, 32), (61, 61)):  # the small image covers its whole cell
        assert picture.getpixel((x0 + dx, y + dy)) == (255, 0, 0), (dx, dy)
    assert picture.getpixel((x0 - 1, y + 32)) == (0x22, 0xAA, 0x22)  # selected: framed
    assert picture.getpixel((x1 + 32, y + 32)) == (0, 0, 255) and picture.getpixel((x1 + 2, y + 17)) == (0, 0, 255)
    assert picture.getpixel((x1 + 32, y + 4)) == (255, 255, 255)  # letterboxed above the wide image
    assert picture.getpixel((x1 - 1, y + 32)) == (255, 255, 255)  # not selected: no frame
