"""Unlabelled image datasets for self-supervised training: any folder of images, an ImageFolder tree, a file list,
WebDataset tar shards.

Samples are listed and read by dinokit's image-source layer (`dinokit.data.sources`) and its one reader (`dinokit.data.images`: the same extensions, pixels and
refusals as every command). A file the reader refuses is skipped when it is read: the dataset logs a warning
naming it and the reason, counts it and returns the next readable image instead, so one bad file never stops a
long run. A source without a single readable image is an
error at construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from dinokit.data.images import IMAGE_EXTENSIONS, display_path, find_image_files
from dinokit.data.sources import (
    LIST_EXTENSIONS,
    Entry,
    expand_braces,
    file_entry,
    list_entries,
    names_tar_member,
    read_sample,
)

logger = logging.getLogger(__name__)


def list_image_files(source, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image paths of `source`, sorted: a folder (searched recursively, so ImageFolder trees work; hidden files
    and folders are skipped), a single image file, a text file listing one path per line (blank lines and `#`
    comments ignored; relative paths are relative to the list's folder), or a sequence of paths."""
    extensions = tuple(e.lower() for e in extensions)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"Image source {root} does not exist. Pass a folder of images, an image "
                                    "file or a text file listing image paths.")
        if root.is_dir():
            return find_image_files(root, extensions)
        if root.suffix.lower() in extensions:
            return [root]
        return _read_file_list(root)
    return [Path(p).expanduser() for p in source]


def training_entries(source, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Entry]:
    """The samples of `source` for training: what `list_image_files` lists, or WebDataset shards (a `.tar`, a
    brace list `shards/{00000..00099}.tar`, a folder of `.tar` files; `dinokit.data.sources`)."""
    if isinstance(source, (str, os.PathLike)) and (_names_shards(os.fspath(source))
                                                   or _lists_tar_members(os.fspath(source))):
        return list_entries(os.fspath(source))
    return [file_entry(p) for p in list_image_files(source, extensions)]


def _lists_tar_members(text: str) -> bool:
    """A .txt/.lst list with `<shard>.tar#<member>` lines (what `dinokit curate` writes for a shard-embedded pool)."""
    path = Path(text).expanduser()
    if not (path.is_file() and path.suffix.lower() in LIST_EXTENSIONS):
        return False
    try:
        return any(names_tar_member(line.strip()) for line in path.read_text().splitlines())
    except (UnicodeDecodeError, OSError):
        return False


def _names_shards(text: str) -> bool:
    expanded = expand_braces(text)
    if all(p.lower().endswith(".tar") for p in expanded):
        return True
    path = Path(text).expanduser()
    return path.is_dir() and any(p.suffix.lower() == ".tar" for p in path.iterdir())


def _read_file_list(list_file: Path) -> list[Path]:
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{list_file} is neither an image with a known extension nor a text file listing image "
                         "paths (one per line).") from None
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            paths.append(path if path.is_absolute() else list_file.parent / path)
    return paths


class UnlabeledImageDataset(Dataset):
    """Images of `source` (see `list_image_files`) as RGB PIL images passed through `transform`.

    `dataset[i]` returns `(transform(image), ())`, the `(sample, target)` pair of Meta's training loader (whose
    targets are `()`), ready for `collate_data_and_cast`. An unreadable file is replaced by the next readable one
    (in index order) and recorded in `bad_files` (per process: each DataLoader worker keeps its own record).
    """

    def __init__(self, source, transform=None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.source = source
        self.transform = transform
        self.entries = training_entries(source, extensions)
        self.paths = [Path(e.key) if e.tar is None else e.key for e in self.entries]  # keys, as before
        self.bad_files: dict[Path | str, str] = {}
        if not self.paths:
            raise ValueError(f"No image files in {source} (extensions {', '.join(extensions)}). Point to a folder "
                             "that contains images (searched recursively) or to a list of image paths.")
        self._check_readable()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_skipped(self) -> int:
        """Number of unreadable files met so far in this process."""
        return len(self.bad_files)

    def __getitem__(self, index: int):
        n = len(self.paths)
        for offset in range(n):
            image = self._load((index + offset) % n)
            if image is not None:
                sample = self.transform(image) if self.transform is not None else image
                return sample, ()
        raise RuntimeError(f"None of the {n} images of {self.source} can be read any more (e.g. "
                           f"{next(iter(self.bad_files), '?')}: {next(iter(self.bad_files.values()), '?')}). "
                           "Was the storage unmounted or the files replaced?")

    def _load(self, index: int):
        """The RGB image at `index`, or None (logged and recorded) when it cannot be decoded."""
        path = self.paths[index]
        if path in self.bad_files:
            return None
        sample = read_sample(self.entries[index])
        if sample.error is not None:
            self.bad_files[path] = sample.error
            logger.warning("Skipping unreadable image %s (%s); %d skipped so far in this process",
                           display_path(path), sample.error, len(self.bad_files))
            return None
        return sample.image

    def _check_readable(self) -> None:
        for index in range(len(self.paths)):
            if self._load(index) is not None:
                return
        first_bad, reason = next(iter(self.bad_files.items()))
        raise ValueError(f"No readable image in {self.source}: none of its {len(self.paths)} image files can be "
                         f"decoded (e.g. {first_bad}: {reason}). Check that the files are valid images.")
