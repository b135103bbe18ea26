"""Stochastic depth, in the two forms DINOv2 trains with (training.md §5)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class DropPath(nn.Module):
    """Classic per-sample drop-path: zero a sample's residual branch with probability p, scale survivors 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


def drop_add_residual_stochastic_depth(x: torch.Tensor, residual_func: Callable[[torch.Tensor], torch.Tensor],
                                       sample_drop_ratio: float) -> torch.Tensor:
    """Batch-subset stochastic depth: run the branch on a random subset of k samples only (real compute saved)
    and add it back scaled by B/k, as Meta's Block does for rates above 0.1."""
    b = x.shape[0]
    subset_size = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:subset_size]
    residual = residual_func(x[brange]).flatten(1)
    out = torch.index_add(x.flatten(1), 0, brange, residual.to(dtype=x.dtype), alpha=b / subset_size)
    return out.view_as(x)
