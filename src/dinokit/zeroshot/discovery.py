"""Single-object discovery without labels: LOST and TokenCut on last-block patch features.

Both take one image's (h, w, C) patch features (by default the last block's attention keys, as both papers) and
return a patch mask, the seed patch and a box; `discover` runs them on image files through a dinokit model.
The rules follow ../shared/spec/zeroshot.md §3 exactly:

- LOST: A = K Kᵀ on raw keys (no normalisation); degree = positive correlations with the other patches; the seed
  is the lowest-degree patch (ties: the first in raster order, a stable sort); the `k_patches` lowest-degree
  patches that correlate positively with the seed are its similars; a patch is foreground when its summed
  correlation with the similars is positive; the 4-connected component holding the seed is the object.
- TokenCut: cosine graph binarised at `tau` (1 above, `eps` below); the eigenvector of the second smallest
  eigenvalue of (D − A) y = λ D y; foreground = the side of the mean holding the entry of largest |y| (the seed);
  the 4-connected component holding the seed is the object.
- Box: [xmin·p, ymin·p, (xmax+1)·p, (ymax+1)·p] over the component, clipped to the unpadded image, then scaled
  to the original image when the image was resized (only over the patch-token bound: the references do not
  resize).

The registers paper ran LOST on DINOv2 keys with a bias "added manually" to the Gram matrix, value unpublished;
`gram_bias` adds a constant to every entry of A before LOST's sign tests (0 = the LOST paper). TokenCut's `tau`
is the same kind of knob for its graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("lost", "tokencut")


@dataclass
class GridDiscovery:
    """What an algorithm finds on one patch grid."""

    mask: np.ndarray  # (h, w) bool: the object's patches (the seed's 4-connected component)
    seed: tuple[int, int]  # (row, col) of the seed patch
    score: np.ndarray  # (h, w) float: LOST's degree or TokenCut's eigenvector (foreground side positive)

    @property
    def grid_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mask in patches, half-open."""
        rows, cols = np.nonzero(self.mask)
        return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@dataclass
class Discovery:
    """One image's object: box and masks in the image's own pixels."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), half-open, original image pixels
    seed: tuple[int, int]  # (row, col) on the patch grid
    mask: np.ndarray  # (h, w) bool patch mask
    score: np.ndarray  # (h, w) float: degree (LOST) or oriented eigenvector (TokenCut)
    patch_size: int
    image_size: tuple[int, int]  # (H, W) of the original image
    model_size: tuple[int, int]  # (H, W) the model saw, before padding (= image_size unless over the bound)
    name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def pixel_mask(self) -> np.ndarray:
        """(H, W) bool mask at the original image's size: each patch covers its p x p pixels (padding cropped)."""
        p = self.patch_size
        full = np.repeat(np.repeat(self.mask, p, axis=0), p, axis=1)[: self.model_size[0], : self.model_size[1]]
        if self.model_size == self.image_size:
            return full
        from PIL import Image

        image = Image.fromarray(full.astype(np.uint8) * 255).resize(self.image_size[::-1], Image.NEAREST)
        return np.asarray(image) > 127

    def to_json(self) -> dict:
        return {"name": self.name, "box": [round(float(v), 3) for v in self.box], "seed": list(self.seed),
                "grid": list(self.grid), "patch_size": self.patch_size, "image_size": list(self.image_size),
                "model_size": list(self.model_size), "object_patches": int(self.mask.sum()), **self.extra}


# ------------------------------------------------------------------------------------------------- algorithms
def _flat(features) -> tuple[np.ndarray, tuple[int, int]]:
    array = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"patch features must be (height, width, channels), got shape {array.shape}")
    h, w, c = array.shape
    return array.reshape(h * w, c), (h, w)


def seed_component(foreground: np.ndarray, seed: int, grid: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of the (h*w,) bool `foreground` that holds patch `seed`, as an (h, w) mask."""
    from scipy import ndimage

    labels, _ = ndimage.label(foreground.reshape(grid))  # default structure: 4-connectivity
    label = labels.flat[seed]
    if label == 0:  # cannot happen for LOST (A[s,s] > 0) nor TokenCut (the seed's side is foreground)
        raise RuntimeError("the seed patch is not in the foreground mask")
    return labels == label


def lost(keys, k_patches: int = 100, gram_bias: float = 0.0) -> GridDiscovery:
    """LOST on one image's (h, w, C) keys (raw dot products; see the module notes)."""
    if k_patches < 1:
        raise ValueError(f"k_patches must be at least 1, got {k_patches}")
    flat, grid = _flat(keys)
    A = flat @ flat.T + gram_bias
    positive = A > 0
    degree = positive.sum(axis=1) - np.diagonal(positive)  # j != i
    order = np.argsort(degree, kind="stable")
    seed = int(order[0])
    candidates = order[:k_patches]
    similars = candidates[A[seed, candidates] > 0]
    foreground = A[similars].sum(axis=0) > 0
    mask = seed_component(foreground, seed, grid)
    return GridDiscovery(mask=mask, seed=divmod(seed, grid[1]), score=degree.reshape(grid).astype(np.float64))


def tokencut(keys, tau: float = 0.2, eps: float = 1e-5, binary: bool = True) -> GridDiscovery:
    """TokenCut on one image's (h, w, C) features (cosine graph; see the module notes). `binary=False` keeps the
    cosine above `tau` (the reference's --no-binary-graph)."""
    from scipy.linalg import eigh

    flat, grid = _flat(keys)
    n = flat.shape[0]
    unit = flat.astype(np.float64) / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    A = unit @ unit.T
    A = np.where(A > tau, 1.0 if binary else A, eps)
    if n < 2:  # one patch: no cut to make; the patch is the object
        return GridDiscovery(mask=np.ones(grid, bool), seed=(0, 0), score=np.ones(grid))
    D = np.diag(A.sum(axis=1))
    # float64, not the reference's float32: near-tied eigenvalues made float32's vector (and so the cut) differ by
    # 0.4% between CPUs' LAPACK kernels; float64 costs ~1.5x (0.18 s at 1200 patches on a 2-core Zen 4).
    _, vectors = eigh(D - A, D, subset_by_index=[1, min(2, n - 1)])
    y = vectors[:, 0]
    side = y > y.mean()
    seed = int(np.argmax(np.abs(y)))
    if not side[seed]:  # the seed's side is the object
        side, y = ~side, -y
    mask = seed_component(side, seed, grid)
    return GridDiscovery(mask=mask, seed=divmod(seed, grid[1]), score=y.reshape(grid))


def run_method(features, method: str = "lost", *, k_patches: int = 100, tau: float = 0.2, eps: float = 1e-5,
               binary: bool = True, gram_bias: float = 0.0) -> GridDiscovery:
    if method == "lost":
        return lost(features, k_patches=k_patches, gram_bias=gram_bias)
    if method == "tokencut":
        return tokencut(features, tau=tau, eps=eps, binary=binary)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def pixel_box(found: GridDiscovery, patch_size: int, model_size: tuple[int, int],
              image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The LOST box rule in model pixels (clipped to the unpadded input), scaled to the original image."""
    x0, y0, x1, y1 = found.grid_box
    H, W = model_size
    box = (x0 * patch_size, y0 * patch_size, min(x1 * patch_size, W), min(y1 * patch_size, H))
    sy, sx = image_size[0] / H, image_size[1] / W
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


# ---------------------------------------------------------------------------------------------- on images
def model_input(image, model, name: str = "image"):
    """(1, 3, H, W) normalised pixels at the image's own size (LOST/TokenCut do not resize), scaled down to whole
    patches only when over the patch-token bound (`dinokit.data.token_bound`); padding is left to the extractor."""
    from PIL import Image

    from dinokit.data.token_bound import bounded_size
    from dinokit.zeroshot.features import normalize_image, patch_size_of

    size = (image.height, image.width)
    bounded = bounded_size(*size, patch_size_of(model), name=name or "image")
    if bounded != size:
        image = image.resize(bounded[::-1], Image.BICUBIC)
    return normalize_image(image, model), bounded


def discover(images, model, method: str = "lost", *, facet: str = "keys", k_patches: int = 100,
             tau: float = 0.2, eps: float = 1e-5, binary: bool = True, gram_bias: float = 0.0,
             device: str = "auto", progress: bool = False) -> list[Discovery]:
    """The object of each image (paths or PIL images) by `method` on `model`'s last-block `facet`."""
    import torch

    from dinokit.apps.embed import load, select_device
    from dinokit.curate.progress import bars
    from dinokit.zeroshot.features import extract, patch_size_of

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    images = list(images)
    if not images:
        raise ValueError("give at least one image")
    dev = select_device(device)
    net = load(model).to(dev).eval()
    p = patch_size_of(net)
    results = []
    with bars(progress)(total=len(images), desc=f"discover ({method})", unit="image") as bar:
        for item in images:
            image, name = _open(item)
            pixels, model_size = model_input(image, net, name)
            with torch.inference_mode():
                features = extract(net, pixels, facet).features[0]
            found = run_method(features, method, k_patches=k_patches, tau=tau, eps=eps, binary=binary,
                               gram_bias=gram_bias)
            image_size = (image.height, image.width)
            results.append(Discovery(box=pixel_box(found, p, model_size, image_size), seed=found.seed,
                                     mask=found.mask, score=found.score, patch_size=p, image_size=image_size,
                                     model_size=model_size, name=name))
            bar.update(1)
    return results


def _open(item):
    from PIL import Image

    from dinokit.data.images import display_path, pil_to_rgb, read_image

    if isinstance(item, Image.Image):
        return pil_to_rgb(item), ""
    return read_image(item), display_path(Path(item).name)
