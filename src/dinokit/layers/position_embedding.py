"""Learned absolute position embeddings, resampled to the input's patch grid (model.md §3).

The three reference behaviours are selected by two numbers:
- offset > 0 (Meta without registers, transformers <= 4.44): `scale_factor=((h0+offset)/M, (w0+offset)/M)`;
- offset == 0 and antialias (Meta `_reg`, transformers with-registers, timm): `size=(h0, w0), antialias=True`;
- offset == 0, no antialias (transformers Dinov2Model >= 4.45): `size=(h0, w0)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def is_tracing() -> bool:
    """True under torch.jit tracing/scripting, torch.compile or ONNX export: the graph must keep the resampling."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    for probe in ("is_compiling", "is_exporting", "is_dynamo_compiling"):
        if compiler is not None and getattr(compiler, probe, lambda: False)():
            return True
    return bool(getattr(torch.onnx, "is_in_onnx_export", lambda: False)())


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h, grid_w, offset: float = 0.0,
                          antialias: bool = False) -> torch.Tensor:
    """Resample a (1, 1 + M*M, D) table (CLS first) to a (grid_h, grid_w) patch grid; returns (1, 1 + h*w, D).

    Runs in float32 like the references and casts back. `grid_h`/`grid_w` may be traced tensors.
    """
    num_positions = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_positions))
    if side * side != num_positions:
        raise ValueError(f"position table of {num_positions} patch positions is not a square grid")
    dim = pos_embed.shape[-1]
    cls_pos = pos_embed[:, :1]
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        # Meta's DINO trick against float error: a scale factor, NOT a size (torch maps coordinates with it).
        scale = (float(grid_h + offset) / side, float(grid_w + offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, grid), dim=1)


class PositionEmbedding:
    """Per-grid cache of resampled position embeddings for inference (resampling every forward is wasted work).

    Entries are keyed by the grid and by the table's identity and version counter, so any in-place update of
    the weights (load_state_dict, an optimizer step) invalidates them; training, traced graphs and tables created
    inside inference_mode (no version counter) never cache.
    """

    def __init__(self, offset: float = 0.0, antialias: bool = False, max_entries: int = 16) -> None:
        self.offset = offset
        self.antialias = antialias
        self.max_entries = max_entries
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, pos_embed: torch.Tensor, grid_h, grid_w, height, width, training: bool = False):
        tracing = is_tracing()
        side = int(math.sqrt(pos_embed.shape[1] - 1))
        # The references return the table untouched at the native grid of a square input (never while tracing).
        if not tracing and grid_h * grid_w == side * side and height == width:
            return pos_embed
        # A table made inside inference_mode (a model copied or cast there) has no version counter, so a cached
        # entry could not notice an in-place change: resample it every time instead.
        if tracing or training or torch.is_grad_enabled() and pos_embed.requires_grad or pos_embed.is_inference():
            return interpolate_pos_embed(pos_embed, grid_h, grid_w, self.offset, self.antialias)
        key = (int(grid_h), int(grid_w), pos_embed.data_ptr(), pos_embed._version, pos_embed.dtype, pos_embed.device)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            with torch.no_grad():
                cached = interpolate_pos_embed(pos_embed, grid_h, grid_w, self.offset, self.antialias)
            self._cache[key] = cached
        return cached

    def clear(self) -> None:
        self._cache.clear()
