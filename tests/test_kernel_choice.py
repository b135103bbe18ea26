"""CPU kernels chosen by measurement: every candidate gives the reference's numbers, decisions are measured once per
machine and shape class, kept on disk by machine, and can be pinned or kept off disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dinokit
from dinokit.layers import attention
from dinokit.layers import kernel_choice as choice
from dinokit.layers import linear as fused

from helpers import images, max_diff, randomize_, small_config, tiny_dinov3_config


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """Decisions kept in a folder of this test's own, none known yet."""
    monkeypatch.setenv("DINOKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("DINOKIT_KERNEL_CACHE", raising=False)
    monkeypatch.setattr(choice, "busy", lambda: False)  # the suite may run on a loaded machine
    monkeypatch.setattr(fused, "_pinned_gemm", None)  # conftest pins them for the other tests
    monkeypatch.setattr(attention, "_pinned_heads", None)
    choice.forget()
    yield tmp_path / "kernel_choices.json"
    choice.forget()


def _reference_output(model, x):
    fused.set_fast_linear(False)
    try:
        return model(x).last_hidden_state
    finally:
        fused.set_fast_linear(True)


@pytest.mark.parametrize("kernel", fused.KERNELS)
@pytest.mark.parametrize("heads", attention.HEAD_LAYOUTS)
@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_every_forced_kernel_and_head_layout_matches_plain_f_linear(monkeypatch, kernel, heads, family):
    monkeypatch.setattr(fused, "_pinned_gemm", kernel)
    monkeypatch.setattr(attention, "_pinned_heads", heads)
    if family == "dinov2":
        model = randomize_(dinokit.Dinov2Model(small_config(swiglu=False)), seed=5).eval()
        x = images(3, 70, 56)
    else:
        from dinokit.models.dinov3_vit import DINOv3ViTModel

        model = randomize_(DINOv3ViTModel(tiny_dinov3_config(layerscale_value=0.3)), seed=5).eval()
        x = images(3, 64, 48)
    with torch.no_grad():
        assert max_diff(model(x).last_hidden_state, _reference_output(model, x)) <= 1e-5


def test_a_decision_is_measured_once_then_read_back_from_disk_by_machine(fresh_choices, monkeypatch):
    model = randomize_(dinokit.Dinov2Model(small_config()), seed=6).eval()
    measured = []
    real_measure = choice.measure
    monkeypatch.setattr(choice, "measure", lambda names, run: measured.append(tuple(names)) or real_measure(names, run))
    with torch.no_grad():
        first = model(images(2, 56, 56)).last_hidden_state
        count = len(measured)
        assert count >= 4  # qkv, proj (residual), fc1 + GELU, fc2 (residual) and the head layout
        model(images(2, 56, 56))
        assert len(measured) == count  # the same shapes: no second measurement
    stored = json.loads(fresh_choices.read_text())
    assert list(stored) == [choice.machine_key()]
    entries = stored[choice.machine_key()]
    assert any(key.startswith("linear:") for key in entries) and any(key.startswith("residual:") for key in entries)
    for entry in entries.values():
        assert entry["choice"] in entry["ms"] and all(ms > 0 for ms in entry["ms"].values())
    choice.forget()  # a new process: everything comes from the file
    monkeypatch.setattr(choice, "measure", lambda names, run: pytest.fail("measured again despite the file"))
    with torch.no_grad():
        assert max_diff(model(images(2, 56, 56)).last_hidden_state, first) <= 1e-5


def test_another_machine_or_thread_count_measures_anew(fresh_choices, monkeypatch):
    fresh_choices.write_text(json.dumps({"Some Other CPU | AVX2 | threads=64 | torch=0": {
        "linear:1:8:8:none": {"choice": "onednn", "ms": {"onednn": 1.0}}}}))
    calls = []
    decided = choice.decision("linear", (1, 8, 8, "none"), ["mkl", "onednn"],
                              lambda name: calls.append(name), plain="mkl")
    assert calls and decided in ("mkl", "onednn")
    assert set(json.loads(fresh_choices.read_text())) == {"Some Other CPU | AVX2 | threads=64 | torch=0",
                                                          choice.machine_key()}


def test_a_candidate_must_beat_the_plain_kernel_by_more_than_the_margin(fresh_choices, monkeypatch):
    times = {"mkl": 10.0, "onednn": 10.0 * (1 - choice.MARGIN / 2), "mkl-packed": 11.0}
    monkeypatch.setattr(choice, "measure", lambda names, run: {name: times[name] for name in names})
    assert choice.decision("linear", (1, 2, 3, "x"), list(times), None, plain="mkl") == "mkl"
    times["onednn"] = 10.0 * (1 - 2 * choice.MARGIN)
    assert choice.decision("linear", (1, 2, 3, "y"), list(times), None, plain="mkl") == "onednn"


def test_a_damaged_cache_file_is_measured_over_and_rewritten(fresh_choices):
    fresh_choices.write_text("{not json")
    assert choice.decision("linear", (1, 4, 4, "none"), ["mkl"], lambda name: None, plain="mkl") == "mkl"
    assert choice.machine_key() in json.loads(fresh_choices.read_text())


def test_kernel_cache_off_keeps_decisions_in_memory_only(fresh_choices, monkeypatch):
    monkeypatch.setenv("DINOKIT_KERNEL_CACHE", "0")
    with torch.no_grad():
        randomize_(dinokit.Dinov2Model(small_config()), seed=7).eval()(images(1, 56, 56))
    assert choice.decisions() and not fresh_choices.exists()


def test_a_decision_measured_on_a_busy_machine_is_not_kept_on_disk(fresh_choices, monkeypatch):
    monkeypatch.setattr(choice, "busy", lambda: True)
    assert choice.decision("linear", (1, 4, 4, "none"), ["mkl"], lambda name: None, plain="mkl") == "mkl"
    assert choice.decisions() and not fresh_choices.exists()


def test_pinned_kernels_skip_measuring(fresh_choices, monkeypatch):
    monkeypatch.setattr(fused, "_pinned_gemm", "mkl")
    monkeypatch.setattr(attention, "_pinned_heads", "strided")
    monkeypatch.setattr(choice, "measure", lambda names, run: pytest.fail("measured although pinned"))
    with torch.no_grad():
        randomize_(dinokit.Dinov2Model(small_config()), seed=8).eval()(images(1, 56, 56))


def test_an_unknown_pinned_kernel_is_one_clear_error():
    code = "import dinokit.layers.linear"
    result = subprocess.run([sys.executable, "-c", code], env={"DINOKIT_GEMM": "blas9000", "PATH": ""},
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "DINOKIT_GEMM='blas9000' is not a kernel: use one of mkl, onednn, mkl-packed or auto" in result.stderr
    with pytest.raises(ValueError, match="unknown GEMM kernel"):
        fused.set_gemm("blas9000")
