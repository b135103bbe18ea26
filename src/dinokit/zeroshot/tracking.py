"""Video label propagation ("segmentation tracking"): the first frame's mask carried through a video by patch-feature
affinity, as DINO v1's `eval_video_segmentation.py` and DINOv3's `segmentation_tracking.ipynb` do
(../shared/spec/zeroshot.md §1.1-1.2).

For each new frame, every patch takes the soft labels of its most similar context patches: the context is the first
frame plus the `context` most recent frames (a FIFO of their features and SOFT patch-level labels, never
argmaxed); candidates are restricted to a spatial window of `radius` patches around the query patch (square = L-inf,
circle = L2) in every context frame; over all context frames together the `topk` best cosines are kept (ties kept)
and weighted by softmax(cos / temperature). v1 writes this as exp(cos/0.1) times a 0/1 window, zero below the k-th
largest, divided by the sum: the same weights.

The two presets differ only where their references do (spec §1.2 "v1 vs v3nb"):

| | `dino` (v1 script) | `dinov3` (v3 notebook) |
|---|---|---|
| resize | short side 480, long side floored to a multiple of 64; bilinear without antialias (cv2) | short side ceil(960/p)p, long side ceiled to a multiple of p; PIL bicubic |
| grid | floor(side / p): the patch convolution drops the remainder | side / p |
| first mask to the grid | PIL NEAREST to (W//p, H//p) | `interpolate(mode="nearest-exact")` |
| window, temperature | square, 0.1 | circle, 0.2 |
| output | bilinear x p, per-channel min-max, argmax, NEAREST to the frame size | nearest to the frame size, min-max, argmax |

Both keep 7 recent frames, radius 12, top-5. Inputs are normalised with the MODEL's mean/std
(`processing.model_normalization`), not v1's (0.228, 0.224, 0.225) typo for ImageNet's std. Planned sizes go
through the patch-token bound (`dinokit.data.token_bound`).

Memory: frames come from an iterator and each mask is yielded as soon as it is computed; the context holds at most
`context + 1` frames of features and labels; the affinity is computed for a band of query rows at a time, against
only the context rows the window can reach, so it is never held for a whole frame (let alone the video).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SHAPES = ("square", "circle")
UPSAMPLES = ("bilinear", "nearest")


@dataclass(frozen=True)
class TrackSettings:
    """Every parameter of one propagation run; `PRESETS` holds the two references' values."""

    short_side: int
    long_rounding: str  # "floor64": v1's floor to a multiple of 64; "ceil": up to a multiple of the patch size
    resample: str  # "bilinear" (cv2.resize INTER_LINEAR, no antialias) or "bicubic" (PIL)
    mask_resize: str  # how the first mask reaches the grid: "pil-nearest" (v1) or "nearest-exact" (v3)
    context: int = 7  # recent frames kept besides the first
    radius: float = 12  # window radius in patches (math.inf: no window)
    shape: str = "square"
    topk: int = 5
    temperature: float = 0.1
    upsample: str = "bilinear"  # "bilinear" (x p, then nearest to the frame) or "nearest" (straight to the frame)

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLES)}, got {self.upsample!r}")
        if self.context < 0 or self.topk < 1 or not self.temperature > 0 or not self.radius >= 0:
            raise ValueError(f"context must be >= 0, topk >= 1, temperature > 0 and radius >= 0 (got context "
                             f"{self.context}, topk {self.topk}, temperature {self.temperature}, radius {self.radius})")
        if self.short_side < 1:
            raise ValueError(f"short_side must be positive, got {self.short_side}")


PRESETS = {
    "dino": TrackSettings(short_side=480, long_rounding="floor64", resample="bilinear", mask_resize="pil-nearest",
                          shape="square", temperature=0.1, upsample="bilinear"),
    "dinov3": TrackSettings(short_side=960, long_rounding="ceil", resample="bicubic", mask_resize="nearest-exact",
                            shape="circle", temperature=0.2, upsample="nearest"),
}


def settings_for(preset: str = "dino", **overrides) -> TrackSettings:
    """The preset's settings with the given (non-None) overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------- frame geometry
def planned_size(height: int, width: int, settings: TrackSettings, patch_size: int) -> tuple[int, int]:
    """(H, W) a frame is resized to, before the patch grid is taken."""
    from dinokit.data.token_bound import bounded_size

    s = settings.short_side
    if settings.long_rounding == "floor64":  # v1 read_frame: portrait iff h > w, so a square frame is landscape
        if height > width:
            size = (int((s * height / width) // 64 * 64), s)
        else:
            size = (s, int((s * width / height) // 64 * 64))
    else:  # v3 ResizeToMultiple: landscape iff w > h
        short = math.ceil(s / patch_size) * patch_size
        if width > height:
            size = (short, math.ceil(width * short / height / patch_size) * patch_size)
        else:
            size = (math.ceil(height * short / width / patch_size) * patch_size, short)
    if min(size) < patch_size:
        raise ValueError(f"a {width} x {height} frame at short side {s} is {size[1]} x {size[0]} pixels, less than "
                         f"one patch ({patch_size}) on a side: use a larger short side")
    return bounded_size(*size, patch_size, name="frame")


def grid_of(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    return size[0] // patch_size, size[1] // patch_size


def frame_pixels(image: Image.Image, size: tuple[int, int], settings: TrackSettings, patch_size: int,
                 mean, std) -> torch.Tensor:
    """(1, 3, h p, w p) normalised pixels of a frame: resized by the preset's rule, cropped to whole patches
    (what v1's patch convolution keeps; v3's sizes are whole patches already)."""
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    if settings.resample == "bicubic":
        resized = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32)
        x = torch.from_numpy(resized).permute(2, 0, 1)[None]
    else:  # cv2.resize INTER_LINEAR on uint8: half-pixel centres, no antialias, rounded back to uint8
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False).round().clamp(0, 255)
    h, w = grid_of(size, patch_size)
    x = x[..., : h * patch_size, : w * patch_size] / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- labels
def initial_probs(mask: np.ndarray, grid: tuple[int, int], settings: TrackSettings, num_labels: int) -> torch.Tensor:
    """(h, w, M) one-hot labels of the first frame's id mask on the patch grid."""
    h, w = grid
    if settings.mask_resize == "pil-nearest":
        small = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))
        small = torch.from_numpy(small.astype(np.int64))
    else:
        small = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(h, w),
                              mode="nearest-exact")[0, 0].long()
    return F.one_hot(small, num_labels).float()


def _minmax_per_channel(probs: torch.Tensor) -> torch.Tensor:
    """(M, H, W) scaled to [0, 1] per channel; a constant channel becomes 0 (v3's nan_to_num; v1 only scales
    channels whose max is > 0, which leaves an all-zero channel at 0 too)."""
    low = probs.amin(dim=(1, 2), keepdim=True)
    span = probs.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (probs - low) / torch.where(span > 0, span, 1), torch.zeros_like(probs))


def labels_at(probs: torch.Tensor, frame_size: tuple[int, int], settings: TrackSettings,
              patch_size: int) -> np.ndarray:
    """(H, W) uint8 ids at the frame's own resolution from (h, w, M) patch probabilities, by the preset's rule."""
    channels = probs.permute(2, 0, 1)[None]
    H, W = frame_size
    if settings.upsample == "bilinear":  # v1: x p bilinear, norm_mask, argmax, PIL NEAREST to the frame size
        up = F.interpolate(channels, scale_factor=patch_size, mode="bilinear", align_corners=False,
                           recompute_scale_factor=False)[0]
        ids = _minmax_per_channel(up).argmax(dim=0).numpy().astype(np.uint8)
        return np.asarray(Image.fromarray(ids).resize((W, H), Image.NEAREST))
    up = F.interpolate(channels, size=(H, W), mode="nearest")[0]  # v3: nearest to the frame, min-max, argmax
    return _minmax_per_channel(up).argmax(dim=0).numpy().astype(np.uint8)


# ----------------------------------------------------------------------------------------------- propagation
def _window(rows_q: torch.Tensor, rows_k: torch.Tensor, w: int, settings: TrackSettings) -> torch.Tensor:
    """(nq, nk) bool: key patch within the window of query patch (flattened row-major on a width-w grid,
    rows given by their absolute grid row)."""
    return _band_window(int(rows_q[0]), int(rows_q[-1]) + 1, int(rows_k[0]), int(rows_k[-1]) + 1, w,
                        settings.shape, float(settings.radius))


@functools.lru_cache(maxsize=64)  # the same bands recur on every frame of a video
def _band_window(q0: int, q1: int, k0: int, k1: int, w: int, shape: str, radius: float) -> torch.Tensor:
    rows_q, rows_k = torch.arange(q0, q1), torch.arange(k0, k1)
    cols = torch.arange(w)
    qi, qj = rows_q[:, None].expand(-1, w).reshape(-1), cols.repeat(len(rows_q))
    ki, kj = rows_k[:, None].expand(-1, w).reshape(-1), cols.repeat(len(rows_k))
    di = (qi[:, None] - ki[None, :]).abs().float()
    dj = (qj[:, None] - kj[None, :]).abs().float()
    if shape == "square":
        return torch.maximum(di, dj) <= radius
    return torch.sqrt(di * di + dj * dj) <= radius  # v3: vector_norm(ord=2) <= size


def propagate(current: torch.Tensor, context_features: torch.Tensor, context_probs: torch.Tensor,
              settings: TrackSettings, band_rows: int | None = None) -> torch.Tensor:
    """(h, w, M) soft labels of the current frame.

    current: (h, w, D) L2-normalised features; context_features: (t, h, w, D) L2-normalised; context_probs:
    (t, h, w, M). Processed in bands of query rows (`band_rows`, default: about 2M affinity entries per band),
    each against the context rows its window can reach."""
    t, h, w, D = context_features.shape
    M = context_probs.shape[-1]
    r = settings.radius
    reach = h if math.isinf(r) else min(h, int(math.floor(r)))
    if band_rows is None:
        band_rows = max(1, (2_000_000 // max(1, t * w * w * (2 * reach + 1))) or 1)
    out = torch.empty(h, w, M)
    for start in range(0, h, band_rows):
        stop = min(h, start + band_rows)
        lo, hi = max(0, start - reach), min(h, stop + reach)
        queries = current[start:stop].reshape(-1, D)
        keys = context_features[:, lo:hi].reshape(-1, D)  # (t * rows * w, D), frame-major like v3's flatten
        dot = (queries @ keys.T).view(len(queries), t, -1)
        inside = _window(torch.arange(start, stop), torch.arange(lo, hi), w, settings)
        dot = torch.where(inside[:, None, :], dot, torch.tensor(-math.inf)).reshape(len(queries), -1)
        k = min(settings.topk, dot.shape[1])
        kth = torch.topk(dot, k=k, dim=1).values[:, -1:]
        dot = torch.where(dot >= kth, dot, torch.tensor(-math.inf))
        weights = torch.softmax(dot / settings.temperature, dim=1)
        probs = weights @ context_probs[:, lo:hi].reshape(-1, M)
        out[start:stop] = (probs / probs.sum(dim=1, keepdim=True)).view(stop - start, w, M)
    return out


def propagate_video(features: Iterable[torch.Tensor], first_probs: torch.Tensor,
                    settings: TrackSettings) -> Iterator[torch.Tensor]:
    """Soft labels (h, w, M) of every frame after the first, one per feature map of `features` (an iterable of
    (h, w, D) maps, the FIRST frame's included, L2-normalised here). Holds the first frame and a FIFO of the
    `settings.context` most recent frames' features and soft labels."""
    iterator = iter(features)
    first = F.normalize(next(iterator).float(), dim=-1)
    if first.shape[:2] != first_probs.shape[:2]:
        raise ValueError(f"first-frame features are on a {tuple(first.shape[:2])} grid, its labels on "
                         f"{tuple(first_probs.shape[:2])}")
    recent: deque = deque(maxlen=settings.context if settings.context > 0 else None)
    for index, current in enumerate(iterator, start=1):
        current = F.normalize(current.float(), dim=-1)
        if current.shape != first.shape:
            raise ValueError(f"frame {index} has features of shape {tuple(current.shape)}, the first frame "
                             f"{tuple(first.shape)}: every frame must have the same size")
        context = [(first, first_probs), *recent]
        probs = propagate(current, torch.stack([f for f, _ in context]), torch.stack([p for _, p in context]),
                          settings)
        if settings.context > 0:
            recent.append((current, probs))
        yield probs


# ----------------------------------------------------------------------------------------------- features
class ModelEncoder:
    """(h, w, D) last-block features of a dinokit model for (1, 3, H, W) normalised pixels: final-normed patch
    tokens, or the attention keys with facet="keys"; with `stride` (a divisor of the patch size), of overlapping
    patches `stride` pixels apart (`zeroshot.overlap`). `stride` is the spacing of the grid either way."""

    def __init__(self, model, facet: str = "tokens", stride: int | None = None):
        from dinokit.processing import model_normalization
        from dinokit.zeroshot.features import FACETS, patch_size_of

        if facet not in FACETS:
            raise ValueError(f"unknown facet {facet!r}: use one of {', '.join(FACETS)}")
        if facet == "keys" or stride is not None:  # both read a ViT's blocks: refuse other models first
            from dinokit.zeroshot.overlap import check_stride, vit_of

            vit_of(model, "--stride" if stride is not None else "the keys facet")
        self.model, self.facet = model, facet
        self.patch_size = patch_size_of(model)
        if stride is not None:
            check_stride(stride, self.patch_size)
        self.overlap = stride
        self.stride = stride or self.patch_size
        self.mean, self.std = model_normalization(model)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from dinokit.zeroshot.features import extract

        return extract(self.model, pixels, self.facet, pad=False, stride=self.overlap).features[0].cpu()


class PixelEncoder:
    """Raw-pixel baseline: a patch's feature is its normalised pixels, flattened (p * p * 3 values)."""

    def __init__(self, patch_size: int = 14, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.patch_size, self.mean, self.std = patch_size, tuple(mean), tuple(std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        _, C, H, W = pixels.shape
        x = pixels[0].reshape(C, H // p, p, W // p, p).permute(1, 3, 0, 2, 4)
        x = x.reshape(H // p, W // p, -1)
        return x - x.mean(dim=-1, keepdim=True)  # centred: cosine then compares texture and colour, not brightness


def as_encoder(model, facet: str = "tokens", stride: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder (callable on pixels with `patch_size`, `mean`, `std`) from a model, a model spec or an encoder;
    `facet` and `stride` as `ModelEncoder`'s (an encoder given as such already has its own)."""
    if hasattr(model, "patch_size") and callable(model) and not isinstance(model, torch.nn.Module):
        if facet != "tokens" or stride is not None:
            raise ValueError("facet and stride apply to a model; an encoder has its own: build it as "
                             "ModelEncoder(model, facet, stride)")
        return model
    from dinokit.apps.embed import load

    return ModelEncoder(load(model).eval(), facet, stride)


# ----------------------------------------------------------------------------------------------- the job
def mask_ids(mask: np.ndarray) -> np.ndarray:
    """A first-frame id mask as int64 with DAVIS's void (255) as background."""
    mask = np.asarray(mask).astype(np.int64)
    return np.where(mask == 255, 0, mask)


def track(frames: Iterable, first_mask: np.ndarray, model, preset: str = "dino", *,
          progress: Callable | None = None, **overrides) -> Iterator[np.ndarray]:
    """Yield the (H, W) uint8 id mask of every frame of `frames`, the first frame's being `first_mask` itself.

    frames: an iterable of PIL images (or (H, W, 3) uint8 arrays), all of one size, read lazily; first_mask:
    (H, W) integer ids of the first frame (0 background, 255 void = background); model: a dinokit model, anything
    `dinokit.load_model` takes, or an encoder (see `PixelEncoder`); preset: "dino" or "dinov3"; overrides: any
    `TrackSettings` field (short_side, context, radius, shape, topk, temperature, upsample, ...).
    progress: called with no argument after each frame (a progress bar's update)."""
    settings = settings_for(preset, **overrides)
    encoder = as_encoder(model)
    p = encoder.patch_size
    if getattr(encoder, "stride", p) != p:
        raise ValueError(f"track propagates labels on the model's own patch grid: give an encoder without stride "
                         f"(this one has stride {encoder.stride}, patch size {p})")
    first_mask = mask_ids(first_mask)
    num_labels = int(first_mask.max()) + 1
    if num_labels > 256:
        raise ValueError(f"the first mask has ids up to {num_labels - 1}; indexed PNG masks hold ids 0-255")
    iterator = iter(frames)
    try:
        first = _as_image(next(iterator))
    except StopIteration:
        raise ValueError("no frames to track") from None
    frame_size = (first.height, first.width)
    if first_mask.shape != frame_size:
        raise ValueError(f"the first mask is {first_mask.shape[1]} x {first_mask.shape[0]} pixels but the first "
                         f"frame is {first.width} x {first.height}: give the mask of the first frame, at its size")
    size = planned_size(*frame_size, settings, p)
    grid = grid_of(size, p)
    first_probs = initial_probs(first_mask, grid, settings, num_labels)

    def features() -> Iterator[torch.Tensor]:
        for index, image in _chain(first, iterator):
            image = _as_image(image)
            if (image.height, image.width) != frame_size:
                raise ValueError(f"frame {index} is {image.width} x {image.height} but the first frame is "
                                 f"{frame_size[1]} x {frame_size[0]}: all frames of a video must have one size")
            yield encoder(frame_pixels(image, size, settings, p, encoder.mean, encoder.std))

    yield first_mask.astype(np.uint8)
    if progress:
        progress()
    for probs in propagate_video(features(), first_probs, settings):
        yield labels_at(probs, frame_size, settings, p)
        if progress:
            progress()


def _chain(first, rest) -> Iterator:
    yield 0, first
    yield from enumerate(rest, start=1)


def _as_image(frame) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame
    return Image.fromarray(np.asarray(frame, dtype=np.uint8))


def describe(settings: TrackSettings) -> dict:
    """The settings as JSON-ready values (inf radius as null)."""
    values = asdict(settings)
    if math.isinf(values["radius"]):
        values["radius"] = None
    return values
