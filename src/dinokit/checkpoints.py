"""Weight layouts (Meta, Hugging Face, timm), conversion between them, and safe checkpoint reading.

Everything converts through one normal form: a backbone state dict with Meta's flat names (model.md §4),
which is also what `DinoVisionTransformer.state_dict()` holds, plus an optional classifier head
(`classifier.weight`, `classifier.bias`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

HF_BACKBONE_PREFIXES = ("dinov2.", "dinov2_with_registers.")
HEAD_KEYS = ("classifier.weight", "classifier.bias")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into, or is not a DINOv2 checkpoint at all."""


# ---------------------------------------------------------------------------------------------------- reading
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load(path: str | os.PathLike, what: str = "checkpoint", allow_numpy: bool = False):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code from the file.

    A pickle that names anything else (a class, `os.system`, ...) is refused with that name in the message; a
    damaged file is reported as such. `allow_numpy` admits numpy arrays (older training checkpoints stored the
    numpy RNG state as one), which unpickle without running code."""
    path = Path(path)
    try:
        if allow_numpy:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _BLOCKED_GLOBAL.search(str(exc))
        if found:
            raise CheckpointError(
                f"{what} {path} contains pickled Python code ({found.group(1)}), which dinokit never runs: it "
                f"loads only tensors and plain values (torch.load with weights_only=True). If the file is from "
                f"a source you trust, load it yourself and re-save only its state dict (torch.save(state_dict) "
                f"or safetensors).") from None
        raise _damaged(path, what, exc) from None
    except Exception as exc:  # zip/pickle errors of a damaged file come in many types
        raise _damaged(path, what, exc) from None


def _damaged(path: Path, what: str, exc: Exception) -> CheckpointError:
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    return CheckpointError(f"could not read {what} {path} ({type(exc).__name__}: {reason}). The file is corrupt "
                           f"or truncated, or is not a weights file; re-download or re-save it.")


def _numpy_globals() -> list:
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *(
        getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None)) if name.endswith("DType"))]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file or a torch pickle (with `weights_only=True`), with a clear error if corrupt."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, the model config the file carries or None).

    The config comes from the file itself (`dinokit_config` in safetensors metadata, `backbone_config` in a
    dinokit training checkpoint), then from a config beside it (`<stem>.config.json`, or a DINOv2
    `config.json` in the same folder); keys given there override what the shapes say."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                data = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # the Rust reader's SafetensorError, or OSError
            raise _damaged(path, "safetensors file", exc) from None
        if "dinokit_config" in metadata:
            config = json.loads(metadata["dinokit_config"])
    else:
        data = torch_load(path, "checkpoint")
        if isinstance(data, Mapping) and isinstance(data.get("backbone_config"), Mapping):
            config = dict(data["backbone_config"])
    return unwrap_state_dict(data, path), _config_beside(path) or config


def _config_beside(path: Path) -> dict | None:
    from dinokit.config import CONFIG_CLASSES

    for candidate in (path.with_name(path.stem + ".config.json"), path.with_name("config.json")):
        if not candidate.is_file():
            continue
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{candidate} (the config beside {path.name}) is not valid JSON: {exc}") from None
        if candidate.name != "config.json" or config.get("model_type") in (*CONFIG_CLASSES, "dinov3_vit"):
            return config
    return None


def config_file_beside(path: Path) -> Path:
    """Where dinokit writes the config of a single-file checkpoint it saves."""
    return path.with_name(path.stem + ".config.json")


def unwrap_state_dict(data, source: object = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the weights inside the usual containers: {'model': ...}, {'teacher': ...}, {'state_dict': ...}."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{source} holds a {type(data).__name__}, not a state dict")
    for key in ("teacher", "model", "state_dict", "module"):
        if key in data and isinstance(data[key], Mapping) and not isinstance(data[key], torch.Tensor):
            return unwrap_state_dict(data[key], source)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} contains no tensors")
    return tensors


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Read `model.safetensors` (or its sharded index), else `pytorch_model.bin` (or its index)."""
    for index_name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(directory / shard))
            return state
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}")


# ---------------------------------------------------------------------------------------------------- layouts
def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("embeddings.", "encoder.layer.")) or k.startswith(HF_BACKBONE_PREFIXES) for k in keys):
        return "hf"
    if any(k == "reg_token" for k in keys) or ("pos_embed" in state and "mask_token" not in state
                                               and any(k.startswith("blocks.") for k in keys)):
        return "timm"
    if any(k.startswith(("blocks.", "backbone.", "teacher.", "student.", "module.")) for k in keys):
        return "meta"
    raise CheckpointError(
        "this is not a DINOv2 checkpoint: found none of the keys of the Meta ('blocks.0...'), Hugging Face "
        f"('embeddings...', 'encoder.layer...') or timm layouts (first keys: {keys[:5]})")


def _strip_meta_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the backbone under `teacher.backbone.` / `student.backbone.` / `module.`.
    Prefer the teacher (the weights the paper evaluates); drop heads (dino_head, ibot_head)."""
    keys = list(state)
    for prefix in ("teacher.backbone.", "backbone.", "module.backbone.", "module.", "student.backbone."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def meta_normalize(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat Meta names: strip training prefixes and `block_chunks` (`blocks.<chunk>.<i>.` -> `blocks.<i>.`)."""
    out = {}
    for key, value in _strip_meta_prefixes(state).items():
        key = _CHUNKED_BLOCK.sub(r"blocks.\2.", key)
        if key.startswith(("head.", "dino_head.", "ibot_head.")):
            continue
        out[key] = value
    return out


# HF name <-> Meta name, per block (qkv handled separately).
_HF_BLOCK = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def split_hf_head(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate `classifier.*` and strip the `dinov2.` / `dinov2_with_registers.` backbone prefix."""
    backbone, head = {}, {}
    for key, value in state.items():
        if key in HEAD_KEYS:
            head[key] = value
            continue
        for prefix in HF_BACKBONE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        backbone[key] = value
    return backbone, head


def hf_to_meta(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if not m:
            unknown.append(key)
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        qm = re.match(r"^attention\.attention\.(query|key|value)$", name)
        if qm:
            qkv.setdefault((i, kind), {})[qm.group(1)] = value
        elif kind == "lambda1":
            out[f"blocks.{i}.{_HF_BLOCK[name + '.lambda1']}"] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{i}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            unknown.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"block {i}: attention {kind} has only {sorted(parts)} of query/key/value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        raise CheckpointError(f"unexpected keys in a Hugging Face DINOv2 checkpoint: {unknown[:10]}"
                              + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    return out


def meta_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if not m:
            raise CheckpointError(f"unexpected key {key!r} in a Meta-layout DINOv2 state dict")
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = part.contiguous()
        elif rest in ("ls1.gamma", "ls2.gamma"):
            out[f"encoder.layer.{i}.{block[rest]}"] = value
        else:
            name, kind = rest.rsplit(".", 1)
            if name not in block:
                raise CheckpointError(f"unexpected key {key!r} in a Meta-layout DINOv2 state dict")
            out[f"encoder.layer.{i}.{block[name]}.{kind}"] = value
    return out


def timm_to_meta(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm drops `mask_token`, and for register models renames `reg_token` and folds `pos_embed[:, 0]` into
    `cls_token`. Unfolding keeps the sum exact: cls_token = timm's, pos_embed[:, 0] = 0."""
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    out = {}
    swiglu = any(k.endswith("mlp.fc1.weight") for k in state) and _is_timm_swiglu(state)
    for key, value in state.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif swiglu and ".mlp.fc1." in key:
            out[key.replace(".mlp.fc1.", ".mlp.w12.")] = value
        elif swiglu and ".mlp.fc2." in key:
            out[key.replace(".mlp.fc2.", ".mlp.w3.")] = value
        elif key.endswith(".mlp.norm.weight") or key.endswith(".mlp.norm.bias"):
            raise CheckpointError("timm SwiGLU with an inner norm is not a DINOv2 layout")
        else:
            out[key] = value
    pos = out["pos_embed"]
    if round(math.sqrt(pos.shape[1])) ** 2 == pos.shape[1]:  # patch grid only: prefix tokens folded
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return out


def _is_timm_swiglu(state: Mapping[str, torch.Tensor]) -> bool:
    fc1 = next(v for k, v in state.items() if k.endswith("mlp.fc1.weight"))
    fc2 = next(v for k, v in state.items() if k.endswith("mlp.fc2.weight"))
    return fc1.shape[0] == 2 * fc2.shape[1]


def meta_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's DINOv2 layout; register models fold pos_embed[:, 0] into cls_token (as timm's own converter)."""
    out = {}
    registers = "register_tokens" in state
    swiglu = any(".mlp.w12." in k for k in state)
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif swiglu and ".mlp.w12." in key:
            out[key.replace(".mlp.w12.", ".mlp.fc1.")] = value
        elif swiglu and ".mlp.w3." in key:
            out[key.replace(".mlp.w3.", ".mlp.fc2.")] = value
        else:
            out[key] = value
    if registers:
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


def to_meta(state: Mapping[str, torch.Tensor], layout: str | None = None):
    """Any supported layout -> (Meta-normal backbone state dict, classifier head dict, detected layout)."""
    layout = layout or detect_layout(state)
    if layout == "hf":
        backbone, head = split_hf_head(state)
        return hf_to_meta(backbone), head, layout
    if layout == "timm":
        return timm_to_meta(state), {}, layout
    if layout == "meta":
        return meta_normalize(state), {}, layout
    raise ValueError(f"unknown layout {layout!r}: use 'hf', 'meta' or 'timm'")


# ---------------------------------------------------------------------------------------------------- config
# DINOv2's released widths and their head counts (64-wide heads); any other width needs the count from a config.
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}


def infer_config(state: Mapping[str, torch.Tensor], layout: str = "meta", known: Mapping | None = None):
    """The Dinov2Config of a Meta-normal state dict: shapes give everything but the head count, which comes
    from `known` (a config carried by or beside the file, or the caller's keyword arguments) or, for the
    released widths, from DINOv2's 64-wide heads. Any other width without a config is refused, not guessed.

    Interpolation follows the source: Meta checkpoints like Meta's hub models (offset 0.1 without registers,
    antialias with); timm checkpoints like timm (antialias, size). Keys in `known` override all of it."""
    from dinokit.config import Dinov2Config, Dinov2WithRegistersConfig
    from dinokit.layers.mlp import swiglu_hidden_features

    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointError(f"checkpoint has no {key!r}: not a DINOv2 backbone")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round(math.sqrt(state["pos_embed"].shape[1] - 1))
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = next((r for r in (4, 4.0, 2, 8, 3) if swiglu_hidden_features(dim, r) == hidden), 4)
    else:
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        mlp_ratio = hidden // dim if hidden % dim == 0 else hidden / dim
    known = {k: v for k, v in (known or {}).items() if k in CONFIG_KEYS}
    if known.get("hidden_size", dim) != dim or known.get("num_hidden_layers", depth) != depth:
        raise CheckpointError(f"the config given for this checkpoint describes a {known.get('hidden_size')}-wide, "
                              f"{known.get('num_hidden_layers')}-block model, but its weights are {dim}-wide "
                              f"with {depth} blocks: pass the config of this checkpoint")
    heads = known.get("num_attention_heads") or OFFICIAL_HEADS.get(dim)
    if heads is None:
        raise CheckpointError(
            f"cannot tell the number of attention heads of this {dim}-wide checkpoint: the weights do not record "
            f"it and {dim} is not a released DINOv2 width ({', '.join(map(str, OFFICIAL_HEADS))}). Pass it: "
            f"load_checkpoint(path, num_attention_heads=N), or put {{\"num_attention_heads\": N}} in a "
            f"<checkpoint name>.config.json beside the file.")
    kwargs = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                  mlp_ratio=mlp_ratio, image_size=grid * patch, patch_size=patch,
                  num_channels=state["patch_embed.proj.weight"].shape[1], use_swiglu_ffn=swiglu,
                  qkv_bias="blocks.0.attn.qkv.bias" in state)
    if layout == "timm" or registers:
        kwargs.update(interpolate_offset=0.0, interpolate_antialias=True)
    else:
        kwargs.update(interpolate_offset=0.1, interpolate_antialias=False)
    kwargs.update(known)
    if dim % kwargs["num_attention_heads"]:
        raise CheckpointError(f"num_attention_heads={kwargs['num_attention_heads']} does not divide the "
                              f"checkpoint's width {dim}")
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
    return Dinov2Config(**kwargs)


# What a config beside a checkpoint may set: the architecture and behaviour, not the derived label maps.
CONFIG_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "image_size", "patch_size",
                "num_channels", "use_swiglu_ffn", "qkv_bias", "interpolate_offset", "interpolate_antialias",
                "layerscale_value", "layer_norm_eps", "hidden_act", "drop_path_rate", "hidden_dropout_prob",
                "apply_layernorm", "reshape_hidden_states",
                "attention_probs_dropout_prob", "initializer_range", "use_mask_token"}


def save_file_atomic(state: Mapping[str, torch.Tensor], path: Path, config: Mapping | None = None) -> None:
    """Write a state dict (safetensors by suffix, else torch) to a temporary name, then rename.

    `config` (the model's config dict) travels with the weights: in the safetensors metadata, and for torch
    files (whose state dicts must stay loadable by Meta's and timm's code) in `<stem>.config.json` beside."""
    from dinokit import atomic

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt"}
        if config is not None:
            metadata["dinokit_config"] = json.dumps(dict(config), sort_keys=True)
        atomic.atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
        return
    if config is not None:  # the config first: a file that exists always has its config beside it
        atomic.write_text(config_file_beside(path), json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    atomic.torch_save(state, path)
