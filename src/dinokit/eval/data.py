"""Labelled image sets for evaluation: an ImageFolder tree (`<split>/<class>/<image>`) or a file list with labels.

A file list is a text file with one `<path> <class name>` per line (or `<path>,<class name>`; blank lines and `#`
comments are ignored; relative paths are relative to the list's folder). Classes are indexed in sorted order of
their names, as torchvision's ImageFolder does. The validation split must have exactly the training split's
classes: evaluating against a different set of folders is almost always a mistake, so it is an error.

Sets are listed and read by dinokit's one image-source layer (`dinokit.data.sources.labelled_entries` and
`read_sample`: the same extensions, reader and rules as every command; a Parquet file with a path and a `label`
column works too). An unreadable image (refused by the reader: corrupt, empty,
truncated, over the pixel limit, permission denied, a link loop) is not an error here: `ImageDataset` returns it
as a failed sample, which the collate function drops and the feature extractor reports (count and paths in the
results).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dinokit.data import sources


@dataclass
class LabelledImages:
    """Image paths with integer labels; `classes[label]` is the label's name."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """An ImageFolder tree: one sub-folder per class, images anywhere below it."""
    root = Path(root).expanduser()
    entries, classes = sources.labelled_entries(root)
    return LabelledImages([e.path for e in entries], [e.label for e in entries], classes, str(root))


def file_list(list_file: str | os.PathLike) -> LabelledImages:
    """A text file of `<path> <class name>` (or comma-separated) lines, or a Parquet file with a path and a
    `label` column."""
    list_file = Path(list_file).expanduser()
    entries, classes = sources.labelled_entries(list_file)
    return LabelledImages([e.path for e in entries], [e.label for e in entries], classes, str(list_file))


def load_split(source: str | os.PathLike, what: str = "split") -> LabelledImages:
    """An ImageFolder directory or a file list, with an error naming the argument when it does not exist."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"The {what} {str(path)!r} does not exist. Pass an ImageFolder directory "
                                f"(<split>/<class>/<image>) or a text file of '<path> <class>' lines.")
    return image_folder(path) if path.is_dir() else file_list(path)


def load_splits(train, val) -> tuple[LabelledImages, LabelledImages]:
    """Train and validation sets (paths or `LabelledImages`) with the same classes, so the same label indices."""
    train_set = train if isinstance(train, LabelledImages) else load_split(train, "training set")
    val_set = val if isinstance(val, LabelledImages) else load_split(val, "validation set")
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise ValueError(
            f"The training and validation sets have different classes: only in {train_set.source}: "
            f"{_short(only_train)}; only in {val_set.source}: {_short(only_val)}. Use the same class folders "
            f"(or class names) in both.")
    return train_set, val_set


def _short(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageDataset(Dataset):
    """Item i: {"index", "pixel_values", "label"}, or {"index", "error"} for a file that cannot be read."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        sample = sources.read_sample(sources.file_entry(self.paths[index]))
        if sample.error is not None:
            return {"index": index, "error": sample.error}
        pixel_values = self.transform(sample.image)
        return {"index": index, "pixel_values": pixel_values, "label": self.labels[index]}


def collate_skipping_unreadable(items: list[dict]) -> dict:
    """Stack the readable samples of a batch; failed ones are listed in "errors" as (index, reason)."""
    good = [item for item in items if "error" not in item]
    return {
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "pixel_values": torch.stack([item["pixel_values"] for item in good]) if good else None,
        "labels": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "errors": [(item["index"], item["error"]) for item in items if "error" in item],
    }
