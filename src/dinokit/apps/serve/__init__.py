"""`dinokit serve`: an image-search service and web page over an embedding folder (FastAPI + uvicorn).

    collection.py  the served images, their index and model (ids = embedding rows)
    uploads.py     bytes to an RGB image, or a clear refusal (the one place images are decoded)
    lanes.py       the threads work runs on, per kind of work, and how abandoned work stops
    budget.py      a time budget per request; cancelling the work of clients that left
    batching.py    dynamic batching of concurrent requests onto the model lane
    clusters.py    the clusters of a `dinokit curate` output over the collection (--curate)
    app.py         the HTTP API and the web page (static/, no build step)

Needs the `serve` extra: pip install 'dinokit[serve]'.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

log = logging.getLogger("dinokit.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(emb_dir: str | Path, *, model=None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
          max_wait_ms: float = 5.0, max_upload_mb: float = 20.0, device: str = "auto",
          request_timeout: float = 30.0, absolute_paths: bool = False, curate: str | Path | None = None) -> None:
    """Serve the collection in `emb_dir` until interrupted (see `dinokit serve --help`)."""
    try:
        import uvicorn

        from dinokit.apps.serve.app import create_app
    except ImportError as exc:  # RuntimeError: the command line reports it in one line
        raise RuntimeError(f"`dinokit serve` needs FastAPI, uvicorn and python-multipart ({exc}): "
                           f"pip install 'dinokit[serve]'") from None
    from dinokit.apps.serve.collection import Collection

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    if request_timeout < 0:
        raise ValueError(f"--request-timeout must be positive (0: no limit), got {request_timeout}")
    collection = Collection(emb_dir, model=model, device=device)
    clusters = None
    if curate is not None:
        from dinokit.apps.serve.clusters import CurateClusters

        clusters = CurateClusters(curate, collection.vectors, collection.paths)
        log.info("curation %s: %s clusters per level, %d images selected", curate, clusters.summary()["levels"],
                 clusters.summary()["selected"])
    log.info("%d images, %d-dimensional %s vectors, index: %s, model: %s on %s", len(collection), collection.dim,
             collection.pooling, collection.index_kind, collection.model_spec, collection.device)
    if not _is_loopback(host):
        log.warning("listening on %s: anyone who can reach this machine can search and download the collection",
                    host)
        if absolute_paths:
            log.warning("--absolute-paths: answers show where the images lie on this machine")
    app = create_app(collection, max_batch=max_batch, max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb,
                     request_timeout=request_timeout, absolute_paths=absolute_paths, clusters=clusters)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
