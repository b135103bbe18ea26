"""One small image cannot take the machine: every path that resizes an image's short side keeps its patch tokens
within the bound (`dinokit.data.token_bound`), and centre-cropping paths never build the whole resized strip.

Each entry point runs on a thin (2 x 900), a wide (5000 x 20) and a large (2000 x 2000) image with a tiny random
model; a guard on the patch embedding records the token count of every image that reaches a model and stops one
over the bound at once (before the fix, a 2 x 900 PNG reached `dinokit pca` as 460,800 tokens)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

import dinokit
from dense_helpers import depth_dataset, seg_dataset
from dinokit.cli import main
from dinokit.layers.patch_embed import PatchEmbed

from helpers import randomize_

BOUND = 4096  # the documented default
SIZES = {"thin": (2, 900), "wide": (5000, 20), "large": (2000, 2000)}  # (width, height)


def _picture(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    if width * height > 1_000_000:  # a smooth picture: a small file that decodes to many pixels
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
        pixels = ramp.astype(np.uint8)
    else:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    return {name: _picture(folder / f"{name}.png", *size) for name, size in SIZES.items()}


@pytest.fixture
def tokens_seen(monkeypatch):
    """Patch-token counts of every input a model embeds; an input over the bound fails the test right there."""
    seen = []
    forward = PatchEmbed.forward

    def guarded(self, x):
        p = self.patch_size[0]
        tokens = (x.shape[-2] // p) * (x.shape[-1] // p)
        seen.append(tokens)
        if tokens > BOUND:
            raise AssertionError(f"{x.shape[-2]} x {x.shape[-1]} pixels = {tokens:,} patch tokens reached the model")
        return forward(self, x)

    monkeypatch.setattr(PatchEmbed, "forward", guarded)
    monkeypatch.delenv("DINOKIT_MAX_PATCH_TOKENS", raising=False)
    return seen


def _tiny(path, patch_size=14):
    config = dinokit.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                  patch_size=patch_size)
    randomize_(dinokit.Dinov2Model(config), seed=0).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("backbone") / "model")


# -- the bound itself ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("height, width", [(448, 796), (796, 448), (518, 920), (448, 448), (448, 1792)])
def test_ordinary_photos_at_the_default_sizes_are_left_exactly_as_planned(patch, height, width):
    from dinokit.data.token_bound import bounded_size

    assert bounded_size(height, width, patch) == (height, width)  # 16:9 at 448 and 518, square, 4:1 at 448


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("height, width", [(201600, 448), (448, 112000), (448, 448 * 60), (14, 14 * 100000)])
def test_thin_and_wide_plans_shrink_into_the_bound_keeping_their_aspect(patch, height, width):
    from dinokit.data.token_bound import bounded_size, patch_tokens

    new_h, new_w = bounded_size(height, width, patch)
    assert new_h % patch == 0 and new_w % patch == 0 and min(new_h, new_w) >= patch
    assert patch_tokens(new_h, new_w, patch) <= BOUND
    assert patch_tokens(new_h, new_w, patch) > BOUND // 2  # not shrunk further than needed
    if min(new_h, new_w) > patch:  # aspect kept to within a patch on each side
        assert abs(math.log((new_w / new_h) / (width / height))) < math.log(1 + 1 / (min(new_h, new_w) // patch))


def test_an_extreme_strip_becomes_one_row_of_at_most_the_bound():
    from dinokit.data.token_bound import bounded_size

    assert bounded_size(14, 14 * 10**6, 14) == (14, 14 * BOUND)
    assert bounded_size(14 * 10**6, 14, 14) == (14 * BOUND, 14)


def test_the_environment_variable_raises_the_bound_and_a_bad_value_is_refused(monkeypatch):
    from dinokit.data.token_bound import bounded_size, max_patch_tokens

    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "20000")
    assert max_patch_tokens() == 20000 and bounded_size(1400, 1400, 14) == (1400, 1400)
    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "lots")
    with pytest.raises(ValueError, match="DINOKIT_MAX_PATCH_TOKENS='lots' is not a positive whole number"):
        max_patch_tokens()


# -- dinokit pca, and the function the server's /api/pca calls ------------------------------------------------------

@pytest.mark.parametrize("patch", [14, 16])
def test_pca_of_thin_wide_and_large_images_stays_within_the_bound(pictures, tokens_seen, tmp_path, patch):
    from dinokit.apps.pca import draw_pca_picture

    model = _tiny(tmp_path / "model", patch)
    picture = draw_pca_picture([pictures["thin"], pictures["wide"], pictures["large"]], model=str(model),
                               size=448)
    assert len(tokens_seen) == 3 and max(tokens_seen) <= BOUND
    assert tokens_seen[0] > BOUND // 2 and tokens_seen[1] > BOUND // 2  # shrunk to the bound, not below it
    (thin_box, _), (wide_box, _), (large_box, _) = picture.boxes
    assert thin_box[3] - thin_box[1] > 10 * (thin_box[2] - thin_box[0])  # still tall and narrow
    assert wide_box[2] - wide_box[0] > 10 * (wide_box[3] - wide_box[1])  # still wide and low
    assert large_box[2] - large_box[0] == large_box[3] - large_box[1] == 448  # an ordinary size is untouched


def test_the_servers_pca_picture_of_an_uploaded_strip_stays_within_the_bound(backbone, tokens_seen):
    from dinokit.apps.pca import draw_pca_picture

    upload = Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 2, 3), dtype=np.uint8))
    model = dinokit.load_model(str(backbone))
    picture = draw_pca_picture([upload], model=model, size=224)  # as `Collection.pca_png` calls it
    assert tokens_seen and max(tokens_seen) <= BOUND and picture.image.height > picture.image.width


def test_pca_command_on_a_thin_png_writes_its_picture(pictures, backbone, tokens_seen, tmp_path, capsys):
    out = tmp_path / "pca.png"
    assert main(["pca", str(pictures["thin"]), "--model", str(backbone), "-o", str(out)]) == 0
    assert Image.open(out).height > 10 * Image.open(out).width and max(tokens_seen) <= BOUND


def test_pca_refuses_a_size_over_the_bound_in_one_line(pictures, backbone, tokens_seen, capsys):
    assert main(["pca", str(pictures["large"]), "--model", str(backbone), "--size", "1120", "-o", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dinokit pca: error: --size 1120 gives 6,400 patch tokens for a square image, over the bound of "
                   "4,096 per image: use --size 896 or less, or raise the bound with DINOKIT_MAX_PATCH_TOKENS=6400."]
    assert not tokens_seen  # refused before any image reached the model


# -- segment and depth, train and predict --------------------------------------------------------------------------

DENSE = ["--size", "112", "--iterations", "3", "--batch-size", "2", "--quiet", "--no-cache"]


def _with_strips(root, kind):
    """A training folder of ordinary images plus the thin and the wide image, with their targets."""
    (seg_dataset if kind == "masks" else depth_dataset)(root, n=2)
    for name, (width, height) in (("thin", SIZES["thin"]), ("wide", SIZES["wide"])):
        _picture(root / "images" / f"{name}.png", width, height)
        if kind == "masks":
            target = np.zeros((height, width), np.uint8)
            target[: height // 2] = 1
            Image.fromarray(target, mode="L").save(root / "masks" / f"{name}.png")
        else:
            Image.fromarray(np.full((height, width), 2000, np.uint16)).save(root / "depth" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def segmenter(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenter")
    out = root / "model"
    assert main(["segment", "train", "--model", str(backbone), "--train", str(seg_dataset(root / "train", n=2)),
                 "--val", str(seg_dataset(root / "val", n=2, seed=1)), "--output", str(out), *DENSE]) == 0
    return out


@pytest.fixture(scope="module")
def depther(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("depther")
    out = root / "model"
    assert main(["depth", "train", "--model", str(backbone), "--train", str(depth_dataset(root / "train", n=2)),
                 "--val", str(depth_dataset(root / "val", n=2, seed=1)), "--output", str(out), "--layers", "1",
                 *DENSE]) == 0
    return out


def test_segment_predict_on_thin_wide_and_large_images_gives_full_size_masks(pictures, segmenter, tokens_seen,
                                                                             tmp_path):
    from dinokit.dense.data import read_mask

    pred = tmp_path / "pred"
    assert main(["segment", "predict", *map(str, pictures.values()), "--model", str(segmenter), "-o", str(pred),
                 "--quiet"]) == 0
    assert len(tokens_seen) == 3 and max(tokens_seen) <= BOUND
    for name, (width, height) in SIZES.items():
        assert read_mask(pred / f"{name}.png").shape == (height, width)  # at the image's own resolution


def test_depth_predict_on_thin_wide_and_large_images_gives_full_size_maps(pictures, depther, tokens_seen,
                                                                          tmp_path):
    pred = tmp_path / "pred"
    assert main(["depth", "predict", *map(str, pictures.values()), "--model", str(depther), "-o", str(pred),
                 "--quiet"]) == 0
    assert len(tokens_seen) == 3 and max(tokens_seen) <= BOUND
    for name, size in SIZES.items():
        assert Image.open(pred / f"{name}_depth16.png").size == size


def test_segment_train_on_a_folder_with_strips_stays_within_the_bound(backbone, tokens_seen, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "1024")  # a lower bound, set as a user would (and faster)
    out = tmp_path / "out"
    assert main(["segment", "train", "--model", str(backbone), "--train", str(_with_strips(tmp_path / "t", "masks")),
                 "--val", str(_with_strips(tmp_path / "v", "masks")), "--output", str(out), *DENSE]) == 0
    assert len(tokens_seen) == 8 and 512 < max(tokens_seen) <= 1024
    assert json.loads((out / "metrics.json").read_text())["val_images"] == 4


def test_depth_train_on_a_folder_with_strips_stays_within_the_bound(backbone, tokens_seen, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("DINOKIT_MAX_PATCH_TOKENS", "1024")
    out = tmp_path / "out"
    assert main(["depth", "train", "--model", str(backbone), "--train", str(_with_strips(tmp_path / "t", "depth")),
                 "--val", str(_with_strips(tmp_path / "v", "depth")), "--output", str(out), "--layers", "1",
                 *DENSE]) == 0
    assert len(tokens_seen) == 8 and 512 < max(tokens_seen) <= 1024
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["rmse"])


def test_dense_commands_refuse_a_size_over_the_bound_before_computing_features(backbone, tokens_seen, tmp_path,
                                                                          capsys):
    train = seg_dataset(tmp_path / "train", n=2)
    out = tmp_path / "out"
    args = ["--model", str(backbone), "--train", str(train), "--val", str(train), "--output", str(out),
            "--iterations", "1", "--quiet", "--no-cache", "--size", "1008"]
    assert main(["segment", "train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size 1008 gives 5,184 patch tokens" in err[0] and "DINOKIT_MAX_PATCH_TOKENS" in err[0]
    assert not tokens_seen and not out.exists()


# -- centre-cropping paths (embed, search, eval): bounded by the crop, and never a whole resized strip --------------

@pytest.fixture
def largest_resize(monkeypatch):
    """The largest output any PIL resize is asked for; a resize to over 2^24 pixels fails the test before it runs
    (a 1 x 20,000 strip at short side 256 would be 256 x 5,120,000 pixels: 13.5 GB and 43 s in `dinokit embed`)."""
    seen = [0]
    resize = Image.Image.resize

    def guarded(self, size, *args, **kwargs):
        seen[0] = max(seen[0], size[0] * size[1])
        if size[0] * size[1] > 1 << 24:
            raise AssertionError(f"a resize to {size[0]} x {size[1]} pixels")
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)
    from torchvision.transforms.v2 import functional as tvF

    tensor_resize = tvF.resize

    def guarded_tensor(images, size, *args, **kwargs):  # the torchvision backend's resize
        guarded_size = (size[1], size[0])
        seen[0] = max(seen[0], size[0] * size[1])
        if size[0] * size[1] > 1 << 24:
            raise AssertionError(f"a resize to {guarded_size[0]} x {guarded_size[1]} pixels")
        return tensor_resize(images, size, *args, **kwargs)

    monkeypatch.setattr(tvF, "resize", guarded_tensor)
    return seen


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_centre_crop_of_a_thin_strip_resizes_only_the_crop(largest_resize, backend):
    from dinokit.processing import Dinov2ImageProcessor

    rng = np.random.default_rng(0)
    strips = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(1, 20000, 3),
                                                                                         (20000, 1, 3)]]
    pixels = Dinov2ImageProcessor(backend=backend)(strips, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224) and bool(pixels.isfinite().all())
    assert largest_resize[0] <= 1 << 24


def test_resizing_only_the_crop_stays_close_to_the_whole_resize(monkeypatch):
    import dinokit.processing as processing

    rng = np.random.default_rng(1)
    for shape, mean, most in [((3, 700, 3), 0.01, 2), ((700, 3, 3), 0.01, 2), ((40, 900, 3), 0.01, 2),
                              ((900, 40, 3), 0.01, 2), ((1500, 50, 3), 1.0, 40)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        whole = processing.Dinov2ImageProcessor()(image, return_tensors="np")["pixel_values"]
        monkeypatch.setattr(processing, "MAX_RESIZED_PIXELS", 0)  # every image takes the crop-region path
        region = processing.Dinov2ImageProcessor()(image, return_tensors="np")["pixel_values"]
        monkeypatch.undo()
        levels = np.abs(whole - region) * np.array(processing.IMAGENET_DEFAULT_STD)[:, None, None] * 255
        assert levels.mean() < mean and levels.max() <= most + 0.01, (shape, levels.mean(), levels.max())
