"""`dinokit serve`: the HTTP API (FastAPI TestClient), upload safety, dynamic batching, and one run of the web page
in a real headless Chromium against a real `dinokit serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dinokit import Dinov2Config, Dinov2Model
from dinokit.apps import store
from dinokit.apps.dedup import dedup
from dinokit.apps.embed import embed

pytest.importorskip("fastapi", reason="dinokit serve needs the `serve` extra: pip install 'dinokit[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from dinokit.apps.serve.app import create_app  # noqa: E402
from dinokit.apps.serve.batching import DynamicBatcher  # noqa: E402
from dinokit.apps.serve.collection import Collection  # noqa: E402
from dinokit.apps.serve.uploads import ImageTooLarge, UnreadableImage, decode_upload  # noqa: E402

pq = pytest.importorskip("pyarrow.parquet")

SIZE = 28  # 2 x 2 patches
NUM_IMAGES = 14
MARKUP_NAME = "<img src=x onerror=alert(1)>.png"  # the twin of picture_01.png: a file name that is also markup


def _picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A colourful picture of shapes over a gradient: distinct per seed, pleasant in the page's screenshot."""
    base = rng.integers(40, 216, 3)
    ramp = np.linspace(-40, 40, width)[None, :, None]
    pixels = np.clip(base[None, None, :] + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny saved model and an embedded folder of generated images, one of them stored twice (a duplicate, under
    a file name that is markup)."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE,
                             patch_size=14)).save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        _picture(rng, 48 + 5 * i, 80 - 2 * i).save(images / f"picture_{i:02d}.{ext}", fmt)
    shutil.copy(images / "picture_01.png", images / MARKUP_NAME)
    embed(images, str(root / "model"), root / "emb", image_size=SIZE, batch_size=4, num_workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def collection(served):
    return Collection(served / "emb")


@pytest.fixture(scope="module")
def client(collection):
    with TestClient(create_app(collection, max_wait_ms=20)) as c:
        yield c


def _paths(collection) -> list[str]:
    return collection.paths


def _upload(path, name: str | None = None) -> dict:
    return {"image": (name or Path(path).name, Path(path).read_bytes())}


def _unique_images(collection) -> list[int]:
    twins = ("picture_01.png", MARKUP_NAME)
    return [i for i, p in enumerate(collection.paths) if Path(p).name not in twins]


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims `width` x `height` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------------------------------------------- the API
def test_health_reports_the_collection_size_model_and_dimension(client, served):
    info = client.get("/api/health").json()
    assert info["status"] == "ok" and info["images"] == NUM_IMAGES + 1 and info["dim"] == 32
    assert info["model"] == "model" and info["pooling"] == "cls"  # a local model by its folder's name only
    assert info["request_timeout"] == 30.0 and set(info["lanes"]) == {"model", "heavy", "decode"}


def test_search_by_upload_finds_the_query_image_itself_first(client, collection):
    for image_id in _unique_images(collection)[:5]:
        response = client.post("/api/search", files=_upload(collection.paths[image_id]), data={"k": "5"})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 5 and results[0]["id"] == image_id
        assert results[0]["path"] == Path(collection.paths[image_id]).name and results[0]["score"] > 0.9999
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        assert results[0]["thumbnail"] == f"/api/thumbnail/{image_id}"


def test_embed_returns_the_vector_dinokit_embed_stored_for_the_same_file(client, served, collection):
    stored = store.load_embeddings(served / "emb")
    for image_id in (0, 4, 8):
        body = client.post("/api/embed", files=_upload(collection.paths[image_id])).json()
        assert body["dim"] == 32 and body["model"] == collection.model_name == "model"
        np.testing.assert_allclose(body["embedding"], stored[image_id], rtol=1e-4, atol=1e-5)
    mean = client.post("/api/embed", files=_upload(collection.paths[0]), data={"pooling": "cls+mean"}).json()
    assert mean["dim"] == 64 and mean["pooling"] == "cls+mean"


def test_search_by_id_ranks_that_image_first_and_returns_k_results(client, collection):
    image_id = _unique_images(collection)[3]
    response = client.post("/api/search", json={"id": image_id, "k": 4})
    body = response.json()
    assert response.status_code == 200 and body["query"]["id"] == image_id
    assert [r["id"] for r in body["results"]][:1] == [image_id] and len(body["results"]) == 4
    for bad in (NUM_IMAGES + 1, -1, None, True, 1.5, "x"):
        assert client.post("/api/search", json={"id": bad}).status_code == 422, bad
    assert "k must be between" in client.post("/api/search", json={"id": 0, "k": 0}).json()["error"]


def test_thumbnail_is_a_small_jpeg_made_once_then_cached(client, collection, monkeypatch):
    image_id = 2
    response = client.get(f"/api/thumbnail/{image_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    monkeypatch.setattr(collection, "read_file", lambda i: pytest.fail("the cached thumbnail was decoded again"))
    assert client.get(f"/api/thumbnail/{image_id}").content == response.content


def test_image_by_id_is_the_original_file(client, collection):
    response = client.get("/api/image/5")
    assert response.status_code == 200 and response.content == Path(collection.paths[5]).read_bytes()
    assert client.get(f"/api/image/{NUM_IMAGES + 1}").status_code == 404


def test_duplicates_are_the_groups_dinokit_dedup_finds(client, served, tmp_path):
    for threshold in (0.99999, 0.99):
        body = client.get("/api/duplicates", params={"threshold": threshold}).json()
        expected = dedup(served / "emb", threshold=threshold, output=tmp_path / "dups.csv").groups
        found = [{"keep": g["keep"]["path"], "remove": [d["path"] for d in g["duplicates"]]} for g in body["groups"]]
        assert found == [{"keep": Path(g["keep"]).name, "remove": [Path(p).name for p in g["remove"]]}
                         for g in expected]
        assert body["num_groups"] == len(expected)
    exact = client.get("/api/duplicates", params={"threshold": 0.99999}).json()["groups"]
    assert [sorted((g["keep"]["path"], *(d["path"] for d in g["duplicates"]))) for g in exact] == [
        sorted(["picture_01.png", MARKUP_NAME])]
    assert client.get("/api/duplicates", params={"threshold": 2}).status_code == 422


def test_pca_picture_of_an_upload_and_of_an_indexed_image_is_a_png(client, collection):
    for response in (client.post("/api/pca", files=_upload(collection.paths[3])), client.get("/api/pca/3")):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(response.content)) as picture:
            assert picture.width > picture.height  # the image beside its PCA panel


# ---------------------------------------------------------------------------------------------------- bad input
def _truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("name, make, status, words", [
    ("text.jpg", lambda paths: b"this is not an image\n", 400, "not an image"),
    ("empty.png", lambda paths: b"", 400, "empty"),
    ("truncated.jpg", lambda paths: _truncated(Path(paths[0])), 400, "truncated"),
    ("truncated.png", lambda paths: _truncated(Path(paths[1])), 400, "truncated"),
    ("bomb.png", lambda paths: _png_claiming(30000, 30000), 422, "decompression bomb"),
    ("warning_zone.png", lambda paths: _png_claiming(10000, 10000), 422, "decompression bomb"),
])
def test_bad_uploads_get_a_json_error_naming_the_problem(client, collection, name, make, status, words):
    assert 89_478_485 < 10000 * 10000 < 2 * 89_478_485  # the zone where PIL only warns
    for route in ("/api/search", "/api/embed", "/api/pca"):
        response = client.post(route, files={"image": (name, make(collection.paths))})
        assert response.status_code == status, (route, response.text)
        assert words in response.json()["error"] and "Traceback" not in response.text
    assert client.get("/api/health").status_code == 200


def test_requests_without_an_image_or_of_the_wrong_kind_are_refused_clearly(client):
    assert "image" in client.post("/api/embed", data={"pooling": "cls"}).json()["error"]
    assert "field `image`" in client.post("/api/search", files={"other": ("a.png", b"x")}).json()["error"]
    assert client.post("/api/search", content=b"raw", headers={"content-type": "image/png"}).status_code == 415
    bad_json = client.post("/api/search", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    assert "pooling must be one of" in client.post("/api/embed", files={"image": ("a", b"x")},
                                                   data={"pooling": "patch"}).json()["error"]


def test_uploads_over_the_limit_get_413_whether_sized_or_streamed(collection):
    small = create_app(collection, max_upload_mb=0.01)  # 10 KB
    big = b"\0" * 20_000
    with TestClient(small) as c:
        sized = c.post("/api/search", files={"image": ("big.png", big)})
        assert sized.status_code == 413 and "upload limit" in sized.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]

        streamed = c.post("/api/search", content=chunks(),
                          headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413 and "upload limit" in streamed.json()["error"]
        assert c.post("/api/search", json={"id": 0}).status_code == 200


@pytest.mark.parametrize("url", [
    "/api/image/..%2F..%2F..%2Fetc%2Fpasswd", "/api/image/%2Fetc%2Fpasswd", "/api/thumbnail/../../etc/passwd",
    "/api/image/-1", "/api/image/1.5", "/api/image/99999999999999999999", "/api/pca/..%2Fmodel",
    "/static/..%2Fapp.py", "/static/../collection.py", "/static/%2Fetc%2Fpasswd", "/../../etc/passwd",
    "/api/image/0%00.png",
])
def test_path_traversal_attempts_reach_nothing(client, url):
    response = client.get(url)
    assert response.status_code in (404, 422), (url, response.status_code)
    assert "root:" not in response.text and "import" not in response.text
    assert "error" in response.json()


def test_internal_errors_are_logged_and_answered_without_a_traceback(collection, monkeypatch, caplog):
    def broken(vector, k):
        raise RuntimeError("secret internal detail")

    with TestClient(create_app(collection), raise_server_exceptions=False) as c:
        monkeypatch.setattr(collection, "search", broken)
        with caplog.at_level(logging.ERROR, logger="dinokit.serve"):
            response = c.post("/api/search", json={"id": 0})
        assert response.status_code == 500 and "server log" in response.json()["error"]
        assert "secret" not in response.text and "Traceback" not in response.text
        assert "secret internal detail" in caplog.text
        monkeypatch.undo()
        assert c.post("/api/search", json={"id": 0}).status_code == 200


# ---------------------------------------------------------------------------------------------------- batching
def test_32_parallel_searches_each_get_their_own_answer(collection):
    ids = [_unique_images(collection)[i % 10] for i in range(32)]
    with TestClient(create_app(collection, max_batch=8, max_wait_ms=200)) as c:
        def search(image_id: int):
            files = _upload(collection.paths[image_id], name=f"query_{image_id}.png")
            return c.post("/api/search", files=files, data={"k": "3"}).json()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(search, ids))
        sizes = c.app.state.batcher.batch_sizes
    assert [a["results"][0]["id"] for a in answers] == ids
    assert [a["query"]["upload"] for a in answers] == [f"query_{i}.png" for i in ids]
    assert all(a["results"][0]["score"] > 0.9999 for a in answers)
    assert sum(sizes) == 32 and max(sizes) > 1 and max(sizes) <= 8  # requests really shared model batches


def test_batcher_fills_batches_up_to_the_limit_and_a_failed_batch_fails_only_its_requests():
    calls = []

    def double(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * x for x in items]

    async def scenario():
        batcher = DynamicBatcher(double, max_batch=4, max_wait_ms=50)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            failed = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
            after = await batcher.submit(21)
        finally:
            await batcher.stop()
        return results, failed, after

    results, failed, after = asyncio.run(scenario())
    assert results == [2 * i for i in range(10)] and after == 42
    assert isinstance(failed[0], ValueError)
    assert [len(c) for c in calls[:3]] == [4, 4, 2]


def test_batching_off_runs_one_image_per_model_call():
    calls = []

    async def scenario():
        batcher = DynamicBatcher(lambda items: calls.append(len(items)) or list(items), max_batch=1)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == list(range(6)) and calls == [1] * 6


# ---------------------------------------------------------------------------------------------------- decoding
def _encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def test_decode_upload_composites_transparency_on_white_and_scales_16_bit():
    clear = decode_upload(_encoded(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert [decode_upload(_encoded(sixteen)).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128,) * 3,
                                                                                     (255,) * 3]


def test_decode_upload_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encoded(Image.new("RGB", (40, 20), "blue"), "JPEG", exif=exif.tobytes())
    assert decode_upload(data).size == (20, 40)


def test_decode_upload_refuses_bombs_before_decoding_and_damaged_data():
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_upload(_png_claiming(10000, 10000))
    with pytest.raises(UnreadableImage, match="empty"):
        decode_upload(b"")


# ---------------------------------------------------------------------------------------------------- serving
def test_the_collection_uses_the_index_dinokit_index_built_and_refuses_one_of_other_embeddings(served, tmp_path):
    from dinokit.apps.index import build_index

    emb = tmp_path / "emb"
    shutil.copytree(served / "emb", emb)
    assert Collection(emb).index_kind.startswith("flat (exact")
    build_index(emb, kind="hnsw")
    assert Collection(emb).index_kind == "hnsw"

    others = sorted((served / "images").iterdir())[:5]
    embed(others, str(served / "model"), tmp_path / "other", image_size=SIZE, num_workers=0, progress=False)
    build_index(tmp_path / "other", emb / "index")  # an index of other embeddings, left in this folder
    with pytest.raises(ValueError, match="does not match"):
        Collection(emb)


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from dinokit.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err


def test_serve_listens_on_loopback_by_default():
    from dinokit.cli import build_parser

    args = build_parser().parse_args(["serve", "some/folder"])
    assert (args.host, args.port, args.max_batch, args.max_upload_mb) == ("127.0.0.1", 8000, 32, 20.0)
    assert (args.request_timeout, args.absolute_paths) == (30.0, False)  # a budget and no paths, unless asked


def test_page_and_its_assets_come_from_the_package_without_external_urls(client):
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200
        for text in (page.text, asset.text):
            assert "http://" not in text and "https://" not in text  # no CDN
    assert client.get("/docs").status_code == 200
    assert set(client.get("/openapi.json").json()["paths"]) >= {"/api/health", "/api/embed", "/api/search",
                                                                "/api/thumbnail/{image_id}",
                                                                "/api/image/{image_id}", "/api/duplicates"}


# ---------------------------------------------------------------------------------------------------- disclosure
def test_answers_show_paths_relative_to_the_collection_root_unless_asked(client, served, collection):
    """/api/search and /api/duplicates must not tell strangers where the collection lies on the server."""
    root = str(served)
    query = _unique_images(collection)[2]
    answers = [client.post("/api/search", files=_upload(collection.paths[query]), data={"k": "5"}),
               client.post("/api/search", json={"id": query, "k": 5}),
               client.get("/api/duplicates", params={"threshold": 0.99}),
               client.get("/api/health"), client.post("/api/embed", files=_upload(collection.paths[0]))]
    for answer in answers:
        assert answer.status_code == 200 and root not in answer.text, answer.text[:300]
    by_id = answers[1].json()
    assert by_id["query"]["path"] == Path(collection.paths[query]).name
    assert {r["path"] for r in by_id["results"]} <= {Path(p).name for p in collection.paths}

    with TestClient(create_app(collection, absolute_paths=True)) as c:  # dinokit serve --absolute-paths
        shown = c.post("/api/search", json={"id": query, "k": 5}).json()
        assert shown["results"][0]["path"] == collection.paths[query] and shown["results"][0]["path"].startswith(root)
        groups = c.get("/api/duplicates", params={"threshold": 0.99999}).json()["groups"]
        assert all(g["keep"]["path"].startswith(root) for g in groups)


def test_the_collection_root_is_the_deepest_folder_holding_every_image():
    from dinokit.apps.serve.collection import collection_root, relative_to

    paths = ["/srv/photos/a.jpg", "/srv/photos/2024/b.png", "/srv/photos/2024/x/c.webp"]
    root = collection_root(paths)
    assert root == "/srv/photos" and [relative_to(p, root) for p in paths] == ["a.jpg", "2024/b.png",
                                                                               "2024/x/c.webp"]
    assert collection_root(["/srv/one.jpg"]) == "/srv" and relative_to("/srv/one.jpg", "/srv") == "one.jpg"
    assert relative_to("/srv/photos2/d.jpg", "/srv/photos") == "d.jpg"  # a sibling folder is not below it
    mixed = ["/srv/a.jpg", "relative/b.jpg"]
    assert collection_root(mixed) == "" and [relative_to(p, "") for p in mixed] == ["a.jpg", "b.jpg"]


# ---------------------------------------------------------------------------------------------------- headers
def test_every_answer_says_nosniff_once_errors_and_files_included(client, collection, monkeypatch):
    answers = {
        "page": client.get("/"), "script": client.get("/static/app.js"), "health": client.get("/api/health"),
        "original": client.get("/api/image/0"), "thumbnail": client.get("/api/thumbnail/0"),
        "pca": client.get("/api/pca/3"), "openapi": client.get("/openapi.json"),
        "404": client.get(f"/api/image/{NUM_IMAGES + 1}"), "404 route": client.get("/nothing"),
        "422": client.get("/api/duplicates", params={"threshold": 7}),
        "400": client.post("/api/search", files={"image": ("a.png", b"not an image")}),
        "415": client.post("/api/search", content=b"x", headers={"content-type": "text/plain"}),
    }
    with TestClient(create_app(collection, max_upload_mb=0.001), raise_server_exceptions=False) as c:
        answers["413"] = c.post("/api/search", files={"image": ("big.png", b"\0" * 5000)})
        monkeypatch.setattr(collection, "search", lambda vector, k: 1 / 0)
        answers["500"] = c.post("/api/search", json={"id": 0})  # answered by the outermost error middleware
    for what, answer in answers.items():
        assert answer.headers.get_list("x-content-type-options") == ["nosniff"], (what, answer.status_code)
    assert [answers[s].status_code for s in ("404", "422", "400", "415", "413", "500")] == [404, 422, 400, 415,
                                                                                          413, 500]


def test_originals_are_typed_by_their_contents_and_a_file_that_is_no_image_is_refused(served, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(served / "images" / "picture_01.png", images / "a_png_named.jpg")
    shutil.copy(served / "images" / "picture_02.webp", images / "b_webp_named.png")
    shutil.copy(served / "images" / "picture_00.jpg", images / "c_replaced.jpg")
    embed(images, str(served / "model"), tmp_path / "emb", image_size=SIZE, num_workers=0, progress=False)
    (images / "c_replaced.jpg").write_text("<html><script>alert(1)</script></html>")  # replaced after embedding
    with TestClient(create_app(Collection(tmp_path / "emb"))) as c:
        png, webp, html = (c.get(f"/api/image/{i}") for i in range(3))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (images / "a_png_named.jpg").read_bytes()
    assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
    assert html.status_code == 422 and html.headers["content-type"] == "application/json"
    assert "not an image" in html.json()["error"] and "<script>" not in html.text
    assert html.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------------------------------------------- budget
DEEP_BLOCKS = 8
SECONDS_PER_TOKEN = 0.001  # the PCA picture of a 448 x 224 upload: 32 x 16 patches, ~0.5 s a block, ~4 s in all
BLOCK_SECONDS = 513 * SECONDS_PER_TOKEN


@pytest.fixture(scope="module")
def deep_collection(served, tmp_path_factory):
    """The served images embedded with an 8-block model, so a request's work can be seen to stop between blocks."""
    root = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=DEEP_BLOCKS, num_attention_heads=2, image_size=SIZE,
                             patch_size=14)).save_pretrained(root / "model")
    embed(served / "images", str(root / "model"), root / "emb", image_size=SIZE, batch_size=8, num_workers=0,
          progress=False)
    return Collection(root / "emb")


class SlowBlocks:
    """Makes the real model genuinely slow on big inputs: before each block runs, a forward pre-hook sleeps
    SECONDS_PER_TOKEN per token the block is given (sleeping frees the CPU, so the timing holds on a loaded
    machine), and counts the blocks started on inputs of `big` tokens or more: the PCA picture (513 tokens), not
    a search query (5 tokens, 5 ms a block)."""

    def __init__(self, model, big: int = 100) -> None:
        self.big, self.started = big, 0
        self.handles = [block.register_forward_pre_hook(self._hook) for block in model.vit.blocks]

    def _hook(self, module, args) -> None:
        tokens = args[0].shape[0] * args[0].shape[1]
        if tokens >= self.big:
            self.started += 1
        time.sleep(SECONDS_PER_TOKEN * tokens)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _real_server(app):
    """`app` served by uvicorn on a free port of 127.0.0.1, in a thread of this process."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started or not thread.is_alive(), 30, "uvicorn did not start")
        assert thread.is_alive(), "uvicorn stopped at start-up"
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _wait_until(condition, seconds: float, failure: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.02)


def _multipart(data: bytes, name: str, fields: dict | None = None) -> tuple[bytes, str]:
    boundary = "dinokit-test-boundary-7c1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, data: bytes, fields: dict | None = None, timeout: float = 60):
    """(status, headers, body) of an upload to `url`."""
    body, content_type = _multipart(data, "query.png", fields)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _send_and_hold(url: str, path: str, data: bytes | None) -> socket.socket:
    """Send an upload to `path` (a GET when `data` is None) and return the open socket without reading the
    answer: a client that may leave."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    if data is None:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        return sock
    body, content_type = _multipart(data, "wide.png")
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _leave(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _wide_png() -> bytes:
    return _encoded(_picture(np.random.default_rng(7), 448, 224))  # PCA input 448 x 224: 32 x 16 patches


@pytest.mark.parametrize("request_kind", ["upload", "indexed"])
def test_work_for_a_client_that_disconnected_stops_within_a_block(deep_collection, request_kind):
    with SlowBlocks(deep_collection.model) as slow, _real_server(create_app(deep_collection)) as url:
        if request_kind == "upload":  # POST /api/pca: the clock starts once the body is in
            client = _send_and_hold(url, "/api/pca", _wide_png())
        else:  # GET /api/pca/{id}: a request without a body (the indexed picture is 16 x 27 patches)
            client = _send_and_hold(url, "/api/pca/3", None)
        _wait_until(lambda: slow.started >= 2, 30, "the PCA picture's model work did not start")
        _leave(client)
        left_at = slow.started
        time.sleep(4 * BLOCK_SECONDS)  # the time of 4 more blocks, had the work gone on
        assert slow.started <= left_at + 1 < DEEP_BLOCKS, (left_at, slow.started)  # + the block then running
        health = _get_json(url + "/api/health")
        assert health["requests_abandoned"] == 1 and health["lanes"]["heavy"]["stopped"] == 1
        assert _post(url + "/api/search", Path(deep_collection.paths[0]).read_bytes())[0] == 200  # still serving


def test_a_slow_request_does_not_hold_up_searches_or_health(deep_collection):
    query = _unique_images(deep_collection)[1]
    with SlowBlocks(deep_collection.model) as slow, _real_server(create_app(deep_collection)) as url, \
            ThreadPoolExecutor(1) as pool:
        pca = pool.submit(_post, url + "/api/pca", _wide_png())
        _wait_until(lambda: slow.started >= 1, 30, "the PCA picture's model work did not start")
        for _ in range(3):  # searches need the model too: they run beside the PCA picture, not behind it
            status, _, body = _post(url + "/api/search", Path(deep_collection.paths[query]).read_bytes(), {"k": "3"})
            assert status == 200 and json.loads(body)["results"][0]["id"] == query
            assert _get_json(url + "/api/health")["status"] == "ok"
        assert not pca.done() and slow.started < DEEP_BLOCKS  # all answered while the PCA was still running
        status, headers, body = pca.result(timeout=60)
        assert status == 200 and headers["content-type"] == "image/png" and slow.started == DEEP_BLOCKS
        health = _get_json(url + "/api/health")  # answers completed are neither abandoned nor timed out
        assert (health["requests_abandoned"], health["requests_timed_out"]) == (0, 0)
        assert health["lanes"]["heavy"] | {"admitted": 0} == {"admitted": 0, "run": 1, "skipped": 0, "stopped": 0}


def test_a_request_over_its_budget_gets_504_and_its_work_stops(deep_collection):
    app = create_app(deep_collection, request_timeout=1.0)
    with SlowBlocks(deep_collection.model) as slow, _real_server(app) as url:
        status, headers, body = _post(url + "/api/pca", _wide_png())
        answered_at = slow.started
        assert status == 504 and headers["content-type"] == "application/json"
        assert "--request-timeout" in json.loads(body)["error"] and headers["x-content-type-options"] == "nosniff"
        time.sleep(4 * BLOCK_SECONDS)
        assert slow.started <= answered_at + 1 < DEEP_BLOCKS, (answered_at, slow.started)
        health = _get_json(url + "/api/health")
        assert health["requests_timed_out"] == 1 and health["request_timeout"] == 1.0
        assert _post(url + "/api/search", Path(deep_collection.paths[0]).read_bytes())[0] == 200


def test_expensive_requests_beyond_the_heavy_queue_get_503_and_a_departed_waiter_is_skipped(deep_collection):
    with SlowBlocks(deep_collection.model) as slow, _real_server(create_app(deep_collection, heavy_queue=2)) as url:
        running = _send_and_hold(url, "/api/pca", _wide_png())
        _wait_until(lambda: slow.started >= 1, 30, "the PCA picture's model work did not start")
        waiting = _send_and_hold(url, "/api/pca", _wide_png())
        _wait_until(lambda: _get_json(url + "/api/health")["lanes"]["heavy"]["admitted"] == 2, 30,
                    "the second PCA request was not admitted")
        status, headers, body = _post(url + "/api/pca", _wide_png())
        assert status == 503 and headers["retry-after"] and "busy" in json.loads(body)["error"]
        assert _post(url + "/api/search", Path(deep_collection.paths[0]).read_bytes())[0] == 200
        _leave(waiting)
        _leave(running)
        _wait_until(lambda: _get_json(url + "/api/health")["lanes"]["heavy"]["admitted"] == 0, 30,
                    "the heavy lane did not empty")
        assert _get_json(url + "/api/health")["lanes"]["heavy"] | {"admitted": 0} == {
            "admitted": 0, "run": 0, "skipped": 1, "stopped": 1}
        assert slow.started < DEEP_BLOCKS  # the waiter's picture never started; the first one stopped


# ---------------------------------------------------------------------------------------------------- browser
def _chromium() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install -y chromium "
                    "chromium-driver; .ci/run does this)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    # A hang guard, not a speed bound: the server imports torch and faiss and loads the model first, which took
    # up to a minute for a CLI command on 2 cores at a load of 10.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dinokit serve exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"dinokit serve did not answer /api/health within {seconds:.0f} s")


# ---------------------------------------------------------------------------------------------------- --curate
@pytest.fixture(scope="module")
def curated(served):
    """`dinokit curate` over the served folder: dedup (the twin goes), two k-means levels, 6 images selected."""
    pytest.importorskip("faiss")
    from dinokit.curate.pipeline import CurateOptions, curate

    out = served / "curated"
    curate(served / "emb", out, options=CurateOptions(levels=[4, 2], n_iters=5, resample_steps=0, target=6,
                                                      dedup_threshold=0.999), quiet=True)
    return out


def _get_error(url: str) -> tuple[int, str]:
    try:
        urllib.request.urlopen(url, timeout=30)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)["error"]
    pytest.fail(f"{url} answered 200")


def test_clusters_of_a_curate_output_are_served_as_curate_wrote_them(collection, curated):
    from dinokit.apps.serve.clusters import CurateClusters

    rows = np.load(curated / "clusters" / "rows.npy")
    labels = {1: np.load(curated / "clusters" / "level1.npy")}
    labels[2] = np.load(curated / "clusters" / "level2.npy")[labels[1]]
    table = pq.read_table(curated / "selected.parquet")
    times = dict(zip(table.column("row").to_pylist(), table.column("times_selected").to_pylist()))
    assert len(rows) == NUM_IMAGES and sum(times.values()) == 6  # the twin was deduplicated away
    view = CurateClusters(curated, collection.vectors, collection.paths)
    with _real_server(create_app(collection, clusters=view)) as url:
        assert _get_json(url + "/api/health")["curate"] == {
            "output": "curated", "levels": [4, 2], "clustered": NUM_IMAGES, "selected": len(times),
            "selected_with_repeats": 6}
        for level in (1, 2):
            data = _get_json(f"{url}/api/clusters?level={level}&per_cluster=100")
            assert data["num_clusters"] == len(np.unique(labels[level]))
            sizes = [c["images"] for c in data["clusters"]]
            assert sizes == sorted(sizes, reverse=True) and sum(sizes) == NUM_IMAGES
            for cluster in data["clusters"]:
                members = cluster["members"]
                assert {m["id"] for m in members} == set(rows[labels[level] == cluster["id"]].tolist())
                assert all(m["selected"] == times.get(m["id"], 0) for m in members)
                assert cluster["selected"] == sum(m["id"] in times for m in members)
                distances = [m["distance"] for m in members]
                assert distances == sorted(distances)  # closest to the centroid first
                assert members[0]["thumbnail"] == f"/api/thumbnail/{members[0]['id']}"
            one = _get_json(f"{url}/api/clusters/{level}/{data['clusters'][0]['id']}")
            assert one["members"] == data["clusters"][0]["members"]
        assert [len(c["members"]) for c in _get_json(f"{url}/api/clusters?per_cluster=1&limit=2")["clusters"]] == [1, 1]
        assert _get_error(f"{url}/api/clusters?level=3") == (404, "no level 3: this curate output has levels 1 to 2")
        assert _get_error(f"{url}/api/clusters/1/4")[0] == 404
        page = urllib.request.urlopen(url + "/", timeout=30).read().decode()
        script = urllib.request.urlopen(url + "/static/app.js", timeout=30).read().decode()
        assert 'id="tab-clusters"' in page and "/api/clusters?level=" in script
    with _real_server(create_app(collection)) as url:  # no --curate: the tab stays hidden, the API says why
        assert _get_json(url + "/api/health")["curate"] is None
        status, message = _get_error(url + "/api/clusters")
        assert status == 404 and "--curate" in message


def test_a_curate_output_of_another_pool_or_unfinished_is_refused_in_one_line(served, collection, curated, tmp_path,
                                                                             capsys):
    from dinokit.apps.serve.clusters import CurateClusters
    from dinokit.cli import main

    other = tmp_path / "other"
    shutil.copytree(curated, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "pool_names_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="curated a pool of other images"):
        CurateClusters(other, collection.vectors, collection.paths)
    (other / "manifest.json").write_text(json.dumps({**manifest, "num_pool": 3}))
    with pytest.raises(ValueError, match="a pool of 3 images but this collection has 15"):
        CurateClusters(other, collection.vectors, collection.paths)
    (other / "manifest.json").unlink()
    assert main(["serve", str(served / "emb"), "--curate", str(other), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "holds no manifest.json" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_web_page_in_headless_chromium_finds_the_uploaded_image_first(served, collection, curated):
    """Upload through the page's file input, see the image itself first, click a result to search from it.

    Set DINOKIT_SCREENSHOT=path.png to keep a screenshot of the page (docs/serve.png is one).
    """
    browser, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dinokit", "serve", str(served / "emb"), "--port", str(port),
                               "--curate", str(curated)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,860", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = None
    try:
        _wait_for_health(url, server)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        wait = WebDriverWait(driver, 120)  # each step waits for a page event; only a hang fails
        driver.get(url)
        wait.until(lambda d: "images" in d.find_element(By.ID, "collection").text)

        query_id = _unique_images(collection)[4]
        driver.find_element(By.ID, "file").send_keys(collection.paths[query_id])
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#results .result")))
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
        assert cards[0].get_attribute("data-path") == Path(collection.paths[query_id]).name  # relative to the root
        assert cards[0].find_element(By.CLASS_NAME, "score").text == "1.0000"
        injected = "return document.querySelectorAll('[onerror], img[src=\"x\"], .name *').length;"
        assert driver.execute_script(injected) == 0, f"the file name {MARKUP_NAME!r} became markup in the page"
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('query-pca'); return i.complete && i.naturalWidth > 0;"))
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0);"))
        if os.environ.get("DINOKIT_SCREENSHOT"):
            driver.save_screenshot(os.environ["DINOKIT_SCREENSHOT"])

        second = cards[1].get_attribute("data-id")  # click a result: search from it
        cards[1].click()
        first_id = "const r = document.querySelector('#results .result'); return r && r.dataset.id;"  # atomic:
        wait.until(lambda d: d.execute_script(first_id) == second  # no stale element while the grid is replaced
                   and d.execute_script("return document.getElementById('query-caption').textContent;")
                   == Path(collection.paths[int(second)]).name)
        shows_original = ("const i = document.getElementById('query-image'); "
                          "return i.complete && i.naturalWidth > 0 && i.src.endsWith('/api/image/' + arguments[0]);")
        wait.until(lambda d: d.execute_script(shows_original, second))  # the original, typed by its contents

        # A file name that is markup is shown as text: in the card, its caption and the duplicate groups.
        driver.execute_script("document.getElementById('results').replaceChildren();")  # wait for the new grid
        driver.find_element(By.ID, "file").send_keys(str(served / "images" / "picture_01.png"))
        twin = f"#results .result[data-path='{MARKUP_NAME}']"
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, twin)))
        card = driver.find_element(By.CSS_SELECTOR, twin)
        assert card.find_element(By.CLASS_NAME, "name").text == MARKUP_NAME
        assert card.find_element(By.TAG_NAME, "img").get_attribute("alt") == MARKUP_NAME
        twin_id = card.get_attribute("data-id")
        card.click()
        wait.until(lambda d: d.execute_script("return document.getElementById('query-caption').textContent;")
                   == MARKUP_NAME and d.execute_script(shows_original, twin_id))
        driver.find_element(By.ID, "tab-duplicates").click()
        threshold = driver.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0.99")  # the input's step is 0.01
        driver.find_element(By.CSS_SELECTOR, "#dup-form button").click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#groups .group h2")))
        groups = driver.find_elements(By.CSS_SELECTOR, "#groups .group")
        names = [[n.text for n in g.find_elements(By.CLASS_NAME, "name")] for g in groups]
        [group] = [g for g, n in zip(groups, names) if MARKUP_NAME in n]  # shown as text, beside its twin
        assert "picture_01.png" in names[groups.index(group)]
        kept = group.find_element(By.CSS_SELECTOR, ".result.keep .name").text
        assert f"keep {kept}," in group.find_element(By.TAG_NAME, "h2").text
        assert driver.execute_script(injected) == 0, f"the file name {MARKUP_NAME!r} became markup in the page"

        # The Clusters tab (--curate): clusters largest first, selected images framed, levels switchable.
        driver.find_element(By.ID, "tab-clusters").click()
        wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#clusters .cluster .result")))
        expected = _get_json(url + "/api/clusters")
        boxes = driver.find_elements(By.CSS_SELECTOR, "#clusters .cluster")
        assert [b.get_attribute("data-id") for b in boxes] == [str(c["id"]) for c in expected["clusters"]]
        framed = [c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, "#clusters .result.selected")]
        assert framed == [str(m["id"]) for c in expected["clusters"] for m in c["members"] if m["selected"]]
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element(By.ID, "cluster-level")).select_by_value("2")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#clusters .cluster"))
                   == _get_json(url + "/api/clusters?level=2")["num_clusters"])
        assert driver.execute_script(injected) == 0, f"the file name {MARKUP_NAME!r} became markup in the page"
        driver.find_element(By.ID, "tab-search").click()

        driver.set_window_size(390, 844)  # a phone: the grid reflows, nothing scrolls sideways
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        server.stderr.close()
