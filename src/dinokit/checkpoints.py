"""Weight layouts (Meta, Hugging Face, timm), conversion between them, and safe checkpoint reading.

Everything converts through one normal form: a backbone state dict with Meta's flat names (model.md §4),
which is also what `DinoVisionTransformer.state_dict()` holds, plus an optional classifier head
(`classifier.weight`, `classifier.bias`).
"""

from __future__ import annotations

import json
import math
import os
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
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file or a torch pickle (with `weights_only=True`), with a clear error if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"The file is corrupt or truncated, or is not a weights file; re-download or re-save it.") from None
    return unwrap_state_dict(data, path)


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
def infer_config(state: Mapping[str, torch.Tensor], layout: str = "meta"):
    """Build the Dinov2Config that a Meta-normal state dict belongs to (DINOv2 fixes head_dim at 64).

    Interpolation follows the source: Meta checkpoints like Meta's hub models (offset 0.1 without registers,
    antialias with); timm checkpoints like timm (antialias, size)."""
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
    kwargs = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=max(dim // 64, 1),
                  mlp_ratio=mlp_ratio, image_size=grid * patch, patch_size=patch,
                  num_channels=state["patch_embed.proj.weight"].shape[1], use_swiglu_ffn=swiglu,
                  qkv_bias="blocks.0.attn.qkv.bias" in state)
    if layout == "timm" or registers:
        kwargs.update(interpolate_offset=0.0, interpolate_antialias=True)
    else:
        kwargs.update(interpolate_offset=0.1, interpolate_antialias=False)
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
    return Dinov2Config(**kwargs)


def load_checkpoint(path: str | os.PathLike, head: str | os.PathLike | None = None, strict: bool = True):
    """Load a Meta, timm or Hugging Face checkpoint file as a dinokit model.

    `head` is a Meta linear-head file (`*_linear_head.pth`: layers=1, `*_linear4_head.pth`: layers=4); with it,
    the result is a `Dinov2ForImageClassification` with Meta's classifier semantics.
    """
    from dinokit.hf import Dinov2ForImageClassification, Dinov2Model

    backbone, head_state, layout = to_meta(read_state_dict(path))
    config = infer_config(backbone, layout)
    if head is not None:
        linear = read_state_dict(head)
        if set(linear) != {"weight", "bias"}:
            raise CheckpointError(f"{head} is not a Meta linear head (expected keys weight, bias; got "
                                  f"{sorted(linear)[:5]})")
        head_state = {"classifier.weight": linear["weight"], "classifier.bias": linear["bias"]}
        ratio = linear["weight"].shape[1] // config.hidden_size
        if ratio not in (2, 5) or linear["weight"].shape[1] % config.hidden_size:
            raise CheckpointError(f"linear head of input width {linear['weight'].shape[1]} does not fit a backbone "
                                  f"of width {config.hidden_size} (expected 2x or 5x)")
        config.num_classifier_layers = 1 if ratio == 2 else 4
    if head_state:
        config.num_labels = head_state["classifier.weight"].shape[0]
        model = Dinov2ForImageClassification(config)
    else:
        model = Dinov2Model(config)
    model.load_meta_state_dict(backbone, head_state, strict=strict, source=str(path))
    return model.eval()


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Convert a checkpoint (file or HF directory) to `hf` (directory), `meta` or `timm` (file)."""
    from dinokit.auto import load_model

    model = load_model(src)
    dst = Path(dst)
    if to == "hf":
        model.save_pretrained(dst)
        return dst
    backbone, head = model.meta_state_dict()
    state = meta_to_timm(backbone) if to == "timm" else backbone
    if to not in ("meta", "timm"):
        raise ValueError(f"unknown target layout {to!r}: use hf, meta or timm")
    if head and to == "meta":
        state = {**state}
        head_path = dst.with_name(dst.stem + "_linear_head" + (dst.suffix or ".pth"))
        save_file_atomic({"weight": head["classifier.weight"], "bias": head["classifier.bias"]}, head_path)
    save_file_atomic(state, dst)
    return dst


def save_file_atomic(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a state dict (safetensors by suffix, else torch) to a temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a checkpoint between Hugging Face, Meta and timm layouts")
    p.add_argument("src", help="checkpoint file (.pth/.bin/.safetensors) or Hugging Face directory / hub id")
    p.add_argument("dst", help="output: a directory for --to hf, a file for --to meta|timm")
    p.add_argument("--to", choices=["hf", "meta", "timm"], required=True)
    p.set_defaults(func=_convert_command)


def _convert_command(args) -> int:
    out = convert(args.src, args.dst, args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
