"""The GPU benchmark suite (issue 14): one command, one JSON, one markdown table file, at most ~8 minutes on an H200.

    python benchmarks/gpu_suite.py                          # all sections on the GPU
    python benchmarks/gpu_suite.py --sections b --time-budget 300 --json b.json --markdown b.md
    python benchmarks/gpu_suite.py --smoke                  # every section at toy sizes on the CPU (~1 min)

Sections (each a function; one that fails is recorded with its error and the others still run):
  a parity      CUDA fp32 (TF32 off) dinokit vs transformers Dinov2Model (SDPA), same weights: max |Δ| of
                last_hidden_state (target <= 1e-4); CLS cosine of dinokit in bf16 (weights cast, and autocast)
                against dinokit fp32. ViT-S/14 and ViT-B/14.
  b throughput  bf16 inference img/s, ViT-S/B/L at 518x518 batch 64 and 224x224 batch 128: dinokit eager and
                compiled, transformers (SDPA), timm eager and compiled (`torch.compile(net)`); interleaved rounds
                (every implementation once per round, rotating order, synchronised), median img/s, min/median/max
                of the per-round ratio to timm compiled, peak memory of one call above the resident weights.
                Target: at 518, dinokit (its faster variant) >= timm compiled.
  c embed       `dinokit embed` end to end on imagenette/val vs the model alone on the same preprocessed batches
                (the share), and a GPU-decode variant: nvjpeg decode + dinokit's tensor preprocessing on the GPU.
  d ssl         SSL training img/s and peak memory of the vits14 preset at 2 x 224 + 8 x 98 crops, bf16, one
                process under torchrun (nccl), with batch-subset stochastic depth (drop_path_rate 0.3) and without.
  e cifar       3 minutes of CIFAR-10 pretraining with the gpu_fast_cifar preset (benchmarks/ssl_cifar10.py), its
                k-NN top-1 against the CPU hour's 50.8%.

--time-budget guards the total: sections after the current one keep their nominal time in reserve, and the
throughput section spends what is left of its share on as many cells (and rounds) as fit, recording the
cells it had to skip. --smoke runs everything on the CPU at toy sizes (2-block models, 28-px inputs, 8 images,
one training step, seconds of CIFAR training); there torch.compile uses the "eager" compiler backend
(TorchDynamo without inductor code generation, which alone takes about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
DATASETS = REPO / ".." / "shared" / "datasets"
sys.path.insert(0, str(BENCHMARKS))  # the shared helpers of the other benchmarks (inference.timm_model)

from inference import transformers_model  # noqa: E402

SECTIONS = {"a": "parity", "b": "throughput", "c": "embed", "d": "ssl", "e": "cifar"}
SSL_VARIANTS = {"batch_subset_drop_path_0.3": 0.3, "no_drop_path": 0.0}
CPU_HOUR_KNN = 50.84  # issue #4: 58.6 min of 2 CPU processes, k-NN against all 50k train images


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class Plan:
    """Sizes of every section: the full GPU run, or the toy CPU run of --smoke."""

    smoke: bool
    device: torch.device
    nominal_s: dict[str, float]  # time each section is expected to take: what later sections keep in reserve
    parity_presets: list[str] = field(default_factory=lambda: ["vits14", "vitb14"])
    parity_inputs: list[tuple[int, int]] = field(default_factory=lambda: [(224, 8), (518, 2)])
    model_overrides: dict = field(default_factory=dict)  # dinokit preset_config overrides (smoke: 2 blocks)
    timm_overrides: dict = field(default_factory=dict)
    compiler: str = "inductor"
    bench_presets: list[str] = field(default_factory=lambda: ["vits14", "vitb14", "vitl14"])
    bench_settings: list[tuple[int, int]] = field(default_factory=lambda: [(518, 64), (224, 128)])
    max_rounds: int = 10
    embed_image_size: int = 224
    embed_batch: int = 128
    embed_workers: int | None = None  # None: embed's default (cores, at most 8)
    ssl_steps: int = 10
    ssl_batch: int = 64
    ssl_overrides: list[str] = field(default_factory=list)
    cifar_minutes: float = 3.0
    cifar_args: list[str] = field(default_factory=list)


def make_plan(smoke: bool) -> Plan:
    if not smoke:
        cores = os.cpu_count() or 2
        workers = max(1, min(12, cores - 2))
        # An explicit index: torch.cuda.set_device (called by `embed`) refuses a bare "cuda".
        return Plan(smoke=False, device=torch.device("cuda", 0),
                    nominal_s={"a": 25, "b": 160, "c": 30, "d": 40, "e": 225},
                    cifar_args=["--workers", str(workers), "--threads", str(max(1, min(8, cores // 2))),
                                "--eval-points", "1"])
    return Plan(
        smoke=True, device=torch.device("cpu"), nominal_s={"a": 5, "b": 10, "c": 5, "d": 20, "e": 25},
        parity_presets=["vits14"], parity_inputs=[(28, 2)], model_overrides={"num_hidden_layers": 2},
        timm_overrides={"depth": 2}, compiler="eager", bench_presets=["vits14"], bench_settings=[(42, 2), (28, 2)],
        max_rounds=2, embed_image_size=28, embed_batch=4, embed_workers=0, ssl_steps=1, ssl_batch=2,
        ssl_overrides=["student.depth=2", "crops.global_crops_size=28", "crops.local_crops_size=14",
                       "crops.local_crops_number=2", "dino.head_n_prototypes=256", "dino.head_hidden_dim=128",
                       "dino.head_bottleneck_dim=64", "ibot.head_n_prototypes=256", "ibot.head_hidden_dim=128",
                       "ibot.head_bottleneck_dim=64"],
        cifar_minutes=0.05,
        cifar_args=["--workers", "0", "--threads", "1", "--eval-points", "1", "--max-train", "200",
                    "--max-test", "100", "--skip-full", "--iterations", "6", "--epochs", "3",
                    "train.batch_size_per_gpu=16", "student.depth=2", "train.log_freq=2"])


class Clock:
    """The suite's time budget: each section may use what is left minus the nominal time of those after it."""

    def __init__(self, budget_s: float, nominal_s: dict[str, float]) -> None:
        self.start, self.budget_s, self.nominal_s = time.perf_counter(), budget_s, nominal_s
        self.later: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section_deadline(self) -> float:
        """perf_counter() time by which the running section should end."""
        reserve = sum(self.nominal_s[s] for s in self.later)
        return self.start + self.budget_s - reserve


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time the work, not its launch


def subprocess_env() -> dict:
    """This checkout's src first on the path: the venv may hold an editable install of another checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def make_model(preset: str, plan: Plan):
    """A random dinokit model of `preset` (seeded: every implementation gets the same weights)."""
    import dinokit
    from dinokit.config import preset_config

    torch.manual_seed(0)
    if not plan.model_overrides:
        return dinokit.load_model(preset).eval()
    # A smaller model of the preset's family: the config is rebuilt so that its stage names fit the new depth.
    config = preset_config(preset)
    data = {k: v for k, v in config.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
    return dinokit.Dinov2Model(type(config).from_dict({**data, **plan.model_overrides})).eval()


def hf_copy(preset: str, model, workdir: Path):
    """transformers' model class for `preset` (SDPA) with `model`'s weights, through save_pretrained /
    from_pretrained."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    model.save_pretrained(folder)
    hf = transformers_model(preset, folder)
    shutil.rmtree(folder, ignore_errors=True)
    return hf


# ---------------------------------------------------------------------------------------------------- (a) parity
def section_parity(plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    # TF32 matmuls would make fp32 differ from fp32 by ~1e-3: the parity claim is about true fp32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        rows = [parity_row(preset, size, batch, plan, workdir)
                for preset in plan.parity_presets for size, batch in plan.parity_inputs]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return {"rows": rows, "target_max_abs_diff": 1e-4,
            "meets_target": all(r["max_abs_diff_vs_transformers"] <= 1e-4 for r in rows)}


def parity_row(preset: str, size: int, batch: int, plan: Plan, workdir: Path) -> dict:
    device = plan.device
    model = make_model(preset, plan)
    hf = hf_copy(preset, model, workdir).to(device)
    model = model.to(device)
    # Copied outside inference mode: parameters made inside it are inference tensors, which dinokit's position
    # grid cache cannot key on (no version counter).
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
    with torch.inference_mode():
        ours = model(pixel_values=pixels).last_hidden_state.float()
        theirs = hf(pixel_values=pixels).last_hidden_state.float()
        cls_bf16 = bf16(pixel_values=pixels.to(torch.bfloat16)).last_hidden_state[:, 0].float()
        with torch.autocast(device.type, dtype=torch.bfloat16):  # what `dinokit embed` does on CUDA
            cls_autocast = model(pixel_values=pixels).last_hidden_state[:, 0].float()
    cosine = torch.nn.functional.cosine_similarity
    return {"model": preset, "size": size, "batch": batch,
            "max_abs_diff_vs_transformers": float((ours - theirs).abs().max()),
            "bf16_cls_cosine_min": float(cosine(cls_bf16, ours[:, 0], dim=-1).min()),
            "autocast_bf16_cls_cosine_min": float(cosine(cls_autocast, ours[:, 0], dim=-1).min())}


# ---------------------------------------------------------------------------------------------------- (b) throughput
def implementations(preset: str, plan: Plan, workdir: Path) -> dict:
    """name -> callable(bf16 pixels): the five implementations, bf16 weights on the device, same weights."""
    from inference import timm_model

    from dinokit.backends import get_backend

    device, dtype = plan.device, torch.bfloat16
    model = make_model(preset, plan)
    hf = hf_copy(preset, model, workdir).to(device, dtype)
    net = timm_model(preset, model, **plan.timm_overrides).to(device, dtype)
    model = model.to(device, dtype)
    eager = get_backend(model, "torch")
    compiled = get_backend(model, "compile", compiler=plan.compiler)
    # dynamic=False, as dinokit's compile backend: both specialise on each input shape (no symbolic shapes).
    timm_compiled = torch.compile(net, dynamic=False, backend=plan.compiler)
    return {"dinokit eager": lambda x: eager(x).last_hidden_state,
            "dinokit compile": lambda x: compiled(x).last_hidden_state,
            "transformers sdpa": lambda x: hf(pixel_values=x).last_hidden_state,
            "timm eager": net, "timm compile": timm_compiled}


@torch.inference_mode()
def time_cell(impls: dict, pixels: torch.Tensor, max_rounds: int, deadline: float) -> tuple[dict, dict]:
    """(seconds per call of each implementation, one list per round; errors). Warm-up (and compilation) first;
    then rounds, each calling every implementation once in a rotating order, until max_rounds or the deadline."""
    device, errors = pixels.device, {}
    for name, fn in list(impls.items()):
        try:
            fn(pixels)
            fn(pixels)
            synchronize(device)
        except Exception as exc:  # e.g. a compiler failure: the other implementations still run
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]
    live = [name for name in impls if name not in errors]
    times: dict[str, list[float]] = {name: [] for name in live}
    for r in range(max_rounds if live else 0):
        if r and time.perf_counter() > deadline:
            break
        for name in live[r % len(live):] + live[: r % len(live)]:
            synchronize(device)
            start = time.perf_counter()
            impls[name](pixels)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, errors


@torch.inference_mode()
def peak_mib(fn, pixels: torch.Tensor) -> float | None:
    """GPU memory one call needs above what is already allocated (the weights of all models): its activations."""
    if pixels.device.type != "cuda":
        return None
    synchronize(pixels.device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(pixels)
    synchronize(pixels.device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cell_summary(times: dict, batch: int) -> dict:
    out = {}
    reference = times.get("timm compile")
    for name, seconds in times.items():
        row = {"img_s": batch / statistics.median(seconds), "rounds": len(seconds)}
        if reference:
            ratios = sorted(ref / t for ref, t in zip(reference, seconds))  # per round: img/s over timm compiled
            row["ratio_to_timm_compile"] = {"min": ratios[0], "median": statistics.median(ratios),
                                            "max": ratios[-1]}
        out[name] = row
    return out


def section_throughput(plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    presets = args.models or plan.bench_presets
    deadline = clock.section_deadline()
    cells = [(size, batch, preset) for size, batch in plan.bench_settings for preset in presets]
    built: dict[str, dict] = {}
    rows, skipped = [], []
    # The longest cell so far (mostly compilation; building the models comes once per preset): a cell starts only
    # if half of that is left, so the section overruns its share by half a cell at most.
    longest = 0.0
    for index, (size, batch, preset) in enumerate(cells):
        started, left = time.perf_counter(), deadline - time.perf_counter()
        if left <= 0.5 * longest or left <= 0:
            skipped.append({"model": preset, "size": size, "batch": batch, "skipped": "time budget"})
            continue
        if preset not in built:
            built[preset] = implementations(preset, plan, workdir)
        impls = built[preset]
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        pixels = pixels.to(plan.device, torch.bfloat16)
        cell_deadline = time.perf_counter() + left / (len(cells) - index)
        times, errors = time_cell(impls, pixels, plan.max_rounds, cell_deadline)
        summary = cell_summary(times, batch)
        for name in summary:
            summary[name]["peak_mib"] = peak_mib(impls[name], pixels)
        row = {"model": preset, "size": size, "batch": batch, "impls": summary, "errors": errors}
        if size == 518 or plan.smoke and size == plan.bench_settings[0][0]:
            row["dinokit_best_vs_timm_compile"] = best_dinokit_ratio(summary)
        rows.append(row)
        longest = max(longest, time.perf_counter() - started)
        print(f"[b] {preset} {size}x{size} batch {batch}: "
              + ", ".join(f"{n} {s['img_s']:.0f}" for n, s in summary.items()), file=sys.stderr, flush=True)
    del built
    targets = [r["dinokit_best_vs_timm_compile"] for r in rows if r.get("dinokit_best_vs_timm_compile")]
    return {"dtype": "bfloat16", "rows": rows, "skipped_cells": skipped,
            "target": "bf16 518x518: dinokit (eager or compiled, the faster) img/s >= timm compiled"
                      + (" (smoke: the first setting stands in for 518)" if plan.smoke else ""),
            "meets_target": bool(targets) and all(t >= 1.0 for t in targets)}


def best_dinokit_ratio(summary: dict) -> float | None:
    ratios = [summary[n]["ratio_to_timm_compile"]["median"] for n in ("dinokit eager", "dinokit compile")
              if n in summary and "ratio_to_timm_compile" in summary[n]]
    return max(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------------- (c) embed
def section_embed(plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    from dinokit.apps.embed import embed, list_images

    data = Path(args.imagenette)
    if not data.is_dir():
        return {"skipped": f"dataset not found: {data}"}
    files = list_images(data)
    limit = args.limit or (8 if plan.smoke else None)
    if limit:
        step = max(1, len(files) // limit)  # spread over the classes, as benchmarks/embed_throughput.py
        files = files[::step][:limit]
    size, batch, device = plan.embed_image_size, plan.embed_batch, plan.device
    model = make_model("vits14", plan).to(device)

    pixels = predecode(files, size, batch, plan.embed_workers).to(device)  # not timed: the model-only input
    embed_features(model, pixels[:batch])  # warm-up: kernels, allocator
    start = time.perf_counter()
    reference = embed_features(model, pixels)
    model_s = time.perf_counter() - start
    del pixels

    start = time.perf_counter()
    report = embed(files, model, workdir / "embed_out", pooling="cls", batch_size=batch, image_size=size,
                   num_workers=plan.embed_workers, device=str(device), progress=False)
    embed_s = time.perf_counter() - start

    gpu_decode_features(files[:batch], model, batch, size, device)  # warm-up of the decoder
    start = time.perf_counter()
    decoded, fallbacks = gpu_decode_features(files, model, batch, size, device)
    decode_s = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(decoded, reference, dim=-1)
    n = len(files)
    return {"images": n, "embedded": report.num_embedded, "batch": batch, "image_size": size, "model": "vits14",
            "embed_img_s": n / embed_s, "model_only_img_s": n / model_s,
            "embed_share_of_model_only": (n / embed_s) / (n / model_s),
            "gpu_decode_img_s": n / decode_s, "gpu_decode_share_of_model_only": (n / decode_s) / (n / model_s),
            "gpu_decode_cls_max_abs_diff": float((decoded - reference).abs().max()),
            "gpu_decode_cls_cosine_min": float(cosine.min()), "gpu_decode_cpu_fallbacks": fallbacks}


def predecode(files: list[str], size: int, batch: int, workers: int | None) -> torch.Tensor:
    """The CPU path's pixels of every file (embed's reader and transform), decoded by DataLoader workers."""
    from torch.utils.data import DataLoader

    from dinokit.apps.embed import ImageFiles, collate, eval_transform

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(ImageFiles(files, eval_transform(size)), batch_size=batch, collate_fn=collate,
                        num_workers=workers)
    parts = []
    for part in loader:
        if part.failed:
            raise ValueError(f"unreadable images: {part.failed[:3]}")
        parts.append(part.pixels)
    return torch.cat(parts)


def embed_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """CLS features of preprocessed pixels through embed's own model call (bf16 autocast on CUDA)."""
    from dinokit.apps.embed import embed_pixels

    batch = 128
    return torch.cat([torch.from_numpy(embed_pixels(model, pixels[i:i + batch], "cls"))
                      for i in range(0, len(pixels), batch)])


def gpu_decode_features(files: list[str], model, batch: int, size: int, device: torch.device):
    """(CLS features, files decoded on the CPU instead): JPEG bytes decoded by nvjpeg on `device`, then dinokit's
    tensor preprocessing (`preprocess_tensor_batch`: bicubic antialiased resize of the short side to
    size * 256/224, centre crop, ImageNet mean/std) on the device, image by image since sizes differ."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    from dinokit.apps.embed import embed_pixels
    from dinokit.processing import preprocess_tensor_batch

    resize, features, fallbacks = round(size * 256 / 224), [], 0
    for i in range(0, len(files), batch):
        data = [read_file(f) for f in files[i:i + batch]]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # e.g. a CMYK or mislabelled file nvjpeg refuses: decode those on the CPU
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
                    fallbacks += 1
        pixels = torch.cat([preprocess_tensor_batch(image[None], size=resize, crop_size=size) for image in images])
        features.append(torch.from_numpy(embed_pixels(model, pixels, "cls")))
    return torch.cat(features), fallbacks


# ---------------------------------------------------------------------------------------------------- (d) ssl
def section_ssl(plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    result = {"preset": "vits14", "crops": "2 x 224 + 8 x 98" if not plan.smoke else "toy", "precision": "bf16",
              "batch_per_gpu": plan.ssl_batch, "steps": plan.ssl_steps}
    for name, rate in SSL_VARIANTS.items():
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   str(Path(__file__).resolve()), "--ssl-worker", "--drop-path", str(rate)]
        command += ["--smoke"] if plan.smoke else []
        timeout = max(60.0, clock.section_deadline() - time.perf_counter() + 60)
        out = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{name}: the torchrun worker failed: {out.stderr.strip()[-1500:]}")
        result[name] = json.loads(out.stdout.strip().splitlines()[-1])
    result["speedup_from_batch_subset_drop_path"] = (result["batch_subset_drop_path_0.3"]["img_per_s"]
                                                     / result["no_drop_path"]["img_per_s"])
    return result


def synthetic_ssl_batch(cfg, batch: int, device: torch.device) -> dict:
    """A collated batch (crops and iBOT masks, as the loader makes) of random pixels, already on the device:
    the step is timed without the data pipeline."""
    from dinokit.data import draw_masks
    from dinokit.ssl.masking import MaskingGenerator

    random.seed(0)
    generator = torch.Generator().manual_seed(0)
    g, lsz, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    grid = g // cfg.student.patch_size
    masks = draw_masks(2 * batch, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability, grid * grid,
                       MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid))
    crops = {"collated_global_crops": torch.randn(2 * batch, 3, g, g, generator=generator),
             "collated_local_crops": torch.randn(n_local * batch, 3, lsz, lsz, generator=generator)}
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in {**crops, **masks}.items()}
    return moved


def ssl_worker(args) -> None:
    """One torchrun rank: time `steps` training steps of SSLMetaArch (DDP student, nccl/gloo), print a JSON line."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dinokit.ssl.meta_arch import SSLMetaArch
    from dinokit.ssl.train_config import load_train_config
    from dinokit.ssl.trainer import build_optimizer

    plan = make_plan(args.smoke)
    cuda = not args.smoke and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before nccl: its communicator binds to the current device
    # torchrun with one process sets WORLD_SIZE=1, where dinokit's init_distributed starts no group; start one
    # so that the step includes DDP's gradient all-reduce, as a multi-GPU run does.
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        cfg = load_train_config("vits14", [f"student.drop_path_rate={args.drop_path}",
                                           f"train.batch_size_per_gpu={plan.ssl_batch}", "compute_precision=bf16",
                                           *plan.ssl_overrides])
        cfg.optim.lr = 1e-4
        torch.manual_seed(0)
        arch = SSLMetaArch(cfg, device=device).train()
        arch.wrap_student(DDP(arch.student, device_ids=[local_rank] if cuda else None))
        optimizer = build_optimizer(cfg, arch.student)
        batch = synthetic_ssl_batch(cfg, plan.ssl_batch, device)
        times = []
        for _ in range(plan.ssl_steps + 2):  # two warm-up steps: allocator, kernels, optimizer state
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _, _ = arch.forward_losses(batch, 0.04)
            loss.backward()
            arch.clip_gradients(3.0)
            optimizer.step()
            arch.update_teacher(0.992)
            synchronize(device)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[2:])
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        print(json.dumps({"drop_path_rate": args.drop_path, "device": str(device),
                          "backend": dist.get_backend(), "step_s_median": step_s,
                          "img_per_s": plan.ssl_batch / step_s, "peak_gib": peak, "step_s_all": times[2:],
                          "loss": float(loss)}))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- (e) cifar
def section_cifar(plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    data = Path(args.cifar10)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        return {"skipped": f"dataset not found: {data} (expected train/ and test/)"}
    results = workdir / "ssl_cifar10.json"
    command = [sys.executable, str(BENCHMARKS / "ssl_cifar10.py"), "--config", "gpu_fast_cifar",
               "--minutes", str(plan.cifar_minutes), "--device", plan.device.type, "--data", str(data),
               "--output", str(workdir / "cifar_run"), "--results", str(results), *plan.cifar_args]
    # The training budget is fixed; evaluation and start-up come on top: allow generously, then give up.
    timeout = plan.cifar_minutes * 60 + (300 if not plan.smoke else 120)
    out = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"ssl_cifar10.py failed: {out.stderr.strip()[-1500:]}")
    run = json.loads(results.read_text())
    full = run.get("full_train_set")
    knn = full["trained"] if full else run["final_knn_top1"]
    return {"config": "gpu_fast_cifar", "minutes": plan.cifar_minutes, "global_batch": run["global_batch"],
            "iterations": run["iterations_done"], "images_seen": run["iterations_done"] * run["global_batch"],
            "img_per_s": run["throughput_img_per_s"]["mean"],
            "knn_train_images": full["train_images"] if full else run["knn"]["train_images"],
            "knn_top1_percent": knn, "knn_top1": knn / 100,
            "subset_knn_top1_percent": run["final_knn_top1"],
            "raw_pixels_percent": (full or run["baselines"])["raw_pixels"],
            "random_init_percent": (full or run["baselines"])["random_init"],
            "cpu_hour_target_percent": CPU_HOUR_KNN, "meets_cpu_hour": knn >= CPU_HOUR_KNN}


# ---------------------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [f"# GPU suite ({'smoke, CPU' if results['smoke'] else results['device_name']})", "",
             f"torch {results['torch']}; {results['elapsed_s']:.0f} s of a {results['time_budget_s']:.0f} s budget.",
             ""]
    writers = {"parity": md_parity, "throughput": md_throughput, "embed": md_embed, "ssl": md_ssl,
               "cifar": md_cifar}
    for name, section in results["sections"].items():
        lines += [f"## {name}", ""]
        if section["status"] == "ok":
            lines += writers[name](section["result"])
        elif section["status"] == "skipped":
            lines.append(f"skipped: {section['result']['skipped']}")
        else:
            lines.append(f"**error** ({section['seconds']:.0f} s): `{section['error']}`")
        lines.append("")
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def md_parity(r: dict) -> list[str]:
    return [f"fp32 (TF32 off) vs transformers Dinov2Model (SDPA); target max abs diff <= 1e-4: "
            f"{'met' if r['meets_target'] else 'NOT met'}", ""] + _table(
        ["model", "input", "max abs diff", "bf16 CLS cosine (min)", "autocast CLS cosine (min)"],
        [[x["model"], f"{x['size']}x{x['size']} x{x['batch']}", f"{x['max_abs_diff_vs_transformers']:.1e}",
          f"{x['bf16_cls_cosine_min']:.5f}", f"{x['autocast_bf16_cls_cosine_min']:.5f}"] for x in r["rows"]])


def md_throughput(r: dict) -> list[str]:
    rows = []
    for cell in r["rows"]:
        for name, s in cell["impls"].items():
            ratio = s.get("ratio_to_timm_compile")
            ratio_text = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a"
            memory = f"{s['peak_mib']:.0f}" if s.get("peak_mib") is not None else "n/a"
            rows.append([cell["model"], f"{cell['size']} x{cell['batch']}", name, f"{s['img_s']:.1f}", ratio_text,
                         memory, s["rounds"]])
        for name, error in cell["errors"].items():
            rows.append([cell["model"], f"{cell['size']} x{cell['batch']}", name, "error", error[:80], "", ""])
    lines = [f"bf16; target: {r['target']}: {'met' if r['meets_target'] else 'NOT met'}", ""]
    lines += _table(["model", "size x batch", "implementation", "img/s", "vs timm compile (min-max)",
                     "peak MiB above weights", "rounds"], rows)
    if r["skipped_cells"]:
        lines += ["", "skipped (time budget): " + ", ".join(f"{c['model']} {c['size']}" for c in r["skipped_cells"])]
    return lines


def md_embed(r: dict) -> list[str]:
    return [f"{r['images']} images, {r['model']}, batch {r['batch']}, {r['image_size']} px", ""] + _table(
        ["path", "img/s", "share of model-only", "CLS max abs diff vs CPU decode"],
        [["dinokit embed (end to end)", f"{r['embed_img_s']:.1f}", f"{r['embed_share_of_model_only']:.1%}", "-"],
         ["model only (pre-decoded)", f"{r['model_only_img_s']:.1f}", "100%", "0"],
         ["GPU JPEG decode + preprocessing", f"{r['gpu_decode_img_s']:.1f}",
          f"{r['gpu_decode_share_of_model_only']:.1%}",
          f"{r['gpu_decode_cls_max_abs_diff']:.2e} (cosine >= {r['gpu_decode_cls_cosine_min']:.4f})"]])


def md_ssl(r: dict) -> list[str]:
    rows = []
    for name in SSL_VARIANTS:
        v = r[name]
        peak = f"{v['peak_gib']:.1f}" if v.get("peak_gib") is not None else "n/a"
        rows.append([name, v["drop_path_rate"], f"{v['img_per_s']:.1f}", f"{v['step_s_median'] * 1000:.0f}", peak,
                     v["backend"]])
    return [f"{r['preset']}, crops {r['crops']}, {r['precision']}, batch {r['batch_per_gpu']} per GPU, "
            f"{r['steps']} timed steps; speedup from batch-subset drop path "
            f"{r['speedup_from_batch_subset_drop_path']:.2f}x", ""] + _table(
        ["variant", "drop_path_rate", "img/s", "ms/step", "peak GiB", "backend"], rows)


def md_cifar(r: dict) -> list[str]:
    return _table(["config", "minutes", "images seen", "img/s", "k-NN top-1", "k-NN train images", "raw pixels",
                   "random init", "CPU hour target"],
                  [[r["config"], r["minutes"], r["images_seen"], f"{r['img_per_s']:.0f}",
                    f"{r['knn_top1_percent']:.2f}%", r["knn_train_images"], f"{r['raw_pixels_percent']:.2f}%",
                    f"{r['random_init_percent']:.2f}%",
                    f"{r['cpu_hour_target_percent']}% ({'met' if r['meets_cpu_hour'] else 'not met'})"]])


# ---------------------------------------------------------------------------------------------------- main
SECTION_FUNCTIONS = {"parity": section_parity, "throughput": section_throughput, "embed": section_embed,
                     "ssl": section_ssl, "cifar": section_cifar}


def run_section(name: str, plan: Plan, clock: Clock, workdir: Path, args) -> dict:
    start = time.perf_counter()
    print(f"[gpu_suite] {name} (at {clock.elapsed():.0f} s)", file=sys.stderr, flush=True)
    try:
        result = SECTION_FUNCTIONS[name](plan, clock, workdir, args)
        record = {"status": "skipped" if "skipped" in result else "ok", "result": result}
    except Exception as exc:  # recorded; the next section still runs
        traceback.print_exc()
        record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record["seconds"] = time.perf_counter() - start
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (the test's run)")
    parser.add_argument("--sections", default="a,b,c,d,e", help="comma-separated letters of " +
                        ", ".join(f"{k} {v}" for k, v in SECTIONS.items()))
    parser.add_argument("--time-budget", type=float, default=None, help="seconds (default 480; smoke 90)")
    parser.add_argument("--json", default="gpu_suite.json")
    parser.add_argument("--markdown", default="gpu_suite.md")
    parser.add_argument("--limit", type=int, default=None, help="embed: this many images (default all; smoke 8)")
    parser.add_argument("--models", nargs="+", default=None, help="throughput: presets (default vits14 vitb14 "
                        "vitl14)")
    parser.add_argument("--imagenette", default=str(DATASETS / "imagenette" / "val"))
    parser.add_argument("--cifar10", default=str(DATASETS / "cifar10"))
    parser.add_argument("--ssl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--drop-path", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ssl_worker:
        ssl_worker(args)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite.py needs a CUDA GPU (none found); use --smoke for the toy CPU run.", file=sys.stderr)
        return 2
    letters = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in letters if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    plan = make_plan(args.smoke)
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    budget = args.time_budget or (90.0 if args.smoke else 480.0)
    clock = Clock(budget, {SECTIONS[k]: v for k, v in plan.nominal_s.items()})
    # Many compiled shapes and models in one process: keep every one of them compiled (no eager fallback).
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    results = {"suite": "gpu_suite", "smoke": args.smoke, "torch": torch.__version__,
               "device_name": torch.cuda.get_device_name() if plan.device.type == "cuda" else "cpu",
               "time_budget_s": budget, "sections": {}}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        names = [SECTIONS[k] for k in letters]
        for i, name in enumerate(names):
            clock.later = names[i + 1:]
            results["sections"][name] = run_section(name, plan, clock, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = clock.elapsed()
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    Path(args.markdown).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
