"""DINOv2's multi-crop augmentation (Meta's dinov2/data/augmentations.py) on torchvision transforms.

Per image: 2 global crops and n local crops. Global: RandomResizedCrop(bicubic) + flip; local likewise at a
smaller size and scale. Every crop: colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (kernel 9, sigma
0.1-2.0), ImageNet normalisation; the second global crop is also solarized (p 0.2). The three photometric
probabilities are arguments (Meta's values by default) for data where colour carries the signal.

Blur probabilities: Meta's GaussianBlur(p) wraps torchvision's RandomApply with 1 - p, so the nominal rates
1.0 / 0.1 / 0.5 (global 1 / global 2 / local) were applied as 0.0 / 0.9 / 0.5. Those EFFECTIVE rates trained the
released checkpoints and are the default here; `blur_probs="nominal"` gives the rates the paper states.
"""

from __future__ import annotations

import logging

from torchvision import transforms

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

BLUR_PROBS = {"effective": (0.0, 0.9, 0.5), "nominal": (1.0, 0.1, 0.5)}


def random_gaussian_blur(p: float) -> transforms.RandomApply:
    """Blur with probability `p` (the probability of blurring, not Meta's inverted one)."""
    return transforms.RandomApply([transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


class DataAugmentationDINO:
    """Callable on a PIL image; returns Meta's dict: `global_crops` (2 tensors), `global_crops_teacher` (the same
    2 tensors), `local_crops` (`local_crops_number` tensors) and `offsets` (())."""

    def __init__(
        self,
        global_crops_scale,
        local_crops_scale,
        local_crops_number,
        global_crops_size=224,
        local_crops_size=96,
        blur_probs="effective",
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        solarize_prob=0.2,
    ):
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_probs = _resolve_blur_probs(blur_probs)
        logger.info(
            "DINO augmentation: global %d x %s px scale %s, local %d x %s px scale %s, blur p %s",
            2, global_crops_size, global_crops_scale, local_crops_number, local_crops_size, local_crops_scale,
            self.blur_probs,
        )

        bicubic = transforms.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )
        self.geometric_augmentation_local = transforms.Compose(
            [
                transforms.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
                transforms.RandomHorizontalFlip(p=0.5),
            ]
        )

        color_jittering = transforms.Compose(
            [
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                    p=color_jitter_prob,
                ),
                transforms.RandomGrayscale(p=grayscale_prob),
            ]
        )
        blur_global1, blur_global2, blur_local = self.blur_probs
        global_transfo1_extra = random_gaussian_blur(blur_global1)
        global_transfo2_extra = transforms.Compose(
            [random_gaussian_blur(blur_global2), transforms.RandomSolarize(threshold=128, p=solarize_prob)]
        )
        local_transfo_extra = random_gaussian_blur(blur_local)

        self.normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)]
        )

        self.global_transfo1 = transforms.Compose([color_jittering, global_transfo1_extra, self.normalize])
        self.global_transfo2 = transforms.Compose([color_jittering, global_transfo2_extra, self.normalize])
        self.local_transfo = transforms.Compose([color_jittering, local_transfo_extra, self.normalize])

    def __call__(self, image):
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": [global_crop_1, global_crop_2],
            "global_crops_teacher": [global_crop_1, global_crop_2],
            "local_crops": local_crops,
            "offsets": (),
        }


def _resolve_blur_probs(blur_probs) -> tuple[float, float, float]:
    if isinstance(blur_probs, str):
        if blur_probs not in BLUR_PROBS:
            raise ValueError(f"blur_probs={blur_probs!r}: use 'effective' (0.0/0.9/0.5, as the released "
                             f"checkpoints were trained), 'nominal' (1.0/0.1/0.5) or a tuple of 3 probabilities.")
        return BLUR_PROBS[blur_probs]
    probs = tuple(float(p) for p in blur_probs)
    if len(probs) != 3 or not all(0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"blur_probs={blur_probs!r}: expected 3 probabilities in [0, 1] for global crop 1, "
                         "global crop 2 and the local crops.")
    return probs
