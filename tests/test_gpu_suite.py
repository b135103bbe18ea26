"""benchmarks/gpu_suite.py --smoke: every section runs on the CPU at toy sizes and reports real numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATASETS, REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"
IMAGENETTE = DATASETS / "imagenette" / "val"
CIFAR10 = DATASETS / "cifar10"

pytestmark = pytest.mark.slow


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(results JSON, markdown text) of one --smoke run (about a minute on two cores)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    run = subprocess.run([sys.executable, str(SUITE), "--smoke", "--json", str(out / "r.json"), "--markdown",
                          str(out / "r.md")], capture_output=True, text=True, env=_env(), cwd=out, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def _ok(results: dict, name: str) -> dict:
    section = results["sections"][name]
    assert section["status"] == "ok", section
    return section["result"]


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_section_is_recorded_and_the_markdown_has_its_tables(smoke):
    results, text = smoke
    assert results["smoke"] is True and list(results["sections"]) == ["parity", "throughput", "embed", "ssl", "cifar"]
    for name in results["sections"]:
        assert f"## {name}" in text
    assert "**error**" not in text
    assert "| model | input | max abs diff |" in text
    assert "| model | size x batch | implementation | img/s |" in text
    assert "| variant | drop_path_rate | img/s |" in text


def test_parity_fp32_matches_transformers(smoke):
    result = _ok(smoke[0], "parity")
    assert result["rows"]
    for row in result["rows"]:
        assert row["max_abs_diff_vs_transformers"] < 1e-3
        assert 0.99 < row["bf16_cls_cosine_min"] <= 1.0 + 1e-6
        assert 0.99 < row["autocast_bf16_cls_cosine_min"] <= 1.0 + 1e-6


def test_throughput_times_all_five_implementations_in_both_settings(smoke):
    result = _ok(smoke[0], "throughput")
    assert len(result["rows"]) == 2 and not result["skipped_cells"]
    for row in result["rows"]:
        assert row["errors"] == {}
        assert set(row["impls"]) == {"dinokit eager", "dinokit compile", "transformers sdpa", "timm eager",
                                     "timm compile"}
        for impl in row["impls"].values():
            assert _positive(impl["img_s"]) and impl["rounds"] >= 1
            ratio = impl["ratio_to_timm_compile"]
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert row["impls"]["timm compile"]["ratio_to_timm_compile"]["median"] == pytest.approx(1.0)
    assert _positive(result["rows"][0]["dinokit_best_vs_timm_compile"])


def test_embed_end_to_end_and_jpeg_decode_variant(smoke):
    section = smoke[0]["sections"]["embed"]
    if not IMAGENETTE.is_dir():
        assert section["status"] == "skipped" and "dataset not found" in section["result"]["skipped"]
        pytest.skip(f"{IMAGENETTE} is not available")
    result = _ok(smoke[0], "embed")
    assert result["images"] == 8 and result["embedded"] == 8
    for key in ("embed_img_s", "model_only_img_s", "gpu_decode_img_s", "embed_share_of_model_only"):
        assert _positive(result[key]), key
    # Decoded by torchvision and resized by the tensor path instead of PIL: close, not identical.
    assert result["gpu_decode_cls_max_abs_diff"] < 0.5 and result["gpu_decode_cls_cosine_min"] > 0.99


def test_ssl_training_steps_under_torchrun(smoke):
    result = _ok(smoke[0], "ssl")
    for name, rate in (("batch_subset_drop_path_0.3", 0.3), ("no_drop_path", 0.0)):
        variant = result[name]
        assert variant["drop_path_rate"] == rate and variant["backend"] == "gloo"
        assert _positive(variant["img_per_s"]) and math.isfinite(variant["loss"])
    assert _positive(result["speedup_from_batch_subset_drop_path"])


def test_cifar_pretraining_reports_a_knn_accuracy(smoke):
    section = smoke[0]["sections"]["cifar"]
    if not (CIFAR10 / "train").is_dir():
        assert section["status"] == "skipped" and "dataset not found" in section["result"]["skipped"]
        pytest.skip(f"{CIFAR10} is not available")
    result = _ok(smoke[0], "cifar")
    assert 0.0 <= result["knn_top1"] <= 1.0 and result["knn_top1"] == pytest.approx(result["knn_top1_percent"] / 100)
    assert result["iterations"] >= 1 and result["images_seen"] > 0 and _positive(result["img_per_s"])
    assert result["cpu_hour_target_percent"] == pytest.approx(50.84)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without CUDA")
def test_without_a_gpu_the_full_suite_refuses_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(SUITE)], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr and "--smoke" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "gpu_suite.json").exists()
