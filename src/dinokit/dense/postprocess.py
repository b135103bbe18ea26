"""transformers' `post_process_semantic_segmentation` (as in its BEiT / DPT / SegFormer image processors):
logits -> one (H, W) class-index map per image, bilinearly resized to `target_sizes` when given."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def post_process_semantic_segmentation(outputs, target_sizes=None) -> list[torch.Tensor]:
    """`outputs.logits` (B, K, h, w) -> list of B (H, W) long tensors (argmax over classes).

    `target_sizes`: None (maps at the logits' resolution) or B (height, width) pairs (list or (B, 2) tensor):
    each image's logits are resized there (bilinear, align_corners=False) before the argmax.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
    if target_sizes is None:
        return list(logits.argmax(dim=1))
    if torch.is_tensor(target_sizes):
        target_sizes = target_sizes.tolist()
    if len(logits) != len(target_sizes):
        raise ValueError("Make sure that you pass in as many target sizes as the batch dimension of the logits")
    maps = []
    for logit, size in zip(logits, target_sizes):
        resized = F.interpolate(logit.unsqueeze(0), size=tuple(int(s) for s in size), mode="bilinear",
                                align_corners=False)
        maps.append(resized[0].argmax(dim=0))
    return maps
