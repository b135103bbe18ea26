"""The training loop of dense heads on cached features (segmentation and depth alike): AdamW, linear warm-up
then poly(1) decay, batches of whole images, and a step count that follows the data.

How many steps: `iterations`, when given, is the exact count (the behaviour before `epochs` existed: batches
drawn with replacement, no early stop). Otherwise `epochs` passes over the training images (each epoch a fresh
permutation cut into batches), at most `max_steps`, and the run stops early once the training loss has not
improved (by `min_improvement`, relative) for `patience` epochs: 2,000 fixed steps were 330 epochs of a
48-image set and 0.8 of a 20,000-image one; Meta's published 40k iterations cap the step count instead.
The poly schedule is planned over the whole step budget. A plateau does not stop the run at the rate the
schedule has reached (about half the peak when a small set plateaus halfway): the rate then falls linearly to 0
over `cooldown` more epochs, as the poly schedule would have ended; a head stopped at a high rate keeps the
noise of its last steps (issue 26, benchmarks/dense_train_speed.py's case, seed 0: stopped at once 42.08 mIoU,
with a 10-epoch cooldown 42.17, a 20-epoch one 42.26, 100 full epochs 42.41, the former 2,000 steps 42.70).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dinokit.progress import bars

MAX_STEPS = 40_000  # Meta's segmentation configs: 40k iterations


@dataclass
class HeadTrainConfig:
    """How a dense head is trained on cached features."""

    iterations: int | None = None  # exact step count; overrides epochs and the plateau stop
    epochs: float = 100.0
    patience: int | None = 10  # epochs without a better training loss before stopping; None = never stop early
    min_improvement: float = 1e-3  # relative drop of the epoch loss that counts as better
    cooldown: float = 20.0  # epochs after a plateau over which the learning rate falls linearly to 0; 0 = stop at once
    max_steps: int = MAX_STEPS
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.04
    seed: int = 0

    def __post_init__(self):
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"--iterations {self.iterations}: a head needs at least 1 training step")
        if not self.epochs > 0:
            raise ValueError(f"--epochs {self.epochs}: must be > 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience {self.patience}: must be at least 1 epoch (or --no-early-stop)")
        if not self.cooldown >= 0:
            raise ValueError(f"--cooldown {self.cooldown}: must be >= 0 epochs")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass
class FitLog:
    """What a training run did: steps taken and planned, why it stopped, the loss and learning rate of every
    step and the mean loss of every completed epoch (epoch-based runs)."""

    planned_steps: int
    steps_per_epoch: int
    stop_reason: str = ""  # "iterations", "epochs", "max_steps" or "plateau"
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def summary(self) -> dict:
        return {"steps": self.steps, "planned_steps": self.planned_steps, "epochs": round(self.epochs, 2),
                "stop_reason": self.stop_reason, "final_loss": self.losses[-1] if self.losses else None,
                "losses_every_50": self.losses[::50], "lr_every_50": self.learning_rates[::50],
                "epoch_losses": self.epoch_losses}


def plan(config: HeadTrainConfig, n_items: int) -> tuple[int, int, str]:
    """(steps, steps per epoch, the reason the count ends there) for `n_items` training images."""
    per_epoch = math.ceil(n_items / min(config.batch_size, n_items))
    if config.iterations is not None:
        return config.iterations, per_epoch, "iterations"
    steps = math.ceil(config.epochs * per_epoch)
    if steps > config.max_steps:
        return config.max_steps, per_epoch, "max_steps"
    return steps, per_epoch, "epochs"


def poly_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (1e-6 + (1 - 1e-6) * step / warmup)
    return base * (1 - (step - warmup) / max(1, total - warmup))


def _batches(config: HeadTrainConfig, n_items: int, generator: torch.Generator):
    size = min(config.batch_size, n_items)
    if config.iterations is not None:  # as before epochs existed: with replacement
        while True:
            yield torch.randint(n_items, (size,), generator=generator).tolist()
    while True:
        order = torch.randperm(n_items, generator=generator).tolist()
        yield from (order[i:i + size] for i in range(0, n_items, size))


class _Plateau:
    def __init__(self, patience: int | None, min_improvement: float):
        self.patience, self.min_improvement = patience, min_improvement
        self.best, self.since = math.inf, 0

    def stalled(self, epoch_loss: float) -> bool:
        if self.best == math.inf or epoch_loss < self.best * (1 - self.min_improvement):
            self.best, self.since = epoch_loss, 0
        else:
            self.since += 1
        return self.patience is not None and self.since >= self.patience


def fit(parameters, n_items: int, batch_loss: Callable[[list[int]], torch.Tensor], config: HeadTrainConfig,
        progress: bool = False, desc: str = "head") -> FitLog:
    """Minimise `batch_loss(image indices)` over `parameters`; returns the FitLog. The caller sets train/eval."""
    if n_items < 1:
        raise ValueError("no training images: the --train folder must hold at least one image")
    total, per_epoch, reason = plan(config, n_items)
    log = FitLog(total, per_epoch, reason)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * total)
    batches = _batches(config, n_items, generator)
    plateau = _Plateau(config.patience if config.iterations is None else None, config.min_improvement)
    cooldown = None  # (first step, steps, learning rate at its start) once the loss has plateaued
    with bars(progress)(total=total, desc=desc, unit="step") as bar:
        step = 0
        while step < total:
            if cooldown is None:
                lr = poly_lr(step, total, config.lr, warmup)
            else:
                start, length, peak = cooldown
                lr = peak * (1 - (step - start) / length)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = batch_loss(next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.losses.append(loss.item())
            log.learning_rates.append(lr)
            recent = log.losses[-min(per_epoch, 50):]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            bar.update(1)
            step += 1
            if step % per_epoch == 0:
                log.epoch_losses.append(sum(log.losses[-per_epoch:]) / per_epoch)
                if cooldown is None and plateau.stalled(log.epoch_losses[-1]):
                    log.stop_reason = "plateau"
                    length = min(math.ceil(config.cooldown * per_epoch), total - step)
                    if length < 1:
                        break
                    # the poly schedule would have ended at 0: fall there from the current rate instead of
                    # stopping at it (a head stopped at a high rate keeps the noise of its last steps)
                    cooldown = (step, length, poly_lr(step, total, config.lr, warmup))
                    total = step + length
                    bar.total = total
    return log
