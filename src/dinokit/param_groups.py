"""Optimizer parameter groups with layer-wise lr decay (Meta's dinov2/utils/param_groups.py and train.py); shared by
SSL training and fine-tuning, so it sits below both.

Each trainable parameter gets
- `lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id)`: layer_id 0 for the backbone's `cls_token`,
  `pos_embed`, `mask_token`, `register_tokens` and `patch_embed.*` (patch_embed additionally × patch_embed_lr_mult),
  i + 1 for `blocks.i.*`, n_blocks + 1 (multiplier 1) for the final norm and everything outside the backbone;
- `wd_multiplier = 0` for names ending in `.bias` or containing `norm` or `gamma`, else 1;
- `is_last_layer` for the heads' `last_layer` (its lr is 0 while it is frozen, see `apply_optim_scheduler`).

The model may be a backbone (Meta's parameter names, attribute `n_blocks` or a `blocks` list) or contain one at
any depth (`backbone.`, `student.backbone.`, ...). Unlike Meta's, which only looks at the top level, the backbone
is found by walking the modules, so a whole student (backbone + heads) also gets the layer-wise decay.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

logger = logging.getLogger(__name__)

_LAYER0_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed")


def _find_backbones(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """{prefix: (n_blocks, chunked_blocks)} of the outermost modules that look like a ViT backbone ("" = model)."""
    backbones: dict[str, tuple[int, bool]] = {}
    for prefix, module in model.named_modules():
        if any(p == "" or prefix.startswith(p + ".") for p in backbones):
            continue  # inside a backbone already found
        if hasattr(module, "n_blocks"):
            backbones[prefix] = (int(module.n_blocks), bool(getattr(module, "chunked_blocks", False)))
        elif isinstance(getattr(module, "blocks", None), (nn.ModuleList, nn.Sequential)):
            backbones[prefix] = (len(module.blocks), False)
    return backbones


def _decay_exponent(name: str, backbones: dict[str, tuple[int, bool]]) -> int:
    """n_blocks + 1 - layer_id of a parameter; 0 (multiplier 1) outside the backbones."""
    for prefix, (n_blocks, chunked_blocks) in backbones.items():
        if prefix and not name.startswith(prefix + "."):
            continue
        relative = name[len(prefix) + 1 :] if prefix else name
        if relative.startswith(_LAYER0_NAMES):
            layer_id = 0
        elif relative.startswith("blocks."):
            # chunked (FSDP) backbones name blocks `blocks.<chunk>.<i>.*` with a global index i
            layer_id = int(relative.split(".")[2 if chunked_blocks else 1]) + 1
        else:
            layer_id = n_blocks + 1
        return n_blocks + 1 - layer_id
    return 0


def get_params_groups_with_decay(model, lr_decay_rate=1.0, patch_embed_lr_mult=1.0):
    """One dict per trainable parameter: params, is_last_layer, lr_multiplier, wd_multiplier, name."""
    backbones = _find_backbones(model)
    all_param_groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = raw_name.replace("_fsdp_wrapped_module.", "")
        d = {
            "params": param,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": lr_decay_rate ** _decay_exponent(raw_name, backbones),
            "wd_multiplier": 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0,
            "name": name,
        }
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        all_param_groups.append(d)
        logger.debug("%s: lr_multiplier %s, wd_multiplier %s", name, d["lr_multiplier"], d["wd_multiplier"])
    return all_param_groups


def fuse_params_groups(all_params_groups, keys=("lr_multiplier", "wd_multiplier", "is_last_layer")):
    """Merge per-parameter groups with equal `keys` into one optimizer group each (list of dicts)."""
    fused_params_groups = defaultdict(lambda: {"params": []})
    for d in all_params_groups:
        identifier = "".join(f"{k}{d[k]}_" for k in keys)
        for k in keys:
            fused_params_groups[identifier][k] = d[k]
        fused_params_groups[identifier]["params"].append(d["params"])
    return list(fused_params_groups.values())


def apply_optim_scheduler(optimizer, lr, wd, last_layer_lr):
    """Set each group's lr and weight decay for this iteration (Meta's train.py): `lr · lr_multiplier`, or
    `last_layer_lr · lr_multiplier` for the heads' last layer, and `wd · wd_multiplier`."""
    for param_group in optimizer.param_groups:
        param_group["weight_decay"] = wd * param_group["wd_multiplier"]
        base = last_layer_lr if param_group["is_last_layer"] else lr
        param_group["lr"] = base * param_group["lr_multiplier"]
