"""Loopback load on `dinokit serve`: searches by upload at several concurrencies, dynamic batching on vs off.

What it does, all on this machine:
1. Saves a ViT-S/14 (the `vits14` preset, random weights: throughput does not depend on them) and embeds --images
   files (imagenette/val when present, else generated pictures) at --image-size with `dinokit embed`.
2. Starts two real `dinokit serve` processes on 127.0.0.1: batching on (--max-batch B) and off (--max-batch 1).
3. For each concurrency, --requests searches against each server, split into --rounds interleaved rounds in
   rotating order (on/off/model-only), so that load from other processes hits all alike. Each client thread
   keeps one HTTP connection and posts a collection file as a multipart upload; a request counts as an error
   unless it answers 200 with that file as its first result.
4. Model-only rate: this process runs the same model on batches of B preprocessed images (decoding not timed),
   the way `benchmarks/embed_throughput.py` measures `dinokit embed`'s model-only img/s -- on one worker
   thread, as the server runs its model. (On a 2-core machine loaded by other processes, torch ops called from
   the main thread were over 10x slower than the same ops from a worker thread: OpenMP's two threads spin at
   barriers while one of them is descheduled. The main-thread rate is printed once at the end for reference.)
Reported per (concurrency, mode): requests/s, p50/p99 latency, errors, the servers' mean model batch, the
ratio to the model-only img/s, and CPU time per image (the server process's, or this process's for model-only),
which shifts less than wall time when other processes load the machine; server RSS before and after the load.

    python benchmarks/serve_load.py                               # 400 searches at concurrency 1, 4, 16
    python benchmarks/serve_load.py --requests 100 --concurrency 16 --image-size 112   # quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "datasets" / "imagenette" / "val"
BOUNDARY = "dinokitbenchboundary"


# ---------------------------------------------------------------------------------------------------- set-up
def collection_files(data: Path, count: int, scratch: Path) -> list[str]:
    from dinokit.apps.embed import list_images

    if data.is_dir():
        files = list_images(data)
        return files[:: max(1, len(files) // count)][:count]
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = scratch / "images"
    folder.mkdir()
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((256, 256), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    return sorted(str(p) for p in folder.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.load(response)


def start_server(emb_dir: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dinokit", "serve", str(emb_dir), "--port", str(port),
                               "--max-batch", str(max_batch)], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dinokit serve exited: {log.read_text()[-2000:]}")
        try:
            get_json(port, "/api/health")
            return server, port
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("dinokit serve did not start within 2 minutes")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (less sensitive to other processes' load than wall time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------------- load
def multipart(data: bytes, name: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def run_load(port: int, pid: int, bodies: list[tuple[int, bytes]], requests: int, concurrency: int) -> dict:
    """`requests` searches from `concurrency` threads, each with its own keep-alive connection."""
    latencies, errors, lock, counter = [], [0], threading.Lock(), iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            expected, body = bodies[n % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/search", body=body, headers={
                    "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and json.loads(payload)["results"][0]["id"] == expected
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        connection.close()

    before, cpu_before = get_json(port, "/api/health"), cpu_seconds(pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    after = get_json(port, "/api/health")
    batches = after["model_batches"] - before["model_batches"]
    items = after["model_batch_items"] - before["model_batch_items"]
    return {"seconds": seconds, "cpu": cpu, "latencies": latencies, "errors": errors[0], "batches": batches,
            "items": items}


def model_only(model, pixels: torch.Tensor, batch: int, images: int, *, on_worker_thread: bool = True):
    """(wall seconds, CPU seconds of this process) for `images` images in batches of `batch`, preprocessed
    beforehand. On a worker thread by default, as the server runs its model: on a machine loaded by other
    processes, torch's OpenMP threads are much slower called from the main thread (see the module docstring)."""
    from dinokit.apps.embed import embed_pixels

    def run():
        done, started, cpu = 0, time.perf_counter(), time.process_time()
        while done < images:
            n = min(batch, images - done)
            embed_pixels(model, pixels[:n], "cls")
            done += n
        return time.perf_counter() - started, time.process_time() - cpu

    if not on_worker_thread:
        return run()
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(run).result()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (default imagenette/val)")
    parser.add_argument("--images", type=int, default=64, help="collection size (queries cycle through it)")
    parser.add_argument("--requests", type=int, default=400, help="searches per concurrency and mode")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--preset", default="vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from dinokit import load_model
    from dinokit.apps.embed import embed, eval_transform, read_image

    scratch = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    servers = {}
    try:
        torch.manual_seed(0)
        model = load_model(args.preset).eval()
        model.save_pretrained(scratch / "model")
        files = collection_files(Path(args.data), args.images, scratch)
        embed(files, str(scratch / "model"), scratch / "emb", image_size=args.image_size,
              batch_size=args.max_batch, num_workers=0, progress=False)
        from dinokit.apps.store import load_metadata

        paths = load_metadata(scratch / "emb", ["path"]).column("path").to_pylist()
        bodies = [(i, multipart(Path(p).read_bytes(), Path(p).name)) for i, p in enumerate(paths)]
        transform = eval_transform(args.image_size)
        pixels = torch.stack([transform(read_image(p)) for p in (paths * args.max_batch)[: args.max_batch]])

        modes = {"on": args.max_batch, "off": 1}
        for mode, max_batch in modes.items():
            servers[mode] = start_server(scratch / "emb", max_batch, scratch / f"server_{mode}.log")
        for server, port in servers.values():  # warm-up: first calls pay for lazy initialisation
            run_load(port, server.pid, bodies, 2 * args.max_batch, min(args.max_batch, 16))
        model_only(model, pixels, args.max_batch, args.max_batch)
        rss_before = {mode: rss_mb(server.pid) for mode, (server, _) in servers.items()}

        print(f"{len(paths)} images ({'imagenette/val' if Path(args.data).is_dir() else 'generated'}), "
              f"{args.preset} at {args.image_size} px (random weights), CPU threads {torch.get_num_threads()} "
              f"(os.cpu_count {os.cpu_count()}); {args.requests} searches per cell in {args.rounds} rounds; "
              f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
        cells = {(c, m): {"seconds": 0.0, "cpu": 0.0, "latencies": [], "errors": 0, "batches": 0, "items": 0, "rounds": []}
                 for c in args.concurrency for m in (*modes, "model")}
        per_round = [args.requests // args.rounds + (r < args.requests % args.rounds) for r in range(args.rounds)]
        for concurrency in args.concurrency:
            for r, count in enumerate(per_round):
                order = ["on", "off", "model"]
                order = order[r % 3:] + order[: r % 3]
                for mode in order:
                    cell = cells[(concurrency, mode)]
                    if mode == "model":
                        seconds, cpu = model_only(model, pixels, args.max_batch, count)
                        result = {"seconds": seconds, "cpu": cpu, "latencies": [], "errors": 0, "batches": 0,
                                  "items": 0}
                    else:
                        server, port = servers[mode]
                        result = run_load(port, server.pid, bodies, count, concurrency)
                    for key in ("seconds", "cpu", "errors", "batches", "items"):
                        cell[key] += result[key]
                    cell["latencies"] += result["latencies"]
                    cell["rounds"].append(count / result["seconds"])
            print(f"  concurrency {concurrency} done (load average {os.getloadavg()[0]:.1f})", flush=True)
        rss_after = {mode: rss_mb(server.pid) for mode, (server, _) in servers.items()}
        main_seconds, main_cpu = model_only(model, pixels, args.max_batch, 2 * args.max_batch, on_worker_thread=False)

        rows = []
        print("\n| concurrency | batching | requests | errors | req/s (rounds) | p50 ms | p99 ms | mean batch | "
              "vs model-only | on/off | CPU ms/img | on/off by CPU |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for concurrency in args.concurrency:
            model_rate = args.requests / cells[(concurrency, "model")]["seconds"]
            off_rate = args.requests / cells[(concurrency, "off")]["seconds"]
            off_cpu = cells[(concurrency, "off")]["cpu"] / args.requests
            for mode in (*modes, "model"):
                cell = cells[(concurrency, mode)]
                rate = args.requests / cell["seconds"]
                spread = ", ".join(f"{x:.1f}" for x in cell["rounds"])
                row = {"concurrency": concurrency, "mode": mode, "requests": args.requests, "errors": cell["errors"],
                       "per_second": rate, "rounds_per_second": cell["rounds"],
                       "p50_ms": 1000 * percentile(cell["latencies"], 50),
                       "p99_ms": 1000 * percentile(cell["latencies"], 99),
                       "mean_batch": cell["items"] / cell["batches"] if cell["batches"] else None,
                       "vs_model_only": rate / model_rate, "cpu_ms_per_image": 1000 * cell["cpu"] / args.requests}
                rows.append(row)
                if mode == "model":
                    print(f"| {concurrency} | model only (batch {args.max_batch}) | {args.requests} img | – | "
                          f"{rate:.1f} ({spread}) | – | – | {args.max_batch} | 100% | – | "
                          f"{row['cpu_ms_per_image']:.0f} | – |")
                else:
                    label = f"on (max {args.max_batch})" if mode == "on" else "off (max 1)"
                    print(f"| {concurrency} | {label} | {args.requests} | {row['errors']} | {rate:.1f} ({spread}) | "
                          f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['mean_batch']:.1f} | "
                          f"{100 * row['vs_model_only']:.0f}% | {rate / off_rate:.2f}x | "
                          f"{row['cpu_ms_per_image']:.0f} | {off_cpu / (cell['cpu'] / args.requests):.2f}x |")
        print(f"\nserver RSS MB before -> after the load: on {rss_before['on']:.0f} -> {rss_after['on']:.0f}, "
              f"off {rss_before['off']:.0f} -> {rss_after['off']:.0f}; load average after: "
              f"{os.getloadavg()[0]:.1f}")
        print(f"model only from the main thread (as `dinokit embed` runs it), {2 * args.max_batch} images: "
              f"{2 * args.max_batch / main_seconds:.1f} img/s, {1000 * main_cpu / (2 * args.max_batch):.0f} CPU ms/img")
        print("median of the per-round rates: " + ", ".join(
            f"c{c} {m} {statistics.median(cells[(c, m)]['rounds']):.1f}" for c in args.concurrency
            for m in (*modes, "model")))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "rss_before_mb": rss_before,
                                                   "rss_after_mb": rss_after}, indent=2) + "\n")
        return 0 if all(r["errors"] == 0 for r in rows) else 1
    finally:
        for server, _ in servers.values():
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
