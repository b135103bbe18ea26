"""Batched multi-crop augmentation (`crops.backend: tensor`): each vectorised step against torchvision's
per-image functional op, the crop-box law, crop order, determinism, and the loader that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinokit.data import BatchDataAugmentationDINO
from dinokit.data.batch_augmentations import color_jitter, gaussian_blur, random_resized_boxes
from dinokit.ssl.loader import build_dataset, build_loader
from dinokit.ssl.train_config import load_train_config

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def _images(n=6, size=(20, 28), seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _plain(**kwargs) -> BatchDataAugmentationDINO:
    defaults = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=3,
                    global_crops_size=16, local_crops_size=8, blur_probs=(0, 0, 0), color_jitter_prob=0.0,
                    grayscale_prob=0.0, solarize_prob=0.0)
    return BatchDataAugmentationDINO(**{**defaults, **kwargs})


def test_full_image_crop_without_photometric_steps_is_the_normalised_image_or_its_mirror():
    images = _images(size=(16, 16))
    global_crops, local_crops = _plain(global_crops_scale=(1, 1), local_crops_scale=(1, 1))(images)
    reference = (images.float() / 255 - MEAN) / STD
    for crops in (global_crops[:6], global_crops[6:]):
        plain = (crops - reference).abs().amax(dim=(1, 2, 3))
        mirrored = (crops - reference.flip(-1)).abs().amax(dim=(1, 2, 3))
        assert torch.all(torch.minimum(plain, mirrored) < 1e-5)
    assert local_crops.shape == (18, 3, 8, 8)


def test_crops_are_crop_major_like_the_pil_collate():
    # Image i is a solid grey level i: crop k of image i must sit at row k * B + i.
    images = torch.stack([torch.full((3, 12, 12), 40 * i, dtype=torch.uint8) for i in range(4)])
    global_crops, local_crops = _plain()(images)
    level = (global_crops * STD + MEAN)[:, 0, 0, 0] * 255
    assert torch.allclose(level, torch.tensor([0, 40, 80, 120] * 2, dtype=torch.float32), atol=1e-3)
    level = (local_crops * STD + MEAN)[:, 0, 0, 0] * 255
    assert torch.allclose(level, torch.tensor([0, 40, 80, 120] * 3, dtype=torch.float32), atol=1e-3)


def test_box_law_is_torchvisions_random_resized_crop():
    sizes = torch.tensor([[30, 40], [64, 20], [9, 9]])
    boxes = random_resized_boxes(sizes, 400, (0.2, 0.6), generator=torch.Generator().manual_seed(0))
    heights = sizes[:, 0].repeat_interleave(400).float()
    widths = sizes[:, 1].repeat_interleave(400).float()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= widths) and torch.all(boxes[:, 3] <= heights)
    assert torch.all(w == w.round()) and torch.all(boxes == boxes.round())
    area = w * h / (heights * widths)
    # Integer rounding of the sides widens the range slightly on small images.
    assert area.min() > 0.12 and area.max() < 0.75
    assert 0.3 < float(area[:400].mean()) < 0.5
    # The fallback (no fit in 10 tries): a 1x50 strip cannot hold a 3/4..4/3 box of 20-60% area.
    # torchvision then takes the centre crop at the nearest allowed aspect: h = 1, w = round(4/3) = 1, x0 = 24.
    fallback = random_resized_boxes(torch.tensor([[1, 50]]), 1, (0.2, 0.6))
    assert fallback.tolist() == [[24.0, 0.0, 25.0, 1.0]]


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_each_colour_adjustment_matches_torchvision(name):
    x = torch.rand(5, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    strengths = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    strengths[name] = 0.4 if name != "hue" else 0.1
    generator = torch.Generator().manual_seed(2)
    out = color_jitter(x.clone(), torch.ones(5, dtype=torch.bool), generator=generator, **strengths)
    # Replay the factor draws: four uniform vectors in the fixed order brightness, contrast, saturation, hue.
    generator = torch.Generator().manual_seed(2)
    draws = {k: torch.empty(5).uniform_(1 - strengths[k], 1 + strengths[k], generator=generator)
             for k in ("brightness", "contrast", "saturation")}
    draws["hue"] = torch.empty(5).uniform_(-strengths["hue"], strengths["hue"], generator=generator)
    adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[name]
    expected = torch.stack([adjust(x[i], float(draws[name][i])) for i in range(5)])
    assert (out - expected).abs().max() < 1e-5


def test_colour_jitter_leaves_unselected_crops_alone():
    x = torch.rand(6, 3, 5, 5)
    apply = torch.tensor([True, False, True, False, False, True])
    out = color_jitter(x.clone(), apply)
    assert torch.equal(out[~apply], x[~apply])
    assert not torch.equal(out[apply], x[apply])


def test_gaussian_blur_matches_torchvision_per_crop_sigma():
    x = torch.rand(4, 3, 12, 10, generator=torch.Generator().manual_seed(3))
    apply = torch.tensor([True, True, False, True])
    out = gaussian_blur(x.clone(), apply, generator=torch.Generator().manual_seed(4))
    sigmas = torch.empty(4).uniform_(0.1, 2.0, generator=torch.Generator().manual_seed(4))
    for i in range(4):
        expected = TF.gaussian_blur(x[i], [9, 9], [float(sigmas[i])] * 2) if apply[i] else x[i]
        assert (out[i] - expected).abs().max() < 1e-5


def test_grayscale_and_solarize_at_probability_one():
    images = _images(4, size=(16, 16))
    global_crops, local_crops = _plain(grayscale_prob=1.0, solarize_prob=1.0)(images)
    pixels = global_crops * STD + MEAN
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)
    # Solarize (>= 128 inverted) only on the second global crop: its pixels are all below 0.5 then.
    assert pixels[4:].max() < 0.5 + 1e-5 and pixels[:4].max() > 0.6


def test_same_generator_seed_gives_the_same_crops_and_another_seed_others():
    augmentation = BatchDataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 16, 8)
    images = list(_images(3, size=(24, 30)))
    a = augmentation(images, torch.Generator().manual_seed(7))
    b = augmentation(images, torch.Generator().manual_seed(7))
    c = augmentation(images, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_images_of_different_sizes_are_cropped_inside_their_own_pixels():
    # A white image beside a large black one: every crop of the white image must stay white (no padding inside).
    images = [torch.full((3, 10, 14), 255, dtype=torch.uint8), torch.zeros(3, 40, 33, dtype=torch.uint8)]
    global_crops, local_crops = _plain()(images)
    white = (global_crops * STD + MEAN)[[0, 2]]
    assert torch.allclose(white, torch.ones_like(white), atol=1e-4)


def test_a_non_rgb_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="RGB uint8 tensors"):
        _plain()([torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8)])


def _folder(root, n=10):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_tensor_backend_loader_batches_are_seeded_by_sample_number(tmp_path):
    cfg = load_train_config("cpu_tiny_cifar", ["crops.backend=tensor", "train.batch_size_per_gpu=4",
                                               "train.num_workers=0", "crops.local_crops_number=2"])
    dataset = build_dataset(cfg, _folder(tmp_path / "images"))
    assert dataset[0][0].dtype == torch.uint8
    stream = iter(build_loader(cfg, dataset))
    batches = [next(stream) for _ in range(3)]
    first = batches[0]
    assert first["collated_global_crops"].shape == (8, 3, 32, 32)
    assert first["collated_local_crops"].shape == (8, 3, 16, 16)
    assert first["collated_masks"].shape == (8, 64)
    assert first["mask_indices_list"].numel() == int(first["n_masked_patches"])
    resumed = next(iter(build_loader(cfg, dataset, start_iteration=2)))
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
        assert torch.equal(resumed[key], batches[2][key])


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="crops.backend"):
        load_train_config("cpu_tiny_cifar", ["crops.backend=gpu"])


def test_crop_statistics_match_the_pil_backend():
    # The two backends draw the same augmentation law: over many crops of smooth images, per-channel mean and
    # spread of the normalised crops agree (bilinear vs bicubic resampling differs only at pixel level).
    from dinokit.data import DataAugmentationDINO

    rng = np.random.default_rng(5)
    pictures = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)
                for _ in range(16)]
    kwargs = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=2,
                  global_crops_size=32, local_crops_size=16)
    torch.manual_seed(0)
    pil = DataAugmentationDINO(**kwargs)
    pil_crops = torch.stack([c for _ in range(8) for p in pictures for c in pil(p)["global_crops"]])
    batch = BatchDataAugmentationDINO(**kwargs)
    tensors = [TF.pil_to_tensor(p) for p in pictures] * 8
    tensor_crops, _ = batch(tensors, torch.Generator().manual_seed(0))
    for reduce in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
        assert (reduce(pil_crops) - reduce(tensor_crops)).abs().max() < 0.12
