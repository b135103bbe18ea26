"""Which CPU kernel runs each shape, chosen by timing the candidates on this machine, once.

The fastest GEMM library depends on the CPU, not on its vendor: on a Sapphire Rapids MKL's sgemm beat oneDNN, on a
Zen 4 (AVX-512) oneDNN with pre-packed weights and fused epilogues won by 2-3x, and on an AVX2 EPYC the two trade
places by shape. So at inference the first call of each shape class (kernel kind, feature sizes, epilogue, rows
rounded to a power of two) runs every candidate on the real input a few times, interleaved, and keeps the one
with the lowest median; a candidate other than the plain one (`F.linear`, the reference) must beat it by more
than `MARGIN`, so a decision is never worse than plain `F.linear` by more than noise. Each measured class costs
(1 warm-up + `ROUNDS`) calls per candidate, about 0.05-0.5 s for a ViT-S/B shape class on 2 cores.

Decisions live in memory and on disk (`kernel_choices.json` in `$DINOKIT_CACHE`, else `~/.cache/dinokit`), keyed
by CPU model, ISA flags, thread count and torch version, so a machine measures once; a decision measured while
the machine is busy (load average above its core count) is kept for that process only. `DINOKIT_GEMM=<name>` pins
every linear to one kernel (`mkl`, `onednn`, `mkl-packed`) and `DINOKIT_SDPA_HEADS=strided|contiguous` the
attention layout; `DINOKIT_KERNEL_CACHE=0` keeps decisions in memory only (measured again in each process).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MARGIN = 0.03  # a non-plain kernel must be this much faster than the plain one (timer noise on a busy machine)
ROUNDS = 5
_FILE_NAME = "kernel_choices.json"
_decisions: dict[str, dict] = {}  # key -> {"choice": name, "ms": {name: median}}
_lock = threading.Lock()
_loaded_from: str | None = None


def cpuinfo(field: str) -> str:
    """The value of `field` ("vendor_id", "flags", ...) for the first CPU in /proc/cpuinfo; "" where unreadable."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def isa() -> str:
    """The vector extensions that decide GEMM speed: AMX / AVX-512 / AVX2 / NEON (or the machine name)."""
    flags = set(cpuinfo("flags").split()) | set(cpuinfo("Features").split())
    found = [name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                     ("asimd", "NEON")) if flag in flags]
    return "+".join(found) or os.uname().machine


def machine_key() -> str:
    """What a decision depends on: the CPU model and ISA, the thread count, and torch (its kernels change)."""
    model = cpuinfo("model name") or cpuinfo("CPU part") or os.uname().machine
    return f"{model} | {isa()} | threads={torch.get_num_threads()} | torch={torch.__version__}"


def pinned(variable: str, names: Sequence[str]) -> str | None:
    """The kernel an environment variable pins, None for "auto"/unset; an unknown name is refused."""
    value = os.environ.get(variable, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in names:
        raise ValueError(f"{variable}={value!r} is not a kernel: use one of {', '.join(names)} or auto")
    return value


def rows_class(rows: int) -> int:
    """Rows rounded to the nearest power of two: GEMM speed changes smoothly with rows, shapes do not repeat exactly."""
    return 1 << round(math.log2(max(rows, 1)))


def _cache_path() -> Path | None:
    if os.environ.get("DINOKIT_KERNEL_CACHE", "1") == "0":
        return None
    root = os.environ.get("DINOKIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "dinokit")
    return Path(root) / _FILE_NAME


def _read_disk(path: Path, machine: str) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text()).get(machine, {})
    except (OSError, ValueError, AttributeError):
        return {}  # no file yet, or a damaged one: measure again (and rewrite it)
    return {key: value for key, value in entries.items()
            if isinstance(value, dict) and isinstance(value.get("choice"), str)}


def _write_disk(path: Path, machine: str, key: str, decision: dict) -> None:
    """Add one decision to the file, atomically (a reader never sees half a file); failures only cost a re-measure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            everything = json.loads(path.read_text())
            if not isinstance(everything, dict):
                everything = {}
        except (OSError, ValueError):
            everything = {}
        everything.setdefault(machine, {})[key] = decision
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".kernel_choices.")
        with os.fdopen(handle, "w") as stream:
            json.dump(everything, stream, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass


def decision(kind: str, shape: Sequence, candidates: Sequence[str], run: Callable[[str], object],
             plain: str) -> str:
    """The kernel for `kind` at `shape`: decided before, or measured now by calling `run(name)` for each candidate
    (each call must leave its inputs unchanged). `plain` is the reference the others must beat by `MARGIN`."""
    global _loaded_from
    machine = machine_key()
    key = f"{machine} :: {kind}:" + ":".join(str(part) for part in shape)
    known = _decisions.get(key)
    if known is not None and known["choice"] in candidates:
        return known["choice"]
    path = _cache_path()
    with _lock:
        if path is not None and _loaded_from != f"{path}|{machine}":
            _decisions.update({f"{machine} :: {k}": v for k, v in _read_disk(path, machine).items()})
            _loaded_from = f"{path}|{machine}"
            known = _decisions.get(key)
            if known is not None and known["choice"] in candidates:
                return known["choice"]
        times = measure(candidates, run)
        choice = min(times, key=times.get)
        if choice != plain and plain in times and times[choice] > times[plain] * (1 - MARGIN):
            choice = plain
        made = {"choice": choice, "ms": {name: round(ms, 4) for name, ms in times.items()}}
        _decisions[key] = made
        if path is not None and not busy():
            _write_disk(path, machine, key.split(" :: ", 1)[1], made)
    return choice


def measure(candidates: Sequence[str], run: Callable[[str], object], rounds: int = ROUNDS) -> dict[str, float]:
    """Median milliseconds of each candidate over `rounds` interleaved rounds (order rotated), after one warm-up."""
    for name in candidates:
        run(name)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        order = list(candidates[round_index % len(candidates):]) + list(candidates[:round_index % len(candidates)])
        for name in order:
            start = time.perf_counter()
            run(name)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def busy() -> bool:
    """Whether more tasks wait to run than there are cores: timings taken now say more about the other jobs than
    about the kernels, so such a decision serves this process only and the next one measures again."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def decisions() -> dict[str, dict]:
    """Every decision this process knows, by "machine :: kind:shape" (for reports and benchmarks)."""
    return dict(_decisions)


def forget() -> None:
    """Drop the in-memory decisions (the disk file is read again at the next decision)."""
    global _loaded_from
    with _lock:
        _decisions.clear()
        _loaded_from = None
