"""Image sources: the one way from an input spec to samples, for every command (embed, eval, train, ...).

An input spec is any of
- a folder of images (searched recursively; `dinokit.data.images.find_image_files`), or an ImageFolder tree
  (`<root>/<class>/<image>`: `labelled_entries` gives the labels);
- an image file; a quoted glob pattern; a text file (.txt/.lst) listing one path per line -- a line may also name
  one sample of a WebDataset shard as `<shard>.tar#<member>`, the name `dinokit embed` stores for it (so a
  `dinokit curate` selection of a shard-embedded pool is read back);
- a Parquet file of paths (a `path`, `image_path` or `filepath` column; optional `label`);
- WebDataset shards, as img2dataset writes them (`{key}.jpg` + `{key}.json` [+ `{key}.txt`] per sample): a `.tar`
  file, a brace-expanded list (`shards/{00000..00099}.tar`, `{a,b}.tar`) or a folder holding `.tar` files;
- or a list of any of these.

`list_entries(spec)` turns it into `Entry`s: a sample not yet decoded, with a unique `key`, where its bytes are (a
file, or a member of a tar at a known offset: tar members are random access, so a shard list behaves exactly like
a folder for sorting, sharding, resuming and splitting over processes), its label and metadata. `read_entry`
decodes one through the one reader (`read_image` / `read_image_bytes`: same pixels, same refusals);
`read_sample` never raises for bad data: it returns a `Sample` whose `error` says why.

The error policy is one for every source: a sample that cannot be read (missing, unreadable or corrupt file; a
tar sample without an image member; a damaged or missing shard) is an entry with a reason, which a command lists
in its error output and goes on. Only a spec that names nothing at all (a folder without images, a pattern that
matches nothing, a shard list none of which exists) is an error, raised at once.

Order: files are sorted by path and de-duplicated (as `dinokit embed` always did); shards come after them in the
order given (a brace list expands in order), their samples in archive order.

Tar shards must be uncompressed (img2dataset's default): a compressed `.tar.gz` has no random access.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dinokit.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    display_path,
    find_image_files,
    read_image,
    read_image_bytes,
)

LIST_EXTENSIONS = {".txt", ".lst"}
PATH_COLUMNS = ("path", "image_path", "filepath")
# Members of a WebDataset sample that can hold its image, in order of preference (webdataset's names).
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "jfif", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


class SourceError(ValueError):
    """An input spec that names no samples (or cannot be understood); the message says what to pass."""


@dataclass(frozen=True)
class Entry:
    """One sample of a source, before decoding."""

    key: str  # unique in the source: the file's path, or '<shard>.tar#<member>' for a tar member
    path: str | None = None  # the image file, or ...
    tar: str | None = None  # ... the tar shard holding it, with the member's data offset and size
    offset: int = 0
    size: int = 0
    label: int | None = None
    error: str | None = None  # known unreadable before decoding: no image member, damaged or missing shard
    metadata: dict = field(default_factory=dict, compare=False, hash=False)  # key, url, caption (shards)

    @property
    def name(self) -> str:
        """Printable, storable name (`display_path` of the key)."""
        return display_path(self.key)


@dataclass
class Sample:
    entry: Entry
    image: Image.Image | None
    error: str | None  # the reason the image could not be read (then image is None)


def file_entry(path, label: int | None = None) -> Entry:
    return Entry(key=str(path), path=str(path), label=label)


def read_entry(entry: Entry) -> Image.Image:
    """The entry's image as RGB (the one reader's policy), or ImageReadError naming it."""
    if entry.error is not None:
        raise ImageReadError(entry.key, entry.error)
    if entry.tar is None:
        return read_image(entry.path)
    try:
        with open(entry.tar, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
    except OSError as exc:
        raise ImageReadError(entry.key, f"cannot read the shard ({exc.strerror or exc})") from None
    if len(data) != entry.size:
        raise ImageReadError(entry.key, f"the shard ends inside this member ({len(data)} of {entry.size} bytes)",
                             "Re-download or re-write the shard.")
    return read_image_bytes(data, entry.key)


def read_sample(entry: Entry) -> Sample:
    """`read_entry` that never raises for bad data: the reason is in `Sample.error`."""
    try:
        return Sample(entry, read_entry(entry), None)
    except ImageReadError as exc:
        return Sample(entry, None, exc.reason)


# ------------------------------------------------------------------------------------------------ the listing
def list_entries(spec) -> list[Entry]:
    """Every sample named by `spec` (see the module notes), files first (sorted), then shards in order."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise SourceError("No inputs were given (empty list).")
    many = isinstance(spec, (list, tuple))  # in a list, a path that does not exist is kept (and reported)
    files: dict[str, Entry] = {}
    shards: list[str] = []
    for item in items:
        text = os.fspath(item) if isinstance(item, os.PathLike) else str(item)
        kind, found = _classify(text, missing_ok=many)
        if kind == "shards":
            shards += found
        else:
            for entry in found:
                files.setdefault(entry.key, entry)
    entries = [files[k] for k in sorted(files)]
    if shards:
        entries += _shard_entries(shards)
    return entries


def list_files(spec) -> list[str]:
    """Sorted, de-duplicated absolute paths of the image files named by `spec` (no shards)."""
    entries = list_entries(spec)
    if any(e.tar is not None or e.path is None for e in entries):
        raise SourceError(f"{spec!r} names WebDataset shards; this command reads image files only.")
    return [e.path for e in entries]


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _classify(text: str, missing_ok: bool) -> tuple[str, list]:
    """("files", [Entry]) or ("shards", [tar path]) for one input spec."""
    expanded = expand_braces(text)
    if any(p.lower().endswith((".tar.gz", ".tgz")) for p in expanded):
        raise SourceError(f"{text!r}: compressed shards (.tar.gz) have no random access. Decompress them "
                          f"(gunzip), or write uncompressed shards (img2dataset's default).")
    if all(p.lower().endswith(".tar") for p in expanded):
        return "shards", [_abs(p) for p in expanded]
    if len(expanded) > 1:  # e.g. 'photos/*.{jpg,png}': each alternative on its own
        found = []
        for alternative in expanded:
            try:
                found += _classify(alternative, missing_ok=True)[1]
            except SourceError:  # an alternative matching nothing is fine as long as another matches
                pass
        if not found:
            raise SourceError(f"The pattern {text!r} matches no files.")
        return "files", found
    path = Path(text).expanduser()
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar" and not p.name.startswith("."))
        if tars:
            return "shards", [str(p.resolve()) for p in tars]
        paths = find_image_files(path)
        if not paths:
            raise SourceError(f"No images found in folder {path} (looked recursively for "
                              f"{', '.join(sorted(IMAGE_EXTENSIONS))}, and for .tar shards directly in it).")
        return "files", [file_entry(_abs(str(p))) for p in paths]
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        lines = [line.strip() for line in path.read_text().splitlines()]
        paths = [str(path.parent / line) for line in lines if line and not line.startswith("#")]
        if not paths:
            raise SourceError(f"The file list {path} names no files.")
        return "files", list_file_entries(paths)
    if path.is_file() and path.suffix.lower() == ".parquet":
        return "files", parquet_entries(path)
    if path.is_file():
        return "files", [file_entry(_abs(text))]
    if glob.has_magic(text):
        paths = [p for p in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(p)]
        if not paths:
            raise SourceError(f"The pattern {text!r} matches no files.")
        return "files", [file_entry(_abs(p)) for p in paths]
    if missing_ok:
        return "files", [file_entry(_abs(text))]
    raise FileNotFoundError(f"Input {text!r} does not exist. Pass a folder, a glob pattern (quoted), a .txt file "
                            f"listing one image path per line, a .parquet of paths, WebDataset shards "
                            f"('shards/{{00000..00099}}.tar') or image files.")


_TAR_MEMBER = re.compile(r"^(.+\.tar)#(.+)$")


def names_tar_member(line: str) -> bool:
    """True for `<shard>.tar#<member>`, the name of one WebDataset sample (`Entry.key`)."""
    return bool(_TAR_MEMBER.match(line))


def list_file_entries(paths: list[str]) -> list[Entry]:
    """Entries of a list file's lines, in order: image files, and `<shard>.tar#<member>` samples looked up in
    their shard (each shard listed once); a member the shard does not hold, or a missing shard, is an entry
    with that reason."""
    shards: dict[str, dict[str, Entry]] = {}
    entries = []
    for line in paths:
        match = _TAR_MEMBER.match(line)
        if match is None:
            entries.append(file_entry(_abs(line)))
            continue
        shard = _abs(match.group(1))
        if shard not in shards:
            shards[shard] = {e.key: e for e in list_tar(shard)}
        key = f"{shard}#{match.group(2)}"
        found = shards[shard].get(key)
        if found is None:
            problem = shards[shard].get(shard)  # the shard itself: missing or damaged
            found = Entry(key=key, tar=shard, error=problem.error if problem is not None and problem.error
                          else "the shard holds no such member")
        entries.append(found)
    return entries


def parquet_entries(path: Path) -> list[Entry]:
    """A Parquet file of image paths (relative ones relative to its folder), with labels if it has `label`."""
    from dinokit.extras import optional_import

    pq = optional_import("pyarrow.parquet", purpose="reading a Parquet list of images")
    table = pq.read_table(path)
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise SourceError(f"{path} has no column of image paths (one of {', '.join(PATH_COLUMNS)}); its columns "
                          f"are {', '.join(table.column_names)}.")
    paths = table.column(column).to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    if not paths:
        raise SourceError(f"The Parquet list {path} names no files.")
    return [file_entry(_abs(str(path.parent / p)), None if label is None else int(label))
            for p, label in zip(paths, labels)]


# ------------------------------------------------------------------------------------------------ brace lists
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(text: str) -> list[str]:
    """Shell-style brace expansion, as webdataset and clip-retrieval take shard lists: `{00000..00099}` (zero
    padding kept, the wider end's width), `{0..10..2}` (step) and `{a,b,c}`; several groups multiply out."""
    match = _BRACE.search(text)
    if match is None:
        return [text]
    head, body, tail = text[:match.start()], match.group(1), text[match.end():]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if numeric:
        first, last, step = numeric.group(1), numeric.group(2), int(numeric.group(3) or 1)
        width = max(len(first), len(last)) if (first.startswith("0") or last.startswith("0")) else 0
        a, b = int(first), int(last)
        numbers = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
        options = [f"{n:0{width}d}" for n in numbers]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace list: keep the braces as they are
        return [head + "{" + body + "}" + p for p in expand_braces(tail)]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


# ------------------------------------------------------------------------------------------------ tar shards
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: key = up to the basename's first dot


def _shard_entries(shards: list[str]) -> list[Entry]:
    existing = [s for s in shards if os.path.isfile(s)]
    if not existing:
        raise SourceError(f"None of the {len(shards)} shard(s) exists (e.g. {display_path(shards[0])}). Check the "
                          f"path and the brace range.")
    entries = []
    for shard in shards:
        entries += list_tar(shard)
    return entries


def list_tar(shard: str) -> list[Entry]:
    """The samples of one uncompressed tar shard, in archive order. A missing or damaged shard, or a sample
    without an image member, becomes an entry with an error (listed, not fatal); `.json` (url, caption, key) and
    `.txt` (caption) members become metadata."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    damage = None
    try:
        tar = tarfile.open(shard, "r:")  # "r:": uncompressed only, so members have fixed offsets
    except FileNotFoundError:
        return [Entry(key=shard, error="the shard does not exist")]
    except (tarfile.TarError, OSError) as exc:
        return [Entry(key=shard, error=f"not a readable uncompressed tar archive ({exc})")]
    with tar:
        try:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match:
                    samples.setdefault(match.group(1), {})[match.group(2).lower()] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            damage = f"damaged tar archive after {len(samples)} samples ({exc})"
        entries = [_tar_sample(tar, shard, key, members) for key, members in samples.items()]
    if damage:
        entries.append(Entry(key=shard, error=damage))
    return entries


def _tar_sample(tar: tarfile.TarFile, shard: str, key: str, members: dict[str, tarfile.TarInfo]) -> Entry:
    metadata = {"key": key, "url": None, "caption": None}
    if "json" in members:
        try:
            info = json.loads(tar.extractfile(members["json"]).read())
            if isinstance(info, dict):
                metadata.update(url=_text(info.get("url")), caption=_text(info.get("caption")))
                metadata["key"] = _text(info.get("key")) or key
        except (ValueError, OSError, tarfile.TarError):
            pass  # unreadable metadata is not a reason to drop the image
    if "txt" in members:
        try:
            metadata["caption"] = tar.extractfile(members["txt"]).read().decode("utf-8", "replace")
        except (OSError, tarfile.TarError):
            pass
    image = next((members[ext] for ext in IMAGE_MEMBER_EXTENSIONS if ext in members), None)
    if image is None:
        has = ", ".join("." + ext for ext in sorted(members))
        return Entry(key=f"{shard}#{key}", tar=shard, metadata=metadata,
                     error=f"no image member in this sample (it has {has}; looked for "
                           f"{', '.join('.' + e for e in IMAGE_MEMBER_EXTENSIONS[:4])}, ...)")
    return Entry(key=f"{shard}#{image.name}", tar=shard, offset=image.offset_data, size=image.size,
                 metadata=metadata)


def _text(value) -> str | None:
    return None if value is None else str(value)


# ------------------------------------------------------------------------------------------------ labelled sets
def labelled_entries(spec) -> tuple[list[Entry], list[str]]:
    """Labelled samples and the sorted class names: an ImageFolder tree (one sub-folder per class, images
    anywhere below it), a text file of `<path> <class name>` (or `<path>,<class name>`) lines, or a Parquet file
    with a path column and a `label` column (integer labels; classes named by their numbers)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _image_folder(path)
    if path.suffix.lower() == ".parquet":
        entries = parquet_entries(path)
        if any(e.label is None for e in entries):
            raise SourceError(f"{path} has no `label` column; a labelled set needs one.")
        count = max(e.label for e in entries) + 1
        return entries, [str(i) for i in range(count)]
    return _labelled_file_list(path)


def _image_folder(root: Path) -> tuple[list[Entry], list[str]]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, class_to_index = find_classes(str(root))
    except FileNotFoundError:
        raise SourceError(f"{root} has no class folders. Expected an ImageFolder tree <split>/<class>/<image>, "
                          f"e.g. train/cat/001.jpg, or a file list of '<path> <class>' lines.") from None
    entries = []
    for name in classes:
        entries += [file_entry(str(p), class_to_index[name]) for p in find_image_files(root / name)]
    if not entries:
        raise SourceError(f"{root} has class folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                          f"but no images in them (extensions {', '.join(IMAGE_EXTENSIONS)}).")
    return entries, classes


def _labelled_file_list(list_file: Path) -> tuple[list[Entry], list[str]]:
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, name = line.rpartition("," if "," in line else " ")
        if not path.strip() or not name.strip():
            raise SourceError(f"{list_file}:{number}: expected '<image path> <class name>', got {line!r}.")
        path = Path(path.strip()).expanduser()
        pairs.append((str(path if path.is_absolute() else list_file.parent / path), name.strip()))
    if not pairs:
        raise SourceError(f"File list {list_file} has no entries. Write one '<image path> <class name>' per line.")
    classes = sorted({name for _, name in pairs})
    index = {name: i for i, name in enumerate(classes)}
    return [file_entry(p, index[n]) for p, n in pairs], classes
