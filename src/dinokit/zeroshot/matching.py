"""Dense and sparse correspondence between two images by nearest neighbours of L2-normalised patch features, as
Meta's DINOv3 `dense_sparse_matching.ipynb` does (../shared/spec/zeroshot.md §2.1), with Amir et al.'s mutual
nearest neighbours ("best buddies", §2.3) as an option, and the PCK@alpha evaluator (§2.4).

Rules (the notebook's unless said):
- Resize: `size // p` rows and int(w * size / (h * p)) columns of p-pixel patches (the notebook's 48 rows at
  size 768, p 16: the image HEIGHT is set, whatever the orientation), bilinear; planned sizes go through the
  patch-token bound. Pixels are normalised with the model's own mean/std.
- Features: final-normed patch tokens (`zeroshot.features.extract`), L2-normalised; `facet="keys"`: the last
  block's attention keys instead (Amir et al.'s descriptors, the facet discover uses). `stride` S < p: overlapping
  patches S pixels apart (`zeroshot.overlap`, Amir's trick), a grid about (p/S)^2 times denser; the planned size
  is then bounded so that the denser grid stays within the patch-token bound.
- Dense: each patch of A -> the patch of B with the highest cosine, over all of B; one direction, no threshold.
  `mutual=True` keeps only pairs that are each other's nearest neighbour (`nn_b[nn_a[i]] == i`).
- Foreground masks: a patch is foreground when more than half of it is (the notebook's 16 x 16 box filter of the
  alpha > 0.5); a pair is kept when its A patch and its matched B patch are both foreground.
- Coordinates: patch centres ((col + 0.5) p, (row + 0.5) p), or (col S + p/2, row S + p/2) with a stride, scaled
  back to each image's pixels per axis (the notebook scales both axes by orig_h / resized_h; per axis is exact
  when the column count was rounded down).
- Sparse: a given point of A takes the patch it falls in (with a stride: the token whose centre is nearest); its
  match is the centre of that patch's nearest B patch.
- Picture: `stratify` thins the drawn lines greedily (the notebook's rule: while two kept A points are within
  `distance` pixels, drop the one with most such neighbours, first index on ties).

PCK@alpha: a predicted point is correct when its distance to the true point is below alpha * max(w, h) of the
target's bounding box (SPair-71k) or of the target image (`image_threshold`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

FOREGROUND = 0.5


@dataclass
class Side:
    """One image as the matcher sees it: features on its grid and how the grid maps back to its pixels."""

    features: torch.Tensor  # (h, w, D) L2-normalised
    image_size: tuple[int, int]  # original (width, height)
    patch_size: int
    foreground: np.ndarray | None = None  # (h, w) bool
    stride: int | None = None  # pixels between token centres when patches overlap; None = patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[0]), int(self.features.shape[1])

    @property
    def step(self) -> int:
        return self.stride or self.patch_size

    def resized(self) -> tuple[int, int]:
        """(width, height) of the resized image the grid covers: (n - 1) * stride + p per axis."""
        h, w = self.grid
        return (w - 1) * self.step + self.patch_size, (h - 1) * self.step + self.patch_size

    def scale(self) -> tuple[float, float]:
        """(x, y) original pixels per resized pixel."""
        width, height = self.resized()
        return self.image_size[0] / width, self.image_size[1] / height

    def centres(self, indices: np.ndarray) -> np.ndarray:
        """(N, 2) (x, y) in original pixels of flat patch indices."""
        h, w = self.grid
        rows, cols = np.divmod(np.asarray(indices, dtype=np.int64), w)
        sx, sy = self.scale()
        half = self.patch_size / 2
        return np.stack([(cols * self.step + half) * sx, (rows * self.step + half) * sy], axis=1)

    def patch_of(self, points: np.ndarray) -> np.ndarray:
        """Flat index of the patch each (x, y) point (original pixels) falls in; with overlapping patches, of the
        one whose centre is nearest."""
        h, w = self.grid
        sx, sy = self.scale()
        if self.step == self.patch_size:
            cols = np.floor(points[:, 0] / sx / self.patch_size)
            rows = np.floor(points[:, 1] / sy / self.patch_size)
        else:
            half = self.patch_size / 2
            cols = np.floor((points[:, 0] / sx - half) / self.step + 0.5)
            rows = np.floor((points[:, 1] / sy - half) / self.step + 0.5)
        return (np.clip(rows, 0, h - 1).astype(np.int64) * w + np.clip(cols, 0, w - 1).astype(np.int64))


@dataclass
class Matches:
    """Pairs of patches: flat indices into A's and B's grids, their cosine, whether they are mutual."""

    index_a: np.ndarray
    index_b: np.ndarray
    cosine: np.ndarray
    mutual: np.ndarray

    def __len__(self) -> int:
        return len(self.index_a)


# ----------------------------------------------------------------------------------------------- geometry
def planned_size(height: int, width: int, size: int, patch_size: int, stride: int | None = None) -> tuple[int, int]:
    """(H, W) in whole patches: size // p rows, int(width * size / (height * p)) columns (at least one each).
    With a stride, the bound on tokens is divided by (p / stride)^2, the growth of the denser grid."""
    from dinokit.data.token_bound import bounded_size, max_patch_tokens

    rows = max(1, int(size / patch_size))
    cols = max(1, int(width * size / (height * patch_size)))
    denser = (patch_size // stride) ** 2 if stride else 1
    return bounded_size(rows * patch_size, cols * patch_size, patch_size, max(1, max_patch_tokens() // denser),
                        name="image")


def image_pixels(image: Image.Image, size: tuple[int, int], mean, std) -> torch.Tensor:
    """(1, 3, H, W) normalised pixels, bilinear resize (torchvision's `TF.resize` default on a PIL image)."""
    resized = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32) / 255
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def patch_foreground(mask: np.ndarray, grid: tuple[int, int], patch_size: int,
                     stride: int | None = None) -> np.ndarray:
    """(h, w) bool: more than half of the patch is foreground. mask: (H, W) in [0, 1] at the image's size;
    `stride`: overlapping patches that many pixels apart."""
    h, w = grid
    step = stride or patch_size
    resized = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F").resize(
        ((w - 1) * step + patch_size, (h - 1) * step + patch_size), Image.BILINEAR)
    fraction = F.avg_pool2d(torch.from_numpy(np.asarray(resized).copy())[None, None], patch_size, step)[0, 0]
    return (fraction > FOREGROUND).numpy()


# ----------------------------------------------------------------------------------------------- matching
def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `queries` (N, D), the index of and cosine to the nearest row of `keys` (M, D) (both unit)."""
    index = torch.empty(len(queries), dtype=torch.long)
    cosine = torch.empty(len(queries))
    for start in range(0, len(queries), chunk):
        values, found = (queries[start:start + chunk] @ keys.T).max(dim=1)
        index[start:start + chunk], cosine[start:start + chunk] = found, values
    return index, cosine


def dense_matches(a: Side, b: Side, mutual: bool = False) -> Matches:
    """Every A patch's nearest B patch, filtered by the foreground masks (both ends) and, with `mutual`, to
    mutual nearest neighbours. The `mutual` column says which pairs are mutual either way."""
    qa = F.normalize(a.features.reshape(-1, a.features.shape[-1]).float(), dim=-1)
    kb = F.normalize(b.features.reshape(-1, b.features.shape[-1]).float(), dim=-1)
    nn_ab, cosine = nearest(qa, kb)
    nn_ba, _ = nearest(kb, qa)
    index_a = torch.arange(len(qa))
    is_mutual = nn_ba[nn_ab] == index_a
    keep = torch.ones(len(qa), dtype=torch.bool)
    if a.foreground is not None:
        keep &= torch.from_numpy(a.foreground.reshape(-1))
    if b.foreground is not None:
        keep &= torch.from_numpy(b.foreground.reshape(-1))[nn_ab]
    if mutual:
        keep &= is_mutual
    return Matches(index_a[keep].numpy(), nn_ab[keep].numpy(), cosine[keep].numpy(), is_mutual[keep].numpy())


def transfer_points(points: np.ndarray, a: Side, b: Side) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) (x, y) points of A (original pixels) -> their matches in B (original pixels) and the cosines."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    qa = F.normalize(a.features.reshape(-1, a.features.shape[-1]).float(), dim=-1)
    kb = F.normalize(b.features.reshape(-1, b.features.shape[-1]).float(), dim=-1)
    index, cosine = nearest(qa[torch.from_numpy(a.patch_of(points))], kb)
    return b.centres(index.numpy()), cosine.numpy()


def check_points(points, image_size: tuple[int, int], name: str = "points") -> np.ndarray:
    """(N, 2) float array of (x, y) points inside an image of `image_size` (width, height), or one ValueError."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: give a list of [x, y] pairs of numbers") from None
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise ValueError(f"{name}: give a list of [x, y] pairs of finite numbers (got shape {array.shape})")
    W, H = image_size
    outside = np.flatnonzero((array[:, 0] < 0) | (array[:, 0] >= W) | (array[:, 1] < 0) | (array[:, 1] >= H))
    if len(outside):
        i = int(outside[0])
        raise ValueError(f"{name}: point {i} ({array[i, 0]:g}, {array[i, 1]:g}) is outside the {W} x {H} image "
                         f"(x in [0, {W}), y in [0, {H}))" + (f"; {len(outside) - 1} more" if len(outside) > 1 else ""))
    return array


def stratify(points: np.ndarray, distance: float = 100.0) -> np.ndarray:
    """Indices kept by the notebook's greedy thinning: while two kept points are within `distance` (squared
    distance <= distance^2), drop the one with the most such neighbours (the first on ties)."""
    points = np.asarray(points, dtype=np.float64)
    kept = np.arange(len(points))
    close = ((points[:, None] - points[None]) ** 2).sum(-1) <= distance * distance
    np.fill_diagonal(close, False)
    while len(kept):
        counts = close[np.ix_(kept, kept)].sum(axis=1)
        if counts.max() == 0:
            break
        kept = np.delete(kept, int(np.argmax(counts)))
    return kept


# ----------------------------------------------------------------------------------------------- evaluation
def bbox_threshold(bbox, alpha: float) -> float:
    """SPair-71k: alpha * max(width, height) of the target box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return alpha * max(x2 - x1, y2 - y1)


def image_threshold(image_size: tuple[int, int], alpha: float) -> float:
    """alpha * max(width, height) of the target image."""
    return alpha * max(image_size)


def pck(predicted: np.ndarray, truth: np.ndarray, threshold) -> float:
    """Fraction of points whose predicted (x, y) is within `threshold` (a number, or one per point; strictly
    less) of the true one. NaN for no points."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if len(predicted) == 0:
        return float("nan")
    distance = np.linalg.norm(predicted - truth, axis=-1)
    return float(np.mean(distance < np.asarray(threshold, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------- the job
@dataclass
class MatchResult:
    a: Side
    b: Side
    matches: Matches
    points_a: np.ndarray | None = None
    points_b: np.ndarray | None = None
    points_cosine: np.ndarray | None = None

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) A and (N, 2) B coordinates (x, y, original pixels) of the dense matches."""
        return self.a.centres(self.matches.index_a), self.b.centres(self.matches.index_b)


def encode(image: Image.Image, encoder, size: int, mask: np.ndarray | None = None, name: str = "image") -> Side:
    """An image's Side: resized by the notebook's rule, encoded, with its patch foreground when a mask is given.
    An encoder with a `stride` below its patch size gives overlapping patches (`tracking.ModelEncoder`)."""
    p = encoder.patch_size
    stride = getattr(encoder, "stride", p)
    stride = None if stride == p else stride
    if mask is not None and tuple(mask.shape) != (image.height, image.width):
        raise ValueError(f"the mask of {name} is {mask.shape[1]} x {mask.shape[0]} but the image is {image.width} x "
                         f"{image.height}: give a mask of the image's size")
    pixels_size = planned_size(image.height, image.width, size, p, stride)
    features = encoder(image_pixels(image, pixels_size, encoder.mean, encoder.std))
    grid = (int(features.shape[0]), int(features.shape[1]))
    foreground = patch_foreground(mask, grid, p, stride) if mask is not None else None
    return Side(F.normalize(features.float(), dim=-1), (image.width, image.height), p, foreground, stride)


def match(image_a: Image.Image, image_b: Image.Image, model, *, size: int = 768, mutual: bool = False,
          mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None, points=None, facet: str = "tokens",
          stride: int | None = None) -> MatchResult:
    """Dense matches from A to B (and the matches of `points`, (x, y) pixels of A, when given).

    model: a dinokit model, anything `dinokit.load_model` takes, or an encoder (`tracking.PixelEncoder`);
    mask_a / mask_b: (H, W) foreground in [0, 1] (alpha / 255, or a 0/1 mask) at each image's size;
    facet: "tokens" (final-normed outputs, the notebook's) or "keys" (last-block attention keys, Amir et al.'s);
    stride: a divisor of the patch size for overlapping patches (None: the model's own grid)."""
    from dinokit.zeroshot.tracking import as_encoder

    if points is not None:
        points = check_points(points, image_a.size)
    encoder = as_encoder(model, facet, stride)
    a = encode(image_a, encoder, size, mask_a, "A")
    b = encode(image_b, encoder, size, mask_b, "B")
    result = MatchResult(a, b, dense_matches(a, b, mutual))
    if points is not None:
        result.points_a = points
        result.points_b, result.points_cosine = transfer_points(points, a, b)
    return result


# ----------------------------------------------------------------------------------------------- picture
def picture(image_a: Image.Image, image_b: Image.Image, result: MatchResult, height: int = 384,
            distance: float = 100.0, max_lines: int = 300) -> Image.Image:
    """A and B side by side at `height` pixels, a line per match: the given points' matches when there are
    points, else the dense matches thinned by `stratify` (distance in A's pixels) and capped at `max_lines`.
    A line's colour encodes its A position (hue by angle around the centre, brightness by row)."""
    if result.points_a is not None:
        pa, pb = result.points_a, result.points_b
    else:
        pa, pb = result.pairs()
        keep = stratify(pa, distance)
        if len(keep) > max_lines:
            keep = keep[np.linspace(0, len(keep) - 1, max_lines).round().astype(int)]
        pa, pb = pa[keep], pb[keep]
    sa, sb = height / image_a.height, height / image_b.height
    left = image_a.convert("RGB").resize((max(1, round(image_a.width * sa)), height), Image.BILINEAR)
    right = image_b.convert("RGB").resize((max(1, round(image_b.width * sb)), height), Image.BILINEAR)
    canvas = Image.new("RGB", (left.width + 8 + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    draw = ImageDraw.Draw(canvas)
    for (xa, ya), (xb, yb) in zip(pa, pb):
        colour = _position_colour(xa / image_a.width, ya / image_a.height)
        start, end = (xa * sa, ya * sa), (left.width + 8 + xb * sb, yb * sb)
        draw.line([start, end], fill=colour, width=1)
        for x, y in (start, end):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return canvas


def _position_colour(u: float, v: float) -> tuple[int, int, int]:
    import colorsys

    hue = (math.atan2(v - 0.5, u - 0.5) / (2 * math.pi)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.55 + 0.45 * (1 - v))
    return int(r * 255), int(g * 255), int(b * 255)
