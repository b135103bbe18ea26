"""What `dinokit serve` serves: one embedded collection, its search index, and the model that embedded it.

Row r of the embedding folder is image id r everywhere (search results, thumbnails, originals, duplicates);
a client can only name an image by that id, never by a path. Clients are shown paths relative to the collection
root (the deepest folder holding every image), so the server's directory layout stays private; `describe(...,
absolute=True)` gives the stored paths. Queries are embedded with the preprocessing and
pooling recorded in the folder's manifest, so an indexed image uploaded again scores ~1 against itself.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.apps import store
from dinokit.apps.embed import (
    _check_image_size,
    embed_pixels,
    eval_transform,
    feature_shape,
    load,
    model_from_manifest,
    select_device,
    weights_sha256,
)
from dinokit.apps.index import _faiss, load_index, normalized_float32, resolve_index_dir
from dinokit.apps.serve.lanes import install_stop_points
from dinokit.apps.serve.uploads import UnreadableImage, decode_upload
from dinokit.processing import model_normalization

log = logging.getLogger("dinokit.serve")

THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 4096  # thumbnails kept in memory (about 10 KB each)
DUPLICATES_CACHE = 8  # duplicate groupings kept, by threshold
MEDIA_TYPES = {"MPO": "image/jpeg"}  # PIL's own MIME for these is one browsers do not show (MPO is a JPEG)
PCA_SIZE = 224  # short side of the PCA picture: 16 x 16 patches, whatever size the collection was embedded at


class UnknownImage(LookupError):
    """An id outside the collection (404)."""


def collection_root(paths: list[str]) -> str:
    """The deepest folder holding every path ("" when they share none, e.g. relative and absolute mixed)."""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:
        return ""


def relative_to(path: str, root: str) -> str:
    """`path` below `root`; its file name alone when it is not below it."""
    if root and (path == root or path.startswith(root.rstrip(os.sep) + os.sep)):
        return os.path.relpath(path, root)
    return os.path.basename(path)


@dataclass
class Hit:
    id: int
    score: float


class Collection:
    """The embedded images of EMBED_DIR, their index and model. Thread-safe for reading."""

    def __init__(self, emb_dir: str | Path, *, model=None, device: str = "auto") -> None:
        self.emb_dir = Path(emb_dir)
        self.manifest = store.read_manifest(self.emb_dir)
        if self.manifest is None:
            raise FileNotFoundError(f"{self.emb_dir} holds no {store.MANIFEST}; serve a folder written by "
                                    f"`dinokit embed`.")
        self.pooling = self.manifest.get("pooling", "cls")
        if self.pooling == "patch":
            raise ValueError(f"{self.emb_dir} holds patch grids, not one vector per image. Embed with --pooling "
                             f"cls, mean or cls+mean to serve it.")
        self.image_size = int(self.manifest.get("image_size", 224))
        vectors, metadata = store.load_embeddings(self.emb_dir, with_metadata=True)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"{self.emb_dir} holds no image vectors to serve (shape {vectors.shape}).")
        self.vectors = normalized_float32(vectors)
        self.paths = metadata.column("path").to_pylist()
        self.root = collection_root(self.paths)
        self.relative_paths = [relative_to(p, self.root) for p in self.paths]
        columns = metadata.column_names
        self.widths = metadata.column("width").to_pylist() if "width" in columns else [0] * len(self.paths)
        self.heights = metadata.column("height").to_pylist() if "height" in columns else [0] * len(self.paths)
        self.index, self.index_kind = self._load_index()

        self.model_spec = str(model) if model is not None else (self.manifest.get("model") or {}).get("spec")
        self.model = load(model) if model is not None else model_from_manifest(self.manifest)
        self.device = select_device(device)
        self.model = self.model.to(self.device).eval()
        install_stop_points(self.model)  # abandoned requests' model work ends within a block (lanes.py)
        recorded = (self.manifest.get("model") or {}).get("weights_sha256")
        if model is not None and recorded and weights_sha256(self.model) != recorded:
            log.warning("--model %s is not the model that embedded %s: queries and the collection's vectors come "
                        "from different models, so scores compare unlike features", model, self.emb_dir)
        _check_image_size(self.model, self.image_size)
        dim = feature_shape(self.model, self.pooling, self.image_size)[-1]
        if dim != self.dim:
            raise ValueError(f"the model gives {dim}-dimensional {self.pooling} features but {self.emb_dir} holds "
                             f"{self.dim}-dimensional ones; serve it with the model it was embedded with.")
        self.transform = eval_transform(self.image_size, model_normalization(self.model))
        self._thumbnails: OrderedDict[int, bytes] = OrderedDict()
        self._duplicates: OrderedDict[float, list] = OrderedDict()
        self._lock = threading.Lock()

    def _load_index(self):
        """The index `dinokit index` built for this folder, or an exact one over the vectors."""
        faiss = _faiss()
        try:
            index_dir = resolve_index_dir(self.emb_dir)
        except FileNotFoundError:
            index_dir = None
        if index_dir is not None:
            index, index_metadata, info = load_index(index_dir)
            if index.ntotal != len(self.vectors) or index_metadata.column("path").to_pylist() != self.paths:
                raise ValueError(f"The index in {index_dir} does not match {self.emb_dir} (built from other "
                                 f"embeddings). Rebuild it with `dinokit index {self.emb_dir}`.")
            return index, info.get("kind", "faiss")
        index = faiss.IndexFlatIP(self.vectors.shape[1])
        index.add(self.vectors)
        return index, "flat (exact, built at start-up)"

    # ------------------------------------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def check_id(self, image_id: int) -> None:
        if not 0 <= image_id < len(self.paths):
            raise UnknownImage(f"no image with id {image_id}: ids run from 0 to {len(self.paths) - 1}")

    @property
    def model_name(self) -> str | None:
        """The model as clients are told it: a hub id as given, a local folder or file by its name only."""
        spec = self.model_spec
        if spec and Path(spec).expanduser().exists():
            return Path(spec).name
        return spec

    def describe(self, image_id: int, score: float | None = None, *, absolute: bool = False) -> dict:
        path = self.paths[image_id] if absolute else self.relative_paths[image_id]
        item = {"id": image_id, "path": path, "width": int(self.widths[image_id] or 0),
                "height": int(self.heights[image_id] or 0), "thumbnail": f"/api/thumbnail/{image_id}",
                "image": f"/api/image/{image_id}"}
        if score is not None:
            item["score"] = round(float(score), 6)
        return item

    # ------------------------------------------------------------------------------------------------ model
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) pixels, exactly as `dinokit embed` prepared the collection."""
        return self.transform(image)

    def embed_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[np.ndarray]:
        """Features of (preprocessed pixels, pooling) items, one model call per pooling; on the model thread."""
        results: list[np.ndarray | None] = [None] * len(items)
        for pooling in dict.fromkeys(p for _, p in items):
            rows = [i for i, (_, p) in enumerate(items) if p == pooling]
            batch = torch.stack([items[i][0] for i in rows]).to(self.device)
            for i, features in zip(rows, embed_pixels(self.model, batch, pooling)):
                results[i] = features
        return results

    def pca_png(self, image: Image.Image) -> bytes:
        """The image beside the PCA picture of its patch features, as PNG; runs on the model thread."""
        from dinokit.apps.pca import draw_pca_picture

        patch = int(getattr(self.model.config, "patch_size", 14))
        size = PCA_SIZE // patch * patch
        picture = draw_pca_picture([image], model=self.model, size=size, device=str(self.device))
        buffer = io.BytesIO()
        picture.image.save(buffer, format="PNG")
        return buffer.getvalue()

    # ------------------------------------------------------------------------------------------------ search
    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        query = normalized_float32(vector)
        scores, ids = self.index.search(query, min(k, len(self.paths)))
        return [Hit(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def vector(self, image_id: int) -> np.ndarray:
        self.check_id(image_id)
        return self.vectors[image_id]

    # ------------------------------------------------------------------------------------------------ files
    def read_file(self, image_id: int) -> bytes:
        self.check_id(image_id)
        return Path(self.paths[image_id]).read_bytes()

    def media_type(self, image_id: int) -> str:
        """The MIME type of the file of `image_id` from its contents as PIL identifies them (not its extension);
        UnreadableImage when they are no image PIL knows (e.g. the file was replaced after embedding)."""
        self.check_id(image_id)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.paths[image_id]) as image:  # reads the header only
                    kind = image.format
        except FileNotFoundError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UnreadableImage(f"the file of image {image_id} is not an image PIL can identify now "
                                  f"({type(exc).__name__}); was it replaced after embedding?") from None
        return MEDIA_TYPES.get(kind) or Image.MIME.get(kind) or "application/octet-stream"

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG at most THUMBNAIL_SIDE pixels on its long side, made once and cached."""
        self.check_id(image_id)
        with self._lock:
            if image_id in self._thumbnails:
                self._thumbnails.move_to_end(image_id)
                return self._thumbnails[image_id]
        image = decode_upload(self.read_file(image_id), draft_size=THUMBNAIL_SIDE)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._thumbnails[image_id] = data
            while len(self._thumbnails) > THUMBNAIL_CACHE:
                self._thumbnails.popitem(last=False)
        return data

    # ------------------------------------------------------------------------------------------------ duplicates
    def duplicates(self, threshold: float) -> list[tuple[int, list[tuple[int, float]]]]:
        """Near-duplicate groups at `threshold` (as `dinokit dedup` finds and orders them), cached: per group the
        id kept and the (id, similarity to it) of the others."""
        from dinokit.apps.dedup import find_duplicate_groups, representative

        key = round(float(threshold), 6)
        with self._lock:
            if key in self._duplicates:
                return self._duplicates[key]
        pixels = np.asarray(self.widths, dtype=np.int64) * np.asarray(self.heights, dtype=np.int64)
        groups = []
        for group in find_duplicate_groups(self.vectors, key):
            keep = representative(group, self.paths, pixels)
            others = sorted((int(i) for i in group if i != keep), key=lambda i: self.paths[i])
            groups.append((int(keep), [(i, float(self.vectors[i] @ self.vectors[keep])) for i in others]))
        with self._lock:
            self._duplicates[key] = groups
            while len(self._duplicates) > DUPLICATES_CACHE:
                self._duplicates.popitem(last=False)
        return groups
