"""The training data stream: an infinite, rank-sharded sample order and per-sample seeded augmentation.

Every random draw of the data pipeline is a function of (seed, global sample number): the crop augmentation of
sample g is drawn under `torch.manual_seed(f(seed, g))` and the iBOT masks of a batch under `random.seed(...)`
of its first sample number (with `crops.backend: tensor`, the batch's crops too, under a generator seeded the
same way). So the stream does not depend on the number of DataLoader workers or on when the
loader was (re)started: resuming at iteration i yields exactly the batches an uninterrupted run would have seen.

Order (Meta's sharded infinite sampler, exact-resume form): pass p over the dataset is the permutation drawn
from seed + p; the global stream is the concatenation of the passes; rank r of W takes stream positions
r, r + W, r + 2W, ... so every rank sees different images and the ranks together see each pass once.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import PILToTensor

from dinokit.data import (
    BatchDataAugmentationDINO,
    DataAugmentationDINO,
    UnlabeledImageDataset,
    collate_data_and_cast,
    draw_masks,
)
from dinokit.ssl.masking import MaskingGenerator

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, sample) pairs over seeds


def sample_seed(seed: int, sample_number: int) -> int:
    return (seed * _MIX + sample_number * 2654435761 + 12345) % (2**63 - 1)


class InfiniteShardedSampler(Sampler):
    """Yields `(dataset index, global sample number)` for rank `rank` of `world_size`, from position `start`
    (in this rank's samples) on, forever."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("InfiniteShardedSampler needs a non-empty dataset.")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        position = self.start
        current_pass, order = -1, None
        while True:
            number = position * self.world_size + self.rank
            pass_index, offset = divmod(number, self.size)
            if pass_index != current_pass:
                generator = torch.Generator().manual_seed(self.seed + pass_index)
                order = torch.randperm(self.size, generator=generator).tolist()
                current_pass = pass_index
            yield order[offset], number
            position += 1


class SeededSamples(Dataset):
    """Wraps an `UnlabeledImageDataset`: item `(index, number)` is the augmented image drawn under a seed made
    from `number`, returned as `(crops, (number, worker id, files skipped so far by this worker))`."""

    def __init__(self, dataset: UnlabeledImageDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, number = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(sample_seed(self.seed, number))
            crops, _ = self.dataset[index]
        worker = get_worker_info()
        return crops, (number, worker.id if worker is not None else 0, self.dataset.num_skipped)


class SeededCollate:
    """`collate_data_and_cast` with the batch's masks drawn from a seed of its first sample number; adds
    `first_sample` and `skipped` ((worker id, files that worker skipped so far)). With `batch_augmentation`
    (a `BatchDataAugmentationDINO`) the samples are uint8 images and the crops are made here, for the whole
    batch at once, under a generator seeded from the first sample number."""

    def __init__(self, seed: int, mask_ratio_tuple, mask_probability: float, n_tokens: int, mask_generator,
                 batch_augmentation: BatchDataAugmentationDINO | None = None):
        self.seed, self.mask_ratio_tuple, self.mask_probability = seed, tuple(mask_ratio_tuple), mask_probability
        self.n_tokens, self.mask_generator = n_tokens, mask_generator
        self.batch_augmentation = batch_augmentation

    def __call__(self, samples):
        first = min(info[0] for _, info in samples)
        state = random.getstate()
        random.seed(sample_seed(self.seed + 1, first))
        try:
            if self.batch_augmentation is None:
                batch = collate_data_and_cast(samples, self.mask_ratio_tuple, self.mask_probability,
                                              torch.float32, n_tokens=self.n_tokens,
                                              mask_generator=self.mask_generator)
            else:
                generator = torch.Generator().manual_seed(sample_seed(self.seed + 2, first))
                global_crops, local_crops = self.batch_augmentation([image for image, _ in samples], generator)
                batch = {"collated_global_crops": global_crops, "collated_local_crops": local_crops,
                         **draw_masks(global_crops.shape[0], self.mask_ratio_tuple, self.mask_probability,
                                      self.n_tokens, self.mask_generator)}
        finally:
            random.setstate(state)
        batch["first_sample"] = first
        batch["skipped"] = (samples[0][1][1], max(info[2] for _, info in samples))
        return batch


def _augmentation_kwargs(crops) -> dict:
    return dict(global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
                local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
                local_crops_size=crops.local_crops_size, blur_probs=crops.blur_probs,
                color_jitter_prob=crops.color_jitter_prob, grayscale_prob=crops.grayscale_prob,
                solarize_prob=crops.solarize_prob)


def build_dataset(cfg, source) -> UnlabeledImageDataset:
    """The training images. `crops.backend: pil`: each item is already augmented (Meta's per-crop PIL
    transforms); `tensor`: each item is the uint8 image and the collate augments the whole batch."""
    if cfg.crops.backend == "tensor":
        return UnlabeledImageDataset(source, transform=PILToTensor())
    return UnlabeledImageDataset(source, transform=DataAugmentationDINO(**_augmentation_kwargs(cfg.crops)))


def build_loader(cfg, dataset: UnlabeledImageDataset, start_iteration: int = 0, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """Infinite DataLoader of collated batches from iteration `start_iteration` on."""
    batch_size = cfg.train.batch_size_per_gpu
    seed = cfg.train.seed
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    n_tokens = grid * grid
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens)
    batch_augmentation = None
    if cfg.crops.backend == "tensor":
        batch_augmentation = BatchDataAugmentationDINO(**_augmentation_kwargs(cfg.crops))
    collate = SeededCollate(seed, cfg.ibot.mask_ratio_min_max, cfg.ibot.mask_sample_probability, n_tokens,
                            mask_generator, batch_augmentation)
    sampler = InfiniteShardedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                                     start=start_iteration * batch_size)
    num_workers = int(cfg.train.num_workers)
    return DataLoader(
        SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # keeps the loader off the global RNG
    )
