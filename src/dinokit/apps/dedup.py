"""Near-duplicate groups: connected components of the graph "cosine similarity >= threshold".

Edges come from an exact faiss range search (every pair is compared, so the cost grows as n^2 -- fine for
hundreds of thousands of images on a CPU), components from scipy. Groups are transitive: if A~B and B~C,
A, B and C form one group even when A and C are further apart than the threshold.

Which image of a group is kept: the one with the most pixels (width * height); on a tie, the smallest path in
string order. Every other member is listed for removal, with its similarity to the kept image.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dinokit.apps import store
from dinokit.apps.index import _faiss, normalized_float32
from dinokit.extras import optional_import, require

# faiss finds the pairs, scipy the connected components, pyarrow reads the embedding folder.
DEDUP_MODULES = ("faiss", "scipy.sparse.csgraph", "pyarrow", "pyarrow.parquet")

KEEP_RULE = "most pixels (width*height), then smallest path"


def find_duplicate_groups(embeddings: np.ndarray, threshold: float = 0.95, *,
                          batch_size: int = 4096) -> list[np.ndarray]:
    """Row indices of each group of 2+ embeddings linked by cosine similarity >= threshold.

    Groups are sorted arrays, listed in order of their first row.
    """
    sparse = optional_import("scipy.sparse", purpose="grouping near-duplicates")
    csgraph = optional_import("scipy.sparse.csgraph", purpose="grouping near-duplicates")

    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    faiss = _faiss()
    vectors = normalized_float32(embeddings)
    n = len(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps scores > radius
    sources, targets = [], []
    for start in range(0, n, batch_size):
        lims, _, ids = index.range_search(vectors[start:start + batch_size], radius)
        queries = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        pair = ids > queries  # each pair once, no self-loops
        sources.append(queries[pair])
        targets.append(ids[pair])
    sources, targets = np.concatenate(sources), np.concatenate(targets)
    graph = sparse.coo_matrix((np.ones(len(sources), dtype=np.int8), (sources, targets)), shape=(n, n))
    _, labels = csgraph.connected_components(graph, directed=False)

    order = np.argsort(labels, kind="stable")  # rows of one component become contiguous, ascending
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, boundaries) if len(g) >= 2]
    return sorted(groups, key=lambda g: g[0])


def representative(group: np.ndarray, paths: list[str], pixels: np.ndarray) -> int:
    """The row kept from `group` (see KEEP_RULE)."""
    return int(min(group, key=lambda i: (-int(pixels[i]), paths[i])))


@dataclass
class DedupReport:
    num_images: int
    threshold: float
    groups: list[dict] = field(default_factory=list)  # {"group", "keep", "remove", "similarity"}
    csv_path: str = ""
    json_path: str = ""

    @property
    def num_duplicates(self) -> int:
        return sum(len(g["remove"]) for g in self.groups)


def dedup(emb_dir: str | Path, threshold: float = 0.95, output: str | Path | None = None) -> DedupReport:
    """Find near-duplicate groups in an embedding folder; write them as CSV and JSON.

    output: the CSV file (default EMB_DIR/duplicates.csv); the JSON goes next to it with the suffix .json.
    CSV columns: group, path, keep (1 for the kept image), width, height, similarity (to the kept image).
    """
    require(*DEDUP_MODULES, purpose="finding near-duplicates")
    emb_dir = Path(emb_dir)
    manifest = store.read_manifest(emb_dir) or {}
    if manifest.get("pooling") == "patch":
        raise ValueError(f"{emb_dir} holds patch grids; embed with --pooling cls, mean or cls+mean to deduplicate")
    embeddings, metadata = store.load_embeddings(emb_dir, with_metadata=True)
    if embeddings.ndim != 2:
        raise ValueError(f"{emb_dir} holds arrays of shape {embeddings.shape[1:]} per image; dedup needs vectors")
    paths = metadata.column("path").to_pylist()
    columns = metadata.column_names
    widths = np.asarray(metadata.column("width").to_numpy() if "width" in columns else np.zeros(len(paths)))
    heights = np.asarray(metadata.column("height").to_numpy() if "height" in columns else np.zeros(len(paths)))
    pixels = widths.astype(np.int64) * heights.astype(np.int64)

    vectors = normalized_float32(embeddings)
    report = DedupReport(num_images=len(paths), threshold=threshold)
    rows = []
    for number, group in enumerate(find_duplicate_groups(vectors, threshold)):
        keep = representative(group, paths, pixels)
        others = sorted((int(i) for i in group if i != keep), key=lambda i: paths[i])
        similarity = [float(vectors[i] @ vectors[keep]) for i in others]
        report.groups.append({"group": number, "keep": paths[keep], "remove": [paths[i] for i in others],
                              "similarity": [round(s, 6) for s in similarity]})
        for i, s in [(keep, 1.0), *zip(others, similarity)]:
            rows.append([number, paths[i], int(i == keep), int(widths[i]), int(heights[i]), round(s, 6)])

    csv_path = Path(output) if output is not None else emb_dir / "duplicates.csv"
    json_path = csv_path.with_suffix(".json")

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group", "path", "keep", "width", "height", "similarity"])
            writer.writerows(rows)

    summary = {"threshold": threshold, "num_images": report.num_images, "num_groups": len(report.groups),
               "num_duplicates": report.num_duplicates, "keep_rule": KEEP_RULE, "groups": report.groups}
    store.atomic_write(csv_path, write_csv)
    store.atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    report.csv_path, report.json_path = str(csv_path), str(json_path)
    return report
