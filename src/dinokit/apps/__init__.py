"""Everyday jobs on DINOv2 features: embed folders, index, search, find duplicates, PCA pictures.

Each job is a Python function; `dinokit.apps.cli` puts a thin command line over them.
Embedding folders use clip-retrieval's layout (`dinokit.apps.store`), so autofaiss and friends read them too.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed": "dinokit.apps.embed",
    "build_index": "dinokit.apps.index",
    "search": "dinokit.apps.search",
    "dedup": "dinokit.apps.dedup",
    "find_duplicate_groups": "dinokit.apps.dedup",
    "pca_picture": "dinokit.apps.pca",
    "load_embeddings": "dinokit.apps.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: faiss, pyarrow and torch load only for the job that needs them.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dinokit.apps' has no attribute {name!r}")
