"""Resolve a local directory or a Hugging Face Hub id to local files, with errors that say what to do."""

from __future__ import annotations

import os
from pathlib import Path


class HubError(OSError):
    """A model id could not be resolved to local files."""


def is_local(path_or_id: str | os.PathLike) -> bool:
    return Path(path_or_id).expanduser().exists()


def resolve_file(path_or_id: str | os.PathLike, filename: str, *, required: bool = True,
                 revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """Return the local path of `filename` inside a directory or a Hub repo.

    A directory is used as is. Anything else is treated as a Hub id and fetched through `huggingface_hub`
    (its cache and `HF_HUB_OFFLINE` apply). Returns None for a missing optional file.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if required:
            raise FileNotFoundError(f"{filename} not found in directory {local}. "
                                    f"Expected a model saved with save_pretrained().")
        return None
    if local.is_file():
        raise HubError(f"{local} is a file, not a model directory. Pass the directory that holds {filename}, "
                       f"or load a single checkpoint file with dinokit.load_checkpoint().")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise FileNotFoundError(f"Model directory {text!r} does not exist. Check the path, or pass a Hub id "
                                f"such as 'facebook/dinov2-small'.")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError("huggingface_hub is required to load models by Hub id") from exc
    try:
        return Path(hf_hub_download(text, filename, revision=revision, cache_dir=cache_dir))
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        if not required and _in_cache(text, revision, cache_dir):
            return None  # the model is cached without this optional file: it has none (transformers reads it so)
        raise HubError(
            f"Could not reach the Hugging Face Hub for {text!r} ({filename}) and it is not in the local cache. "
            f"Download the model elsewhere and pass its local directory instead, e.g. "
            f"from_pretrained('/path/to/{text.split('/')[-1]}'), or copy it into the Hugging Face cache "
            f"(HF_HUB_OFFLINE=1 then reads it from there).") from None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in Hub repo {text!r}.") from None
        return None
    except RepositoryNotFoundError:
        raise HubError(f"Hub repo {text!r} does not exist (or is private). Check the id, or pass a local "
                       f"directory saved with save_pretrained().") from None
    except Exception as exc:  # network errors, offline mode, gated repos: one clear message
        if not required and "404" in str(exc):
            return None
        raise HubError(
            f"Could not fetch {filename!r} of {text!r} from the Hugging Face Hub ({type(exc).__name__}). "
            f"If you are offline, download the model elsewhere and pass its local directory instead, e.g. "
            f"from_pretrained('/path/to/{text.split('/')[-1]}'); files already in the cache load with "
            f"HF_HUB_OFFLINE=1.") from None


def _in_cache(hub_id: str, revision: str | None, cache_dir: str | None) -> bool:
    """Whether the cache holds this revision of the repo (its config.json): then a file missing from it is one
    the repo does not have (e.g. the index of a model that is not sharded), since downloads fetch whole models."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir, revision=revision), str)
