"""Unlabelled image datasets for self-supervised training: any folder of images, an ImageFolder tree, a file list.

Files are listed and read by dinokit's one reader (`dinokit.data.images`: the same extensions, pixels and
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

from dinokit.data.images import IMAGE_EXTENSIONS, ImageReadError, display_path, find_image_files, read_image

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
        self.paths = list_image_files(source, extensions)
        self.bad_files: dict[Path, str] = {}
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
        try:
            return read_image(path)
        except ImageReadError as exc:
            self.bad_files[path] = exc.reason
            logger.warning("Skipping unreadable image %s (%s); %d skipped so far in this process",
                           display_path(path), exc.reason, len(self.bad_files))
            return None

    def _check_readable(self) -> None:
        for index in range(len(self.paths)):
            if self._load(index) is not None:
                return
        first_bad, reason = next(iter(self.bad_files.items()))
        raise ValueError(f"No readable image in {self.source}: none of its {len(self.paths)} image files can be "
                         f"decoded (e.g. {first_bad}: {reason}). Check that the files are valid images.")
