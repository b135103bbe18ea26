"""Image sources (`sources`: folders, lists, Parquet, WebDataset shards -> samples, through the one reader) and
training data: unlabelled image datasets, DINOv2's multi-crop augmentation and the iBOT-masking collate."""

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.batch_augmentations import BatchDataAugmentationDINO
from dinokit.data.collate import collate_data_and_cast, draw_masks
from dinokit.data.datasets import UnlabeledImageDataset, list_image_files
from dinokit.data.images import (
           IMAGE_EXTENSIONS,
           ImageReadError,
           find_image_files,
           read_image,
           read_image_bytes,
)
from dinokit.data.sources import Entry, Sample, labelled_entries, list_entries, read_entry, read_sample

__all__ = ["IMAGE_EXTENSIONS", "BatchDataAugmentationDINO", "DataAugmentationDINO", "Entry", "ImageReadError",
           "Sample", "UnlabeledImageDataset", "collate_data_and_cast", "draw_masks", "find_image_files",
           "labelled_entries", "list_entries", "list_image_files", "read_entry", "read_image", "read_image_bytes",
           "read_sample"]
