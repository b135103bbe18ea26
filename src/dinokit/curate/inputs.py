"""Curation inputs: a `dinokit embed` folder, a clip-retrieval folder (same layout) or a bare (N, D) .npy.

Every set becomes unit-length float32 vectors (cosine similarity = inner product, squared L2 = 2 - 2 cos, as in
both DINO papers) with one name per row: the image path from the metadata, or the row number for a .npy.
Vectors are normalised here because `dinokit embed` stores raw vectors unless --normalize was given; what is
refused is a *mix*: shards of one folder some unit-length and some not, sets of different dimensions, or sets
whose manifests name different models or poolings -- their similarities would mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinokit.apps import store

_UNIT_TOLERANCE = 1e-3  # |norm - 1| of a stored float16 unit vector stays below ~5e-4


@dataclass
class EmbeddingSet:
    name: str
    source: str
    vectors: np.ndarray  # (N, D) float32, unit rows
    paths: list[str] | None = None  # None for a bare .npy: rows are named by their index
    keys: list[str] | None = None
    pixels: np.ndarray | None = None  # width * height per row when the metadata has them
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def names(self) -> list[str]:
        return self.paths if self.paths is not None else [str(i) for i in range(len(self))]


def _check_vectors(array: np.ndarray, what: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{what} holds arrays of shape {array.shape}; curation needs one vector per image "
                         f"(embed with --pooling cls, mean or cls+mean).")
    if len(array) == 0:
        raise ValueError(f"{what} is empty: there is nothing to curate.")


def _normalise(array: np.ndarray, what: str, chunk: int = 262_144) -> tuple[np.ndarray, bool]:
    """Unit float32 rows, and whether the input already was unit-length; refuses non-finite and zero rows."""
    out = np.empty(array.shape, dtype=np.float32)
    unit = []
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start:start + chunk], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{what}: row {bad} holds NaN or infinite values ({int((~finite).sum())} rows in "
                             f"this block); re-embed those images or drop them.")
        norms = np.linalg.norm(block, axis=1)
        if (norms == 0).any():
            bad = start + int(np.flatnonzero(norms == 0)[0])
            raise ValueError(f"{what}: row {bad} is a zero vector, which has no direction; drop it.")
        unit.append(np.abs(norms - 1) <= _UNIT_TOLERANCE)
        out[start:start + chunk] = block / norms[:, None]
    unit = np.concatenate(unit)
    return out, bool(unit.all())


def load_set(path: str | Path, name: str = "pool") -> EmbeddingSet:
    path = Path(path)
    if path.suffix == ".npy" and path.is_file():
        array = np.load(path, mmap_mode="r")
        _check_vectors(array, str(path))
        vectors, _ = _normalise(array, str(path))
        return EmbeddingSet(name, str(path), vectors)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give an embedding folder (`dinokit embed`, "
                                f"clip-retrieval) or an (N, D) .npy file.")
    manifest = store.read_manifest(path) or {}
    if manifest.get("pooling") == "patch":
        raise ValueError(f"{path} holds patch grids; embed with --pooling cls, mean or cls+mean to curate.")
    shards = store.list_shards(path)
    metadata = store.load_metadata(path)
    parts, units, dims = [], [], set()
    for emb_path, _ in shards:
        array = np.load(emb_path, mmap_mode="r")
        _check_vectors(array, str(emb_path)) if len(array) else None
        dims.add(array.shape[1:])
        if len(dims) > 1:
            raise ValueError(f"{path}: shards hold vectors of different shapes {sorted(dims)} -- embeddings of "
                             f"different models or poolings were mixed in one folder. Re-embed into a new folder.")
        vectors, unit = _normalise(array, str(emb_path))
        parts.append(vectors)
        units.append(unit)
    if len(set(units)) > 1:
        normed = [s[0].name for s, u in zip(shards, units) if u][:3]
        raw = [s[0].name for s, u in zip(shards, units) if not u][:3]
        raise ValueError(f"{path}: some shards hold unit vectors ({', '.join(normed)}) and some do not "
                         f"({', '.join(raw)}) -- runs with and without --normalize were mixed. Re-embed into a "
                         f"new folder.")
    vectors = np.concatenate(parts)
    if len(vectors) != metadata.num_rows:
        raise ValueError(f"{path}: {len(vectors)} vectors but {metadata.num_rows} metadata rows; re-embed.")
    _check_vectors(vectors, str(path))
    columns = metadata.column_names
    paths = metadata.column("path").to_pylist() if "path" in columns else None
    keys = [str(k) for k in metadata.column("key").to_pylist()] if "key" in columns else None
    pixels = None
    if "width" in columns and "height" in columns:
        pixels = (np.asarray(metadata.column("width").to_numpy(zero_copy_only=False), dtype=np.int64)
                  * np.asarray(metadata.column("height").to_numpy(zero_copy_only=False), dtype=np.int64))
    return EmbeddingSet(name, str(path), vectors, paths, keys, pixels, manifest)


def _model_of(manifest: dict) -> tuple | None:
    model = manifest.get("model") or {}
    weights = model.get("weights_sha256") or model.get("spec")
    if not weights and not manifest.get("pooling"):
        return None  # a .npy or a clip-retrieval folder: nothing recorded to compare
    return weights, manifest.get("pooling")


def check_compatible(pool: EmbeddingSet, others: list[EmbeddingSet]) -> None:
    """One clear error when a seed or evaluation set cannot be compared with the pool."""
    for other in others:
        if other.dim != pool.dim:
            raise ValueError(f"{other.name} ({other.source}) has {other.dim}-d vectors but the pool "
                             f"({pool.source}) has {pool.dim}-d: embed both with the same model and pooling.")
        mine, theirs = _model_of(pool.manifest), _model_of(other.manifest)
        if mine and theirs and mine != theirs:
            raise ValueError(f"{other.name} ({other.source}) was embedded with model/pooling {theirs[1]!r} "
                             f"weights {str(theirs[0])[:12]} but the pool with {mine[1]!r} weights "
                             f"{str(mine[0])[:12]}: similarities between them mean nothing. Embed both with the "
                             f"same model and --pooling.")


def parse_named(spec: str, option: str) -> tuple[str, str]:
    """'NAME=PATH' (or a bare PATH, named after its file) for --seed / --exclude."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).stem
    if not name or not path:
        raise ValueError(f"{option} {spec!r}: expected NAME=PATH")
    return name, path
