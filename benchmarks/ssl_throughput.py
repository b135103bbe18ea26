"""Training-step throughput of DINOv2 ViT-S/14 at the official crop sizes on CPU.

One step = teacher forward on 2 global crops, student forward on 2 x 224 (masked) + 8 x 98 crops (the default
96-px local crops are for /16 models: 96 is not a multiple of 14, Meta's /14 configs use 98), DINO / iBOT / KoLeo
losses, backward, per-module clipping, AdamW step and EMA update (Meta's default heads: 65536 prototypes).
Batch 8 images. Variants: drop_path_rate 0.3 (batch-subset stochastic depth, as trained) and 0.0 (none).
Each variant runs in its own process so its peak resident memory (ru_maxrss) is its own; the processes
alternate over --rounds (A, B, A, B, ...) so both variants see the same machine load, and the step times of
all rounds are pooled. Also measured, interleaved in this process: the data pipeline's cost per image for the
two augmentation backends (`crops.backend` pil vs tensor) at these crop sizes.

    python benchmarks/ssl_throughput.py --steps 3 --rounds 2 --results ssl_throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VARIANTS = {"batch_subset_drop_path_0.3": 0.3, "no_drop_path": 0.0}


def measure(drop_path: float, steps: int, batch: int, threads: int) -> dict:
    from dinokit.data import DataAugmentationDINO, collate_data_and_cast
    from dinokit.ssl.masking import MaskingGenerator
    from dinokit.ssl.meta_arch import SSLMetaArch
    from dinokit.ssl.train_config import load_train_config
    from dinokit.ssl.trainer import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_train_config("vits14", [f"student.drop_path_rate={drop_path}", f"train.batch_size_per_gpu={batch}"])
    cfg.optim.lr = 1e-4
    arch = SSLMetaArch(cfg).train()
    optimizer = build_optimizer(cfg, arch.student)
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    samples = [(augment(Image.fromarray((torch.rand(256, 256, 3, generator=generator) * 255).byte().numpy())), ())
               for _ in range(batch)]
    masking = MaskingGenerator((16, 16), max_num_patches=128)
    data = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=256, mask_generator=masking)

    times = []
    for _ in range(steps + 1):  # the first step warms up allocator and kernels
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = arch.forward_losses(data, 0.04)
        loss.backward()
        arch.clip_gradients(3.0)
        optimizer.step()
        arch.update_teacher(0.992)
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"drop_path_rate": drop_path, "batch": batch, "threads": threads, "steps": steps,
            "step_s_median": step_s, "img_per_s": batch / step_s, "step_s_all": times[1:],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def augmentation_cost(images: int, rounds: int, threads: int) -> dict:
    """Milliseconds per image of 2 x 224 + 8 x 98 crops: Meta's per-crop PIL transforms vs the batched tensor
    backend (one call per batch of `images`), interleaved."""
    import numpy as np
    from PIL import Image

    from dinokit.data import BatchDataAugmentationDINO, DataAugmentationDINO

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((320, 256), Image.BICUBIC)
                for _ in range(images)]
    tensors = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pictures]
    pil = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)
    batched = BatchDataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)
    times: dict[str, list[float]] = {"pil": [], "tensor": []}
    for _ in range(rounds):
        start = time.perf_counter()
        for p in pictures:
            pil(p)
        times["pil"].append((time.perf_counter() - start) / images * 1000)
        start = time.perf_counter()
        batched(tensors)
        times["tensor"].append((time.perf_counter() - start) / images * 1000)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"images_per_batch": images, "threads": threads, "ms_per_image": median, "all": times,
            "tensor_speedup": median["pil"] / median["tensor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two variants")
    parser.add_argument("--results", default=None, help="write the results JSON here")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(VARIANTS[args.variant], args.steps, args.batch, args.threads)))
        return
    results = {"model": "ViT-S/14", "crops": "2 x 224 + 8 x 98", "heads": "DINO 65536 prototypes (shared iBOT)",
               "precision": "fp32 (CPU)", "load_avg_start": list(__import__("os").getloadavg())}
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                                  "--batch", str(args.batch), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index}", name, json.dumps(runs[name][-1]), flush=True)
    for name, variant_runs in runs.items():
        steps = sorted(t for r in variant_runs for t in r["step_s_all"])
        median = steps[len(steps) // 2]
        results[name] = {"drop_path_rate": VARIANTS[name], "batch": args.batch, "threads": args.threads,
                         "step_s_median": median, "step_s_min": steps[0], "img_per_s": args.batch / median,
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in variant_runs), "step_s_all": steps}
    results["speedup_from_batch_subset_drop_path"] = (
        results["batch_subset_drop_path_0.3"]["img_per_s"] / results["no_drop_path"]["img_per_s"])
    results["speedup_best_steps"] = (results["no_drop_path"]["step_s_min"]
                                     / results["batch_subset_drop_path_0.3"]["step_s_min"])
    results["augmentation"] = augmentation_cost(args.batch, max(3, args.rounds), args.threads)
    print("augmentation", json.dumps(results["augmentation"]), flush=True)
    results["load_avg_end"] = list(__import__("os").getloadavg())
    print(json.dumps(results, indent=2))
    if args.results:
        with open(args.results, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
