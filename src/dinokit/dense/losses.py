"""Meta's depth loss: the scale-invariant log loss `SigLoss` of the Monocular-Depth-Estimation-Toolbox that the
DINOv2 depth configs train with: sqrt(var(g) + 0.15 * mean(g)^2), g = log(pred + eps) - log(gt + eps), over the
pixels with 0 < gt <= max_depth (eps = 1e-3; torch.var is the unbiased variance, as in the toolbox)."""

from __future__ import annotations

import torch

SIGLOSS_LAMBDA = 0.15
SIGLOSS_EPS = 1e-3


def sigloss(pred: torch.Tensor, target: torch.Tensor, max_depth: float | None = None) -> torch.Tensor:
    valid = target > 0
    if max_depth is not None and max_depth != float("inf"):
        valid &= target <= max_depth
    if not bool(valid.any()):
        return pred.sum() * 0.0  # no labelled pixel: a zero that keeps the graph
    g = torch.log(pred[valid] + SIGLOSS_EPS) - torch.log(target[valid] + SIGLOSS_EPS)
    variance = torch.var(g) if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(variance + SIGLOSS_LAMBDA * g.mean() ** 2)
