"""Memory of `dinokit curate` with the pool streamed from memory-mapped shards vs loaded whole.

Writes one synthetic (N, D) float32 pool (a 200-component Gaussian mixture, not unit-length) and runs the same
`dinokit curate` command (k-means and sampling stages) in fresh processes, one per code version given with
--src (a `src/` folder: this checkout's, and e.g. an older checkout's), each with --memory-mb settings where
the version has them. Reports the peak anonymous memory (RssAnon: what the process itself allocated; pages of
the memory-mapped pool are file-backed, reclaimable and reported apart as RssFile) and the wall time, sampled
every 20 ms from /proc/PID/status, runs interleaved.

    python benchmarks/curate_memory.py --n 200000 --dim 384 --src src --src /path/to/older/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from curate_scale import cpu_description  # noqa: E402


def status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def run(src: str, pool: Path, out: Path, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "dinokit", "curate", str(pool), "-o", str(out), "--quiet", "--stages",
            "kmeans,sample", "--levels", "50,10", "--iters", "3", "--resample-steps", "1", "--target", "10000",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"RssAnon": 0, "RssFile": 0}
    while process.poll() is None:
        for key, value in status_kb(process.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{process.stderr.read().decode()}")
    process.stderr.close()
    return {"anon_mb": peak["RssAnon"] / 1024, "file_mb": peak["RssFile"] / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--src", action="append", required=True, help="a src/ folder to import dinokit from")
    parser.add_argument("--memory-mb", type=int, action="append", default=None,
                        help="--memory-mb values for versions that have it (default: 16 and 2048)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    memory = args.memory_mb or [16, 2048]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(200, args.dim)).astype(np.float32)
        pool = np.lib.format.open_memmap(tmp / "pool.npy", mode="w+", dtype=np.float32, shape=(args.n, args.dim))
        for s in range(0, args.n, 50_000):
            m = min(50_000, args.n - s)
            pool[s:s + m] = centres[rng.integers(0, 200, m)] + 0.7 * rng.normal(size=(m, args.dim))
        pool.flush()
        del pool
        configs = []
        for src in args.src:
            has_option = "memory_mb" in (Path(src) / "dinokit" / "curate" / "pipeline.py").read_text()
            configs += ([(src, ["--memory-mb", str(m)]) for m in memory] if has_option else [(src, [])])
        results = {f"{src} {' '.join(extra)}".strip(): [] for src, extra in configs}
        for r in range(args.rounds):
            for i, (src, extra) in enumerate(configs):
                key = f"{src} {' '.join(extra)}".strip()
                results[key].append(run(src, tmp / "pool.npy", tmp / f"out{i}_{r}", extra))
                print(key, results[key][-1], flush=True)
    pool_mb = args.n * args.dim * 4 / 2**20
    print(f"\n{cpu_description()}; pool {args.n:,} x {args.dim} float32 = {pool_mb:.0f} MiB\n")
    print("| code, options | peak RssAnon MiB (min-max) | peak RssFile MiB | wall s (min-max) |\n|---|---|---|---|")
    for key, runs in results.items():
        a, f, t = ([r[k] for r in runs] for k in ("anon_mb", "file_mb", "seconds"))
        print(f"| {key} | {min(a):.0f}-{max(a):.0f} | {max(f):.0f} | {min(t):.1f}-{max(t):.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args),
                                                 "pool_mib": pool_mb, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
