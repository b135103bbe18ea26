"""The DINOv2 paper's picture of patch features, and CLS-to-patch attention maps.

PCA picture (paper, Fig. 1 and 9), over the patches of all given images together, so that the same part gets the
same colour in every image:
1. First principal component of all patch features. Its sign is arbitrary, so it is oriented to make the image
   borders background: if border patches score above the mean, the component is negated. Foreground = patches
   scoring above `threshold` (default 0, the paper's "remove patches with a negative score"; None keeps all).
2. PCA with three components on the foreground patches only; each component is min-max scaled to [0, 1] over all
   foreground patches and becomes one of R, G, B. Background patches are black.
(If fewer than 3 patches are foreground, all patches are used: a mask that small is noise.)

Attention (`attention=True`): for the last block, the attention of the CLS token to each patch token, one map
per head (register columns dropped), min-max scaled per map and drawn in grey.

Each image is resized so its short side is `size` and its long side the nearest multiple of the patch size
(no crop, so the whole image is shown); it is drawn next to its maps, one row per image. An image whose aspect
ratio would make that more than `max_patch_tokens()` patch tokens (4,096 by default; `dinokit.data.token_bound`)
is scaled down to fit, and a `size` at which a square image is over the bound is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.apps.store import atomic_write

GAP = 4  # white pixels between panels


def _principal_components(x: np.ndarray, n: int) -> np.ndarray:
    """Scores of the centred rows of `x` on its first `n` principal axes, signs fixed as scikit-learn does."""
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:n]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return x @ axes.T


def _border(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask.reshape(-1)


def pca_colours(features: list[np.ndarray], threshold: float | None = 0.0):
    """Per image: an (h, w, 3) float image in [0, 1] and the (h, w) foreground mask.

    features: one (h, w, D) array of patch features per image (grids may differ).
    """
    grids = [f.shape[:2] for f in features]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float64)
    border = np.concatenate([_border(h, w) for h, w in grids])
    if threshold is None:
        foreground = np.ones(len(flat), dtype=bool)
    else:
        first = _principal_components(flat, 1)[:, 0]
        if first[border].mean() > first.mean():
            first = -first
        foreground = first > threshold
        if foreground.sum() < 3:
            foreground[:] = True
    colours = np.zeros((len(flat), 3))
    components = _principal_components(flat[foreground], 3)
    low, high = components.min(axis=0), components.max(axis=0)
    colours[foreground, : components.shape[1]] = (components - low) / np.where(high > low, high - low, 1.0)

    pictures, masks, start = [], [], 0
    for h, w in grids:
        pictures.append(colours[start:start + h * w].reshape(h, w, 3))
        masks.append(foreground[start:start + h * w].reshape(h, w))
        start += h * w
    return pictures, masks


def attention_maps(attentions: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(heads, h, w) CLS-to-patch maps from last-block attentions of shape (heads, S, S), S = 1 + R + h*w."""
    h, w = grid
    patches = attentions[:, 0, attentions.shape[-1] - h * w:]  # drop the CLS and register columns
    maps = patches.reshape(-1, h, w).astype(np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return (maps - low) / np.where(span > 0, span, 1.0)


def _to_panel(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """(h, w) or (h, w, 3) values in [0, 1] upscaled without smoothing, so each patch is a visible block."""
    pixels = np.clip(np.round(values * 255), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert("RGB")
    return image.resize(size, Image.NEAREST)


def compose(rows: list[list[Image.Image]]) -> tuple[Image.Image, list[list[tuple[int, int, int, int]]]]:
    """Panels laid out row by row with GAP pixels between them; returns the picture and each panel's box."""
    width = max(sum(p.width for p in row) + GAP * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + GAP * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    boxes, y = [], 0
    for row in rows:
        x, row_boxes = 0, []
        for panel in row:
            canvas.paste(panel, (x, y))
            row_boxes.append((x, y, x + panel.width, y + panel.height))
            x += panel.width + GAP
        boxes.append(row_boxes)
        y += max(p.height for p in row) + GAP
    return canvas, boxes


@dataclass
class PcaPicture:
    image: Image.Image
    boxes: list[list[tuple[int, int, int, int]]]  # per input row: input panel, then its maps
    masks: list[np.ndarray] = field(default_factory=list)  # foreground masks (PCA mode)
    path: str = ""


def render(images: list[Image.Image], features: list[np.ndarray] | None = None,
           attentions: list[np.ndarray] | None = None, threshold: float | None = 0.0) -> PcaPicture:
    """The picture from inputs (already at model resolution) and their (h, w, D) patch features or (heads, h, w)
    attention maps."""
    if features is not None:
        colours, masks = pca_colours(features, threshold)
        rows = [[image, _to_panel(c, image.size)] for image, c in zip(images, colours)]
    else:
        masks = []
        rows = [[image, *(_to_panel(m, image.size) for m in maps)] for image, maps in zip(images, attentions)]
    picture, boxes = compose(rows)
    return PcaPicture(image=picture, boxes=boxes, masks=masks)


def resize_to_patches(image: Image.Image, size: int, patch_size: int = 14, name: str = "image") -> Image.Image:
    """Short side to `size`, long side to the nearest multiple of `patch_size`, keeping the aspect ratio; scaled
    down to the bound on patch tokens (`dinokit.data.token_bound`) when the aspect ratio takes it over."""
    from dinokit.data.token_bound import bounded_size, check_short_side

    if size % patch_size:
        raise ValueError(f"size must be a multiple of the patch size {patch_size}, got {size}")
    check_short_side(size, patch_size)
    w, h = image.size
    scale = size / min(w, h)
    new_w = max(patch_size, round(w * scale / patch_size) * patch_size)
    new_h = max(patch_size, round(h * scale / patch_size) * patch_size)
    new_h, new_w = bounded_size(new_h, new_w, patch_size, name=name)
    return image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)


def _open(image) -> Image.Image:
    """A PIL image as RGB (transparency on white), or a file through dinokit's one reader (which refuses files
    over PIL's pixel limit before decoding them, and names the file in every error)."""
    from dinokit.data.images import pil_to_rgb, read_image

    return pil_to_rgb(image) if isinstance(image, Image.Image) else read_image(image)


def _name(image) -> str:
    from dinokit.data.images import display_path

    return "image" if isinstance(image, Image.Image) else display_path(image)


def pca_picture(images: list, output: str | Path, *, model="facebook/dinov2-small", size: int = 448,
                attention: bool = False, threshold: float | None = 0.0, device: str = "auto") -> PcaPicture:
    """Write the PCA picture (or, with attention=True, the attention maps) of `images` to `output` (PNG)."""
    picture = draw_pca_picture(images, model=model, size=size, attention=attention, threshold=threshold,
                               device=device)
    output = Path(output)
    atomic_write(output, lambda tmp: picture.image.save(tmp, format="PNG"))
    picture.path = str(output)
    return picture


def draw_pca_picture(images: list, *, model="facebook/dinov2-small", size: int = 448, attention: bool = False,
                     threshold: float | None = 0.0, device: str = "auto") -> PcaPicture:
    """The picture of `pca_picture` in memory (e.g. for `dinokit serve`), written nowhere."""
    import torch

    from dinokit.apps.embed import load, select_device
    from dinokit.data.token_bound import check_short_side
    from dinokit.processing import model_normalization

    if not images:
        raise ValueError("Give at least one image")
    device = select_device(device)
    model = load(model).to(device).eval()
    if attention and not hasattr(model, "vit_module"):
        raise ValueError(f"--attention draws a ViT's last-block CLS attention; {type(model).__name__} has no "
                         f"attention (a DINOv3 ConvNeXt is a CNN): draw its PCA picture without --attention")
    patch_size = int(getattr(model.config, "patch_size", 14))
    if size % patch_size:
        raise ValueError(f"size must be a multiple of the patch size {patch_size}, got {size}")
    check_short_side(size, patch_size)  # before reading any image
    inputs = [resize_to_patches(_open(p), size, patch_size, _name(p)) for p in images]
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in model_normalization(model))
    features, maps = [], []
    with torch.inference_mode():
        for image in inputs:  # one at a time: images may have different shapes
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            pixels = ((pixels - mean) / std)[None].to(device)
            grid = (image.height // patch_size, image.width // patch_size)
            out = model(pixel_values=pixels, output_attentions=attention)
            tokens = out.last_hidden_state[0]
            features.append(tokens[-grid[0] * grid[1]:].float().cpu().numpy().reshape(*grid, -1))
            if attention:
                maps.append(attention_maps(out.attentions[-1][0].float().cpu().numpy(), grid))
    return render(inputs, None if attention else features, maps if attention else None, threshold)
