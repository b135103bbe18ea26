"""The clusters of a `dinokit curate` output over the served collection, for the page's Clusters tab.

`dinokit curate` writes, in OUT/: clusters/rows.npy (the pool rows it clustered, i.e. those left after dedup and
decontamination), clusters/level{l}.npy (the cluster of each level-l input: a clustered row at level 1, a
level-(l-1) cluster above), centroids_level{l}.npy, and selected.parquet (row, times_selected). Pool rows are
embedding rows, which are the served image ids, so the files are read as they are: nothing is recomputed but the
distance of each image to the centroid of its cluster at each level (members are listed closest first).

The output must be finished (its manifest says `complete`) and made from this collection: the same number of
rows and, when recorded, the same image paths in the same order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def names_sha256(names: list[str]) -> str:
    """The fingerprint `dinokit curate` records of its pool's row names (`pool_names_sha256`)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class CurateClusters:
    def __init__(self, output: str | Path, vectors: np.ndarray, paths: list[str]) -> None:
        self.output = Path(output)
        manifest_path = self.output / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.output} holds no manifest.json: give --curate the output folder of a "
                                    f"finished `dinokit curate` run (rerun the same command to finish one).")
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise ValueError(f"the `dinokit curate` run in {self.output} is not finished; rerun it to finish it.")
        if manifest.get("num_pool") != len(paths):
            raise ValueError(f"{self.output} curated a pool of {manifest.get('num_pool')} images but this "
                             f"collection has {len(paths)}: give --curate the output made from this folder.")
        recorded = manifest.get("pool_names_sha256")
        if recorded is not None and recorded != names_sha256(paths):
            raise ValueError(f"{self.output} curated a pool of other images (its image paths differ from this "
                             f"collection's): give --curate the output made from this folder.")
        self.ks = [int(k) for k in manifest.get("levels") or []]
        if not self.ks:
            raise ValueError(f"{self.output} was curated without the kmeans stage: it has no clusters to show.")
        folder = self.output / "clusters"
        self.rows = np.load(folder / "rows.npy").astype(np.int64)
        labels = np.load(folder / "level1.npy").astype(np.int64)
        self.labels = [labels]  # per level: the cluster of each clustered row
        for level in range(2, len(self.ks) + 1):
            labels = np.load(folder / f"level{level}.npy").astype(np.int64)[labels]
            self.labels.append(labels)
        points = np.asarray(vectors[self.rows], dtype=np.float32)
        self.order, self.bounds, self.distance = [], [], []
        for level, labels in enumerate(self.labels, start=1):
            centroids = np.load(folder / f"centroids_level{level}.npy").astype(np.float32)
            gap = points - centroids[labels]
            distance = np.einsum("ij,ij->i", gap, gap)
            order = np.lexsort((distance, labels))  # by cluster, each closest to its centroid first
            self.order.append(order)
            self.bounds.append(np.r_[0, np.cumsum(np.bincount(labels, minlength=len(centroids)))])
            self.distance.append(distance)
        self.times = np.zeros(len(paths), dtype=np.int64)
        selected = self.output / "selected.parquet"
        if selected.is_file():
            from dinokit.extras import optional_import

            table = optional_import("pyarrow.parquet", purpose="curation outputs").read_table(
                selected, columns=["row", "times_selected"])
            self.times[table.column("row").to_numpy()] = table.column("times_selected").to_numpy()
        self.counts = manifest.get("counts") or {}

    def summary(self) -> dict:
        return {"output": self.output.name, "levels": [int(b.size - 1) for b in self.bounds],
                "clustered": len(self.rows), "selected": int((self.times > 0).sum()),
                "selected_with_repeats": int(self.times.sum())}

    def check_level(self, level: int) -> None:
        if not 1 <= level <= len(self.labels):
            raise LookupError(f"no level {level}: this curate output has levels 1 to {len(self.labels)}")

    def check_cluster(self, level: int, cluster: int) -> None:
        self.check_level(level)
        if not 0 <= cluster < len(self.bounds[level - 1]) - 1:
            raise LookupError(f"no cluster {cluster} at level {level}: it has clusters 0 to "
                              f"{len(self.bounds[level - 1]) - 2}")

    def members(self, level: int, cluster: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, squared distances to the centroid) of a cluster, closest first."""
        self.check_cluster(level, cluster)
        b = self.bounds[level - 1]
        positions = self.order[level - 1][b[cluster]:b[cluster + 1]]
        return self.rows[positions], self.distance[level - 1][positions]

    def clusters(self, level: int, sort: str = "size") -> list[dict]:
        """Every cluster of a level: id, images, images selected; largest first (or by id)."""
        self.check_level(level)
        sizes = np.diff(self.bounds[level - 1])
        picked = np.bincount(self.labels[level - 1], weights=self.times[self.rows] > 0, minlength=len(sizes))
        ids = np.argsort(-sizes, kind="stable") if sort == "size" else np.arange(len(sizes))
        return [{"id": int(c), "images": int(sizes[c]), "selected": int(picked[c])} for c in ids]
