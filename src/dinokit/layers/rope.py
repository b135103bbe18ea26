"""Axial 2-D rotary position encoding of DINOv3 (dinov3.md §2), written from the formulas.

For an `H x W` patch grid and head width `D` (D % 4 == 0):
- periods  p_i = base ** (4i / D), i < D/4 (optionally rounded to bfloat16: the values Meta's `.pth` files hold);
- coords   c = 2 * ((arange(0.5, n) / n)) - 1 per axis ("separate" normalisation), (row=y, col=x) row-major;
- angles   a = 2*pi * c / p  -> [HW, 2, D/4] -> [y-freqs | x-freqs] (D/2) -> tiled twice (D);
- rotation x * cos(a) + rotate_half(x) * sin(a) on q and k of the patch tokens only (prefix tokens untouched).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dinokit.layers.position_embedding import is_tracing

PERIOD_DTYPES = ("fp32", "bf16")


def rope_periods(head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, periods_dtype: str = "fp32") -> torch.Tensor:
    """The D/4 periods in float32; `periods_dtype="bf16"` rounds them to bfloat16 values (Meta's checkpoints)."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
    if periods_dtype not in PERIOD_DTYPES:
        raise ValueError(f"rope periods dtype {periods_dtype!r}: use one of {PERIOD_DTYPES}")
    n = head_dim // 4
    if base is not None:
        periods = base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
    elif min_period is not None and max_period is not None:
        periods = max_period * (max_period / min_period) ** (torch.linspace(0, 1, n, dtype=torch.float32) - 1)
    else:
        raise ValueError("RoPE needs either a base or both min_period and max_period")
    if periods_dtype == "bf16":
        periods = periods.to(torch.bfloat16).float()
    return periods


def patch_coordinates(grid_h: int, grid_w: int, normalize: str = "separate",
                      device: torch.device | str | None = None, step: float = 1.0) -> torch.Tensor:
    """Patch centres in (-1, 1), shape [grid_h * grid_w, 2] as (y, x), row-major.

    step: the tokens' spacing in patches (stride / patch size). Overlapping tokens (step < 1, the zeroshot
    `--stride` option) are placed at their own centres, i * step + 0.5 patches, in an image of (n - 1) * step + 1
    patches per side; step 1 is the trained grid (computed as before, bit for bit)."""
    if step == 1:
        ys = torch.arange(0.5, grid_h, dtype=torch.float32, device=device)
        xs = torch.arange(0.5, grid_w, dtype=torch.float32, device=device)
        extent_h, extent_w = grid_h, grid_w
    else:
        ys = torch.arange(grid_h, dtype=torch.float32, device=device) * step + 0.5
        xs = torch.arange(grid_w, dtype=torch.float32, device=device) * step + 0.5
        extent_h, extent_w = (grid_h - 1) * step + 1, (grid_w - 1) * step + 1
    if normalize == "separate":
        ys, xs = ys / extent_h, xs / extent_w
    elif normalize in ("max", "min"):
        side = max(extent_h, extent_w) if normalize == "max" else min(extent_h, extent_w)
        ys, xs = ys / side, xs / side
    else:
        raise ValueError(f"unknown RoPE coordinate normalisation {normalize!r}: use separate, max or min")
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def rope_tables(coords: torch.Tensor, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [HW, D], float32."""
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :].to(coords.device)
    angles = angles.flatten(1, 2).tile(2)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Rotate the last HW tokens of q and k ([B, heads, N, D]); the N - HW prefix tokens stay as they are.

    The rotation runs in the tables' dtype (float32) and is cast back, so bf16/fp16 models rotate in float32."""
    cos, sin = rope
    prefix = q.shape[-2] - cos.shape[-2]
    if prefix < 0:
        raise ValueError(f"RoPE tables for {cos.shape[-2]} patches, but the sequence has only {q.shape[-2]} tokens")
    return _rotate(q, cos, sin, prefix), _rotate(k, cos, sin, prefix)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int) -> torch.Tensor:
    patches = x[..., prefix:, :]
    dtype = patches.dtype
    if dtype != cos.dtype:
        patches = patches.to(cos.dtype)
    rotated = (patches * cos + rotate_half(patches) * sin).to(dtype)
    return torch.cat((x[..., :prefix, :], rotated), dim=-2)


class RopePositionEmbedding(nn.Module):
    """The RoPE part of a DINOv3 backbone: `periods` (a buffer, Meta's `rope_embed.periods`) and per-grid tables.

    At inference the tables are cached per grid (like the DINOv2 position cache); in training, the coordinates
    are augmented once per forward (shift, then jitter per axis, then one rescale shared by both axes), as
    transformers does, and nothing is cached. The periods stay float32 when the model is cast to bf16/fp16.
    """

    def __init__(self, head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, normalize_coords: str = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None, periods_dtype: str = "fp32", max_entries: int = 16) -> None:
        super().__init__()
        self.head_dim, self.base, self.min_period, self.max_period = head_dim, base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.periods_dtype = periods_dtype
        self.register_buffer("periods", rope_periods(head_dim, base, min_period, max_period, periods_dtype))
        self.max_entries = max_entries
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_periods(self, periods_dtype: str | None = None) -> None:
        """Recompute the periods from the formula (e.g. after choosing fp32 or bf16 values)."""
        self.periods_dtype = periods_dtype or self.periods_dtype
        fresh = rope_periods(self.head_dim, self.base, self.min_period, self.max_period, self.periods_dtype)
        with torch.no_grad():
            self.periods.copy_(fresh.to(self.periods.device))
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.periods.dtype != torch.float32:  # a cast of the whole model: keep the exact float32 values
            self.periods = rope_periods(self.head_dim, self.base, self.min_period, self.max_period,
                                        self.periods_dtype).to(self.periods.device)
        self._cache.clear()
        return module

    def forward(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training or is_tracing():
            coords = patch_coordinates(grid_h, grid_w, self.normalize_coords, self.periods.device)
            if self.training:
                coords = self._augment(coords)
            return rope_tables(coords, self.periods)
        periods = self.periods
        key = (int(grid_h), int(grid_w), periods.device, periods.data_ptr(), _version(periods))
        cached = self._cache.get(key)
        if cached is None or key[-1] is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            with torch.no_grad():
                cached = rope_tables(patch_coordinates(grid_h, grid_w, self.normalize_coords, periods.device),
                                     periods)
            self._cache[key] = cached
        return cached

    def _augment(self, coords: torch.Tensor) -> torch.Tensor:
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, device=coords.device).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, device=coords.device).uniform_(-log_j, log_j).exp()
        if self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-log_r, log_r).exp()
        return coords

    def clear(self) -> None:
        self._cache.clear()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, periods={self.periods_dtype}"


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter: never trust a cached table
        return None
