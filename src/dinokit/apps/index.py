"""Build a faiss index over an embedding folder: cosine similarity as inner product of L2-normalised vectors.

Up to `exact_max` vectors the index is exact (IndexFlatIP). Above it an approximate index is built --
IVF-Flat with about 4*sqrt(n) lists by default, or HNSW -- and its search parameter (nprobe / efSearch) is raised
until recall@10 against exact search, measured on a sample of the vectors, reaches `target_recall`.
The measured recall is saved with the index and returned.

    INDEX_DIR/index.faiss       the faiss index
    INDEX_DIR/metadata.parquet  path, width, height, ... of each indexed row (faiss id = row number)
    INDEX_DIR/index.json        kind, parameters, recall@10, counts and the embedding manifest (written last:
                                a folder without it holds no index; a rebuild removes it first)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dinokit import atomic, locking
from dinokit.apps import store
from dinokit.extras import optional_import, require

INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
INFO_FILE = "index.json"
DEFAULT_SUBDIR = "index"
KINDS = ("auto", "flat", "ivf", "hnsw")


# What reading, building and searching an index imports (pyarrow: the metadata tables).
INDEX_MODULES = ("faiss", "pyarrow", "pyarrow.parquet")


def _faiss():
    return optional_import("faiss", purpose="faiss indexes")


def _parquet():
    return optional_import("pyarrow.parquet", purpose="faiss indexes (their metadata tables)")


@dataclass
class IndexReport:
    kind: str  # "flat" (exact), "ivf" or "hnsw"
    num_vectors: int
    dim: int
    params: dict = field(default_factory=dict)
    recall_at_10: float = 1.0  # against exact search; 1.0 for the exact index
    recall_queries: int = 0
    output_dir: str = ""


def normalized_float32(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy with unit-length rows (zero rows stay zero), as faiss inner-product search expects."""
    vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise ValueError(f"expected vectors of shape (n, dim), got {vectors.shape}")
    _faiss().normalize_L2(vectors)
    return vectors


def _without_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> list[np.ndarray]:
    # Queries are database rows; finding a row itself is trivial, so recall is measured on the k others.
    return [row[row != qid][:k] for row, qid in zip(ids, query_ids)]


def recall_at_k(index, vectors: np.ndarray, query_ids: np.ndarray, k: int = 10) -> float:
    """Share of the k exact nearest neighbours (other than the query itself) that `index` returns."""
    faiss = _faiss()
    queries = vectors[query_ids]
    _, exact = faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, k + 1)
    hits = [len(set(e.tolist()) & set(f.tolist())) / max(len(e), 1)
            for e, f in zip(_without_self(exact, query_ids, k), _without_self(found, query_ids, k))]
    return float(np.mean(hits))


def _build_ivf(vectors: np.ndarray, rng: np.random.Generator):
    faiss = _faiss()
    n, dim = vectors.shape
    nlist = int(min(max(4 * math.sqrt(n), 16), n // 39 or 1, 65536))  # faiss wants >= 39 training points a list
    train = vectors[np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    index.add(vectors)
    candidates = sorted({min(2 ** i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    return index, {"nlist": nlist}, "nprobe", candidates


def _build_hnsw(vectors: np.ndarray, rng: np.random.Generator):
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vectors)
    return index, {"M": 32, "efConstruction": 80}, "efSearch", [16, 32, 64, 128, 256, 512, 1024]


def _set_search_param(index, name: str, value: int) -> None:
    if name == "nprobe":
        index.nprobe = value
    else:
        index.hnsw.efSearch = value


def build_index(emb_dir: str | Path, output_dir: str | Path | None = None, *, kind: str = "auto",
                exact_max: int = 200_000, target_recall: float = 0.95, recall_queries: int = 1000,
                seed: int = 0) -> IndexReport:
    """Index the embeddings of `emb_dir` (written by `dinokit embed`) into `output_dir` (default emb_dir/index).

    kind: "auto" (exact up to `exact_max` vectors, IVF-Flat above), "flat", "ivf" or "hnsw".
    """
    require(*INDEX_MODULES, purpose="building an index")
    faiss = _faiss()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    emb_dir = Path(emb_dir)
    output_dir = Path(output_dir) if output_dir is not None else emb_dir / DEFAULT_SUBDIR
    store.list_shards(emb_dir)  # a missing or unfinished embedding folder is refused before anything is created
    with locking.acquire(output_dir, "dinokit index"):  # a second build into this folder refuses at once
        return _build_index(faiss, emb_dir, output_dir, kind, exact_max, target_recall, recall_queries, seed)


def _build_index(faiss, emb_dir: Path, output_dir: Path, kind: str, exact_max: int, target_recall: float,
                 recall_queries: int, seed: int) -> IndexReport:
    manifest = store.read_manifest(emb_dir) or {}
    if manifest.get("pooling") == "patch":
        raise ValueError(f"{emb_dir} holds patch grids, not one vector per image. Embed with --pooling cls, mean "
                         f"or cls+mean to build a search index.")
    vectors, metadata = store.load_embeddings(emb_dir, with_metadata=True)
    if vectors.ndim != 2:
        raise ValueError(f"{emb_dir} holds arrays of shape {vectors.shape[1:]} per image; an index needs vectors")
    if len(vectors) == 0:
        raise ValueError(f"{emb_dir} holds no embeddings (every input failed? see its errors.parquet)")
    vectors = normalized_float32(vectors)
    n, dim = vectors.shape

    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    report = IndexReport(kind=kind, num_vectors=n, dim=dim)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
    else:
        rng = np.random.default_rng(seed)
        index, report.params, param, candidates = (_build_ivf if kind == "ivf" else _build_hnsw)(vectors, rng)
        query_ids = np.sort(rng.choice(n, size=min(n, recall_queries), replace=False))
        for value in candidates:  # cheapest setting that reaches the target recall
            _set_search_param(index, param, value)
            report.recall_at_10 = recall_at_k(index, vectors, query_ids, k=10)
            if report.recall_at_10 >= target_recall:
                break
        report.params[param] = value
        report.recall_queries = len(query_ids)

    report.output_dir = str(output_dir)
    pq = _parquet()
    # index.json marks a whole index: remove it first, so an interrupted rebuild never pairs the old index.json
    # with a new index.faiss (or the reverse); an index folder is one build or none.
    atomic.remove_stale_temporaries(output_dir)
    (output_dir / INFO_FILE).unlink(missing_ok=True)
    store.atomic_write(output_dir / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    store.atomic_write(output_dir / METADATA_FILE, lambda tmp: pq.write_table(metadata, tmp))
    info = {**asdict(report), "embeddings_dir": str(emb_dir.resolve()), "embeddings_manifest": manifest}
    text = json.dumps(info, indent=2) + "\n"
    store.atomic_write(output_dir / INFO_FILE, lambda tmp: tmp.write_text(text))
    return report


def resolve_index_dir(path: str | Path) -> Path:
    """An index folder, or an embedding folder that holds one in index/."""
    path = Path(path)
    for candidate in (path, path / DEFAULT_SUBDIR):
        if (candidate / INFO_FILE).is_file():
            return candidate
    if (path / store.MANIFEST).is_file() or (path / store.EMBEDDINGS_DIR).is_dir():
        raise FileNotFoundError(f"{path} is an embedding folder without an index. Build one with "
                                f"`dinokit index {path}`.")
    raise FileNotFoundError(f"No index in {path} ({INFO_FILE} missing). Build one with `dinokit index EMB_DIR`.")


def load_index(path: str | Path):
    """(faiss index with its tuned search parameter, metadata Table, info dict) of an index folder."""
    require(*INDEX_MODULES, purpose="reading an index")
    faiss, pq = _faiss(), _parquet()
    index_dir = resolve_index_dir(path)
    info = json.loads((index_dir / INFO_FILE).read_text())
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    for name in ("nprobe", "efSearch"):
        if name in info.get("params", {}):
            _set_search_param(index, name, int(info["params"][name]))
    return index, pq.read_table(index_dir / METADATA_FILE), info
