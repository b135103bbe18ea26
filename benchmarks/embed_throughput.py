"""End-to-end embedding throughput: `dinokit embed` vs transformers, and vs dinokit's own model-only rate.

Methods, all in one process, on the same files, same model weights (ViT-S/14, random init) and batch size:
  dinokit      dinokit.apps.embed.embed() with its default decoding (`default_num_workers`), shards written to
               disk (CLS pooling)
  dinokit_int8   the same with int8=True (`dinokit embed --int8`: the blocks' Linear layers in int8)
  pipeline     transformers pipeline("image-feature-extraction", pool=True) over the file paths
  hand_loop    transformers AutoImageProcessor + AutoModel in a plain loop: open, preprocess, forward
  model_only   dinokit's model on the same batches, images decoded and preprocessed beforehand (not timed)
  model_only_int8  dinokit's int8 copy likewise (the rate dinokit_int8 is a share of)
  hf_model_only  transformers' model likewise: separates the model's speed from the pipeline's overhead
The files are split into --rounds parts; each round runs every method on its part, in rotating order, so that
load from other processes on a shared machine hits all methods alike. Rates are images / wall-clock second.
CPU time (user + system, this process and its finished workers) per image is printed too: it is less sensitive
than wall-clock time to load from other processes. Peak memory: the highest resident set size (PSS when /proc allows, so pages shared with forked workers count
once) of this process plus its DataLoader workers, sampled every 20 ms while each method runs.

    python benchmarks/embed_throughput.py --limit 400
    python benchmarks/embed_throughput.py            # all 3,925 images of imagenette/val
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from peak_memory import PeakMemory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "datasets" / "imagenette" / "val"


# ---------------------------------------------------------------------------------------------------- memory
def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------------------------------------------- methods
def run_dinokit(files, model, batch_size, num_workers, scratch: Path, int8: bool = False) -> None:
    from dinokit.apps.embed import embed

    out = scratch / "dinokit_out"
    shutil.rmtree(out, ignore_errors=True)
    embed(files, model, out, pooling="cls", batch_size=batch_size, num_workers=num_workers, progress=False,
          int8=int8)


def run_pipeline(files, pipe, batch_size) -> None:
    for _ in pipe(files, batch_size=batch_size, pool=True):
        pass


def run_hand_loop(files, hf_model, processor, batch_size) -> None:
    from PIL import Image

    with torch.inference_mode():
        for i in range(0, len(files), batch_size):
            images = [Image.open(f).convert("RGB") for f in files[i:i + batch_size]]
            inputs = processor(images=images, return_tensors="pt")
            hf_model(**inputs).pooler_output.numpy()


def decode_all(files):
    from PIL import Image

    from dinokit.apps.embed import eval_transform

    transform = eval_transform(224)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def run_model_only(pixels, model, batch_size) -> None:
    from dinokit.apps.embed import embed_pixels

    for i in range(0, len(pixels), batch_size):
        embed_pixels(model, pixels[i:i + batch_size], "cls")


def run_hf_model_only(pixels, hf_model, batch_size) -> None:
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            hf_model(pixel_values=pixels[i:i + batch_size]).pooler_output.numpy()


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of images (default imagenette/val)")
    parser.add_argument("--limit", type=int, default=None, help="use this many images (spread over the classes)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="dinokit decoding workers (default: embed's own)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaving rounds")
    parser.add_argument("--methods", default="dinokit,dinokit_int8,pipeline,hand_loop,model_only,model_only_int8,"
                                              "hf_model_only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoImageProcessor, AutoModel, pipeline

    from dinokit import load_model
    from dinokit.apps.embed import list_images
    from dinokit.int8 import quantize_int8
    from dinokit.processing import Dinov2ImageProcessor

    files = list_images(args.data)
    if args.limit:
        step = max(1, len(files) // args.limit)
        files = files[::step][: args.limit]
    methods = args.methods.split(",")
    print(f"{len(files)} images from {args.data}; ViT-S/14 random weights; batch {args.batch_size}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"{args.rounds} interleaved rounds", flush=True)

    torch.manual_seed(0)
    model = load_model("vits14").eval()
    int8_model = quantize_int8(model) if "model_only_int8" in args.methods else None
    scratch = Path(tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        model.save_pretrained(scratch / "model")
        Dinov2ImageProcessor().save_pretrained(scratch / "model")  # the facebook/dinov2-* preprocessing
        hf_model = AutoModel.from_pretrained(scratch / "model").eval()
        processor = AutoImageProcessor.from_pretrained(scratch / "model")
        pipe = pipeline("image-feature-extraction", model=hf_model, image_processor=processor, device="cpu")

        parts = [files[r::args.rounds] for r in range(args.rounds)]
        pixels = {r: None for r in range(args.rounds)}
        calls = {
            "dinokit": lambda fs, r: run_dinokit(fs, model, args.batch_size, args.num_workers, scratch),
            "dinokit_int8": lambda fs, r: run_dinokit(fs, model, args.batch_size, args.num_workers, scratch, True),
            "pipeline": lambda fs, r: run_pipeline(fs, pipe, args.batch_size),
            "hand_loop": lambda fs, r: run_hand_loop(fs, hf_model, processor, args.batch_size),
            "model_only": lambda fs, r: run_model_only(pixels[r], model, args.batch_size),
            "model_only_int8": lambda fs, r: run_model_only(pixels[r], int8_model, args.batch_size),
            "hf_model_only": lambda fs, r: run_hf_model_only(pixels[r], hf_model, args.batch_size),
        }
        # Warm-up: one batch each (kernel selection, allocator, worker start-up code paths).
        warm = files[: args.batch_size]
        pixels["warm"] = decode_all(warm)
        for name in methods:
            calls[name](warm, "warm")

        seconds = {m: 0.0 for m in methods}
        cpu = {m: 0.0 for m in methods}
        peak = {m: 0.0 for m in methods}
        for r, part in enumerate(parts):
            if {"model_only", "model_only_int8", "hf_model_only"} & set(methods):
                pixels[r] = decode_all(part)
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for name in order:
                with PeakMemory() as memory:
                    start, cpu_start = time.perf_counter(), _cpu_seconds()
                    calls[name](part, r)
                    elapsed = time.perf_counter() - start
                    cpu[name] += _cpu_seconds() - cpu_start
                seconds[name] += elapsed
                peak[name] = max(peak[name], memory.peak_mb)
                print(f"  round {r + 1}/{args.rounds} {name:15s} {len(part) / elapsed:6.2f} img/s", flush=True)
            pixels[r] = None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rate = {m: len(files) / seconds[m] for m in methods}
    cpu_ms = {m: 1000 * cpu[m] / len(files) for m in methods}
    print(f"\n{'method':16s} {'img/s':>8s} {'CPU ms/img':>11s} {'peak MB':>9s}")
    for m in methods:
        print(f"{m:16s} {rate[m]:8.2f} {cpu_ms[m]:11.0f} {peak[m]:9.0f}")
    ratios = {}
    for ours, alone in (("dinokit", "model_only"), ("dinokit_int8", "model_only_int8")):
        if ours in rate:
            for other in ("pipeline", "hand_loop"):
                if other in rate:
                    ratios[f"{ours} / {other}"] = rate[ours] / rate[other]
            if alone in rate:
                ratios[f"{ours} / {alone}"] = rate[ours] / rate[alone]
    if "pipeline" in rate and "hf_model_only" in rate:
        ratios["pipeline / hf_model_only"] = rate["pipeline"] / rate["hf_model_only"]
    if "model_only" in rate and "hf_model_only" in rate:
        ratios["model_only / hf_model_only"] = rate["model_only"] / rate["hf_model_only"]
    for name, value in ratios.items():
        shares = ("dinokit / model_only", "dinokit_int8 / model_only_int8", "pipeline / hf_model_only")
        print(f"{name:32s} {value:6.1%}" if name in shares else f"{name:32s} {value:6.2f}x")
    cpu_share = cpu_ms.get("model_only", 0) / cpu_ms["dinokit"] if "dinokit" in cpu_ms else 0
    if cpu_share:
        print(f"{'dinokit / model_only (CPU)':28s} {cpu_share:6.1%}  (model-only CPU time / end-to-end CPU time)")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": len(files), "batch_size": args.batch_size,
                                               "images_per_second": rate, "cpu_ms_per_image": cpu_ms,
                                               "peak_memory_mb": peak,
                                               "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
