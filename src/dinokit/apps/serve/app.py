"""The FastAPI application of `dinokit serve`: JSON API under /api, the web page at /.

Errors are JSON `{"error": "..."}` naming the problem; unexpected failures are logged with their traceback and
answered with a 500 that carries none. Images are named only by id (an integer path parameter), so no request
can reach a file outside the collection, and paths are shown relative to the collection root unless
`absolute_paths`. Every answer, errors included, carries `X-Content-Type-Options: nosniff` (one outermost
middleware), and originals are served with the media type of their contents, never of their extension.

Every request has a time budget (`request_timeout`, budget.py) and its work runs in lanes (lanes.py): uploads'
embeddings on the batcher's model lane, PCA pictures and duplicate groupings on the heavy lane (admitting
`heavy_queue` requests at once), upload decoding on the decode lane. Work of a request that timed out or whose
client left is skipped or stopped at the model's next block.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dinokit.apps.serve.batching import DynamicBatcher
from dinokit.apps.serve.budget import RequestBudget, budget_of, timeout_message
from dinokit.apps.serve.clusters import CurateClusters
from dinokit.apps.serve.collection import Collection, UnknownImage
from dinokit.apps.serve.lanes import Lane, LaneFull, WorkStopped
from dinokit.apps.serve.uploads import BadImage, decode_upload

log = logging.getLogger("dinokit.serve")

VECTOR_POOLINGS = ("cls", "mean", "cls+mean")
MAX_K = 1000
REQUEST_TIMEOUT = 30.0  # seconds of server work per request (--request-timeout)
HEAVY_QUEUE = 4  # PCA pictures / duplicate groupings admitted at once (running or waiting); more get 503
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"

SEARCH_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the query image"},
        "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": MAX_K}}}},
    "application/json": {"schema": {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "integer", "description": "an indexed image, as returned in results"},
        "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": MAX_K}}}},
}, "required": True}


class UploadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the upload limit of {limit / 2**20:g} MB "
                              f"(--max-upload-mb)")


class UploadLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, from Content-Length or while streaming,
    before the multipart parser spools them anywhere."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, UploadTooLarge(self.limit).detail)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise UploadTooLarge(self.limit)
            return message

        return await self.app(scope, limited_receive, send)


class NoSniff:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every answer, so a browser never reads a file as
    another type than the one it is served as."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_nosniff(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        return await self.app(scope, receive, send_nosniff)


class ServeApp(FastAPI):
    """FastAPI with the budget and the nosniff header outside even its error middleware, so they cover every
    answer, the 500s included."""

    request_timeout: float | None = None

    def build_middleware_stack(self):
        self.state.budget = RequestBudget(super().build_middleware_stack(), self.request_timeout)
        return NoSniff(self.state.budget)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _int_field(value, name: str, default: int | None, low: int, high: int) -> int:
    if value is None or value == "":
        if default is None:
            raise HTTPException(422, f"{name} is required")
        return default
    try:
        number = int(value)
        if isinstance(value, bool) or (isinstance(value, float) and value != number):
            raise ValueError
    except (TypeError, ValueError):
        raise HTTPException(422, f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise HTTPException(422, f"{name} must be between {low} and {high}, got {number}")
    return number


def create_app(collection: Collection, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_upload_mb: float = 20.0, request_timeout: float | None = REQUEST_TIMEOUT,
               heavy_queue: int = HEAVY_QUEUE, absolute_paths: bool = False,
               clusters: CurateClusters | None = None) -> FastAPI:
    """The app serving `collection`. request_timeout: seconds of work per request (None or 0: no limit);
    heavy_queue: PCA pictures and duplicate groupings admitted at once; absolute_paths: show stored paths;
    clusters: a `dinokit curate` output over this collection, shown in the Clusters tab."""
    if request_timeout is not None and request_timeout < 0:
        raise ValueError(f"--request-timeout must be positive (0: no limit), got {request_timeout}")
    batcher = DynamicBatcher(collection.embed_batch, max_batch=max_batch, max_wait_ms=max_wait_ms)
    heavy = Lane("heavy", capacity=heavy_queue, describes="PCA pictures or duplicate groupings")
    decoder = Lane("decode", workers=DECODE_THREADS)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        heavy.shutdown()
        decoder.shutdown()

    app = ServeApp(title="dinokit serve", version="1", lifespan=lifespan,
                   description="Image search over an embedding folder written by `dinokit embed`.")
    app.request_timeout = request_timeout or None
    app.state.collection, app.state.batcher, app.state.heavy, app.state.decoder = collection, batcher, heavy, decoder
    app.add_middleware(UploadLimit, limit=int(max_upload_mb * 2**20))

    def describe(image_id: int, score: float | None = None) -> dict:
        return collection.describe(image_id, score, absolute=absolute_paths)

    # ------------------------------------------------------------------------------------------------ errors
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request",
                                    e.get("msg", "invalid")) for e in exc.errors()]
        return _error(422, "; ".join(problems))

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage):
        log.info("refused upload on %s: %s", request.url.path, exc)
        return _error(exc.status, f"image: {exc}")

    @app.exception_handler(UnknownImage)
    async def unknown_image(request: Request, exc: UnknownImage):
        return _error(404, str(exc))

    @app.exception_handler(LaneFull)
    async def lane_full(request: Request, exc: LaneFull):
        log.info("refused %s: %s", request.url.path, exc)
        return _error(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(WorkStopped)
    async def work_stopped(request: Request, exc: WorkStopped):  # the model thread saw the deadline first
        return _error(504, timeout_message(app.request_timeout or 0))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error while answering this request; the server log has the details")

    # ------------------------------------------------------------------------------------------------ helpers
    async def read_upload(upload) -> bytes:
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "image: send the query image as a file in the multipart field `image`")
        return await upload.read()

    async def embed_bytes(request: Request, data: bytes, pooling: str):
        def prepare():
            return collection.preprocess(decode_upload(data))

        stop = budget_of(request.scope).stopped
        pixels = await decoder.run(prepare, stop=stop)  # decoding on the decode lane; the model in the batcher
        return await batcher.submit((pixels, pooling), stop=stop)

    # ------------------------------------------------------------------------------------------------ API
    @app.get("/api/health", summary="collection size, model and vector dimension")
    async def health():
        budget = getattr(app.state, "budget", None)
        return {"status": "ok", "images": len(collection), "model": model_name(), "dim": collection.dim,
                "pooling": collection.pooling, "image_size": collection.image_size,
                "index": collection.index_kind, "max_batch": batcher.max_batch,
                "model_batches": batcher.batches_run, "model_batch_items": batcher.items_run,
                "request_timeout": app.request_timeout,
                "requests_timed_out": budget.counts["timed_out"] if budget else 0,
                "requests_abandoned": budget.counts["disconnected"] if budget else 0,
                "lanes": {"model": batcher.lane.stats(), "heavy": heavy.stats(), "decode": decoder.stats()},
                "curate": clusters.summary() if clusters else None}

    def model_name():
        return collection.model_spec if absolute_paths else collection.model_name

    @app.post("/api/embed", summary="the embedding of an uploaded image")
    async def embed(request: Request, image: UploadFile = File(..., description="the image to embed"),
                    pooling: str | None = Form(None, description="cls, mean or cls+mean (default: the collection's)")):
        pooling = pooling or collection.pooling
        if pooling not in VECTOR_POOLINGS:
            raise HTTPException(422, f"pooling must be one of {', '.join(VECTOR_POOLINGS)}, got {pooling!r}")
        vector = await embed_bytes(request, await read_upload(image), pooling)
        return {"embedding": [float(x) for x in vector], "dim": len(vector), "model": model_name(),
                "pooling": pooling}

    @app.post("/api/search", summary="the k most similar indexed images to an upload or to an indexed image",
              openapi_extra={"requestBody": SEARCH_BODY})
    async def search(request: Request):
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise HTTPException(400, f"the JSON body is not valid JSON ({exc})") from None
            if not isinstance(body, dict) or "id" not in body:
                raise HTTPException(422, 'send {"id": ID} with the id of an indexed image (and optionally "k")')
            image_id = _int_field(body["id"], "id", None, 0, len(collection) - 1)
            k = _int_field(body.get("k"), "k", 10, 1, MAX_K)
            vector, query = collection.vector(image_id), describe(image_id)
        elif content_type.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=4) as form:  # closes the spooled upload after
                k = _int_field(form.get("k"), "k", 10, 1, MAX_K)
                upload = form.get("image")
                vector = await embed_bytes(request, await read_upload(upload), collection.pooling)
                query = {"upload": getattr(upload, "filename", None)}
        else:
            raise HTTPException(415, "send multipart/form-data with the image in the field `image`, or JSON "
                                     '{"id": ID} for an indexed image')
        hits = await asyncio.to_thread(collection.search, vector, k)
        return {"query": query, "results": [describe(h.id, h.score) for h in hits]}

    @app.get("/api/thumbnail/{image_id}", summary="a JPEG thumbnail of an indexed image",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(image_id: int):
        collection.check_id(image_id)
        try:
            data = await asyncio.to_thread(collection.thumbnail, image_id)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {image_id} is no longer there") from None
        except BadImage as exc:
            raise HTTPException(422, f"the file of image {image_id} cannot be decoded now: {exc}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/image/{image_id}", summary="the original file of an indexed image, typed by its contents",
             response_class=FileResponse)
    async def original(image_id: int):
        collection.check_id(image_id)
        path = collection.paths[image_id]
        if not await asyncio.to_thread(os.path.isfile, path):
            raise HTTPException(404, f"the file of image {image_id} is no longer there")
        try:
            media_type = await asyncio.to_thread(collection.media_type, image_id)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {image_id} is no longer there") from None
        except BadImage as exc:
            raise HTTPException(422, str(exc)) from None
        return FileResponse(path, media_type=media_type, headers={"Content-Disposition": "inline"})

    @app.get("/api/duplicates", summary="near-duplicate groups of the collection")
    async def duplicates(request: Request,
                         threshold: float = Query(0.95, ge=-1.0, le=1.0, description="cosine similarity")):
        groups = await heavy.run(collection.duplicates, threshold, stop=budget_of(request.scope).stopped)
        return {"threshold": threshold, "num_groups": len(groups),
                "num_duplicates": sum(len(others) for _, others in groups),
                "groups": [{"keep": describe(keep, 1.0), "duplicates": [describe(i, score) for i, score in others]}
                           for keep, others in groups]}

    def curated() -> CurateClusters:
        if clusters is None:
            raise HTTPException(404, "no curation to show: start `dinokit serve` with --curate OUT, the output "
                                     "folder of `dinokit curate` over this collection")
        return clusters

    def member(image_id: int, distance: float) -> dict:
        return {**describe(int(image_id)), "selected": int(clusters.times[image_id]),
                "distance": round(float(distance), 6)}

    @app.get("/api/clusters", summary="the clusters of one level of the curate output, largest first")
    async def cluster_list(level: int = Query(1, ge=1, description="1 = the finest level"),
                           offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=MAX_K),
                           per_cluster: int = Query(8, ge=0, le=100,
                                                    description="images shown per cluster, closest first")):
        view = curated()
        try:
            listed = view.clusters(level)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        page = listed[offset:offset + limit]
        for entry in page:
            ids, distances = view.members(level, entry["id"])
            entry["members"] = [member(i, d) for i, d in zip(ids[:per_cluster], distances[:per_cluster])]
        return {**view.summary(), "level": level, "num_clusters": len(listed), "offset": offset,
                "clusters": page}

    @app.get("/api/clusters/{level}/{cluster_id}", summary="the images of one cluster, closest to its centroid first")
    async def cluster_members(level: int, cluster_id: int, offset: int = Query(0, ge=0),
                              limit: int = Query(200, ge=1, le=MAX_K)):
        view = curated()
        try:
            ids, distances = view.members(level, cluster_id)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        chosen = slice(offset, offset + limit)
        return {"level": level, "id": cluster_id, "images": len(ids),
                "selected": int((view.times[ids] > 0).sum()), "offset": offset,
                "members": [member(i, d) for i, d in zip(ids[chosen], distances[chosen])]}

    def pca_of(data: bytes) -> bytes:  # one heavy-lane job: decoding, the model and the PNG
        return collection.pca_png(decode_upload(data))

    @app.post("/api/pca", summary="an uploaded image beside the PCA picture of its patch features (PNG)",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def pca_upload(request: Request, image: UploadFile = File(...)):
        data = await read_upload(image)
        png = await heavy.run(pca_of, data, stop=budget_of(request.scope).stopped)
        return Response(png, media_type="image/png")

    @app.get("/api/pca/{image_id}", summary="an indexed image beside the PCA picture of its patch features (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def pca_indexed(request: Request, image_id: int):
        try:
            data = await asyncio.to_thread(collection.read_file, image_id)
        except FileNotFoundError:
            raise HTTPException(404, f"the file of image {image_id} is no longer there") from None
        png = await heavy.run(pca_of, data, stop=budget_of(request.scope).stopped)
        return Response(png, media_type="image/png")

    # ------------------------------------------------------------------------------------------------ page
    def static(name: str) -> Response:
        data = resources.files("dinokit.apps.serve").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC_FILES[name], headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/", include_in_schema=False)
    async def page():
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in STATIC_FILES or name == "index.html":  # a fixed list: nothing else can be named
            raise HTTPException(404, f"no static file {name!r}")
        return static(name)

    return app
