"""Embedding folders in clip-retrieval's layout, written shard by shard and read back in order.

    DIR/manifest.json                   model, preprocessing, pooling, dimension, dtype, counts, `complete`
    DIR/img_emb/img_emb_{i}.npy         float32/float16, (rows, D) or (rows, N, D) for patch grids
    DIR/metadata/metadata_{i}.parquet   path, width, height -- row r describes row r of img_emb_{i}.npy
    DIR/errors/errors_{i}.parquet       files of shard i that could not be read (path, reason); only if any
    DIR/errors.parquet                  all of them, merged when the run finishes
    DIR/.dinokit.lock                   while a run writes DIR (`dinokit.locking`); a second run refuses

Shard numbers are zero-padded to the width of the largest one (as clip-retrieval does), so sorting names
sorts shards. Every file is written under a unique temporary name and renamed (`dinokit.atomic`); the metadata file is renamed last,
so a shard whose metadata exists is complete, and a half-written shard is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from dinokit.atomic import atomic_write  # also imported from here by other modules

EMBEDDINGS_DIR = "img_emb"
METADATA_DIR = "metadata"
ERRORS_DIR = "errors"
MANIFEST = "manifest.json"
ERRORS = "errors.parquet"

_SHARD_NUMBER = re.compile(r"_(\d+)\.(?:npy|parquet)$")


def _pa():
    from dinokit.extras import optional_import

    return (optional_import("pyarrow", purpose="embedding folders"),
            optional_import("pyarrow.parquet", purpose="embedding folders"))


def shard_stem(index: int, num_shards: int) -> str:
    return f"{index:0{len(str(max(num_shards - 1, 0)))}d}"


def shard_paths(root: Path, index: int, num_shards: int) -> tuple[Path, Path, Path]:
    """(embeddings, metadata, errors) files of shard `index`."""
    stem = shard_stem(index, num_shards)
    root = Path(root)
    return (root / EMBEDDINGS_DIR / f"img_emb_{stem}.npy",
            root / METADATA_DIR / f"metadata_{stem}.parquet",
            root / ERRORS_DIR / f"errors_{stem}.parquet")


def is_shard_complete(root: Path, index: int, num_shards: int) -> bool:
    embeddings, metadata, _ = shard_paths(root, index, num_shards)
    return metadata.is_file() and embeddings.is_file()


def write_shard(root: Path, index: int, num_shards: int, embeddings: np.ndarray, metadata: dict[str, list],
                errors: dict[str, list] | None = None) -> None:
    """Write one shard; `metadata` holds equal-length columns with one row per embedding row."""
    pa, pq = _pa()
    rows = {len(values) for values in metadata.values()}
    if rows != {len(embeddings)}:
        raise ValueError(f"shard {index}: {len(embeddings)} embeddings but metadata columns of lengths {rows}")
    emb_path, meta_path, err_path = shard_paths(root, index, num_shards)

    # Errors first and metadata last: the metadata file is the mark of a finished shard.
    if errors and errors.get("path"):
        atomic_write(err_path, lambda tmp: pq.write_table(pa.table(errors), tmp))
    elif err_path.exists():  # left over from an interrupted attempt whose files have since become readable
        err_path.unlink()

    def save_array(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, np.ascontiguousarray(embeddings))

    atomic_write(emb_path, save_array)
    atomic_write(meta_path, lambda tmp: pq.write_table(pa.table(metadata), tmp))


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(root: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(Path(root) / MANIFEST, lambda tmp: tmp.write_text(text))


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    files = {}
    for path in folder.glob(f"{prefix}_*{suffix}"):
        match = _SHARD_NUMBER.search(path.name)
        if match and path.name.startswith(prefix + "_"):
            files[int(match.group(1))] = path
    return files


def list_shards(root: Path) -> list[tuple[Path, Path]]:
    """(embeddings, metadata) file pairs of a finished embedding folder, in shard order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Embedding folder {root} does not exist. Create it with `dinokit embed`.")
    manifest = read_manifest(root)
    embeddings = _numbered(root / EMBEDDINGS_DIR, "img_emb", ".npy")
    metadata = _numbered(root / METADATA_DIR, "metadata", ".parquet")
    if manifest is not None and not manifest.get("complete", False):
        raise ValueError(f"The embedding run in {root} is incomplete ({len(metadata)} of "
                         f"{manifest.get('num_shards', '?')} shards done). Run the same `dinokit embed` command "
                         f"again to finish it.")
    if not embeddings:
        raise FileNotFoundError(f"No {EMBEDDINGS_DIR}/img_emb_*.npy files in {root}. Is this an embedding folder "
                                f"written by `dinokit embed` (or clip-retrieval)?")
    if embeddings.keys() != metadata.keys():
        missing = sorted(embeddings.keys() ^ metadata.keys())
        raise ValueError(f"{root}: shards {missing[:5]} have embeddings without metadata or the reverse; "
                         f"the folder is damaged. Re-run `dinokit embed` into it to repair it.")
    return [(embeddings[i], metadata[i]) for i in sorted(embeddings)]


def load_metadata(root: Path, columns: list[str] | None = None):
    """All metadata rows as one pyarrow Table, row-aligned with `load_embeddings`.

    clip-retrieval names the path column `image_path`; it is renamed to `path`.
    """
    pa, pq = _pa()
    tables = []
    for _, meta_path in list_shards(root):
        table = pq.read_table(meta_path)
        if "path" not in table.column_names and "image_path" in table.column_names:
            table = table.rename_columns(["path" if c == "image_path" else c for c in table.column_names])
        tables.append(table.select(columns) if columns else table)
    return pa.concat_tables(tables, promote_options="default")


def load_embeddings(root: Path, *, dtype: np.dtype | str | None = None, with_metadata: bool = False):
    """All embedding rows of a finished folder, shards in order; with the metadata table if asked.

    Checks that each shard has as many metadata rows as embedding rows.
    """
    _, pq = _pa()
    arrays = []
    for emb_path, meta_path in list_shards(root):
        array = np.load(emb_path, mmap_mode="r")
        rows = pq.ParquetFile(meta_path).metadata.num_rows
        if len(array) != rows:
            raise ValueError(f"{emb_path.name} has {len(array)} rows but {meta_path.name} has {rows}; the folder "
                             f"is damaged. Re-run `dinokit embed` into a new folder.")
        arrays.append(array)
    embeddings = np.concatenate(arrays) if len(arrays) > 1 else np.array(arrays[0])
    if dtype is not None:
        embeddings = embeddings.astype(dtype, copy=False)
    if with_metadata:
        return embeddings, load_metadata(root)
    return embeddings


def merge_errors(root: Path, num_shards: int) -> int:
    """Collect the per-shard error files into errors.parquet (written even when empty); returns its rows."""
    pa, pq = _pa()
    tables = [pq.read_table(err) for i in range(num_shards)
              if (err := shard_paths(root, i, num_shards)[2]).is_file()]
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    atomic_write(Path(root) / ERRORS, lambda tmp: pq.write_table(table, tmp))
    return table.num_rows
