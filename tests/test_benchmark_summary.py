"""benchmarks/inference.py --summarize: several runs' JSON side by side, each cell from its own run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(path, ratio, dinokit_img_s, machine=None):
    cells = [
        {"model": "vits14", "size": 224, "batch": 8, "impl": "dinokit torch", "img_s": dinokit_img_s,
         "ratio_to_peer": ratio},
        {"model": "vits14", "size": 224, "batch": 8, "impl": "transformers (sdpa)", "img_s": 8.0,
         "ratio_to_peer": [1.0, 1.0, 1.0]},
        {"model": "vits14", "size": 224, "batch": 8, "impl": "timm", "img_s": 8.5, "ratio_to_peer": [1.0, 1.0, 1.0]},
    ]
    path.write_text(json.dumps({"threads": 2, "rounds": 3, "cells": cells, "machine": machine}))
    return str(path)


def test_summary_puts_each_runs_ratio_spread_and_rate_in_its_own_column(tmp_path):
    runs = [_run(tmp_path / "a.json", [1.1, 1.3, 1.5], 12.0), _run(tmp_path / "b.json", [0.9, 1.2, 1.25], 10.0)]
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--summarize", *runs],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    assert "| vits14 | 224x8 | 1.30x (1.10-1.50) | 1.20x (0.90-1.25) |" in out
    assert "| vits14 | 224x8 | dinokit torch | 12.00 (1.50x) | 10.00 (1.25x) |" in out
    assert "| vits14 | 224x8 | timm | 8.50 (1.06x) | 8.50 (1.06x) |" in out


def test_runs_from_different_machines_get_a_block_each_never_a_shared_column(tmp_path):
    runs = [_run(tmp_path / "zen3.json", [0.8, 0.9, 1.0], 8.0, "AMD EPYC 7B13 | AVX2 | 2 threads"),
            _run(tmp_path / "spr.json", [1.1, 1.3, 1.5], 12.0, "Intel Xeon 8481C | AVX-512+AMX | 2 threads"),
            _run(tmp_path / "zen3b.json", [0.85, 0.95, 1.05], 8.2, "AMD EPYC 7B13 | AVX2 | 2 threads")]
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--summarize", *runs],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    zen3, spr = out.split("### Intel Xeon 8481C | AVX-512+AMX | 2 threads")
    assert zen3.startswith("### AMD EPYC 7B13 | AVX2 | 2 threads")
    assert "| vits14 | 224x8 | 0.90x (0.80-1.00) | 0.95x (0.85-1.05) |" in zen3  # the two EPYC runs side by side
    assert "| vits14 | 224x8 | 1.30x (1.10-1.50) |" in spr and "run 2" not in spr
