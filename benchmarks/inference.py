"""CPU inference throughput: every dinokit backend vs transformers (SDPA) vs timm, same weights, one process.

    .venv/bin/python benchmarks/inference.py                       # ViT-S/14 and ViT-B/14, fp32, every backend
    .venv/bin/python benchmarks/inference.py --backends torch --no-memory   # the default path vs the peers only
    .venv/bin/python benchmarks/inference.py --models vits14 --rounds 3 --no-compile   # quick look
    .venv/bin/python benchmarks/inference.py --models dinov3_vits16 dinov3_vitb16 --no-compile   # DINOv3 rows
    .venv/bin/python benchmarks/inference.py --summarize run1.json run2.json run3.json  # the runs side by side
    .venv/bin/python benchmarks/inference.py --backends torch --kernels mkl onednn mkl-packed --no-memory
        # the measured kernel choice (`dinokit torch`) beside each GEMM kernel pinned (`dinokit torch[mkl]`, ...)

This is the one CPU inference benchmark (it replaced core_throughput.py, whose back-to-back calls without
pauses and different thread handling gave other ratios). For each model and setting (DINOv2: 224x224 batch 8,
518x518 batch 1 and batch 8; DINOv3, patch 16: 224x224 batch 8 and 512x512 batch 1) the implementations run
interleaved: each round
times one call of every implementation in turn (after one warm-up call each, and a short pause between calls so
spinning worker threads of the previous one go idle). Reported: median img/s over rounds; for each dinokit
backend the min / median / max over rounds of its per-round speed ratio to the faster peer (transformers or
timm, whichever has the higher median), so the spread of the lead is visible, never one best figure;
max |Δ| of last_hidden_state and min CLS cosine against dinokit's eager torch output on the same input, and peak
memory of one forward (RSS high-water mark above the loaded model, measured in a fresh subprocess per cell;
"n/a" for torch.compile, whose compilation would dominate it). The CPU model, its vector ISA and the thread count
are printed first and stored in the JSON (`machine`).

Same weights everywhere: a random dinokit model (Meta init) -> `save_pretrained` -> transformers
`Dinov2Model.from_pretrained`; `checkpoints.meta_to_timm` -> timm `load_state_dict` (timm created with
`dynamic_img_size=True`, its position resampling switched to bicubic without antialias, which is the
interpolation of transformers' Dinov2Model and of dinokit's default config). DINOv3 (`dinov3_vits16`,
`dinov3_vitb16`): the random dinokit preset model -> `save_pretrained` -> transformers
`DINOv3ViTModel.from_pretrained` (SDPA); `checkpoints_dinov3.from_normal(..., "timm")` -> timm
`vit_*_patch16_dinov3_qkvb` (RoPE on any grid, no resampling). The preset uses float32 RoPE periods, the ones
transformers and timm recompute, so all three compute the same function. With a GPU, a CUDA section compares
dinokit and timm in bf16 at 518x518 (DINOv3: 512x512), batch 64.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import cpu_description

from dinokit.backends import BACKENDS
from dinokit.layers import kernel_choice

warnings.filterwarnings("ignore")

SETTINGS = [(224, 8), (518, 1), (518, 8)]
DINOV3_SETTINGS = [(224, 8), (512, 1)]  # patch 16: 518 is not a multiple of it (timm refuses such sizes)
TIMM_NAMES = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
              "vitl14": "vit_large_patch14_dinov2",
              "dinov3_vits16": "vit_small_patch16_dinov3_qkvb", "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb"}
PAUSE = 0.3  # seconds between timed calls


def is_dinov3(preset: str) -> bool:
    return preset.startswith("dinov3_")


def patch_size(preset: str) -> int:
    return 16 if is_dinov3(preset) else 14


# ---------------------------------------------------------------------------------------------------- models
def dinokit_model(preset: str, seed: int = 0):
    import dinokit

    torch.manual_seed(seed)
    return dinokit.load_model(preset).eval()


def transformers_model(preset: str, weights_dir: Path):
    from transformers import Dinov2Model, DINOv3ViTModel

    cls = DINOv3ViTModel if is_dinov3(preset) else Dinov2Model
    return cls.from_pretrained(weights_dir, attn_implementation="sdpa").eval()


def timm_model(preset: str, model, **overrides):
    """timm's ViT for `preset` with `model`'s weights; `overrides` (e.g. depth=2) go to timm.create_model."""
    import timm

    if is_dinov3(preset):
        from dinokit.checkpoints_dinov3 import from_normal

        # timm recomputes the RoPE periods in float32; Meta-file (bf16) periods would be a different function.
        if model.config.rope_periods != "fp32":
            raise ValueError(f"timm computes float32 RoPE periods; {preset} has {model.config.rope_periods!r}")
        net = timm.create_model(TIMM_NAMES[preset], pretrained=False, num_classes=0, **overrides)
        backbone, _ = model.meta_state_dict()
        net.load_state_dict(from_normal(backbone, "timm"), strict=True)
        return net.eval()
    import timm.models.vision_transformer as timm_vit
    from timm.layers import resample_abs_pos_embed

    from dinokit.checkpoints import meta_to_timm

    # timm resamples with antialias=True; the reference here (transformers Dinov2Model) does not.
    timm_vit.resample_abs_pos_embed = functools.partial(resample_abs_pos_embed, antialias=False)
    net = timm.create_model(TIMM_NAMES[preset], pretrained=False, num_classes=0, img_size=518,
                            dynamic_img_size=True, **overrides)
    backbone, _ = model.meta_state_dict()
    net.load_state_dict(meta_to_timm(backbone), strict=True)
    return net.eval()


def implementations(preset: str, model, weights_dir: Path, onnx_dir: Path, backends: list[str],
                    kernels: list[str] = ()) -> dict:
    """name -> callable(pixels) -> last_hidden_state (torch tensor); `kernels`: the torch backend again with each
    of these GEMM kernels pinned instead of chosen by measurement."""
    from dinokit.backends import get_backend

    onnx_path = onnx_dir / f"{preset}.onnx"
    impls = {}
    for name in backends:
        options = {"onnx_path": onnx_path} if name.startswith("onnxruntime") else {}
        backend = get_backend(model, name, **options)
        impls[f"dinokit {name}"] = lambda x, b=backend: b(x).last_hidden_state
    for kernel in kernels:
        impls[f"dinokit torch[{kernel}]"] = functools.partial(pinned_call, get_backend(model, "torch"), kernel)
    hf = transformers_model(preset, weights_dir)
    impls["transformers (sdpa)"] = lambda x: hf(pixel_values=x).last_hidden_state
    net = timm_model(preset, model)
    impls["timm"] = lambda x: net.forward_features(x)
    return impls


def pinned_call(backend, kernel: str, x: torch.Tensor) -> torch.Tensor:
    from dinokit.layers import linear

    before = linear._pinned_gemm
    linear.set_gemm(kernel)
    try:
        return backend(x).last_hidden_state
    finally:
        linear.set_gemm(before)


@torch.inference_mode()
def choice_cost(model, pixels: torch.Tensor) -> dict:
    """Seconds of the first call with no kernel decision known (it measures) and of the second (it does not)."""
    saved = os.environ.get("DINOKIT_KERNEL_CACHE")
    os.environ["DINOKIT_KERNEL_CACHE"] = "0"
    kernel_choice.forget()
    try:
        calls = []
        for _ in range(2):
            started = time.perf_counter()
            model(pixels)
            calls.append(time.perf_counter() - started)
    finally:
        if saved is None:
            os.environ.pop("DINOKIT_KERNEL_CACHE")
        else:
            os.environ["DINOKIT_KERNEL_CACHE"] = saved
    return {"first_call_s": calls[0], "second_call_s": calls[1]}


# ---------------------------------------------------------------------------------------------------- timing
@torch.inference_mode()
def time_interleaved(impls: dict, pixels: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in impls}
    for fn in impls.values():  # warm-up (compile happens here)
        fn(pixels)
    names = list(impls)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            time.sleep(PAUSE)
            start = time.perf_counter()
            impls[name](pixels)
            times[name].append(time.perf_counter() - start)
    return times


def ratio_spreads(times: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    """min / median / max over rounds of each implementation's speed relative to the faster peer, same round."""
    peers = [name for name in times if not name.startswith("dinokit")]
    peer = min(peers, key=lambda name: statistics.median(times[name]))
    out = {}
    for name, own in times.items():
        ratios = [theirs / mine for mine, theirs in zip(own, times[peer])]
        out[name] = (min(ratios), statistics.median(ratios), max(ratios))
    return out


@torch.inference_mode()
def distances(impls: dict, pixels: torch.Tensor) -> dict[str, tuple[float, float]]:
    reference = impls["dinokit torch"](pixels).float()
    out = {}
    for name, fn in impls.items():
        got = fn(pixels).float()
        cos = torch.nn.functional.cosine_similarity(got[:, 0], reference[:, 0], dim=-1)
        out[name] = (float((got - reference).abs().max()), float(cos.min()))
    return out


# ---------------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory_child(args) -> None:
    """Subprocess: load one implementation, reset the RSS high-water mark, run one forward, print MiB used."""
    torch.set_num_threads(args.threads)
    model = dinokit_model(args.preset)
    impls = implementations_for_memory(args.memory_impl, args.preset, model, Path(args.weights_dir),
                                       Path(args.onnx_dir))
    del model
    pixels = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    import gc

    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    with torch.inference_mode():
        impls(pixels)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def implementations_for_memory(name: str, preset: str, model, weights_dir: Path, onnx_dir: Path):
    from dinokit.backends import get_backend

    if name.startswith("dinokit "):
        backend_name = name.split(" ", 1)[1]
        options = {"onnx_path": onnx_dir / f"{preset}.onnx"} if backend_name.startswith("onnxruntime") else {}
        backend = get_backend(model, backend_name, **options)
        return lambda x: backend(x).last_hidden_state
    if name.startswith("transformers"):
        hf = transformers_model(preset, weights_dir)
        return lambda x: hf(pixel_values=x).last_hidden_state
    net = timm_model(preset, model)
    return net.forward_features


def peak_memory(name: str, preset: str, size: int, batch: int, weights_dir: Path, onnx_dir: Path,
                threads: int) -> float | None:
    if "compile" in name or not Path("/proc/self/clear_refs").exists():
        return None
    command = [sys.executable, __file__, "--memory-impl", name, "--preset", preset, "--size", str(size),
               "--batch", str(batch), "--weights-dir", str(weights_dir), "--onnx-dir", str(onnx_dir),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        print(f"  memory of {name} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------------------- CUDA
def cuda_section(presets: list[str], rounds: int) -> list[dict]:
    """bf16, 518x518, batch 64: dinokit (eager and compiled) vs timm on the GPU."""
    from dinokit.backends import get_backend

    rows = []
    for preset in presets:  # DINOv3 at 512x512 (patch 16)
        model = dinokit_model(preset)
        net = timm_model(preset, model).cuda().to(torch.bfloat16)
        model = model.cuda().to(torch.bfloat16)
        impls = {"dinokit torch": get_backend(model, "torch"), "dinokit compile": get_backend(model, "compile"),
                 "timm": net.forward_features}
        side = 512 if is_dinov3(preset) else 518
        pixels = torch.randn(64, 3, side, side, device="cuda", dtype=torch.bfloat16)
        for name, fn in impls.items():
            with torch.inference_mode():
                fn(pixels)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    fn(pixels)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            rows.append({"model": preset, "impl": name, "img_s": 64 / statistics.median(times),
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
    return rows


# ---------------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    from dinokit.export import export_onnx

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dinokit-bench-"))
    machine = cpu_description()
    print(f"machine: {machine}; torch {torch.__version__}", flush=True)
    all_settings = list(dict.fromkeys(s for preset in args.models for s in settings_for(preset, args.settings)))
    results = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "machine": machine,
               "cells": [], "settings": all_settings}
    for preset in args.models:
        model = dinokit_model(preset)
        weights_dir = work / preset
        model.save_pretrained(weights_dir)
        if any(b.startswith("onnxruntime") for b in args.backends):
            started = time.perf_counter()
            export_onnx(model, work / f"{preset}.onnx")
            print(f"[{preset}] ONNX export + check {time.perf_counter() - started:.0f} s", flush=True)
        impls = implementations(preset, model, weights_dir, work, args.backends, args.kernels)
        for size, batch in settings_for(preset, args.settings):
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
            cost = choice_cost(model, pixels)
            print(f"[{preset}] {size}x{size} batch {batch}: first call {cost['first_call_s']:.2f} s with the "
                  f"kernel choice measured, second {cost['second_call_s']:.2f} s", flush=True)
            # choice_cost forgets earlier decisions, so each cell's decisions are recorded with the cell
            chosen = {key.split(" :: ", 1)[1]: made for key, made in kernel_choice.decisions().items()}
            results.setdefault("kernel_choice_cost", []).append({"model": preset, "size": size, "batch": batch,
                                                                  **cost, "kernel_choices": chosen})
            results.setdefault("kernel_choices", {}).update(chosen)
            started = time.perf_counter()
            times = time_interleaved(impls, pixels, args.rounds)
            diffs = distances(impls, pixels)
            print(f"[{preset}] {size}x{size} batch {batch}: timed in {time.perf_counter() - started:.0f} s",
                  flush=True)
            spreads = ratio_spreads(times)
            load = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine, stored with each cell
            for name in impls:
                memory = peak_memory(name, preset, size, batch, weights_dir, work, args.threads) \
                    if args.memory and "[" not in name else None  # pinned kernels: timing only
                results["cells"].append({
                    "model": preset, "size": size, "batch": batch, "impl": name,
                    "img_s": batch / statistics.median(times[name]), "times": times[name],
                    "max_abs_diff": diffs[name][0], "min_cls_cosine": diffs[name][1], "peak_mib": memory,
                    "ratio_to_peer": spreads[name], "load_average": load})
        del impls
    if torch.cuda.is_available():
        results["cuda"] = cuda_section(args.models, args.rounds)
    return results


def settings_for(preset: str, settings: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The (size, batch) settings of `preset`: the given ones, else its family's defaults."""
    if settings is None:
        return DINOV3_SETTINGS if is_dinov3(preset) else SETTINGS
    return settings


def print_tables(results: dict) -> None:
    cells = results["cells"]
    for preset in dict.fromkeys(c["model"] for c in cells):
        for size, batch in results["settings"]:
            rows = [c for c in cells if c["model"] == preset and c["size"] == size and c["batch"] == batch]
            if not rows:
                continue
            base = next(c["img_s"] for c in rows if c["impl"].startswith("transformers"))
            peer = max((c for c in rows if not c["impl"].startswith("dinokit")), key=lambda c: c["img_s"])
            print(f"\n{preset}, fp32, {size}x{size}, batch {batch} ({results['threads']} threads, "
                  f"median of {results['rounds']} interleaved rounds; faster peer: {peer['impl']})\n")
            print("| implementation | img/s | vs transformers | vs faster peer: median (min-max over rounds) "
                  "| peak MiB | max abs diff | min CLS cosine |")
            print("|---|---|---|---|---|---|---|")
            for c in rows:
                memory = f"{c['peak_mib']:.0f}" if c["peak_mib"] is not None else "n/a"
                lo, mid, hi = c["ratio_to_peer"]
                print(f"| {c['impl']} | {c['img_s']:.2f} | {c['img_s'] / base:.2f}x | {mid:.2f}x ({lo:.2f}-{hi:.2f}) "
                      f"| {memory} | {c['max_abs_diff']:.1e} | {c['min_cls_cosine']:.4f} |")
    if results.get("kernel_choices"):
        print("\nKernel choices measured in this run (median ms per candidate; the plain kernel wins ties within "
              "the margin)\n\n| kind:rows:in:out:epilogue | chosen | ms per candidate |\n|---|---|---|")
        for key, made in sorted(results["kernel_choices"].items()):
            times = ", ".join(f"{name} {ms:.2f}" for name, ms in made["ms"].items())
            print(f"| {key} | {made['choice']} | {times} |")
    if results.get("cuda"):
        print("\nCUDA, bf16, 518x518, batch 64\n\n| model | implementation | img/s | peak MiB |\n|---|---|---|---|")
        for row in results["cuda"]:
            print(f"| {row['model']} | {row['impl']} | {row['img_s']:.1f} | {row['peak_mib']:.0f} |")
    else:
        print("\n(no GPU: CUDA section skipped)")


def summarize(paths: list[str]) -> str:
    """Markdown tables of several runs' --json output, one block per machine (runs from different CPUs are never
    put side by side): per dinokit backend, its ratio to the faster peer (median and min-max over rounds) in each
    run, then every implementation's ratio to transformers."""
    runs = [(p, json.loads(Path(p).read_text())) for p in paths]
    machines = list(dict.fromkeys(run.get("machine") or "machine not recorded" for _, run in runs))
    blocks = []
    for machine in machines:
        group = [(p, run) for p, run in runs if (run.get("machine") or "machine not recorded") == machine]
        blocks.append("\n".join([f"### {machine}", ""] + summarize_runs([p for p, _ in group],
                                                                      [run for _, run in group])))
    return "\n\n".join(blocks)


def summarize_runs(paths: list[str], runs: list[dict]) -> list[str]:
    """The tables of runs made on one machine."""
    keys = list(dict.fromkeys((c["model"], c["size"], c["batch"]) for run in runs for c in run["cells"]))
    impls = list(dict.fromkeys(c["impl"] for run in runs for c in run["cells"]))
    header = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    lines = [f"Runs: {', '.join(paths)} ({runs[0]['threads']} threads, {runs[0]['rounds']} interleaved rounds each)"]

    def cell(run, key, impl):
        return next((c for c in run["cells"] if (c["model"], c["size"], c["batch"]) == key and c["impl"] == impl),
                    None)

    for impl in (i for i in impls if i.startswith("dinokit")):
        lines += ["", f"{impl} / faster peer (timm or transformers), per-round ratio: median (min-max)", "",
                  f"| model | setting | {header} |", "|---|---|" + "---|" * len(runs)]
        for model, size, batch in keys:
            ratios = []
            for run in runs:
                c = cell(run, (model, size, batch), impl)
                ratios.append(f"{c['ratio_to_peer'][1]:.2f}x ({c['ratio_to_peer'][0]:.2f}-{c['ratio_to_peer'][2]:.2f})"
                              if c else "-")
            lines.append(f"| {model} | {size}x{batch} | {' | '.join(ratios)} |")
    lines += ["", "img/s (median over rounds) and speed relative to transformers (SDPA), per run", "",
              f"| model | setting | implementation | {header} |", "|---|---|---|" + "---|" * len(runs)]
    for key in keys:
        for impl in impls:
            values = []
            for run in runs:
                c, base = cell(run, key, impl), cell(run, key, "transformers (sdpa)")
                values.append(f"{c['img_s']:.2f} ({c['img_s'] / base['img_s']:.2f}x)" if c and base else "-")
            lines.append(f"| {key[0]} | {key[1]}x{key[2]} | {impl} | {' | '.join(values)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vits14", "vitb14"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, help="dinokit backends to time (default: all; --no-compile drops compile)")
    parser.add_argument("--settings", nargs="+", default=None, metavar="SIZExBATCH",
                        help="input sizes and batch sizes, e.g. 224x8 518x1 (default: 224x8 518x1 518x8 for "
                             "DINOv2, 224x8 512x1 for DINOv3); sizes must be multiples of each model's patch size")
    parser.add_argument("--kernels", nargs="*", default=[], choices=["mkl", "onednn", "mkl-packed"],
                        help="also time the torch backend with each of these GEMM kernels pinned")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="print the tables of these runs' --json files side by side, then exit")
    # internal: one memory measurement in a subprocess
    parser.add_argument("--memory-impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_impl:
        measure_memory_child(args)
        return
    if args.summarize:
        print(summarize(args.summarize))
        return
    args.backends = args.backends or [b for b in BACKENDS if args.compile or b != "compile"]
    if args.settings:
        try:
            args.settings = [tuple(int(v) for v in s.split("x")) for s in args.settings]
        except ValueError:
            parser.error(f"--settings takes SIZExBATCH values such as 224x8, got {' '.join(args.settings)}")
        for preset in args.models:
            wrong = [size for size, _ in args.settings if size % patch_size(preset)]
            if wrong:
                parser.error(f"{preset} has patch size {patch_size(preset)}: sizes {wrong} are not multiples of it "
                             f"(timm refuses them); use e.g. {patch_size(preset) * 16} or 224")
    results = run(args)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
