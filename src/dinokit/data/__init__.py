"""Training data: unlabelled image datasets, DINOv2's multi-crop augmentation and the iBOT-masking collate."""

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.batch_augmentations import BatchDataAugmentationDINO
from dinokit.data.collate import collate_data_and_cast, draw_masks
from dinokit.data.datasets import UnlabeledImageDataset, list_image_files

__all__ = ["BatchDataAugmentationDINO", "DataAugmentationDINO", "UnlabeledImageDataset", "collate_data_and_cast",
           "draw_masks", "list_image_files"]
