"""iBOT block masking and the masks drawn by the collate function (training.md §7)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinokit.data import collate_data_and_cast
from dinokit.ssl import MaskingGenerator

GRID = 16  # 224 / 14
N = GRID * GRID
MASK_RATIO = (0.1, 0.5)


def _generator() -> MaskingGenerator:
    return MaskingGenerator(input_size=(GRID, GRID), max_num_patches=0.5 * N)  # as Meta's train.py


def _fake_batch(batch_size: int) -> list:
    crops = {"global_crops": [torch.zeros(3, 4, 4)] * 2, "local_crops": [torch.zeros(3, 2, 2)] * 2}
    return [(crops, ()) for _ in range(batch_size)]


def test_mask_reaches_nearly_its_target_and_never_exceeds_it():
    random.seed(0)
    generator = _generator()
    for _ in range(500):
        target = int(N * random.uniform(*MASK_RATIO))
        mask = generator(target)
        assert mask.shape == (GRID, GRID) and mask.dtype == bool
        assert 0.9 * target <= mask.sum() <= target


def test_each_rectangle_adds_at_most_max_num_patches_new_cells():
    random.seed(1)
    deltas = []

    class RecordingGenerator(MaskingGenerator):
        def _mask(self, mask, max_mask_patches):
            delta = super()._mask(mask, max_mask_patches)
            deltas.append(delta)
            return delta

    generator = RecordingGenerator(input_size=(GRID, GRID), max_num_patches=20)
    for _ in range(30):
        assert generator(100).sum() <= 100
    assert max(deltas) <= 20 and max(deltas) > 10


def test_mask_of_zero_patches_is_empty_and_square_size_may_be_an_int():
    generator = MaskingGenerator(8, max_num_patches=32)
    assert generator.get_shape() == (8, 8) and generator.num_patches == 64
    assert not generator().any()
    assert "8, 8" in repr(generator)


def test_mask_is_made_of_rectangles_not_scattered_cells():
    random.seed(2)
    generator = _generator()
    mask = generator(40)
    # in a union of rectangles most masked cells have a masked 4-neighbour
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbours[mask]).mean() > 0.9


def test_generator_without_a_budget_explains_how_to_set_it():
    with pytest.raises(ValueError, match="max_num_patches"):
        MaskingGenerator(GRID)(10)


def test_collate_masks_half_the_global_crops_with_stratified_ratios_within_bounds():
    random.seed(3)
    batch_size = 8  # 16 global crops
    generator = _generator()
    probs = torch.linspace(*MASK_RATIO, 8 + 1)
    masked_shares, positions_masked = [], np.zeros(2 * batch_size)
    for _ in range(60):
        out = collate_data_and_cast(_fake_batch(batch_size), MASK_RATIO, 0.5, torch.float32, n_tokens=N,
                                    mask_generator=generator)
        counts = out["collated_masks"].sum(1).numpy()
        masked = np.sort(counts[counts > 0])
        assert out["collated_masks"].shape == (16, N)
        assert len(masked) == 8  # int(16 * 0.5) crops masked, the others not at all
        # the k-th smallest mask comes from stratum k: target in [N p_k, N p_k+1), reached to >= 90 %
        for k, count in enumerate(masked):
            assert 0.9 * int(N * probs[k]) <= count <= int(N * probs[k + 1])
        assert masked.max() <= 0.5 * N
        assert counts.sum() <= out["upperbound"]
        masked_shares += list(masked / N)
        positions_masked += counts > 0
    # stratified U(0.1, 0.5): mean share 0.3, slightly less because the generator may stop short
    assert 0.27 < np.mean(masked_shares) <= 0.3
    assert positions_masked.min() > 0  # masks are shuffled over the crops


def test_collate_mask_bookkeeping_is_consistent():
    random.seed(4)
    out = collate_data_and_cast(_fake_batch(3), MASK_RATIO, 0.5, torch.float32, mask_generator=_generator())
    masks = out["collated_masks"]
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    per_image = masks.sum(1).clamp(min=1)
    expected_weights = torch.repeat_interleave(1.0 / per_image, masks.sum(1))
    torch.testing.assert_close(out["masks_weight"], expected_weights)
    # weights sum to the number of masked crops: each masked image contributes 1 in the iBOT loss
    assert out["masks_weight"].sum().item() == pytest.approx(int((masks.sum(1) > 0).sum()))


def test_collate_with_mask_probability_zero_masks_nothing():
    out = collate_data_and_cast(_fake_batch(4), MASK_RATIO, 0.0, torch.float32, mask_generator=_generator())
    assert not out["collated_masks"].any() and out["n_masked_patches"].item() == 0 and out["upperbound"] == 0
