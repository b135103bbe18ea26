"""The DINO / iBOT projection head (Meta's dinov2/layers/dino_head.py).

MLP (Linear → GELU → ... → Linear to the bottleneck), L2-normalisation, then a weight-normalised
`Linear(bottleneck, K, bias=False)` whose norm `g` starts at 1 and is trained.

Weight norm: `torch.nn.utils.parametrizations.weight_norm` (the classic hook-based `torch.nn.utils.weight_norm`
that Meta uses is deprecated). The computation is the same, `W = g · v / ‖v‖` row-wise (dim 0); only the
state-dict keys differ: ours are `last_layer.parametrizations.weight.original0` (g) and `...original1` (v),
Meta's `last_layer.weight_g` and `last_layer.weight_v`. Loading a state dict with Meta's keys works as is
(torch converts them on load); `weight_norm_keys_to_meta` converts ours for Meta's code.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm

_OURS_TO_META = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim,
        out_dim,
        use_bn=False,
        nlayers=3,
        hidden_dim=2048,
        bottleneck_dim=256,
        mlp_bias=True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim=hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim=None, use_bn=False, bias=True):
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


def weight_norm_keys_to_meta(state_dict: dict) -> dict:
    """Rename parametrized weight-norm keys (`X.parametrizations.weight.original0/1`) to Meta's `X.weight_g/v`."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, meta in _OURS_TO_META.items():
            if key == ours or key.endswith("." + ours):
                key = key[: len(key) - len(ours)] + meta
                break
        renamed[key] = value
    return renamed
