"""Batch collation with iBOT masks (Meta's dinov2/data/collate.py)."""

from __future__ import annotations

import random

import torch


def collate_data_and_cast(samples_list, mask_ratio_tuple, mask_probability, dtype, n_tokens=None, mask_generator=None):
    """Stack the crops of `samples_list` (items `(DataAugmentationDINO output, target)`) and draw the iBOT masks.

    Crops are stacked crop-major: global crop 0 of every image, then global crop 1 (likewise for local crops).
    Of the 2B global crops, the first `int(2B · mask_probability)` get a mask whose target size is drawn from its
    own stratum of `linspace(*mask_ratio_tuple, n + 1)` of the `n_tokens` patches, the others no mask; the masks
    are then shuffled. `n_tokens` defaults to the generator's grid size.

    Returns Meta's dict: collated_global_crops (2B, C, H, W), collated_local_crops (nB, C, h, w), collated_masks
    (2B, N) bool, mask_indices_list (flat indices of masked patches), masks_weight (1 / masked patches of each
    masked patch's image), upperbound (max possible masked patches, for fixed-size buffers), n_masked_patches (1,).
    """
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator (dinokit.ssl.MaskingGenerator) for the "
                         "iBOT masks; use mask_probability=0 to mask nothing.")
    if not samples_list:
        raise ValueError("collate_data_and_cast got an empty batch.")
    n_global_crops = len(samples_list[0][0]["global_crops"])
    n_local_crops = len(samples_list[0][0]["local_crops"])

    collated_global_crops = torch.stack([s[0]["global_crops"][i] for i in range(n_global_crops) for s in samples_list])
    collated_local_crops = (
        torch.stack([s[0]["local_crops"][i] for i in range(n_local_crops) for s in samples_list])
        if n_local_crops > 0
        else torch.empty(0)
    )

    masks = draw_masks(len(collated_global_crops), mask_ratio_tuple, mask_probability, n_tokens, mask_generator)
    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        **masks,
    }


def draw_masks(n_crops: int, mask_ratio_tuple, mask_probability, n_tokens=None, mask_generator=None) -> dict:
    """The iBOT masks of `n_crops` global crops (Meta's collate, training.md §7): collated_masks (n, N) bool,
    mask_indices_list, masks_weight, upperbound, n_masked_patches. Draws from Python's `random`."""
    B = n_crops
    N = mask_generator.num_patches if n_tokens is None else n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(torch.from_numpy(mask_generator(int(N * random.uniform(prob_min, prob_max)))))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.from_numpy(mask_generator(0)))

    random.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()

    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
