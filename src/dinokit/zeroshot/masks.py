"""Reading id masks (first-frame masks, DAVIS predictions and ground truth): one integer id per pixel."""

from __future__ import annotations

import numpy as np
from PIL import Image


def read_id_mask(path, what: str = "mask") -> tuple[np.ndarray, list[int] | None]:
    """(H, W) int64 ids of an indexed (P) or greyscale (L, 1) PNG, and its palette (P only)."""
    from dinokit.data.images import display_path

    try:
        with Image.open(path) as image:
            image.load()
            mode, palette = image.mode, image.getpalette() if image.mode == "P" else None
            if mode not in ("P", "L", "1", "I;16", "I"):
                raise ValueError(f"the {what} {display_path(path)} is a {mode} image, not a mask of ids: save it as "
                                 f"an indexed (palette) or greyscale PNG whose pixel values are object ids")
            ids = np.asarray(image).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"the {what} {display_path(path)} does not exist") from None
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read the {what} {display_path(path)} ({type(exc).__name__}: {exc})") from None
    if ids.max(initial=0) > 255:
        raise ValueError(f"the {what} {display_path(path)} has ids up to {ids.max()}: masks hold ids 0-255")
    return ids, palette
