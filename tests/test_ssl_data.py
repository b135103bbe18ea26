"""Training data: multi-crop augmentation (training.md §6), collation, unlabelled image datasets."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dinokit.data import DataAugmentationDINO, UnlabeledImageDataset, collate_data_and_cast, list_image_files
from dinokit.ssl import MaskingGenerator

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def _image(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _augmentation(**kwargs) -> DataAugmentationDINO:
    defaults = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=3,
                    global_crops_size=32, local_crops_size=16)
    return DataAugmentationDINO(**{**defaults, **kwargs})


# --- augmentation ----------------------------------------------------------------------------------------------


def test_photometric_probabilities_are_configurable_and_zero_keeps_colours():
    # A solid-colour image: with every photometric probability at 0 only the geometry acts, so each crop is the
    # normalised colour exactly; with Meta's defaults some of 40 draws must change it.
    image = Image.new("RGB", (40, 30), (200, 60, 30))
    expected = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(
        torch.tensor([200, 60, 30], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 32, 32))
    plain = _augmentation(color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, blur_probs=(0, 0, 0))
    for _ in range(10):
        out = plain(image)
        for crop in out["global_crops"]:
            assert torch.allclose(crop, expected, atol=1e-5)
    torch.manual_seed(0)
    default = _augmentation()
    changed = sum(not torch.allclose(default(image)["global_crops"][1], expected, atol=1e-3) for _ in range(40))
    assert changed > 20


def test_augmentation_returns_two_global_and_n_local_normalised_crops_in_metas_dict():
    out = _augmentation()(_image())
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [c.shape for c in out["global_crops"]] == [torch.Size([3, 32, 32])] * 2
    assert [c.shape for c in out["local_crops"]] == [torch.Size([3, 16, 16])] * 3
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    assert out["offsets"] == ()
    assert out["global_crops"][0].min() < 0  # ImageNet normalisation, not [0, 1]


def test_augmentation_uses_bicubic_crops_with_the_configured_scales():
    aug = _augmentation(global_crops_scale=(0.4, 0.9), local_crops_scale=(0.1, 0.2))
    global_crop, local_crop = aug.geometric_augmentation_global.transforms[0], aug.geometric_augmentation_local.transforms[0]
    assert global_crop.scale == (0.4, 0.9) and local_crop.scale == (0.1, 0.2)
    assert global_crop.interpolation == transforms.InterpolationMode.BICUBIC == local_crop.interpolation


def _blur_rate(pipeline, image, n=1000) -> float:
    """Share of calls in which the Gaussian blur of `pipeline` runs (its random-apply stage alone, the blur itself
    replaced by a counter, for speed)."""
    stages = [t for t in _walk(pipeline) if isinstance(t, transforms.RandomApply)
              and any(isinstance(c, transforms.GaussianBlur) for c in t.transforms)]
    assert len(stages) == 1
    blur = stages[0].transforms[0]
    assert blur.kernel_size == (9, 9) and blur.sigma == (0.1, 2.0)
    calls = []
    blur.forward = lambda img: calls.append(1) or img
    for _ in range(n):
        stages[0](image)
    return len(calls) / n


def _walk(transform):
    yield transform
    for child in getattr(transform, "transforms", []):
        yield from _walk(child)


@pytest.mark.parametrize(("blur_probs", "expected"), [("effective", (0.0, 0.9, 0.5)), ("nominal", (1.0, 0.1, 0.5))])
def test_blur_is_applied_at_the_effective_rates_by_default_and_nominal_on_request(blur_probs, expected):
    torch.manual_seed(0)
    aug = _augmentation(blur_probs=blur_probs)
    assert aug.blur_probs == expected
    image = _image((12, 12))
    rates = [_blur_rate(p, image) for p in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)]
    np.testing.assert_allclose(rates, expected, atol=0.05)


def test_solarize_only_on_the_second_global_crop():
    aug = _augmentation()
    solarize = [[t for t in _walk(p) if isinstance(t, transforms.RandomSolarize)]
                for p in (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)]
    assert [len(s) for s in solarize] == [0, 1, 0]
    assert solarize[1][0].p == 0.2 and solarize[1][0].threshold == 128


def test_unknown_blur_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="effective"):
        _augmentation(blur_probs="strong")


# --- collate ---------------------------------------------------------------------------------------------------


def test_collate_stacks_crops_crop_major_and_casts_to_the_requested_dtype():
    random.seed(0)
    aug = _augmentation(local_crops_number=2)
    samples = [(aug(_image(seed=i)), ()) for i in range(3)]
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.bfloat16, n_tokens=16,
                                mask_generator=MaskingGenerator(4, max_num_patches=8))
    assert out["collated_global_crops"].shape == (6, 3, 32, 32) and out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].shape == (6, 3, 16, 16)
    # crop-major: [image 0 crop 0, image 1 crop 0, image 2 crop 0, image 0 crop 1, ...]
    torch.testing.assert_close(out["collated_global_crops"][4], samples[1][0]["global_crops"][1].bfloat16())
    torch.testing.assert_close(out["collated_local_crops"][2].float(), samples[2][0]["local_crops"][0],
                               atol=2e-2, rtol=1e-2)
    assert out["collated_masks"].shape == (6, 16)


def test_collate_without_a_mask_generator_says_what_to_pass():
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast([({"global_crops": [], "local_crops": []}, ())], (0.1, 0.5), 0.5, torch.float32)


# --- datasets --------------------------------------------------------------------------------------------------


def _write_images(folder: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _image((8, 6), seed=i).save(path)


def test_dataset_finds_images_recursively_in_an_imagefolder_tree(tmp_path):
    _write_images(tmp_path, ["cats/a.jpg", "cats/b.PNG", "dogs/deep/c.png", "d.bmp"])
    (tmp_path / "notes.txt").write_text("not an image")
    _write_images(tmp_path, [".hidden/e.png", "._f.png"])
    dataset = UnlabeledImageDataset(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.paths] == ["cats/a.jpg", "cats/b.PNG", "d.bmp",
                                                                          "dogs/deep/c.png"]
    image, target = dataset[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == ()


def test_dataset_skips_corrupt_files_counts_and_logs_them(tmp_path, caplog):
    _write_images(tmp_path, ["0.png", "2.png"])
    (tmp_path / "1.jpg").write_bytes(b"definitely not a jpeg")
    good = tmp_path / "3.jpg"
    _image((64, 64)).save(good)
    (tmp_path / "4.jpg").write_bytes(good.read_bytes()[:200])  # truncated
    dataset = UnlabeledImageDataset(tmp_path, transform=transforms.ToTensor())
    assert len(dataset) == 5
    with caplog.at_level(logging.WARNING, logger="dinokit"):
        samples = [dataset[i][0] for i in range(len(dataset))]
    assert all(isinstance(s, torch.Tensor) for s in samples)
    torch.testing.assert_close(samples[1], samples[2])  # 1.jpg replaced by the next readable image, 2.png
    torch.testing.assert_close(samples[4], dataset[0][0])  # 4.jpg wraps around to 0.png
    assert dataset.num_skipped == 2 and {p.name for p in dataset.bad_files} == {"1.jpg", "4.jpg"}
    assert sum("Skipping unreadable image" in r.message for r in caplog.records) == 2  # once per file


def test_dataset_from_a_file_list_resolves_relative_paths(tmp_path):
    _write_images(tmp_path, ["imgs/a.png", "imgs/b.png"])
    listing = tmp_path / "train.txt"
    listing.write_text(f"# training images\nimgs/a.png\n\n{tmp_path / 'imgs' / 'b.png'}\n")
    dataset = UnlabeledImageDataset(listing)
    assert dataset.paths == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert dataset[1][0].size == (8, 6)
    assert list_image_files(tmp_path / "imgs" / "a.png") == [tmp_path / "imgs" / "a.png"]  # one image


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No image files"):
        UnlabeledImageDataset(tmp_path)


def test_folder_of_only_corrupt_images_is_a_clear_error(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="No readable image"):
        UnlabeledImageDataset(tmp_path)


def test_missing_source_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnlabeledImageDataset(tmp_path / "nowhere")


def test_real_cifar10_folder_through_augmentation_and_collate():
    root = DATASETS / "cifar10" / "test"
    if not root.is_dir():
        pytest.skip(f"real images not available at {root}")
    random.seed(0)
    aug = _augmentation(global_crops_scale=(0.32, 1.0), local_crops_number=2, global_crops_size=32,
                        local_crops_size=16)
    dataset = UnlabeledImageDataset(root, transform=aug)
    assert len(dataset) == 10_000
    batch = collate_data_and_cast([dataset[i] for i in range(0, 10_000, 2500)], (0.1, 0.5), 0.5, torch.float32,
                                  mask_generator=MaskingGenerator(8, max_num_patches=32))
    assert batch["collated_global_crops"].shape == (8, 3, 32, 32) and batch["collated_masks"].shape == (8, 64)
    assert dataset.num_skipped == 0
