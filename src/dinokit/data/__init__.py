"""Training data: unlabelled image datasets, DINOv2's multi-crop augmentation and the iBOT-masking collate."""

from dinokit.data.augmentations import DataAugmentationDINO
from dinokit.data.batch_augmentations import BatchDataAugmentationDINO
from dinokit.data.collate import collate_data_and_cast, draw_masks
from dinokit.data.datasets import UnlabeledImageDataset, list_image_files
from dinokit.data.images import IMAGE_EXTENSIONS, ImageReadError, find_image_files, read_image

__all__ = ["IMAGE_EXTENSIONS", "BatchDataAugmentationDINO", "DataAugmentationDINO", "ImageReadError",
           "UnlabeledImageDataset", "collate_data_and_cast", "draw_masks", "find_image_files", "list_image_files",
           "read_image"]
