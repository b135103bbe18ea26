"""The DINOv3 parity table: max |dinokit - reference| per variant x reference x size, over every output the
parity tests compare. ViT (tests/test_dinov3_vit_parity.py): last_hidden_state, pooler_output, each
hidden_states entry, each backbone feature map; timm: forward_features. ConvNeXt (tests/test_dinov3_convnext.py):
last_hidden_state, pooler_output, each hidden_states entry, each backbone feature map; timm: the pooled head and
every stage map.

It runs the checks of those tests (the same models, weights and sizes) and records each difference instead of
only asserting it below 1e-5:

    PYTHONPATH=src .venv/bin/python benchmarks/dinov3_parity_table.py [--vit-only | --convnext-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from machine import cpu_description

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_dinov3_convnext as convnext  # noqa: E402
import test_dinov3_vit_parity as parity  # noqa: E402


def vit_rows() -> None:
    recorded: list[float] = []
    measure = parity.max_diff

    def recording(a, b):
        value = measure(a, b)
        recorded.append(value)
        return value

    parity.max_diff = recording
    for case in parity.CASES:
        recorded.clear()
        parity.test_dinov3_vit_parity(case)
        name, reference, (height, width) = case
        print(f"| ViT {name} | {reference} | {height}x{width} | {len(recorded)} | {max(recorded):.2e} |", flush=True)


@torch.no_grad()
def convnext_rows() -> None:
    for name in convnext.VARIANTS:
        with tempfile.TemporaryDirectory() as folder:
            ours, ours_backbone, hf_model, hf_backbone, ref = convnext.build_references(name, Path(folder))
            for height, width in convnext.SIZES:
                x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(height))
                a, b = ours(x, output_hidden_states=True), hf_model(x, output_hidden_states=True)
                pairs = [(a.last_hidden_state, b.last_hidden_state), (a.pooler_output, b.pooler_output),
                         *zip(a.hidden_states, b.hidden_states),
                         *zip(ours_backbone(x).feature_maps, hf_backbone(x).feature_maps)]
                final, maps = ref.forward_intermediates(x, indices=4)
                timm_pairs = [(a.pooler_output, ref.forward_head(final, pre_logits=True)),
                              *zip(a.hidden_states[1:], maps, strict=True)]
                for reference, compared in (("transformers", pairs), ("timm", timm_pairs)):
                    diffs = [convnext.max_diff(m, t) for m, t in compared]
                    print(f"| ConvNeXt {name} | {reference} | {height}x{width} | {len(diffs)} | {max(diffs):.2e} |",
                          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-only", action="store_true")
    parser.add_argument("--convnext-only", action="store_true")
    args = parser.parse_args()
    print(f"# fp32 CPU, torch {torch.__version__}, transformers {parity.transformers.__version__}, "
          f"timm {parity.timm.__version__}; {cpu_description()}\n")
    print("| variant | reference | size | outputs compared | max abs diff |")
    print("|---|---|---|---|---|")
    if not args.convnext_only:
        vit_rows()
    if not args.vit_only:
        convnext_rows()


if __name__ == "__main__":
    main()
