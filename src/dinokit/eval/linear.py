"""Linear probes on a frozen backbone, the DINOv2 protocol (Meta's `dinov2/eval/linear.py`).

A grid of linear heads is trained together, one per (feature variant, learning rate):
- feature variants: the normed CLS token of the last 1 or 4 blocks, concatenated, optionally followed by the mean
  of the last block's normed patch tokens ("avgpool");
- 13 learning rates from 1e-5 to 0.1, each multiplied by batch_size / 256;
- SGD with momentum 0.9 and no weight decay, cosine schedule to 0 over all iterations, weights ~ N(0, 0.01),
  bias 0; the loss is the sum of every head's cross-entropy (heads are independent);
- the head with the best top-1 on the validation set is reported (first best in grid order on equal accuracy).

Two ways to feed the heads:
- `linear_probe_augmented` is the reference protocol: training images go through RandomResizedCrop(224, bicubic)
  + horizontal flip and the frozen backbone at every step (12,500 iterations of batch 128 by default).
- `linear_probe_features` is a fast mode on cached features: NO augmentation, each training image is seen through
  the eval transform only, so it is much cheaper (no backbone forward during training) and typically a little
  below the reference protocol. Its numbers must be labelled "fast mode".
Validation always uses eval-transform features (resize 256, centre crop 224), as the reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LINEAR_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LINEAR_ITERATIONS = 12_500  # the reference's 10 epochs x 1250 iterations
LINEAR_BATCH_SIZE = 128
SMALL_GRID_MACS = 300_000_000  # below this many multiply-adds per step, heads train on one CPU thread


@dataclass(frozen=True)
class LinearProbeConfig:
    """Every constant of the protocol; the defaults are the reference's."""

    learning_rates: Sequence[float] = LINEAR_LEARNING_RATES
    n_last_blocks: Sequence[int] = (1, 4)
    avgpool: Sequence[bool] = (False, True)
    iterations: int = LINEAR_ITERATIONS
    batch_size: int = LINEAR_BATCH_SIZE
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_size: int = 224  # RandomResizedCrop size of the augmented protocol
    hflip_prob: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def linear_input(cls_blocks: torch.Tensor, patch_mean: torch.Tensor | None, n_blocks: int,
                 avgpool: bool) -> torch.Tensor:
    """Input of a head: CLS of the last `n_blocks` blocks, concatenated, then the mean patch token if `avgpool`.

    `cls_blocks` is (B, blocks, D) with the last block last; `patch_mean` is (B, D).
    """
    parts = [cls_blocks[:, -n_blocks:].flatten(1)]
    if avgpool:
        parts.append(patch_mean)
    return torch.cat(parts, dim=1).float()


def head_name(n_blocks: int, avgpool: bool, scaled_lr: float) -> str:
    """The reference's classifier name, e.g. `classifier_4_blocks_avgpool_True_lr_0_0005`.

    The reference prints the scaled lr with 5 decimals, which makes names collide below 1e-5 (e.g. at batch 64);
    here the lr is printed in full (trailing zeros dropped).
    """
    lr_text = f"{scaled_lr:.12f}".rstrip("0").rstrip(".")
    return f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr_text}".replace(".", "_")


class LinearHeadGrid(nn.Module):
    """All heads of the grid. Heads sharing a feature variant run as one matrix product (their weights are
    concatenated on the fly), but each keeps its own parameters so that each gets its own learning rate."""

    def __init__(self, feature_dim: int, num_classes: int, config: LinearProbeConfig, batch_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.variants = [(n, pool) for n in config.n_last_blocks for pool in config.avgpool]
        self.heads = nn.ModuleDict()
        self.specs = []  # (name, n_blocks, avgpool, base lr, scaled lr), in grid order
        for n_blocks, avgpool in self.variants:
            in_dim = feature_dim * n_blocks + (feature_dim if avgpool else 0)
            for lr in config.learning_rates:
                scaled = lr * batch_size / 256.0
                name = head_name(n_blocks, avgpool, scaled)
                if name in self.heads:
                    raise ValueError(f"Duplicate learning rate {lr} in the linear-probe grid.")
                head = nn.Linear(in_dim, num_classes)
                nn.init.normal_(head.weight, mean=0.0, std=0.01)
                nn.init.zeros_(head.bias)
                self.heads[name] = head
                self.specs.append((name, n_blocks, avgpool, lr, scaled))

    def param_groups(self) -> list[dict]:
        return [{"params": self.heads[name].parameters(), "lr": scaled} for name, *_, scaled in self.specs]

    def forward_stacked(self, cls_blocks: torch.Tensor,
                        patch_mean: torch.Tensor | None) -> list[tuple[list[str], torch.Tensor]]:
        """Per feature variant: the head names and their logits stacked as (B, heads, C)."""
        outputs = []
        for n_blocks, avgpool in self.variants:
            names = [spec[0] for spec in self.specs if spec[1:3] == (n_blocks, avgpool)]
            weight = torch.cat([self.heads[name].weight for name in names])
            bias = torch.cat([self.heads[name].bias for name in names])
            logits = F.linear(linear_input(cls_blocks, patch_mean, n_blocks, avgpool), weight, bias)
            outputs.append((names, logits.view(len(logits), len(names), self.num_classes)))
        return outputs

    def forward(self, cls_blocks: torch.Tensor, patch_mean: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Logits (B, C) of every head, by name."""
        return {name: stacked[:, i] for names, stacked in self.forward_stacked(cls_blocks, patch_mean)
                for i, name in enumerate(names)}

    def loss(self, cls_blocks: torch.Tensor, patch_mean: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Sum over heads of each head's mean cross-entropy (one call per feature variant)."""
        total = 0.0
        for names, stacked in self.forward_stacked(cls_blocks, patch_mean):
            per_head = F.cross_entropy(stacked.transpose(1, 2), labels.view(-1, 1).expand(-1, len(names)))
            total = total + per_head * len(names)
        return total


def _check_features(cls_blocks, patch_mean, labels, config: LinearProbeConfig, what: str) -> None:
    if cls_blocks.ndim != 3:
        raise ValueError(f"{what} CLS features must be (N, blocks, D); got shape {tuple(cls_blocks.shape)}.")
    if cls_blocks.shape[1] < max(config.n_last_blocks):
        raise ValueError(f"{what} features hold the CLS of {cls_blocks.shape[1]} blocks but the grid uses the last "
                         f"{max(config.n_last_blocks)}; extract features with more blocks or lower n_last_blocks.")
    if any(config.avgpool) and patch_mean is None:
        raise ValueError(f"{what} features have no mean patch token, needed by avgpool heads.")
    if len(cls_blocks) != len(labels) or len(labels) == 0:
        raise ValueError(f"{what}: {len(cls_blocks)} features for {len(labels)} labels (need the same, > 0).")


@contextmanager
def _threads_for(heads: LinearHeadGrid, batch_size: int):
    """Run small head grids single-threaded on CPU.

    Each step is a few small matrix products; splitting them over threads costs more in synchronisation than it
    saves, and on a machine busy with other work the spinning threads make steps 10x slower.
    """
    weights = sum(head.weight.numel() for head in heads.heads.values())
    small = next(heads.parameters()).device.type == "cpu" and batch_size * weights < SMALL_GRID_MACS
    previous = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_heads(heads: LinearHeadGrid, batches: Iterator, config: LinearProbeConfig, *,
                progress: bool = False) -> list[float]:
    """Train all heads for `config.iterations` steps on batches of (cls_blocks, patch_mean, labels).

    Returns the summed loss every 100 iterations (for logs and tests).
    """
    optimizer = torch.optim.SGD(heads.param_groups(), momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations, eta_min=0)
    steps = range(config.iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="linear heads", unit="it")
    heads.train()
    losses = []
    for step in steps:
        cls_blocks, patch_mean, labels = next(batches)
        loss = heads.loss(cls_blocks, patch_mean, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == config.iterations - 1:
            losses.append(loss.item())
            if progress:
                steps.set_postfix(loss=f"{losses[-1] / len(heads.specs):.4f}")
    return losses


@torch.no_grad()
def evaluate_heads(heads: LinearHeadGrid, cls_blocks, patch_mean, labels, *, batch_size: int = 1024) -> dict:
    """Top-1 / top-5 (percent) of every head, and the best head (first best top-1 in grid order)."""
    heads.eval()
    device = next(heads.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
    hits1 = {spec[0]: 0 for spec in heads.specs}
    hits5 = dict(hits1)
    top = min(5, heads.num_classes)
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        batch_cls = torch.as_tensor(np.array(cls_blocks[rows])).to(device)
        batch_patch = None if patch_mean is None else torch.as_tensor(np.array(patch_mean[rows])).to(device)
        target = labels[rows].view(-1, 1)
        for name, logits in heads(batch_cls, batch_patch).items():
            ranked = logits.sort(dim=1, descending=True, stable=True).indices[:, :top]
            hits1[name] += int((ranked[:, :1] == target).sum())
            hits5[name] += int((ranked == target).any(dim=1).sum())
    rows = [{"name": name, "n_blocks": n, "avgpool": pool, "lr": lr, "scaled_lr": scaled,
             "top1": 100.0 * hits1[name] / len(labels), "top5": 100.0 * hits5[name] / len(labels)}
            for name, n, pool, lr, scaled in heads.specs]
    best = max(rows, key=lambda row: row["top1"])  # max() keeps the first of equal values
    return {"best_head": best["name"], "top1": best["top1"], "top5": best["top5"], "heads": rows}


def _feature_batches(cls_blocks, patch_mean, labels, batch_size: int, seed: int) -> Iterator:
    """Endless shuffled batches (a new permutation per epoch, last partial batch dropped, as the reference)."""
    generator = torch.Generator().manual_seed(seed)
    count = len(labels)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            rows = order[start:start + batch_size].sort().values.numpy()  # sorted rows read memmaps faster
            yield (torch.as_tensor(np.asarray(cls_blocks[rows])),
                   None if patch_mean is None else torch.as_tensor(np.asarray(patch_mean[rows])),
                   labels[rows])


def linear_probe_features(
    train_cls_blocks,
    train_patch_mean,
    train_labels,
    val_cls_blocks,
    val_patch_mean,
    val_labels,
    config: LinearProbeConfig = LinearProbeConfig(),
    *,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict:
    """Fast mode: train the head grid on cached eval-transform features (no augmentation).

    Arrays may be NumPy (memmaps included) or torch: CLS features (N, blocks, D), mean patch tokens (N, D),
    integer labels (N,). Returns the best head's validation top-1 / top-5 (percent) and every head's accuracies.
    """
    _check_features(train_cls_blocks, train_patch_mean, train_labels, config, "Train")
    _check_features(val_cls_blocks, val_patch_mean, val_labels, config, "Validation")
    if num_classes is None:
        num_classes = int(max(np.max(np.asarray(train_labels)), np.max(np.asarray(val_labels)))) + 1
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    batch_size = min(config.batch_size, len(train_labels))
    heads = LinearHeadGrid(train_cls_blocks.shape[2], num_classes, config, batch_size)
    batches = _feature_batches(train_cls_blocks, train_patch_mean, train_labels, batch_size, config.seed)
    with _threads_for(heads, batch_size):  # no backbone here: the heads are the whole work
        train_heads(heads, batches, config, progress=progress)
        results = evaluate_heads(heads, val_cls_blocks, val_patch_mean, val_labels)
    return {"mode": "fast (cached eval-transform features, no augmentation)", **results,
            "config": config.to_dict(), "batch_size": batch_size, "seconds": time.perf_counter() - start}


def train_transform(config: LinearProbeConfig, model=None):
    """The reference training transform: RandomResizedCrop(bicubic) + horizontal flip + normalisation as `model`'s
    inputs are (ImageNet's but for models that carry their own, see `processing.model_normalization`)."""
    from torchvision import transforms

    from dinokit.processing import model_normalization

    steps = [transforms.RandomResizedCrop(config.crop_size, interpolation=transforms.InterpolationMode.BICUBIC)]
    if config.hflip_prob > 0:
        steps.append(transforms.RandomHorizontalFlip(config.hflip_prob))
    steps += [transforms.ToTensor(), transforms.Normalize(*model_normalization(model))]
    return transforms.Compose(steps)


def _image_batches(model, dataset, batch_size: int, n_blocks: int, num_workers: int, seed: int,
                   device: torch.device, unreadable: dict) -> Iterator:
    """Endless batches of backbone features of augmented images (a new shuffle and new crops every epoch).

    Unreadable images are dropped from their batch and recorded in `unreadable` (index -> reason).
    """
    from dinokit.eval.data import collate_skipping_unreadable
    from dinokit.eval.features import backbone_features

    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, generator=generator,
                                         collate_fn=collate_skipping_unreadable, persistent_workers=num_workers > 0)
    while True:
        for batch in loader:
            unreadable.update(batch["errors"])
            if batch["pixel_values"] is None:
                continue
            cls_blocks, patch_mean = backbone_features(model, batch["pixel_values"].to(device), n_blocks)
            yield cls_blocks, patch_mean, batch["labels"].to(device)


def linear_probe_augmented(
    model,
    train_dataset,
    val_cls_blocks,
    val_patch_mean,
    val_labels,
    config: LinearProbeConfig = LinearProbeConfig(),
    *,
    num_classes: int,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """The reference protocol: heads trained on a frozen backbone's features of augmented training images.

    `train_dataset` yields samples with the transform `train_transform(config)` already applied (see
    `dinokit.eval.features.ImageDataset`); validation uses cached eval-transform features.
    """
    _check_features(val_cls_blocks, val_patch_mean, val_labels, config, "Validation")
    if len(train_dataset) < config.batch_size:
        raise ValueError(f"The training set has {len(train_dataset)} images, fewer than one batch "
                         f"({config.batch_size}); lower the batch size.")
    start = time.perf_counter()
    device = torch.device(device)
    model = model.to(device).eval()
    torch.manual_seed(config.seed)
    feature_dim = val_cls_blocks.shape[2]
    heads = LinearHeadGrid(feature_dim, num_classes, config, config.batch_size).to(device)
    unreadable = {}
    batches = _image_batches(model, train_dataset, config.batch_size, max(config.n_last_blocks), num_workers,
                             config.seed, device, unreadable)
    train_heads(heads, batches, config, progress=progress)
    results = evaluate_heads(heads, val_cls_blocks, val_patch_mean, val_labels)
    paths = getattr(train_dataset, "paths", None)
    skipped = [{"path": paths[i] if paths else str(i), "reason": reason} for i, reason in sorted(unreadable.items())]
    return {"mode": "reference (augmented images through the frozen backbone)", **results,
            "config": config.to_dict(), "batch_size": config.batch_size,
            "train_skipped_unreadable": len(skipped), "train_skipped_files": skipped,
            "seconds": time.perf_counter() - start}
