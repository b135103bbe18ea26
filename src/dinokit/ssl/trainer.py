"""`dinokit train`: DINOv2 self-supervised pretraining (and distillation) on any image folder.

One process or `torchrun --nproc_per_node N -m dinokit train ...` (DDP: gloo on CPU, nccl on GPU; FSDP on GPU
with distributed.strategy=fsdp). Per iteration (Meta's train.py): set lr / weight decay / last-layer lr from the
schedules, forward the losses, stop on a non-finite loss (before the update, so the last checkpoint stays the
last good state), backward, clip each module, AdamW step, EMA update of the teacher.

Output directory:
  checkpoint.pth   everything needed to resume exactly (written atomically: temporary name, then rename)
  metrics.jsonl    one line per `train.log_freq` iterations (losses, schedules, teacher entropy, img/s)
  config.yaml      the resolved configuration
  teacher/         the teacher backbone in Hugging Face layout (config.json + model.safetensors) at the end
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from dinokit import atomic, locking
from dinokit.checkpoints import torch_load
from dinokit.param_groups import apply_optim_scheduler, fuse_params_groups, get_params_groups_with_decay
from dinokit.ssl.schedules import CosineScheduler, scaled_lr
from dinokit.ssl.train_config import load_train_config

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
METRICS_NAME = "metrics.jsonl"
EXPORT_DIR = "teacher"
TIMING_KEYS = ("img_per_s", "elapsed_s", "eta_s")  # metrics that depend on the machine, not on the run


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment; start the process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def _all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(values)
        values /= env.world_size
    return values


# ---------------------------------------------------------------------------------------------- schedules
@dataclass
class Schedules:
    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, iteration: int) -> dict[str, float]:
        return {name: float(getattr(self, name)[iteration])
                for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")}


def build_schedules(cfg) -> Schedules:
    """Meta's schedules (train.py build_schedulers), per iteration; an "epoch" is OFFICIAL_EPOCH_LENGTH."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = dict(base_value=cfg.optim.lr, final_value=cfg.optim.min_lr, total_iters=total,
              warmup_iters=cfg.optim.warmup_epochs * epoch, start_warmup_value=0)
    last_layer_lr = CosineScheduler(**lr)
    last_layer_lr.schedule[: int(cfg.optim.freeze_last_layer_epochs * epoch)] = 0  # last layer frozen
    temp_iters = int(cfg.teacher.warmup_teacher_temp_epochs * epoch)
    return Schedules(
        lr=CosineScheduler(**lr),
        wd=CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=CosineScheduler(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, max(temp_iters, 1),
                                     warmup_iters=temp_iters, start_warmup_value=cfg.teacher.warmup_teacher_temp),
        last_layer_lr=last_layer_lr,
    )


def build_optimizer(cfg, student: torch.nn.Module) -> torch.optim.AdamW:
    groups = get_params_groups_with_decay(student, lr_decay_rate=cfg.optim.layerwise_decay,
                                          patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult)
    groups = fuse_params_groups(groups)
    return torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))


# ---------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """Every RNG's state in plain types (tensors, ints, lists), so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path) -> None:
    """torch.save under a unique temporary name, fsync, rename: a crash never leaves a truncated checkpoint."""
    atomic.torch_save(obj, path)


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint (a run directory or its checkpoint.pth), read without running pickled code."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No training checkpoint at {path}. Start without --resume, or point to the "
                                "output directory of an earlier `dinokit train` run.")
    # numpy arrays: the RNG state of checkpoints written before it was stored as plain lists
    data = torch_load(path, "training checkpoint", allow_numpy=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dinokit training checkpoint.")
    return data


# ---------------------------------------------------------------------------------------------- the run
class Trainer:
    """Builds model, optimizer, schedules and data for `cfg`, then `run()` trains. `arch` is an
    `SSLMetaArch` (or a distillation arch with the same methods)."""

    def __init__(self, cfg, data, output_dir, resume: bool = False, env: DistEnv | None = None, arch=None,
                 progress: bool = True):
        self.cfg = cfg
        self.env = env or init_distributed()
        self.output_dir = Path(output_dir)
        self.progress = progress and self.env.is_main
        self._check_batch(cfg)
        cfg.optim.lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size_per_gpu * self.env.world_size,
                                 cfg.optim.scaling_rule)

        from dinokit.ssl.loader import build_dataset

        self.dataset = build_dataset(cfg, data)
        if len(self.dataset) < cfg.train.batch_size_per_gpu * self.env.world_size:
            logger.warning("Only %d images for a global batch of %d: images repeat within a batch (with "
                           "different crops).", len(self.dataset), cfg.train.batch_size_per_gpu * self.env.world_size)

        if arch is None:
            from dinokit.ssl.meta_arch import SSLMetaArch

            torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
            arch = SSLMetaArch(cfg, device=self.env.device)
        self.arch = arch
        seed = cfg.train.seed + self.env.rank  # then different drop-path draws per rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.scaler = torch.amp.GradScaler("cuda") if arch.precision == "fp16" else None
        self.schedules = build_schedules(cfg)
        self.total_iterations = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.start_iteration = 0
        self.skipped_files: dict[int, int] = {}

        # Order matters for FSDP: full weights are loaded before sharding, the optimizer is built on the wrapper.
        checkpoint_path = self.output_dir / CHECKPOINT_NAME
        checkpoint = None
        if resume:
            checkpoint = read_checkpoint(checkpoint_path)
            self._check_world_size(checkpoint)
            self.arch.load_state_dict(checkpoint["model"])
        elif checkpoint_path.exists():
            raise ValueError(f"{self.output_dir} already holds a training run ({CHECKPOINT_NAME}). Continue it with "
                             "--resume, or choose another --output directory.")
        self.fsdp = None
        self._wrap_for_distributed()
        self.optimizer = build_optimizer(cfg, self.fsdp if self.fsdp is not None else arch.student)
        if checkpoint is not None:
            self._load_training_state(checkpoint)

    @staticmethod
    def _check_batch(cfg) -> None:
        if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
            raise ValueError(
                f"train.batch_size_per_gpu={cfg.train.batch_size_per_gpu}: the KoLeo loss needs at least 2 images "
                "per process (the nearest neighbour of a single image is undefined). Use a batch of 2 or more, or "
                "set dino.koleo_loss_weight=0.")

    def _wrap_for_distributed(self) -> None:
        if not self.env.distributed:
            return
        if self.cfg.distributed.strategy == "fsdp":
            if self.env.device.type != "cuda":
                raise ValueError("distributed.strategy=fsdp needs CUDA devices; use ddp (the default) on CPU.")
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # Only the student is sharded. The teacher stays a full copy per rank; the EMA update and the
            # checkpoints gather the student's full parameters (`_full_student`).
            self.fsdp = FSDP(self.arch.student, use_orig_params=True, device_id=self.env.device)
            self.arch.wrap_student(self.fsdp)
            update_teacher = self.arch.update_teacher

            def update_teacher_with_full_student(momentum: float) -> None:
                with self._full_student():
                    update_teacher(momentum)

            self.arch.update_teacher = update_teacher_with_full_student
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.arch.wrap_student(DDP(self.arch.student, device_ids=device_ids))

    def _full_student(self):
        """Context in which the student's parameters are whole (FSDP: gathered, written back after)."""
        if self.fsdp is None:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(self.fsdp, writeback=True)

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint(self, next_iteration: int) -> dict:
        kind = getattr(self.arch, "checkpoint_kind", "ssl")
        states = [rng_state()]
        if self.env.distributed:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, rng_state())
        with self._full_student():  # FSDP: copies, since the gathered tensors are freed on exit
            model = self.arch.state_dict()
            if self.fsdp is not None:
                model = {k: v.detach().clone() for k, v in model.items()}
        if self.fsdp is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            optimizer = FSDP.optim_state_dict(self.fsdp, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "iteration": next_iteration,
            "model": model,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": states,
            "world_size": self.env.world_size,
            "config": self.cfg.to_dict(),
            "kind": kind,
            # what `load_model(checkpoint.pth)` builds (the teacher backbone): shapes cannot tell its head count
            "backbone_config": self.arch.teacher_config().to_dict() if kind == "ssl" else None,
        }

    def save(self, next_iteration: int) -> None:
        checkpoint = self._checkpoint(next_iteration)  # collective: every rank takes part
        if self.env.is_main:
            save_atomic(checkpoint, self.output_dir / CHECKPOINT_NAME)

    def _check_world_size(self, checkpoint: dict) -> None:
        if checkpoint.get("world_size", 1) != self.env.world_size:
            raise ValueError(f"The checkpoint was written by {checkpoint.get('world_size')} processes; resume it "
                             f"with the same number (now {self.env.world_size}) to continue exactly.")

    def _load_training_state(self, checkpoint: dict) -> None:
        """Optimizer, scaler, RNG and iteration (the weights are loaded before wrapping)."""
        optimizer_state = checkpoint["optimizer"]
        if self.fsdp is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            optimizer_state = FSDP.optim_state_dict_to_load(self.fsdp, self.optimizer, optimizer_state)
        self.optimizer.load_state_dict(optimizer_state)
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"][self.env.rank])
        self.start_iteration = int(checkpoint["iteration"])
        logger.info("Resuming at iteration %d", self.start_iteration)

    # ------------------------------------------------------------------ logging
    def _open_logs(self):
        if not self.env.is_main:
            return None, None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.output_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        metrics_path = self.output_dir / METRICS_NAME
        if self.start_iteration > 0 and metrics_path.exists():
            # Drop lines past the checkpoint (written after it by an interrupted run) so the file stays one history;
            # a line cut short by a kill is dropped too.
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.endswith("}") and json.loads(line).get("iteration", -1) <= self.start_iteration]
            atomic.write_text(metrics_path, "".join(line + "\n" for line in kept))
        elif metrics_path.exists():
            metrics_path.unlink()
        writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        except Exception:  # tensorboard not installed
            writer = None
        return metrics_path.open("a"), writer

    # ------------------------------------------------------------------ main loop
    def run(self, max_iterations: int | None = None, max_minutes: float | None = None, on_log=None) -> dict:
        """Train until the schedule ends, `max_iterations` (absolute iteration count) or `max_minutes`;
        write the last checkpoint and export the teacher. Returns the last metrics record."""
        from dinokit.ssl.loader import build_loader

        cfg, env, arch = self.cfg, self.env, self.arch
        max_iterations = max_iterations if max_iterations is not None else cfg.train.max_iterations
        max_minutes = max_minutes if max_minutes is not None else cfg.train.max_minutes
        end = min(self.total_iterations, max_iterations or self.total_iterations)
        if self.start_iteration >= end:
            logger.info("Nothing to do: the run is at iteration %d of %d.", self.start_iteration, end)
        loader = build_loader(cfg, self.dataset, self.start_iteration, env.rank, env.world_size)
        metrics_file, writer = self._open_logs()
        monitor = self._knn_monitor()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.start_iteration, desc="dinokit train", dynamic_ncols=True,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        images_per_iteration = cfg.train.batch_size_per_gpu * env.world_size
        start_time = time.perf_counter()
        paused = 0.0  # seconds spent in evaluation and callbacks
        window_start, window_iterations = start_time, 0
        record: dict = {}
        arch.train()
        iteration = self.start_iteration
        try:
            for iteration, batch in zip(range(self.start_iteration, end), loader):
                values = self.schedules.at(iteration)
                apply_optim_scheduler(self.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
                self.optimizer.zero_grad(set_to_none=True)
                total, losses, stats = arch.forward_losses(batch, values["teacher_temp"])

                # One reduction for logging, the finiteness check and the time budget (all ranks agree). The
                # budget is rank 0's clock: it alone pauses for evaluations, which the others wait out.
                elapsed_min = (time.perf_counter() - start_time - paused) / 60
                out_of_time = float(env.is_main and bool(max_minutes) and elapsed_min >= max_minutes)
                reduced = torch.stack([total.detach().float()] + [v.detach().float() for v in losses.values()]
                                      + [torch.tensor(out_of_time, device=total.device)])
                reduced = _all_reduce_mean(reduced.clone(), env).tolist()
                if not all(math.isfinite(v) for v in reduced[:-1]):
                    terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(["total_loss", *losses], reduced))
                    raise TrainingDiverged(
                        f"Loss is not finite at iteration {iteration} ({terms}). Stopped before updating the "
                        f"weights; the last good checkpoint is {self.output_dir / CHECKPOINT_NAME} (if one was "
                        "written). Lower optim.base_lr, raise train.batch_size_per_gpu or use fp32/bf16, then "
                        "--resume.")
                self._backward_and_step(total, values["momentum"])
                self._count_skipped(batch)

                window_iterations += 1
                done = iteration + 1
                last = done == end or reduced[-1] > 0
                if done % cfg.train.log_freq == 0 or last:
                    now = time.perf_counter()
                    img_per_s = window_iterations * images_per_iteration / max(now - window_start, 1e-9)
                    record = {"iteration": done, "total_loss": reduced[0],
                              **dict(zip(losses, reduced[1:-1])), **values, **stats,
                              "bad_files_skipped": sum(self.skipped_files.values()),
                              "img_per_s": img_per_s, "elapsed_s": now - start_time - paused,
                              "eta_s": (end - done) * images_per_iteration / max(img_per_s, 1e-9)}
                    if monitor is not None and (done % cfg.evaluation.knn_every_iterations == 0 or last):
                        record["knn_top1"] = monitor(arch.result_backbone())
                    self._log(record, metrics_file, writer, on_log)
                    # Evaluation and callbacks are not training: keep them out of the budget and of img/s.
                    paused += time.perf_counter() - now
                    window_start, window_iterations = time.perf_counter(), 0
                    if bar is not None:
                        bar.set_postfix({k.replace("_loss", ""): f"{record[k]:.3f}" for k in losses} |
                                        {"lr": f"{values['lr']:.2e}", "img/s": f"{img_per_s:.1f}"}, refresh=False)
                if bar is not None:
                    bar.update(1)
                if done % cfg.train.saveckp_freq == 0 and not last:
                    self.save(done)
                if last:
                    break
            else:
                iteration = end - 1  # empty loop: nothing to train
            self.save(iteration + 1)
            if env.is_main:
                arch.export_model().save_pretrained(self.output_dir / EXPORT_DIR)
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()
        return record

    def _backward_and_step(self, total: torch.Tensor, momentum: float) -> None:
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            if self.cfg.optim.clip_grad:
                self.arch.clip_gradients(self.cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            if self.cfg.optim.clip_grad:
                self.arch.clip_gradients(self.cfg.optim.clip_grad)
            self.optimizer.step()
        self.arch.update_teacher(momentum)

    def _count_skipped(self, batch: dict) -> None:
        worker, skipped = batch.get("skipped", (0, 0))
        self.skipped_files[worker] = max(self.skipped_files.get(worker, 0), int(skipped))

    def _log(self, record: dict, metrics_file, writer, on_log) -> None:
        if self.env.is_main:
            if metrics_file is not None:
                with atomic.writing(metrics_file.name):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if writer is not None:
                for key, value in record.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        writer.add_scalar(key, value, record["iteration"])
            if record.get("teacher_batch_entropy", 1.0) < 0.05:
                logger.warning("Iteration %d: teacher batch entropy %.3f - the teacher puts (almost) every image on "
                               "the same prototype (collapse). Check the batch size, lr and teacher temperature.",
                               record["iteration"], record["teacher_batch_entropy"])
        if on_log is not None:
            on_log(record)

    def _knn_monitor(self):
        ev = self.cfg.evaluation
        if not ev.knn_every_iterations or not self.env.is_main:
            return None
        if not (ev.knn_train and ev.knn_test):
            raise ValueError("evaluation.knn_every_iterations needs evaluation.knn_train and evaluation.knn_test "
                             "(labelled ImageFolder trees).")
        from dinokit.ssl.knn_monitor import KnnMonitor

        return KnnMonitor(ev.knn_train, ev.knn_test, self.cfg.crops.global_crops_size, ev.knn_max_train,
                          k=ev.knn_k)


def train(config="cpu_tiny_cifar", data=None, output_dir="dinokit_run", overrides=None, resume: bool = False,
          distill_from=None, progress: bool = True, **run_kwargs) -> dict:
    """Python entry point of `dinokit train`. `config`: preset name, YAML path or dict; `overrides`: list of
    `section.key=value` strings or a nested dict. Returns the last metrics record."""
    if data is None:
        raise ValueError("train() needs data: a folder of images (searched recursively), an image list file, or "
                         "an ImageFolder tree.")
    output_dir = Path(output_dir)
    if resume:
        # The run's own configuration wins, so a resumed run continues with exactly its settings.
        saved = output_dir / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {output_dir} has no config.yaml of an earlier run.")
        cfg = load_train_config(yaml.safe_load(saved.read_text()), overrides)
    else:
        cfg = load_train_config(config, overrides)
    env = init_distributed()
    # Held from before the "already holds a run" check to the export: a second run on this folder refuses at
    # once, and temporary files here are a killed run's leftovers.
    with locking.acquire_for_ranks(output_dir, "dinokit train", env.rank, env.world_size):
        if env.is_main:
            atomic.remove_stale_temporaries(output_dir)
        arch = None
        if distill_from is not None or cfg.distill.teacher:
            from dinokit.ssl.distill import build_distill_arch

            if distill_from is not None:
                cfg.distill.teacher = str(distill_from)
            torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
            arch = build_distill_arch(cfg, env.device)
        trainer = Trainer(cfg, data, output_dir, resume=resume, env=env, arch=arch, progress=progress)
        return trainer.run(**run_kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    from dinokit.ssl.train_config import preset_names

    p = subparsers.add_parser(
        "train", help="DINOv2 self-supervised pretraining or distillation on a folder of images",
        description="Train a DINOv2 model without labels. Settings: a preset or YAML file, then section.key=value "
                    "overrides (e.g. optim.epochs=10 train.batch_size_per_gpu=32).")
    p.add_argument("--config", default="cpu_tiny_cifar",
                   help=f"preset ({', '.join(preset_names())}) or YAML file (default: cpu_tiny_cifar)")
    p.add_argument("--data", required=True, help="folder of images (recursive), ImageFolder tree or image list")
    p.add_argument("--output", required=True, help="output directory (checkpoint, metrics, exported teacher)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly where it stopped")
    p.add_argument("--distill-from", default=None,
                   help="distil from this teacher: a dinokit run directory/checkpoint (with heads) or any model "
                        "dinokit can load (hub id, HF directory, Meta/timm checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("overrides", nargs="*", help="section.key=value settings")
    p.set_defaults(func=_train_command, on_interrupt="rerun with --resume to continue from the last checkpoint")


def _train_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = train(args.config, args.data, args.output, overrides=args.overrides, resume=args.resume,
                   distill_from=args.distill_from, progress=not args.no_progress)
    env = init_distributed()
    if env.is_main:
        losses = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("loss"))
        print(f"trained to iteration {record.get('iteration')}: {losses}")
        print(f"teacher backbone (Hugging Face layout): {Path(args.output) / EXPORT_DIR}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
