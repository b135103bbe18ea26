"""Curation inputs: a `dinokit embed` folder, a clip-retrieval folder (same layout) or a bare (N, D) .npy.

Every set is read as unit-length float32 vectors (cosine similarity = inner product, squared L2 = 2 - 2 cos, as
in both DINO papers) with one name per row: the image path from the metadata, or the row number for a .npy.
The vectors are never loaded whole: `Vectors` reads rows on demand from the memory-mapped shards and normalises
them as it reads, so a stage holds only the chunk it works on (and what faiss keeps in its index).

Loading makes one streaming pass that refuses what would make similarities meaningless or the output partial:
non-finite or zero rows (all of them counted and named), shards of one folder some unit-length and some not,
shards whose shape differs from each other or from the manifest, metadata out of step with the vectors, and
(`check_compatible`) seed or evaluation sets embedded with another model, pooling or dimension than the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinokit.apps import store
from dinokit.curate.progress import Silent

_UNIT_TOLERANCE = 1e-3  # |norm - 1| of a stored float16 unit vector stays below ~5e-4
CHUNK_BYTES = 64 << 20  # rows read (or computed on) at a time in every streaming pass


def rows_per_chunk(dim: int, itemsize: int = 4) -> int:
    """Rows of `dim` values of `itemsize` bytes that fit one chunk of CHUNK_BYTES (read at call time)."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


class Vectors:
    """(N, D) unit float32 rows of one or more row-aligned 2-D arrays (memory-mapped shards, or other
    `Vectors`), optionally restricted to a subset of rows. Reading rows -- a slice, an index array, a boolean
    mask -- returns an ndarray; `subset` returns another view without reading anything."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, parts: list, *, normalise: bool = True, rows: np.ndarray | None = None):
        if not parts:
            raise ValueError("no arrays to read vectors from")
        self.parts = list(parts)
        self.normalise = normalise
        self.offsets = np.r_[0, np.cumsum([len(p) for p in self.parts])].astype(np.int64)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.dim = int(self.parts[0].shape[1])

    def __len__(self) -> int:
        return int(len(self.rows) if self.rows is not None else self.offsets[-1])

    def __getstate__(self) -> dict:
        """Memory-mapped parts travel as (file, offset, dtype, shape), not as their data (Ray workers reopen them)."""
        state = dict(self.__dict__)
        state["parts"] = [_MappedFile(p) if isinstance(p, np.memmap) else p for p in self.parts]
        return state

    def __setstate__(self, state: dict) -> None:
        state["parts"] = [p.open() if isinstance(p, _MappedFile) else p for p in state["parts"]]
        self.__dict__.update(state)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * 4

    def subset(self, rows: np.ndarray) -> Vectors:
        rows = np.asarray(rows, dtype=np.int64)
        return Vectors(self.parts, normalise=self.normalise, rows=rows if self.rows is None else self.rows[rows])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if self.rows is None and step == 1:
                return self._range(start, max(start, stop))
            key = np.arange(start, stop, step)
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._gather(key.astype(np.int64) if self.rows is None else self.rows[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def chunks(self, size: int | None = None):
        """(start, rows) blocks of at most `size` rows (default: CHUNK_BYTES' worth), in order."""
        size = size or rows_per_chunk(self.dim)
        for start in range(0, len(self), size):
            yield start, self[start:start + size]

    def _unit(self, block) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        if self.normalise:
            with np.errstate(invalid="ignore", divide="ignore"):  # rows left out by --skip-invalid read as NaN
                block = block / np.linalg.norm(block, axis=1)[:, None]
        return block

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        blocks = []
        for p in range(max(first, 0), len(self.parts)):
            a, b = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
            if a >= stop:
                break
            if b > a:
                blocks.append(self.parts[p][a - self.offsets[p]:b - self.offsets[p]])
        if not blocks:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._unit(blocks[0] if len(blocks) == 1 else np.concatenate(
            [np.asarray(b, dtype=np.float32) for b in blocks]))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")  # read each shard in row order: sequential pages
        ordered = rows[order]
        part_of = np.searchsorted(self.offsets, ordered, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            out[order[sel]] = np.asarray(self.parts[p][ordered[sel] - self.offsets[p]], dtype=np.float32)
        return self._unit(out)


class _MappedFile:
    def __init__(self, array: np.memmap):
        self.filename, self.offset = str(array.filename), int(array.offset)
        self.dtype, self.shape = array.dtype, array.shape
        self.order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"

    def open(self) -> np.memmap:
        return np.memmap(self.filename, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape,
                         order=self.order)


def concatenate(sets: list) -> Vectors:
    """The rows of several `Vectors` (or arrays of unit rows) one after the other, without reading them."""
    return Vectors(sets, normalise=False)


def take(x, rows: np.ndarray):
    """x[rows] as a view when x is `Vectors` (nothing read), as an array otherwise."""
    return x.subset(rows) if isinstance(x, Vectors) else x[rows]


def materialise(x, budget_bytes: int):
    """x read into memory when it fits `budget_bytes`, else left as it is (read chunk by chunk by its users)."""
    if isinstance(x, Vectors) and x.nbytes <= budget_bytes:
        return x[:]
    return x


@dataclass
class EmbeddingSet:
    name: str
    source: str
    vectors: Vectors  # (N, D) unit float32 rows, read on demand
    paths: list[str] | None = None  # None for a bare .npy: rows are named by their index
    keys: list[str] | None = None
    pixels: np.ndarray | None = None  # width * height per row when the metadata has them
    manifest: dict = field(default_factory=dict)
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (row, why) left out with skip_invalid

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: False for the rows `invalid` lists."""
        mask = np.ones(len(self), dtype=bool)
        mask[[r for r, _ in self.invalid]] = False
        return mask

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.dim

    def names(self) -> list[str]:
        return self.paths if self.paths is not None else [str(i) for i in range(len(self))]


def _role(name: str) -> str:
    return "the pool" if name == "pool" else f"set {name!r}"


def _check_shape(array: np.ndarray, what: str) -> None:
    if array.ndim != 2:
        raise ValueError(f"{what} holds arrays of shape {array.shape}; curation needs one vector per image "
                         f"(embed with --pooling cls, mean or cls+mean).")


def _scan(arrays: list[np.ndarray], files: list[str], name: str, names: list[str] | None,
          progress=Silent, skip_invalid: bool = False) -> list[tuple[int, str]]:
    """One streaming pass over every row: refuses non-finite and zero rows (counting all of them and naming the
    first few), or returns them with skip_invalid; refuses a folder whose shards are some unit-length and some
    not."""
    bad: list[tuple[int, str]] = []  # (global row, what is wrong)
    unit_shards, raw_shards = [], []
    offset = 0
    bar = progress(total=sum(len(a) for a in arrays), desc=f"check {name}", unit="vector")
    chunk = rows_per_chunk(arrays[0].shape[1])
    for array, file in zip(arrays, files):
        unit = True
        for start in range(0, len(array), chunk):
            bar.update(min(chunk, len(array) - start))
            block = np.asarray(array[start:start + chunk], dtype=np.float32)
            finite = np.isfinite(block).all(axis=1)
            norms = np.linalg.norm(np.where(finite[:, None], block, 0), axis=1)
            bad += [(offset + start + int(r), "NaN or infinite values") for r in np.flatnonzero(~finite)]
            bad += [(offset + start + int(r), "a zero vector") for r in np.flatnonzero(finite & (norms == 0))]
            unit &= bool((np.abs(norms[finite & (norms > 0)] - 1) <= _UNIT_TOLERANCE).all())
        (unit_shards if unit else raw_shards).append(Path(file).name)
        offset += len(array)
    bar.close()
    bad.sort()
    if bad and not skip_invalid:
        shown = "; ".join(f"row {r}" + (f" ({names[r]})" if names is not None else "") + f": {why}"
                          for r, why in bad[:3])
        raise ValueError(f"{_role(name)} has {len(bad):,} unusable vector(s) (NaN, infinite or zero) -- {shown}"
                         f"{'; ...' if len(bad) > 3 else ''}. Re-embed those images, drop them from the set, or "
                         f"pass --skip-invalid to leave them out (listed in OUT/invalid.csv).")
    if unit_shards and raw_shards and len(arrays) > 1:
        raise ValueError(f"{_role(name)}: some shards hold unit vectors ({', '.join(unit_shards[:3])}) and some "
                         f"do not ({', '.join(raw_shards[:3])}) -- runs with and without --normalize were mixed. "
                         f"Re-embed into a new folder.")
    return bad


def _check_not_empty(n: int, name: str, source) -> None:
    if n == 0:
        what = "there is nothing to curate" if name == "pool" else "it cannot seed or exclude anything"
        raise ValueError(f"{_role(name)} ({source}) is empty, it holds no vectors: {what}. Check the path, or "
                         f"embed the images first.")


def load_set(path: str | Path, name: str = "pool", progress=Silent, skip_invalid: bool = False) -> EmbeddingSet:
    """An embedding set, checked in one streaming pass; its vectors stay on disk (memory-mapped). With
    skip_invalid, NaN/infinite/zero rows are listed in `invalid` instead of refused (`without_invalid` drops
    them; the pool keeps its row numbers and the pipeline leaves them out)."""
    path = Path(path)
    if path.suffix == ".npy" and path.is_file():
        array = np.load(path, mmap_mode="r")
        _check_shape(array, str(path))
        _check_not_empty(len(array), name, path)
        bad = _scan([array], [str(path)], name, None, progress=progress, skip_invalid=skip_invalid)
        return EmbeddingSet(name, str(path), Vectors([array]), invalid=bad)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give an embedding folder (`dinokit embed`, "
                                f"clip-retrieval) or an (N, D) .npy file.")
    manifest = store.read_manifest(path) or {}
    if manifest.get("pooling") == "patch":
        raise ValueError(f"{path} holds patch grids; embed with --pooling cls, mean or cls+mean to curate.")
    shards = store.list_shards(path)
    metadata = store.load_metadata(path)
    arrays, files, shapes = [], [], {}
    for emb_path, _ in shards:
        array = np.load(emb_path, mmap_mode="r")
        if len(array):
            _check_shape(array, str(emb_path))
            shapes.setdefault(array.shape[1:], emb_path.name)
            arrays.append(array)
            files.append(str(emb_path))
    if len(shapes) > 1:
        listed = ", ".join(f"{shard}: {d[0]}-d" for d, shard in shapes.items())
        raise ValueError(f"{path}: shards hold vectors of different sizes ({listed}) -- embeddings of different "
                         f"models or poolings were mixed in one folder. Re-embed into a new folder.")
    stated = manifest.get("dim")
    if stated is not None and shapes and next(iter(shapes))[0] != stated:
        raise ValueError(f"{path}: the manifest says {stated}-d vectors but the shards hold "
                         f"{next(iter(shapes))[0]}-d ones -- shards of another model were copied in. Re-embed into "
                         f"a new folder.")
    total = sum(len(a) for a in arrays)
    _check_not_empty(total, name, path)
    if total != metadata.num_rows:
        raise ValueError(f"{path}: {total} vectors but {metadata.num_rows} metadata rows; re-embed.")
    columns = metadata.column_names
    paths = metadata.column("path").to_pylist() if "path" in columns else None
    keys = [str(k) for k in metadata.column("key").to_pylist()] if "key" in columns else None
    pixels = None
    if "width" in columns and "height" in columns:
        pixels = (np.asarray(metadata.column("width").to_numpy(zero_copy_only=False), dtype=np.int64)
                  * np.asarray(metadata.column("height").to_numpy(zero_copy_only=False), dtype=np.int64))
    bad = _scan(arrays, files, name, paths, progress=progress, skip_invalid=skip_invalid)
    return EmbeddingSet(name, str(path), Vectors(arrays), paths, keys, pixels, manifest, bad)


def without_invalid(s: EmbeddingSet) -> EmbeddingSet:
    """A seed or evaluation set without its invalid rows (their row numbers do not matter to the output)."""
    if not s.invalid:
        return s
    rows = np.flatnonzero(s.valid)
    _check_not_empty(len(rows), s.name, s.source)

    def pick(values):
        return None if values is None else [values[r] for r in rows]
    names = pick(s.names())
    return EmbeddingSet(s.name, s.source, s.vectors.subset(rows), names, pick(s.keys),
                        None if s.pixels is None else s.pixels[rows], s.manifest)


def _recorded(manifest: dict) -> dict:
    """What a manifest says about how its vectors were made (empty for a .npy or a clip-retrieval folder)."""
    model = manifest.get("model") or {}
    return {k: v for k, v in (("weights", model.get("weights_sha256")), ("model", model.get("spec")),
                              ("pooling", manifest.get("pooling"))) if v}


def check_compatible(pool: EmbeddingSet, others: list[EmbeddingSet], log=None) -> None:
    """One clear error when a seed or evaluation set cannot be compared with the pool; a logged note when
    one side records nothing to compare (a .npy, a clip-retrieval folder)."""
    mine = _recorded(pool.manifest)
    for other in others:
        if other.dim != pool.dim:
            raise ValueError(f"{other.name} ({other.source}) has {other.dim}-d vectors but the pool "
                             f"({pool.source}) has {pool.dim}-d: embed both with the same model and pooling.")
        theirs = _recorded(other.manifest)
        # Weights decide when both record them (one model saved under two paths is the same model); the
        # model spec only when neither has weights; pooling always when both record it.
        keys = (["weights"] if "weights" in mine and "weights" in theirs else ["model"]) + ["pooling"]
        differ = [k for k in keys if k in mine and k in theirs and mine[k] != theirs[k]]
        if differ:
            said = "; ".join(f"{k} {str(theirs[k])[:16]!r} vs the pool's {str(mine[k])[:16]!r}" for k in differ)
            raise ValueError(f"{other.name} ({other.source}) was embedded differently from the pool ({said}): "
                             f"similarities between them mean nothing. Embed both with the same model and "
                             f"--pooling.")
        if log and bool(mine) != bool(theirs):
            log(f"note: {other.name} and the pool cannot be checked for the same model and pooling "
                f"({other.source if not theirs else pool.source} records neither); make sure they match")


def parse_named(spec: str, option: str) -> tuple[str, str]:
    """'NAME=PATH' (or a bare PATH, named after its file) for --seed / --exclude."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).stem
    if not name or not path:
        raise ValueError(f"{option} {spec!r}: expected NAME=PATH")
    return name, path
