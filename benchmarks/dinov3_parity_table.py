"""The DINOv3 ViT parity table: max |dinokit - reference| per variant x reference x size, over every output the
parity tests compare (last_hidden_state, pooler_output, each hidden_states entry, each backbone feature map; timm:
forward_features).

It runs the checks of tests/test_dinov3_vit_parity.py (the same models, weights and sizes) and records each
difference instead of only asserting it below 1e-5:

    PYTHONPATH=src .venv/bin/python benchmarks/dinov3_parity_table.py
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_dinov3_vit_parity as parity  # noqa: E402


def main() -> None:
    recorded: list[float] = []
    measure = parity.max_diff

    def recording(a, b):
        value = measure(a, b)
        recorded.append(value)
        return value

    parity.max_diff = recording
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, fp32 CPU\n")
    print("| variant | reference | size | outputs compared | max abs diff |")
    print("|---|---|---|---|---|")
    for case in parity.CASES:
        recorded.clear()
        parity.test_dinov3_vit_parity(case)
        name, reference, (height, width) = case
        print(f"| {name} | {reference} | {height}x{width} | {len(recorded)} | {max(recorded):.2e} |", flush=True)


if __name__ == "__main__":
    main()
