from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"

# Kernel decisions (dinokit.layers.kernel_choice) stay in each test process: none read from or left in ~/.cache.
os.environ.setdefault("DINOKIT_KERNEL_CACHE", "0")
# Tests compare vectors written by other processes (torchrun ranks, Ray workers, CLI runs) at 1e-6; each process
# measuring its own kernels on a busy machine may choose differently, so the suite pins one choice
# (tests/test_kernel_choice.py unpins it to test the measuring).
os.environ.setdefault("DINOKIT_GEMM", "onednn")
os.environ.setdefault("DINOKIT_SDPA_HEADS", "strided")
if "x86" in torch.backends.quantized.supported_engines:
    os.environ.setdefault("DINOKIT_INT8_ENGINE", "x86")

# Two cores: keep torch from oversubscribing when several test processes run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return DATASETS


def require_dataset(*parts: str) -> Path:
    path = DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"dataset {path} is not available (expected ../shared/datasets beside the repository)")
    return path


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster for one test module, small: 2 CPUs, an 80 MB object store."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from tests (CI has no network)
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()
