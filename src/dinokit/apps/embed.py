"""Embed many images with a DINOv2 model into an embedding folder (layout: `dinokit.apps.store`).

How a run is organised, and why:
- The inputs are listed and sorted by path, then cut into shards of `shard_size` consecutive files. Shard i always
  holds the same files, so a killed run restarts at its first unfinished shard, and `torchrun` processes take the
  shards in turn (rank r embeds shards r, r + world, ...) -- both give the same bytes as one uninterrupted run.
- Batches never straddle a shard boundary, so every image is computed in the same batch in every kind of run.
- Files are read by dinokit's one reader (`dinokit.data.images.read_image`: the processor's pixels, 16-bit
  scaled, transparency on white). A file it refuses (missing, unreadable, empty, truncated, not an image, a
  symbolic link loop, more pixels than PIL's MAX_IMAGE_PIXELS) is left out of its shard's rows and recorded in
  errors.parquet with the reason; it never stops the run. Paths are stored as `display_path` text: bytes of a
  file name that are not UTF-8 are written as \\xNN (Parquet strings must be UTF-8). Shards therefore may hold fewer than `shard_size` rows; metadata row r always describes embedding row r.
- DataLoader workers decode and resize while the model runs; on CUDA the model runs under bf16 autocast.
- `int8=True` (CPU) runs a copy of the model whose blocks' Linear layers are int8 (`dinokit.int8`): about 2x the
  float32 rate on CPUs with AMX or VNNI, CLS cosine ~0.998 to float32 (`benchmarks/int8_accuracy.py`). Activation
  scales are taken per batch, so a vector depends slightly on its batch-mates; batches are the same in every kind
  of run, so runs still reproduce. The manifest records it, and a resumed run must use the same setting.

Preprocessing for `image_size` S (a multiple of the patch size): resize the short side to S * 256 / 224 (bicubic),
centre crop S x S, ImageNet mean/std -- the DINOv2 evaluation transform, scaled; at 224 it is bit-identical to
`Dinov2ImageProcessor`. EXIF orientation is applied.

Pooling: "cls" (the CLS token after the final norm), "mean" (mean of the patch tokens, registers excluded),
"cls+mean" (both, concatenated: Meta's linear-probe feature) or "patch" (the whole (N, D) grid of patch tokens).
`normalize=True` scales each stored vector (each patch vector for "patch") to unit length.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinokit import atomic, locking
from dinokit.apps import store
from dinokit.data import loading, sources
from dinokit.data.images import display_path, pil_to_rgb, read_image
from dinokit.extras import require
from dinokit.processing import model_normalization

POOLINGS = ("cls", "mean", "cls+mean", "patch")
DTYPES = {"float32": np.float32, "float16": np.float16}
LIST_EXTENSIONS = sources.LIST_EXTENSIONS
VECTOR_SHARD_SIZE = 10_000
PATCH_SHARD_BYTES = 256 * 2**20  # patch grids are big: shards of about this size keep memory bounded
FORMAT = "dinokit-embeddings/1"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- inputs
def list_images(inputs) -> list[str]:
    """Sorted, de-duplicated absolute paths of the image files named by `inputs` (no WebDataset shards).

    inputs: a folder (searched recursively for image extensions, hidden files skipped); a glob pattern; a text
    file (.txt/.lst) with one path per line (relative paths are relative to that file; blank lines and lines
    starting with # are skipped); a .parquet of paths; an image file; or a list of any of these. Files named
    explicitly, listed or matched by a glob are all tried, whatever their extension; in a list, a path that does
    not exist is kept (it is reported in errors.parquet rather than stopping the run). `list_entries` also
    takes shards (`dinokit.data.sources`).
    """
    return sources.list_files(inputs)


def list_entries(inputs) -> list[sources.Entry]:
    """The samples `embed` embeds, in order: files as `list_images`, then WebDataset shards' samples."""
    return sources.list_entries(inputs)


# ---------------------------------------------------------------------------------------------------- models
def select_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load(model) -> nn.Module:
    """A model from anything `dinokit.load_model` accepts; other in-memory modules (e.g. transformers'
    Dinov2Model) pass through as long as they return `last_hidden_state`. A classifier gives its backbone."""
    if isinstance(model, nn.Module):
        return getattr(model, "dinov2", model)
    from dinokit import load_model

    return load_model(model)


def weights_sha256(model: nn.Module) -> str:
    """Fingerprint of the weights, so a resumed run cannot mix outputs of two different models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def describe_model(model: nn.Module, spec) -> dict:
    from dinokit.loading import preset_name

    config = getattr(model, "config", None)
    text = None if isinstance(spec, nn.Module) else str(spec)
    preset = text is not None and preset_name(text) is not None
    if text is not None and Path(text).expanduser().exists():
        text = str(Path(text).expanduser().resolve())
    return {"spec": text, "class": type(model).__name__, "random_weights": preset,
            "weights_sha256": weights_sha256(model),
            "config": config.to_dict() if hasattr(config, "to_dict") else None}


def model_from_manifest(manifest: dict) -> nn.Module:
    """The model an embedding folder was made with, to embed queries the same way."""
    info = manifest.get("model") or {}
    if not info.get("spec") or info.get("random_weights"):
        what = "randomly initialised weights" if info.get("random_weights") else "an in-memory model"
        raise ValueError(f"These embeddings were made with {what}, which cannot be loaded again. Pass the model "
                         f"itself (model=... in Python), or re-embed with a saved model (--model DIR or hub id).")
    return load(info["spec"])


def _patch_size(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "patch_size", 14))


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


# ---------------------------------------------------------------------------------------------------- decoding
def eval_transform(image_size: int, normalization=None):
    """The DINOv2 evaluation transform scaled to `image_size`: short side to image_size * 256/224, centre crop;
    `normalization`: (mean, std), by default ImageNet's (see `processing.model_normalization`)."""
    from dinokit.processing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from dinokit.processing import eval_transform as dinov2_eval_transform

    mean, std = normalization or (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return dinov2_eval_transform(resize=round(image_size * 256 / 224), crop=image_size, image_mean=mean,
                                 image_std=std)


def preprocessing_description(image_size: int, normalization) -> dict:
    mean, std = normalization
    return {"resize_short_side": round(image_size * 256 / 224), "interpolation": "bicubic (PIL)",
            "center_crop": image_size, "mean": list(mean), "std": list(std),
            "exif_transpose": True, "transparency": "composited onto white", "16-bit": "scaled to 8 bits"}


class ImageFiles(Dataset):
    """Item i: (i, pixels or None, width, height, error reason or None). Never raises for a bad file.

    `paths`: file paths or `dinokit.data.sources.Entry`s (files or tar members)."""

    def __init__(self, paths: list, transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return (i, *decode(self.paths[i], self.transform))


def decode(item, transform) -> tuple:
    """(pixels or None, width, height, error reason or None) of one path or entry: the work of a decoding worker,
    shared by the local and the Ray engine. A bad file is data, not a crash: its reason goes to errors.parquet."""
    entry = item if isinstance(item, sources.Entry) else sources.file_entry(item)
    sample = sources.read_sample(entry)
    if sample.error is not None:
        return None, 0, 0, sample.error
    return transform(sample.image), sample.image.width, sample.image.height, None


@dataclass
class Batch:
    indices: list[int]  # files read successfully, in order
    pixels: torch.Tensor | None
    sizes: list[tuple[int, int]]
    failed: list[tuple[int, str]]  # (file index, reason)


def collate(items) -> Batch:
    good = [item for item in items if item[4] is None]
    return Batch(indices=[item[0] for item in good],
                 pixels=torch.stack([item[1] for item in good]) if good else None,
                 sizes=[(item[2], item[3]) for item in good],
                 failed=[(item[0], item[4]) for item in items if item[4] is not None])


# ---------------------------------------------------------------------------------------------------- pooling
def feature_shape(model: nn.Module, pooling: str, image_size: int) -> tuple[int, ...]:
    dim = _hidden_size(model)
    num_patches = (image_size // _patch_size(model)) ** 2
    return {"cls": (dim,), "mean": (dim,), "cls+mean": (2 * dim,), "patch": (num_patches, dim)}[pooling]


@torch.inference_mode()
def embed_pixels(model: nn.Module, pixels: torch.Tensor, pooling: str, normalize: bool = False) -> np.ndarray:
    """Pooled float32 features of a batch of preprocessed images (B, 3, H, W) already on the model's device."""
    num_patches = (pixels.shape[-2] // _patch_size(model)) * (pixels.shape[-1] // _patch_size(model))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pixels.is_cuda):
        hidden = model(pixel_values=pixels).last_hidden_state
    hidden = hidden.float()
    cls, patches = hidden[:, 0], hidden[:, hidden.shape[1] - num_patches:]  # registers sit in between
    if pooling == "cls":
        features = cls
    elif pooling == "mean":
        features = patches.mean(dim=1)
    elif pooling == "cls+mean":
        features = torch.cat([cls, patches.mean(dim=1)], dim=-1)
    else:
        features = patches
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy()


def embed_images(images: list, model, *, image_size: int = 224, pooling: str = "cls", normalize: bool = False,
                 device: str = "auto", batch_size: int = 16) -> np.ndarray:
    """Features of a few images (paths or PIL images) in this process, e.g. search queries; bad files raise."""
    _check_pooling(pooling)
    model = load(model)
    device = select_device(device)
    model = model.to(device).eval()
    _check_image_size(model, image_size)
    transform = eval_transform(image_size, model_normalization(model))
    pixels = []
    for image in images:
        image = image if isinstance(image, Image.Image) else read_image(image)  # ImageReadError names the file
        pixels.append(transform(pil_to_rgb(image)))
    batches = [torch.stack(pixels[i:i + batch_size]).to(device) for i in range(0, len(pixels), batch_size)]
    return np.concatenate([embed_pixels(model, b, pooling, normalize) for b in batches])


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")


def _check_image_size(model: nn.Module, image_size: int) -> None:
    patch = _patch_size(model)
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch} (e.g. 224, 448, 518); "
                         f"got {image_size}")


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class EmbedReport:
    output_dir: str
    num_files: int
    num_embedded: int
    num_errors: int
    num_shards: int
    shards_already_done: int
    feature_shape: tuple[int, ...] = field(default_factory=tuple)
    seconds: float = 0.0


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group): joins torchrun's group when launched by it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""  # unreachable


def _settings_mismatch(old: dict, new: dict) -> list[str]:
    keys = ("format", "inputs_sha256", "num_files", "image_size", "pooling", "dtype", "normalized", "shard_size",
            "batch_size", "int8")
    old = {"int8": False, **old}  # folders written before int8 existed are float32 runs
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if (old.get("model") or {}).get("weights_sha256") != new["model"]["weights_sha256"]:
        changes.append("model weights differ")
    return changes


ENGINES = ("local", "ray")


@dataclass
class Plan:
    """What a run embeds and how it is cut: shared by the local and the Ray engine, so both write the same
    shards from the same batches (batches never straddle a shard; shard s holds entries
    [s * shard_size, (s + 1) * shard_size))."""

    entries: list
    num_shards: int
    shard_size: int
    batch_size: int
    image_size: int
    pooling: str
    normalize: bool
    out_dtype: type
    shape: tuple[int, ...]
    shard_metadata: bool  # WebDataset sources: key, url and caption columns in the metadata
    int8: bool = False  # each engine quantises its own copy of the float model (`runnable_model`)
    normalization: tuple = ()  # (mean, std) of the model's inputs; () = ImageNet's

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.entries)))

    def batches(self, shards) -> list[tuple[int, list[int]]]:
        """(shard, entry indices) of every batch of `shards`, in order."""
        out = []
        for s in shards:
            files = self.shard_range(s)
            out += [(s, list(files[i:i + self.batch_size])) for i in range(0, len(files), self.batch_size)]
        return out


def embed(inputs, model, output_dir: str | Path, *, pooling: str = "cls", normalize: bool = False,
          dtype: str = "float32", image_size: int = 224, batch_size: int = 32, num_workers: int | None = None,
          shard_size: int | None = None, device: str = "auto", progress: bool = True, engine: str = "local",
          ray_address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0,
          int8: bool = False) -> EmbedReport:
    """Embed the images of `inputs` (see `list_entries`) with `model` into `output_dir`; resumes an unfinished run.

    model: a dinokit model or anything `dinokit.load_model` accepts (directory, hub id, checkpoint, preset).
    shard_size: images per shard (default 10,000; for "patch" about 256 MB of features per shard).
    num_workers: decoding processes (default `default_num_workers`: all cores up to 8 for a GPU model; for a CPU
    model none on up to 4 cores, else one per 8 cores, at a lower priority than the model's threads).
    engine: "local" (this process, DataLoader workers; under `torchrun`, call it in every process with the same
    arguments: rank 0 writes the manifest and errors.parquet, and the result equals a one-process run) or "ray"
    (`dinokit.apps.embed_ray`: decoding as Ray tasks, the model in a pool of `workers` Ray actors with
    `gpus_per_worker` GPUs each, on the cluster at `ray_address` or a local one; same folder, same vectors).
    int8: run the blocks' Linear layers in int8 (CPU only; see the module notes).
    """
    require("pyarrow", "pyarrow.parquet", purpose="writing an embedding folder")  # before anything is written
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if engine == "ray":
        require("ray", "ray.data", purpose="dinokit embed --engine ray")
    _check_pooling(pooling)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    rank, world, created_group = _distributed() if engine == "local" else (0, 1, False)
    say = _log if (progress and rank == 0) else (lambda message: None)
    output_dir = Path(output_dir)
    lock = None
    try:
        device = select_device(device) if engine == "local" else torch.device("cpu")
        if int8 and (device.type != "cpu" or gpus_per_worker):
            where = f"device {device}" if device.type != "cpu" else f"gpus_per_worker={gpus_per_worker}"
            raise ValueError(f"int8 embedding runs on the CPU only (its kernels are CPU kernels); got {where}. "
                             f"Pass --device cpu, or drop --int8 (on a GPU the model runs in bf16).")
        if device.type == "cuda":
            if device.index is None:  # set_device refuses a bare "cuda"
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)  # NCCL collectives run on the current device
        # Before any slow step: a second run on this folder refuses at once. Held until the run ends.
        lock = locking.acquire_for_ranks(output_dir, "dinokit embed", rank, world)
        entries = list_entries(inputs)
        spec = model
        model = load(model)
        model = model.to(device).eval()
        _check_image_size(model, image_size)
        if int8:
            from dinokit.export.onnx import backbone_of

            backbone_of(model)  # a model without ViT blocks is refused before anything is written
        shape = feature_shape(model, pooling, image_size)
        bytes_per_image = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        if shard_size is None:
            shard_size = VECTOR_SHARD_SIZE if pooling != "patch" else max(1, PATCH_SHARD_BYTES // bytes_per_image)
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        num_shards = -(-len(entries) // shard_size)
        plan = Plan(entries, num_shards, shard_size, batch_size, image_size, pooling, normalize, DTYPES[dtype],
                    shape, shard_metadata=any(e.tar is not None for e in entries), int8=int8,
                    normalization=model_normalization(model))

        manifest = {
            "format": FORMAT, "complete": False, "model": describe_model(model, spec),
            "image_size": image_size, "patch_size": _patch_size(model),
            "preprocessing": preprocessing_description(image_size, plan.normalization), "pooling": pooling,
            "dim": shape[-1], "shape": list(shape), "dtype": dtype, "normalized": normalize,
            "num_files": len(entries), "num_shards": num_shards, "shard_size": shard_size, "batch_size": batch_size,
            "inputs_sha256": hashlib.sha256(b"\n".join(os.fsencode(e.key) for e in entries)).hexdigest(),
            "engine": engine, "int8": bool(int8),
        }
        if rank == 0:
            _start_or_resume(output_dir, manifest)
        _barrier(world)

        mine = list(range(rank, num_shards, world))
        todo = [s for s in mine if not store.is_shard_complete(output_dir, s, num_shards)]
        done_before = len(mine) - len(todo)
        say(f"dinokit embed: {len(entries):,} files in {num_shards} shard(s) of {shard_size:,}; "
            f"{_human_bytes(bytes_per_image)} per image ({pooling}: {' x '.join(map(str, shape))} {dtype}), "
            f"up to {_human_bytes(bytes_per_image * len(entries))} in all"
            + (f"; resuming, {done_before} shard(s) already done" if done_before else "")
            + (f"; {world} processes" if world > 1 else "") + ("; engine: ray" if engine == "ray" else "")
            + ("; int8 linear layers" if int8 else ""))
        if pooling == "patch":
            say(f"dinokit embed: patch grids are held one shard at a time in memory: "
                f"up to {_human_bytes(bytes_per_image * min(shard_size, len(entries)))} per shard.")
        if todo and engine == "ray":
            from dinokit.apps.embed_ray import embed_shards_on_ray

            embed_shards_on_ray(plan, model, output_dir, todo, address=ray_address, workers=workers,
                                gpus_per_worker=gpus_per_worker, progress=progress)
        elif todo:
            _embed_shards(plan, model, output_dir, todo, num_workers, device, progress and rank == 0)
        _barrier(world)
        if rank == 0:
            _finish(output_dir, manifest)
        _barrier(world)
        final = store.read_manifest(output_dir)
        report = EmbedReport(output_dir=str(output_dir), num_files=len(entries),
                             num_embedded=final["num_embedded"], num_errors=final["num_errors"],
                             num_shards=num_shards, shards_already_done=done_before, feature_shape=shape,
                             seconds=time.perf_counter() - started)
        say(f"dinokit embed: {report.num_embedded:,} embedded, {report.num_errors:,} unreadable "
            f"(see {output_dir / store.ERRORS}) in {report.seconds:.1f} s")
        return report
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            torch.distributed.destroy_process_group()


def _start_or_resume(output_dir: Path, manifest: dict) -> None:
    """Refuse to mix runs: an existing folder must hold the same run (then it resumes), or be empty.

    Runs under the folder's lock, so the check and the manifest write are one step for other dinokit runs, and
    temporary files in the folder are leftovers of a killed run.
    """
    old = store.read_manifest(output_dir)
    if old is None:
        ours = {locking.LOCK_NAME} | {p.name for p in output_dir.glob(".*") if atomic.is_temporary(p.name)}
        if output_dir.exists() and any(p.name not in ours for p in output_dir.iterdir()):
            raise ValueError(f"Output folder {output_dir} exists, is not empty and holds no {store.MANIFEST}. "
                             f"Choose a new or empty folder.")
    else:
        changes = _settings_mismatch(old, manifest)
        if changes:
            raise ValueError(f"Output folder {output_dir} holds a different embedding run ({'; '.join(changes)}). "
                             f"Use another output folder, or delete this one to start over.")
    atomic.remove_stale_temporaries(output_dir, recursive=True)
    if old is None or not old.get("complete"):
        store.write_manifest(output_dir, manifest)


def runnable_model(model: nn.Module, int8: bool) -> nn.Module:
    """The model as a run uses it: `model` itself, or its int8 copy. Quantised where it runs (in this process,
    in each Ray actor), so the weights are packed for that process's kernels and every engine gives one result."""
    if not int8:
        return model
    from dinokit.int8 import quantize_int8

    return quantize_int8(model)


DECODE_NICENESS = 5


def default_num_workers(device: torch.device) -> int:
    """Decoding processes: on a GPU every core may decode (up to 8). A CPU model's threads take every core, and
    decoding is ~3% of the work (4 ms against ~120 ms an image for ViT-S/14): on up to 4 cores it runs in this
    process between batches (a worker would only preempt the model's threads, and its fork costs memory); on
    more, one worker per 8 cores."""
    cores = os.cpu_count() or 1
    if device.type != "cpu":
        return min(8, cores)
    return 0 if cores <= 4 else min(8, max(1, cores // 8))


def _yield_to_the_model(worker_id: int) -> None:
    """Decoding workers run at a lower priority than the CPU model's threads: a model thread preempted by a
    decoder stalls every other model thread at the next barrier, so decoding should fill idle time instead."""
    try:
        os.nice(DECODE_NICENESS)
    except OSError:  # not permitted here: run at the normal priority
        pass


def _embed_shards(plan: Plan, model, output_dir, shards, num_workers, device, show_progress) -> None:
    from tqdm.auto import tqdm

    model = runnable_model(model, plan.int8)
    batches = [indices for _, indices in plan.batches(shards)]  # shard-aligned: the same batches in every run
    if num_workers is None:
        num_workers = default_num_workers(device)
    loader = DataLoader(ImageFiles(plan.entries, eval_transform(plan.image_size, plan.normalization)),
                        batch_sampler=batches,
                        collate_fn=collate, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                        persistent_workers=False,
                        worker_init_fn=_yield_to_the_model if device.type == "cpu" else None)
    total = sum(len(plan.shard_range(s)) for s in shards)
    bar = tqdm(total=total, unit="img", desc="embed", disable=not show_progress, smoothing=0.1, dynamic_ncols=True)

    current, parts = None, []
    with loading.batches(loader) as loaded:  # Ctrl-C kills the decoding workers: none can hold up the exit
        for batch in loaded:
            shard = (batch.indices or [i for i, _ in batch.failed])[0] // plan.shard_size
            if current is None:
                current = shard
            features = None
            if batch.pixels is not None:
                features = embed_pixels(model, batch.pixels.to(device, non_blocking=True), plan.pooling,
                                        plan.normalize)
            parts.append(BatchResult(batch.indices, features, batch.sizes, batch.failed))
            bar.update(len(batch.indices) + len(batch.failed))
            if sum(len(p.indices) + len(p.failed) for p in parts) == len(plan.shard_range(current)):
                write_shard(plan, output_dir, current, parts)  # the shard's last batch
                current, parts = None, []
    bar.close()


@dataclass
class BatchResult:
    """One embedded batch: the rows of the readable entries, their sizes, and the entries that failed."""

    indices: list[int]
    features: np.ndarray | None
    sizes: list[tuple[int, int]]
    failed: list[tuple[int, str]]


def write_shard(plan: Plan, output_dir, shard: int, parts: list[BatchResult]) -> None:
    """Write shard `shard` from its batches (in order) through `store.write_shard` (atomic, metadata last)."""
    import pyarrow as pa

    rows = [p.features.astype(plan.out_dtype, copy=False) for p in parts if p.features is not None]
    embeddings = np.concatenate(rows) if rows else np.zeros((0, *plan.shape), dtype=plan.out_dtype)
    good = [(plan.entries[i], w, h) for p in parts for i, (w, h) in zip(p.indices, p.sizes)]
    failed = [(plan.entries[i], reason) for p in parts for i, reason in p.failed]
    metadata = {"path": pa.array([_entry_name(e) for e, _, _ in good], pa.string()),
                "width": pa.array([w for _, w, _ in good], pa.int32()),
                "height": pa.array([h for _, _, h in good], pa.int32())}
    if plan.shard_metadata:
        for column in ("key", "url", "caption"):
            metadata[column] = pa.array([_entry_meta(e, column) for e, _, _ in good], pa.string())
    errors = {"path": pa.array([_entry_name(e) for e, _ in failed], pa.string()),
              "reason": pa.array([r for _, r in failed], pa.string())}
    store.write_shard(output_dir, shard, plan.num_shards, embeddings, metadata, errors if failed else None)


def _entry_name(entry) -> str:
    return entry.name if isinstance(entry, sources.Entry) else display_path(entry)


def _entry_meta(entry, column: str):
    value = entry.metadata.get(column) if isinstance(entry, sources.Entry) else None
    return value


def _finish(output_dir: Path, manifest: dict) -> None:
    import pyarrow.parquet as pq

    num_shards = manifest["num_shards"]
    missing = [s for s in range(num_shards) if not store.is_shard_complete(output_dir, s, num_shards)]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {output_dir} were not written; run the command again")
    manifest = {**manifest, "complete": True}
    manifest["num_errors"] = store.merge_errors(output_dir, num_shards)
    manifest["num_embedded"] = sum(pq.ParquetFile(store.shard_paths(output_dir, s, num_shards)[1]).metadata.num_rows
                                   for s in range(num_shards))
    store.write_manifest(output_dir, manifest)
