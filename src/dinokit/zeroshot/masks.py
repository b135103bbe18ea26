"""Reading id masks (first-frame masks, DAVIS predictions and ground truth, CorLoc's instance masks): one integer
id per pixel. The one reader of them all, so every command refuses a colour image or a broken file alike."""

from __future__ import annotations

import numpy as np
from PIL import Image


def read_id_mask(path, what: str = "mask", max_id: int | None = 255) -> tuple[np.ndarray, list[int] | None]:
    """(H, W) int64 ids of an indexed (P) or greyscale (L, 1, I;16, I) PNG, and its palette (P only).

    `max_id` 255: track and DAVIS write ids back as 8-bit indexed PNGs; None: any id (instance masks, which are
    only turned into boxes and a foreground)."""
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
    if max_id is not None and ids.max(initial=0) > max_id:
        raise ValueError(f"the {what} {display_path(path)} has ids up to {ids.max()}: masks hold ids 0-{max_id}")
    return ids, palette
