"""Train an image classifier on labelled images: `Dinov2ForImageClassification`, saved as a Hugging Face checkpoint.

The classifier is transformers' DINOv2 head: one linear layer on [final-norm CLS, mean of the final-norm patch
tokens]. Two ways to train it:
- frozen backbone (default): the backbone's features are extracted once (eval transform, cached on disk like the
  evaluation protocols) and only the head is trained, with AdamW and a cosine schedule. Cheap, even on a CPU.
- `unfreeze=True`: the whole network is trained on augmented images (RandomResizedCrop + flip) with layer-wise
  learning-rate decay (block i of n gets lr x decay^(n - i), patch embedding and tokens decay^(n + 1), the head
  and final norm lr), as in DINOv2's own parameter groups.
After every epoch the validation accuracy is measured; whenever it improves the model is written to the output
directory (config.json with id2label / label2id, model.safetensors, preprocessor_config.json, training_log.json),
atomically, so the directory always holds the best complete checkpoint. transformers'
`AutoModelForImageClassification.from_pretrained(output_dir)` loads it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dinokit
from dinokit import atomic, locking
from dinokit.eval.data import ImageDataset, collate_skipping_unreadable, load_splits
from dinokit.eval.features import extract_features
from dinokit.processing import eval_transform, model_normalization


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # head lr; None: 1e-3 with a frozen backbone, 1e-4 unfrozen
    weight_decay: float = 1e-4
    unfreeze: bool = False
    layer_decay: float = 0.75
    warmup_epochs: float = 0.0
    seed: int = 0

    @property
    def head_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.unfreeze else 1e-3)


def build_classifier(model, classes: list[str]):
    """The classifier of `model`'s family (`Dinov2ForImageClassification`, `DINOv3ViTForImageClassification`)
    with the backbone weights of `model` and a fresh head for `classes`."""
    from dinokit.auto import model_class

    backbone = dinokit.load_model(model)
    config = backbone.config.copy(id2label={i: name for i, name in enumerate(classes)},
                                  label2id={name: i for i, name in enumerate(classes)},
                                  num_classifier_layers=1, problem_type="single_label_classification")
    classifier = model_class(config.model_type, "classification")(config)
    classifier.dinov2.vit.load_state_dict(backbone.vit_module.state_dict())
    return classifier


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save(classifier, output: Path, log: dict, resize_size: int, crop_size: int) -> None:
    """Replace `output` with a complete checkpoint (written beside it, then renamed)."""
    from dinokit.processing import Dinov2ImageProcessor

    with atomic.staged_folder(output) as staging:
        classifier.save_pretrained(staging)
        mean, std = model_normalization(classifier)
        Dinov2ImageProcessor(size={"shortest_edge": resize_size}, crop_size=crop_size, image_mean=mean,
                             image_std=std).save_pretrained(staging)
        (staging / "training_log.json").write_text(json.dumps(log, indent=2))


def _check_output(output: Path) -> None:
    if output.is_file():
        raise ValueError(f"--output {output} is a file; give a directory for the checkpoint.")
    if output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file():
        raise ValueError(f"--output {output} exists and is not a dinokit checkpoint; choose an empty or new "
                         f"directory (it would be replaced).")


def finetune(model, train, val, output_dir, config: FinetuneConfig = FinetuneConfig(), *, num_workers: int = 0,
             device: str | torch.device = "cpu", cache_dir="default", resize_size: int = 256, crop_size: int = 224,
             feature_batch_size: int = 64, progress: bool = True) -> dict:
    """Train a classifier; returns {"history": [per-epoch records], "best_epoch", "best_val_top1", "output"}.

    Images are evaluated with resize `resize_size` (short side, bicubic) + centre crop `crop_size`, the setting
    saved as the checkpoint's image processor; unfrozen training uses RandomResizedCrop(`crop_size`) + flip.
    """
    output = Path(output_dir).expanduser()
    # The output folder is replaced by each better checkpoint, so its lock file sits beside it.
    with locking.acquire(output, "dinokit finetune", lock_path=output.with_name(f".{output.name}.lock")):
        _check_output(output)
        return _finetune(model, train, val, output, config, num_workers=num_workers, device=device,
                         cache_dir=cache_dir, resize_size=resize_size, crop_size=crop_size,
                         feature_batch_size=feature_batch_size, progress=progress)


def _finetune(model, train, val, output: Path, config: FinetuneConfig, *, num_workers, device, cache_dir,
              resize_size, crop_size, feature_batch_size, progress) -> dict:
    from tqdm.auto import tqdm

    train_images, val_images = load_splits(train, val)
    torch.manual_seed(config.seed)
    device = torch.device(device)
    backbone = dinokit.load_model(model)
    classifier = build_classifier(backbone, train_images.classes).to(device)
    mean, std = model_normalization(backbone)
    transform = eval_transform(resize=resize_size, crop=crop_size, image_mean=mean, image_std=std)
    started = time.perf_counter()

    setup = _unfrozen_setup if config.unfreeze else _frozen_setup
    trainer = setup(backbone, classifier, train_images, val_images, config, transform=transform,
                    num_workers=num_workers, device=device, cache_dir=cache_dir, crop_size=crop_size,
                    feature_batch_size=feature_batch_size, progress=progress)
    total_steps = config.epochs * trainer.steps_per_epoch
    warmup = int(config.warmup_epochs * trainer.steps_per_epoch)
    history, best, best_epoch, step = [], -1.0, 0, 0
    for epoch in range(1, config.epochs + 1):
        losses = []
        batches = trainer.batches()
        if progress:
            batches = tqdm(batches, total=trainer.steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}",
                           unit="batch")
        for batch in batches:
            losses.append(trainer.step(batch, _cosine_lr(step, total_steps, warmup)))
            step += 1
        val_top1 = trainer.evaluate()
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                        "val_top1": val_top1, "seconds": time.perf_counter() - started})
        improved = val_top1 > best
        if improved:
            best, best_epoch = val_top1, epoch
            classifier.cpu()
            _save(classifier, output, _log(history, config, trainer, best_epoch), resize_size, crop_size)
            classifier.to(device)
        if progress:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, val top-1 {val_top1:.2f}%"
                  + (" (best, saved)" if improved else ""))
    # The log beside the best checkpoint gets the epochs after it too.
    atomic.write_text(output / "training_log.json", json.dumps(_log(history, config, trainer, best_epoch), indent=2))
    return {"history": history, "best_epoch": best_epoch, "best_val_top1": best, "output": str(output),
            "skipped_unreadable": dict(trainer.skipped), "skipped_files": _skipped_files(trainer)}


def _log(history: list[dict], config: FinetuneConfig, trainer, best_epoch: int) -> dict:
    return {"epochs": history, "best_epoch": best_epoch, "settings": {**asdict(config), "head_lr": config.head_lr},
            "skipped_unreadable": dict(trainer.skipped), "skipped_files": _skipped_files(trainer)}


def _skipped_files(trainer) -> dict:
    """{"train": [{"path", "reason"}, ...], "val": [...]}: the unreadable images, for training_log.json."""
    return {split: [{"path": path, "reason": reason} for path, reason in sorted(files.items())]
            for split, files in trainer.skipped_files.items()}


@dataclass
class _Trainer:
    batches: Callable[[], Iterator]  # one epoch of batches
    step: Callable[[object, float], float]  # (batch, lr scale) -> loss
    evaluate: Callable[[], float]  # validation top-1 (percent)
    steps_per_epoch: int
    skipped: dict  # unreadable images: {"train": count, "val": count}
    skipped_files: dict  # the same images: {"train": {path: reason}, "val": {path: reason}}


def _frozen_setup(backbone, classifier, train_images, val_images, config, *, transform, num_workers, device,
                  cache_dir, progress, crop_size, feature_batch_size) -> _Trainer:
    """Head only, on cached eval-transform features of the backbone (the same cache as the protocols)."""
    extract = dict(transform=transform, batch_size=feature_batch_size, num_workers=num_workers, device=device,
                   cache_dir=cache_dir, progress=progress)
    train_features = extract_features(backbone, train_images, description="train features", **extract)
    val_features = extract_features(backbone, val_images, description="val features", **extract)

    def head_input(features):  # the classifier's own input: [final-norm CLS, mean patch token]
        return torch.cat([torch.as_tensor(np.array(features.final_cls)),
                          torch.as_tensor(np.array(features.patch_mean))], dim=1).to(device)

    train_x, val_x = head_input(train_features), head_input(val_features)
    train_y = torch.as_tensor(train_features.labels).to(device)
    val_y = torch.as_tensor(val_features.labels).to(device)
    head = classifier.classifier
    for param in classifier.dinov2.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, len(train_y))

    def batches():
        order = torch.randperm(len(train_y), generator=generator)
        return iter(order.split(batch_size))

    def step(rows, lr_scale):
        for group in optimizer.param_groups:
            group["lr"] = config.head_lr * lr_scale
        loss = F.cross_entropy(head(train_x[rows]), train_y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    @torch.no_grad()
    def evaluate():
        return 100.0 * (head(val_x).argmax(dim=1) == val_y).double().mean().item()

    return _Trainer(batches, step, evaluate, math.ceil(len(train_y) / batch_size),
                    {"train": len(train_features.skipped), "val": len(val_features.skipped)},
                    {"train": dict(train_features.skipped), "val": dict(val_features.skipped)})


def _unfrozen_setup(backbone, classifier, train_images, val_images, config, *, transform, num_workers, device,
                    cache_dir, progress, crop_size, feature_batch_size) -> _Trainer:
    """Whole network on augmented images, layer-wise lr decay (DINOv2's parameter groups)."""
    from dinokit.eval.linear import LinearProbeConfig, train_transform
    from dinokit.param_groups import fuse_params_groups, get_params_groups_with_decay

    augment = train_transform(LinearProbeConfig(crop_size=crop_size), backbone)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = torch.utils.data.DataLoader(
        ImageDataset(train_images.paths, train_images.labels, augment), batch_size=config.batch_size, shuffle=True,
        drop_last=len(train_images) > config.batch_size, num_workers=num_workers, generator=generator,
        collate_fn=collate_skipping_unreadable)
    val_loader = torch.utils.data.DataLoader(
        ImageDataset(val_images.paths, val_images.labels, transform), batch_size=config.batch_size,
        num_workers=num_workers, collate_fn=collate_skipping_unreadable)
    groups = fuse_params_groups(get_params_groups_with_decay(classifier, lr_decay_rate=config.layer_decay))
    for group in groups:
        group["weight_decay"] = config.weight_decay * group["wd_multiplier"]
    optimizer = torch.optim.AdamW(groups, lr=config.head_lr)
    unreadable: dict[str, dict] = {"train": {}, "val": {}}  # path -> reason
    skipped = {"train": 0, "val": 0}

    def batches():
        classifier.train()
        for batch in train_loader:
            unreadable["train"].update((train_images.paths[i], reason) for i, reason in batch["errors"])
            skipped["train"] = len(unreadable["train"])
            if batch["pixel_values"] is not None:
                yield batch

    def step(batch, lr_scale):
        for group in optimizer.param_groups:
            group["lr"] = config.head_lr * group["lr_multiplier"] * lr_scale
        output = classifier(pixel_values=batch["pixel_values"].to(device), labels=batch["labels"].to(device))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        return output.loss.item()

    @torch.no_grad()
    def evaluate():
        classifier.eval()
        correct = seen = 0
        for batch in val_loader:
            unreadable["val"].update((val_images.paths[i], reason) for i, reason in batch["errors"])
            if batch["pixel_values"] is None:
                continue
            logits = classifier(pixel_values=batch["pixel_values"].to(device)).logits
            correct += int((logits.argmax(dim=1).cpu() == batch["labels"]).sum())
            seen += len(batch["labels"])
        skipped["val"] = len(unreadable["val"])
        if seen == 0:
            raise ValueError(f"None of the {len(val_images)} validation images could be read.")
        return 100.0 * correct / seen

    return _Trainer(batches, step, evaluate, len(train_loader), skipped, unreadable)
