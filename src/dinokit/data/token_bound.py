"""The bound on patch tokens per image, for every path that resizes an image's short side without cropping.

Resizing the short side to a fixed size scales the long side by the same factor, so a thin image (2 x 900
pixels at short side 448: 32 x 14,400 patches) becomes hundreds of thousands of tokens and attention, quadratic
in them, takes the machine. Every variable-size path (`dinokit pca` and the server's PCA picture, `segment` and
`depth` train/predict) plans its resize, then passes it through `bounded_size`:

- A planned size within `max_patch_tokens()` patch tokens is returned unchanged (ordinary images, bit for bit
  as before: a 16:9 photo at short side 448 is 32 x 57 = 1,824 tokens; at 518, 37 x 66 = 2,442).
- Over the bound, both sides are scaled down by one factor (aspect kept to the patch) to multiples of the patch
  size whose grid fits the bound; the short side keeps at least one patch, so an extreme strip ends as one
  row of up to `max_patch_tokens()` patches. Outputs stay at the image's own resolution (masks and depth maps
  are resized back), so a user gets a result, at a coarser grid.
- A requested short side that no image can honour (a square image at that size is over the bound) is refused
  up front by `check_short_side`, with one line naming the option, the bound and how to raise it.

The bound counts patch tokens, not pixels, so it means the same work for patch-14 and patch-16 models. The
default, 4,096 = 64 x 64 patches (896 px at patch 14, 1,024 px at patch 16), covers each command's default size
at any aspect ratio up to 4:1 (448) or 3:1 (518). Raise it with the environment variable
`DINOKIT_MAX_PATCH_TOKENS` (read at each call).

Centre-cropping paths (embed, search, eval) are bounded by their crop; `dinokit.processing` resizes only the
region the crop keeps, so their memory is bounded too.
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)

MAX_PATCH_TOKENS = 4096
ENV_VAR = "DINOKIT_MAX_PATCH_TOKENS"


def max_patch_tokens() -> int:
    """The bound: `DINOKIT_MAX_PATCH_TOKENS` when set, else `MAX_PATCH_TOKENS`."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return MAX_PATCH_TOKENS
    try:
        bound = int(value)
    except ValueError:
        bound = 0
    if bound < 1:
        raise ValueError(f"{ENV_VAR}={value!r} is not a positive whole number of patch tokens; unset it for the "
                         f"default of {MAX_PATCH_TOKENS}.")
    return bound


def patch_tokens(height: int, width: int, patch_size: int) -> int:
    """Patch tokens of an image of this size (sides padded up to whole patches)."""
    return math.ceil(height / patch_size) * math.ceil(width / patch_size)


def bounded_size(height: int, width: int, patch_size: int, max_tokens: int | None = None,
                 name: str = "image") -> tuple[int, int]:
    """(height, width) of a planned resize, scaled down to multiples of `patch_size` whose patch grid has at most
    `max_tokens` (default `max_patch_tokens()`) tokens; unchanged when it has that few already."""
    bound = max_patch_tokens() if max_tokens is None else max_tokens
    tokens = patch_tokens(height, width, patch_size)
    if tokens <= bound:
        return height, width
    factor = math.sqrt(bound / tokens)
    rows = max(1, math.floor(math.ceil(height / patch_size) * factor))
    cols = max(1, math.floor(math.ceil(width / patch_size) * factor))
    if rows * cols > bound:  # the short side was held at one patch: the long side takes what is left
        rows, cols = (1, bound) if rows == 1 else (bound, 1)
    logger.warning("%s: %d x %d pixels is %s patch tokens, over the bound of %s (%s): resized to %d x %d "
                   "(%d x %d patches)", name, width, height, f"{tokens:,}", f"{bound:,}", ENV_VAR,
                   cols * patch_size, rows * patch_size, cols, rows)
    return rows * patch_size, cols * patch_size


def check_short_side(size: int, patch_size: int, option: str | None = "--size", saved_in: str = "") -> None:
    """Refuse a short side at which even a square image has more patch tokens than the bound. `option` names
    the option that set it; None with `saved_in` (a model folder) when it comes from saved preprocessing."""
    bound = max_patch_tokens()
    tokens = patch_tokens(size, size, patch_size)
    if tokens <= bound:
        return
    what = f"{option} {size}" if option else f"the short side {size} saved in {saved_in}"
    fix = f"use {option} {math.isqrt(bound) * patch_size} or less, or raise" if option else "raise"
    raise ValueError(f"{what} gives {tokens:,} patch tokens for a square image, over the bound of {bound:,} per "
                     f"image: {fix} the bound with {ENV_VAR}={tokens}.")
