"""DINOv3 ViT weight layouts (dinov3.md §4): Meta `.pth`, transformers (`layer.N.*` of 4.56-5.3 and
`model.layer.N.*` of >= 5.5) and timm (`_dinov3`, `_dinov3_qkvb`), to and from dinokit's normal form.

dinokit's normal form is what the DINOv3 `DinoVisionTransformer.state_dict()` holds: Meta's names except
`register_tokens` (Meta: `storage_tokens`) and the fused SwiGLU input `mlp.w12` (= cat(Meta w1 (gate), w2 (up))),
one fused `attn.qkv` whose key bias is zero, and `rope_embed.periods`.

What each layout drops (and what is refilled on reading): transformers and timm have no periods (recomputed
in float32), no `local_cls_norm` and no key bias; timm has no mask token (zeros); Meta's `bias_mask` is applied
to the bias on reading (`bias * mask`, as Meta's forward does) and written as 1/0/1 (q/k/v).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from dinokit.checkpoints import CheckpointError

# Released DINOv3 widths -> heads (head width 64; 7B 128).
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}

_META_MLP = re.compile(r"^(blocks\.\d+\.mlp)\.(w1|w2)\.(weight|bias)$")


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """'meta', 'hf', 'timm' or 'dinokit' for a DINOv3 ViT state dict; None when it is not one."""
    keys = set(state)
    if "storage_tokens" in keys:
        return "meta"
    if "embeddings.register_tokens" in keys and any(".attention.q_proj." in k for k in keys):
        return "hf"
    if "reg_token" in keys and "pos_embed" not in keys and any(k.endswith(".gamma_1") for k in keys):
        return "timm"
    if "rope_embed.periods" in keys and "pos_embed" not in keys:
        return "dinokit"
    return None


# ---------------------------------------------------------------------------------------------------- Meta
def meta_to_normal(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    mlp: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".qkv.bias_mask"):
            continue
        if key.endswith(".qkv.bias") and key + "_mask" in state:
            value = value * state[key + "_mask"].to(value.dtype)  # Meta's forward: bias * bias_mask
        m = _META_MLP.match(key)
        if m:
            mlp.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = value
            continue
        out["register_tokens" if key == "storage_tokens" else key] = value
    for key, parts in mlp.items():
        if set(parts) != {"w1", "w2"}:
            raise CheckpointError(f"{key}: a SwiGLU block needs both w1 and w2, found {sorted(parts)}")
        base, kind = key.rsplit(".", 1)
        out[f"{base}.w12.{kind}"] = torch.cat([parts["w1"], parts["w2"]], dim=0)
    return out


def normal_to_meta(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "register_tokens":
            out["storage_tokens"] = value
        elif ".mlp.w12." in key:
            w1, w2 = value.chunk(2, dim=0)
            out[key.replace(".w12.", ".w1.")] = w1.contiguous()
            out[key.replace(".w12.", ".w2.")] = w2.contiguous()
        elif key.endswith(".attn.qkv.bias"):
            out[key] = value
            mask = torch.ones_like(value)
            dim = value.shape[0] // 3
            mask[dim:2 * dim] = 0
            out[key + "_mask"] = mask
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------- transformers
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")


def hf_to_normal(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("dinov3_vit.")  # a 4.x task model's base_model_prefix
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif (m := _HF_LAYER.match(key)):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in a transformers DINOv3 ViT checkpoint: {unknown[:10]}")
    for i, parts in blocks.items():
        p = f"blocks.{i}."
        q_w, k_w, v_w = (parts.pop(f"attention.{n}_proj.weight", None) for n in "qkv")
        if q_w is None or k_w is None or v_w is None:
            raise CheckpointError(f"layer {i}: the attention needs q_proj, k_proj and v_proj weights")
        out[p + "attn.qkv.weight"] = torch.cat([q_w, k_w, v_w], dim=0)
        biases = [parts.pop(f"attention.{n}_proj.bias", None) for n in "qkv"]
        if any(b is not None for b in biases):
            dim = q_w.shape[0]
            out[p + "attn.qkv.bias"] = torch.cat([b if b is not None else q_w.new_zeros(dim) for b in biases])
        gated = "mlp.gate_proj.weight" in parts
        for kind in ("weight", "bias"):
            if gated and f"mlp.gate_proj.{kind}" in parts:
                out[p + f"mlp.w12.{kind}"] = torch.cat([parts.pop(f"mlp.gate_proj.{kind}"),
                                                        parts.pop(f"mlp.up_proj.{kind}")])
                out[p + f"mlp.w3.{kind}"] = parts.pop(f"mlp.down_proj.{kind}")
            elif f"mlp.up_proj.{kind}" in parts:
                out[p + f"mlp.fc1.{kind}"] = parts.pop(f"mlp.up_proj.{kind}")
                out[p + f"mlp.fc2.{kind}"] = parts.pop(f"mlp.down_proj.{kind}")
        for name, value in parts.items():
            module, kind = name.rsplit(".", 1) if not name.endswith("lambda1") else (name, None)
            if name in _HF_BLOCK:
                out[p + _HF_BLOCK[name]] = value
            elif module in _HF_BLOCK:
                out[p + f"{_HF_BLOCK[module]}.{kind}"] = value
            else:
                raise CheckpointError(f"unexpected key layer.{i}.{name} in a transformers DINOv3 ViT checkpoint")
    return out


def normal_to_hf(state: Mapping[str, torch.Tensor], legacy: bool = False) -> dict[str, torch.Tensor]:
    """transformers' keys: `model.layer.N.*` (>= 5.5), or `layer.N.*` with `legacy` (4.56-5.3). The key bias,
    periods and `local_cls_norm` have no place there and are dropped."""
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    layer = "layer." if legacy else "model.layer."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
            continue
        if key == "rope_embed.periods" or key.startswith("local_cls_norm."):
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if not m:
            raise CheckpointError(f"unexpected key {key!r} in a DINOv3 ViT state dict")
        p, rest = f"{layer}{m.group(1)}.", m.group(2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                if not (kind == "bias" and name == "k"):
                    out[f"{p}attention.{name}_proj.{kind}"] = part.contiguous()
        elif rest.startswith("mlp."):
            _, name, kind = rest.split(".")
            if name == "w12":
                gate, up = value.chunk(2, dim=0)
                out[f"{p}mlp.gate_proj.{kind}"] = gate.contiguous()
                out[f"{p}mlp.up_proj.{kind}"] = up.contiguous()
            else:
                out[f"{p}mlp.{ {'fc1': 'up_proj', 'fc2': 'down_proj', 'w3': 'down_proj'}[name]}.{kind}"] = value
        elif rest in block:
            out[p + block[rest]] = value
        else:
            module, kind = rest.rsplit(".", 1)
            if module not in block:
                raise CheckpointError(f"unexpected key {key!r} in a DINOv3 ViT state dict")
            out[f"{p}{block[module]}.{kind}"] = value
    return out


# ---------------------------------------------------------------------------------------------------- timm
def timm_to_normal(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif key.endswith((".attn.q_bias", ".attn.v_bias", ".attn.k_bias", ".mlp.fc1_x.weight",
                           ".mlp.fc1_x.bias", "rope.periods")):
            continue  # assembled below (k_bias is a fixed zero buffer; periods are recomputed)
        elif key.endswith(".gamma_1") or key.endswith(".gamma_2"):
            out[key[: -len("gamma_1")] + ("ls1.gamma" if key.endswith("1") else "ls2.gamma")] = value
        elif ".mlp.fc1_g." in key:
            out[key.replace(".fc1_g.", ".w12.")] = torch.cat([value, state[key.replace(".fc1_g.", ".fc1_x.")]])
        elif ".mlp.fc2." in key and key.replace(".fc2.", ".fc1_g.") in state:
            out[key.replace(".fc2.", ".w3.")] = value
        else:
            out[key] = value
        if key.endswith(".attn.qkv.weight") and key.replace("qkv.weight", "q_bias") in state:
            q_bias = state[key.replace("qkv.weight", "q_bias")]
            v_bias = state[key.replace("qkv.weight", "v_bias")]
            out[key.replace(".weight", ".bias")] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def normal_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `*_dinov3_qkvb` layout when the model has q/v biases, else `*_dinov3`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("mask_token", "rope_embed.periods") or key.startswith("local_cls_norm."):
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key.endswith(".ls1.gamma") or key.endswith(".ls2.gamma"):
            out[key[: -len("ls1.gamma")] + ("gamma_1" if ".ls1." in key else "gamma_2")] = value
        elif key.endswith(".attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")] = q.contiguous()
            out[key.replace("qkv.bias", "v_bias")] = v.contiguous()
        elif ".mlp.w12." in key:
            gate, up = value.chunk(2, dim=0)
            out[key.replace(".w12.", ".fc1_g.")] = gate.contiguous()
            out[key.replace(".w12.", ".fc1_x.")] = up.contiguous()
        elif ".mlp.w3." in key:
            out[key.replace(".w3.", ".fc2.")] = value
        else:
            out[key] = value
    return out


def to_normal(state: Mapping[str, torch.Tensor], layout: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Any DINOv3 ViT layout -> (dinokit normal form, the layout it came in)."""
    layout = layout or detect_layout(state)
    if layout == "meta":
        return meta_to_normal(state), layout
    if layout == "hf":
        return hf_to_normal(state), layout
    if layout == "timm":
        return timm_to_normal(state), layout
    if layout == "dinokit":
        return dict(state), layout
    raise CheckpointError("this is not a DINOv3 ViT checkpoint: none of the keys of the Meta ('storage_tokens'), "
                          "transformers ('embeddings.register_tokens', 'layer.N.attention.q_proj') or timm "
                          f"('reg_token', 'blocks.N.gamma_1') layouts (first keys: {list(state)[:5]})")


def from_normal(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "meta":
        return normal_to_meta(state)
    if layout == "hf":
        return normal_to_hf(state)
    if layout == "hf-legacy":
        return normal_to_hf(state, legacy=True)
    if layout == "timm":
        return normal_to_timm(state)
    raise ValueError(f"unknown layout {layout!r}: use meta, hf, hf-legacy or timm")


# ---------------------------------------------------------------------------------------------------- config
def periods_kind(periods: torch.Tensor, head_dim: int, base: float = 100.0) -> str:
    """Which formula a file's `rope_embed.periods` follow: "bf16" (Meta's released files) or "fp32"."""
    from dinokit.layers.rope import rope_periods

    for kind in ("bf16", "fp32"):
        if torch.equal(periods.float().cpu(), rope_periods(head_dim, base, periods_dtype=kind)):
            return kind
    raise CheckpointError(f"the checkpoint's RoPE periods {periods[:4].tolist()}... follow neither the float32 nor "
                          f"the bfloat16 values of base {base} for head width {head_dim}; pass rope_theta=<base> "
                          f"(and num_attention_heads) for this checkpoint")


def infer_config_kwargs(state: Mapping[str, torch.Tensor], layout: str, known: Mapping | None = None) -> dict:
    """DINOv3ViTConfig keyword arguments of a normal-form state dict: shapes give the architecture; the head count
    comes from the periods (head width = 4 x their number), `known`, or the released widths; the periods choice
    follows the source (a Meta file's own values, float32 for transformers/timm) unless `known` sets it."""
    known = dict(known or {})
    for key in ("cls_token", "patch_embed.proj.weight", "norm.weight"):
        if key not in state:
            raise CheckpointError(f"checkpoint has no {key!r}: not a DINOv3 ViT backbone")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    gated = "blocks.0.mlp.w12.weight" in state
    hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2 if gated else state["blocks.0.mlp.fc1.weight"].shape[0]
    heads = known.get("num_attention_heads")
    periods = state.get("rope_embed.periods")
    if heads is None and periods is not None:
        heads = dim // (4 * periods.numel())
    heads = heads or OFFICIAL_HEADS.get(dim)
    if heads is None or dim % heads:
        raise CheckpointError(f"cannot tell the number of attention heads of this {dim}-wide DINOv3 checkpoint; "
                              f"pass num_attention_heads=N (or put it in a <name>.config.json beside the file)")
    has_bias = "blocks.0.attn.qkv.bias" in state
    kwargs = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=hidden,
                  patch_size=state["patch_embed.proj.weight"].shape[-1],
                  num_channels=state["patch_embed.proj.weight"].shape[1],
                  num_register_tokens=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
                  use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                  query_bias=has_bias, value_bias=has_bias, key_bias=False,
                  untie_global_and_local_cls_norm="local_cls_norm.weight" in state)
    if layout in ("meta", "dinokit") and periods is not None and "rope_periods" not in known:
        kwargs["rope_periods"] = periods_kind(periods, dim // heads, known.get("rope_theta", 100.0))
    else:
        kwargs["rope_periods"] = "fp32"
    kwargs.update(known)
    return kwargs
