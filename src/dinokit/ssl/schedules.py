"""Per-iteration schedules of DINOv2 training (Meta's CosineScheduler) and the learning-rate scaling rule."""

from __future__ import annotations

import math

import numpy as np


class CosineScheduler:
    """Value per iteration: `freeze_iters` zeros, then a linear warmup from `start_warmup_value` to `base_value`
    over `warmup_iters` (end point included), then a cosine from `base_value` to `final_value` over the rest.
    Indexing at or past `total_iters` gives `final_value`. `schedule` is a numpy array that may be edited (Meta
    zeroes the start of the last layer's lr schedule to freeze it)."""

    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        super().__init__()
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"CosineScheduler: warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters "
                f"({total_iters}). Shorten the warmup/freeze or train for more iterations."
            )
        self.final_value = final_value
        self.total_iters = total_iters

        freeze_schedule = np.zeros(freeze_iters)
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)

        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))

        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it):
        if it >= self.total_iters:
            return self.final_value
        return self.schedule[it]

    def __len__(self):
        return self.total_iters


def scaled_lr(base_lr: float, total_batch_size: int, scaling_rule: str = "sqrt_wrt_1024") -> float:
    """DINOv2's lr scaling: `base_lr · sqrt(total_batch / 1024)` ("sqrt_wrt_1024", Meta's default) or
    `base_lr · total_batch / 1024` ("linear_wrt_1024"); base_lr is quoted per 1024 images."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_1024":
        return base_lr * total_batch_size / 1024.0
    raise ValueError(f"Unknown lr scaling rule {scaling_rule!r}; use 'sqrt_wrt_1024' or 'linear_wrt_1024'.")
