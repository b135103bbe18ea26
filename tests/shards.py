"""WebDataset shards as img2dataset writes them ({key}.jpg + {key}.json + {key}.txt per sample), for tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(rng, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, shard: int, count: int, rng, *, skip_image: set[int] = frozenset(),
                corrupt: set[int] = frozenset()) -> list[str]:
    """Shard number `shard` with `count` samples keyed like img2dataset (5-digit shard + 4-digit index); samples
    in `skip_image` have no image member, those in `corrupt` a damaged JPEG. Returns the keys."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            key = f"{shard:05d}{i:04d}"
            keys.append(key)
            if i not in skip_image:
                data = image_bytes(rng, "JPEG", (30 + 3 * i, 40 - i))
                if i in corrupt:
                    data = data[:200] + bytes(b ^ 0x5A for b in data[200:400]) + data[400:len(data) // 2]
                add_member(tar, f"{key}.jpg", data)
            add_member(tar, f"{key}.txt", f"caption {key}".encode())
            add_member(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg",
                                                       "caption": f"caption {key}", "key": key,
                                                       "status": "success"}).encode())
    return keys
