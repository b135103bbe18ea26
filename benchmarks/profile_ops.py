"""Where the time goes: a torch.profiler op table (self CPU time) of each implementation, one setting at a time.

    .venv/bin/python benchmarks/profile_ops.py                                  # ViT-S/14, 224x8 and 518x1
    .venv/bin/python benchmarks/profile_ops.py --models vitb14 --settings 518x8 --backends torch

Same implementations and weights as benchmarks/inference.py (dinokit backends, transformers SDPA, timm), same
threads; each is warmed up, then `--forwards` forwards are profiled. Profiling adds overhead per op, so compare the
shares, not the absolute times, with the benchmark's.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from inference import dinokit_model, implementations

warnings.filterwarnings("ignore")


def profile(fn, pixels: torch.Tensor, forwards: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        fn(pixels)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                fn(pixels)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vits14"])
    parser.add_argument("--settings", nargs="+", default=["224x8", "518x1"], metavar="SIZExBATCH")
    parser.add_argument("--backends", nargs="+", default=["torch", "torch-int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forwards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        for preset in args.models:
            model = dinokit_model(preset)
            model.save_pretrained(Path(work) / preset)
            impls = implementations(preset, model, Path(work) / preset, Path(work), args.backends)
            for setting in args.settings:
                size, batch = (int(v) for v in setting.split("x"))
                pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
                for name, fn in impls.items():
                    print(f"\n## {preset} {size}x{size} batch {batch}: {name} ({args.forwards} forwards, "
                          f"{args.threads} threads)\n", flush=True)
                    print(profile(fn, pixels, args.forwards, args.rows), flush=True)


if __name__ == "__main__":
    main()
