"""Schedules, lr scaling and parameter groups against the numbers of training.md §1-2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinokit.ssl import (
    CosineScheduler,
    DINOHead,
    apply_optim_scheduler,
    fuse_params_groups,
    get_params_groups_with_decay,
    scaled_lr,
)

EPOCH = 1250  # Meta's OFFICIAL_EPOCH_LENGTH


# --- schedules -------------------------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_linearly_then_follows_the_cosine_and_stays_at_final():
    base, final, total, warmup = 0.004, 1e-6, 100, 10
    schedule = CosineScheduler(base, final, total, warmup_iters=warmup, start_warmup_value=0)
    assert len(schedule) == total
    np.testing.assert_allclose([schedule[i] for i in range(warmup)], np.linspace(0, base, warmup))
    assert schedule[warmup - 1] == pytest.approx(base)  # end point included
    n_cosine = total - warmup
    for i in range(n_cosine):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n_cosine))
        assert schedule[warmup + i] == pytest.approx(expected)
    assert schedule[total] == final and schedule[10 * total] == final


def test_cosine_schedule_freeze_iterations_are_zero_before_warmup():
    schedule = CosineScheduler(1.0, 0.5, 20, warmup_iters=5, start_warmup_value=0.2, freeze_iters=3)
    assert [schedule[i] for i in range(3)] == [0, 0, 0]
    assert schedule[3] == pytest.approx(0.2) and schedule[7] == pytest.approx(1.0)


def test_default_dino_schedules_have_the_spec_values():
    total = 100 * EPOCH
    lr = CosineScheduler(0.004, 1e-6, total, warmup_iters=10 * EPOCH)
    assert lr[0] == 0 and lr[10 * EPOCH - 1] == pytest.approx(0.004) and lr[10 * EPOCH] == pytest.approx(0.004)
    assert lr[total - 1] == pytest.approx(1e-6, abs=1e-9)
    wd = CosineScheduler(0.04, 0.4, total)  # rising
    assert wd[0] == pytest.approx(0.04) and wd[total // 2] == pytest.approx(0.22) and wd[total] == 0.4
    momentum = CosineScheduler(0.992, 1.0, total)
    assert momentum[0] == pytest.approx(0.992) and momentum[total] == 1.0
    # teacher temperature: linear 0.04 -> 0.07 over 30 epochs, then 0.07 (Meta's build_schedulers)
    temp = CosineScheduler(0.07, 0.07, 30 * EPOCH, warmup_iters=30 * EPOCH, start_warmup_value=0.04)
    assert temp[0] == pytest.approx(0.04) and temp[15 * EPOCH] == pytest.approx(0.055, abs=1e-6)
    assert temp[30 * EPOCH - 1] == pytest.approx(0.07) and temp[99 * EPOCH] == 0.07


def test_schedule_with_warmup_longer_than_training_is_a_clear_error():
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineScheduler(1.0, 0.0, 10, warmup_iters=8, freeze_iters=5)


def test_lr_scales_with_the_square_root_of_the_batch_relative_to_1024():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    assert scaled_lr(2e-4, 4096) == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="scaling rule"):
        scaled_lr(0.004, 256, "cubic")


# --- parameter groups ------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Meta's block parameter names at a tiny width."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)


class _StandInViT(nn.Module):
    """Meta's DinoVisionTransformer parameter names (ViT-L depth, tiny width): cheap stand-in for param groups."""

    def __init__(self, depth: int = 24, dim: int = 4, num_register_tokens: int = 4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.n_blocks = depth


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_vit_large_layerwise_decay_reproduces_the_spec_multipliers():
    groups = _by_name(get_params_groups_with_decay(_StandInViT(), lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    for token in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert groups[token]["lr_multiplier"] == pytest.approx(0.0718, abs=5e-5)
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.01436, abs=1e-5)
    assert groups["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.0798, abs=5e-5)
    assert groups["blocks.23.mlp.fc2.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert groups["blocks.11.norm1.weight"]["lr_multiplier"] == pytest.approx(0.9**13)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0


def test_weight_decay_is_off_for_biases_norms_and_layerscale_and_on_for_tokens():
    groups = _by_name(get_params_groups_with_decay(_StandInViT(depth=2), lr_decay_rate=0.9))
    no_decay = {n for n, g in groups.items() if g["wd_multiplier"] == 0.0}
    assert no_decay == {n for n in groups if n.endswith(".bias") or "norm" in n or "gamma" in n}
    for name in ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
                 "blocks.1.attn.qkv.weight"):
        assert groups[name]["wd_multiplier"] == 1.0
    assert {"blocks.0.ls1.gamma", "blocks.1.norm2.weight", "norm.bias", "blocks.0.mlp.fc1.bias"} <= no_decay


@pytest.mark.parametrize("prefix", ["backbone", "student.backbone"])
def test_backbone_nested_under_a_prefix_gets_the_same_multipliers_and_heads_get_one(prefix):
    outer = nn.ModuleDict()
    holder = outer
    for part in prefix.split(".")[:-1]:
        holder[part] = nn.ModuleDict()
        holder = holder[part]
    holder[prefix.split(".")[-1]] = _StandInViT()
    holder["dino_head"] = DINOHead(4, 10, hidden_dim=8, bottleneck_dim=4)

    groups = _by_name(get_params_groups_with_decay(outer, lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    assert groups[f"{prefix}.cls_token"]["lr_multiplier"] == pytest.approx(0.9**25)
    assert groups[f"{prefix}.patch_embed.proj.bias"]["lr_multiplier"] == pytest.approx(0.2 * 0.9**25)
    assert groups[f"{prefix}.blocks.0.attn.proj.weight"]["lr_multiplier"] == pytest.approx(0.9**24)
    head_prefix = prefix.rsplit(".", 1)[0] + ".dino_head" if "." in prefix else "dino_head"
    head = {n: g for n, g in groups.items() if n.startswith(head_prefix)}
    assert head and all(g["lr_multiplier"] == 1.0 for g in head.values())
    last = {n: g for n, g in head.items() if "last_layer" in n}
    assert len(last) == 2 and all(g["is_last_layer"] and g["wd_multiplier"] == 1.0 for g in last.values())
    assert not any(g["is_last_layer"] for n, g in groups.items() if "last_layer" not in n)


def test_frozen_parameters_are_left_out():
    model = _StandInViT(depth=2)
    model.mask_token.requires_grad_(False)
    names = {g["name"] for g in get_params_groups_with_decay(model)}
    assert "mask_token" not in names and "cls_token" in names


def test_fused_groups_partition_the_parameters_by_multipliers():
    model = nn.ModuleDict({"backbone": _StandInViT(depth=3), "dino_head": DINOHead(4, 10, hidden_dim=8,
                                                                                    bottleneck_dim=4)})
    groups = get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    fused = fuse_params_groups(groups)
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    assert len(fused) == len(keys)
    assert sum(len(g["params"]) for g in fused) == len(groups) == len(list(model.parameters()))
    for g in fused:
        members = [d for d in groups if any(d["params"] is p for p in g["params"])]
        assert all((d["lr_multiplier"], d["wd_multiplier"], d["is_last_layer"])
                   == (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for d in members)


def test_last_layer_does_not_move_while_its_lr_schedule_is_frozen():
    torch.manual_seed(0)
    head = DINOHead(4, 10, hidden_dim=8, bottleneck_dim=4)
    optimizer = torch.optim.AdamW(fuse_params_groups(get_params_groups_with_decay(head)))
    lr = CosineScheduler(0.1, 0.01, 4)
    last_layer_lr = CosineScheduler(0.1, 0.01, 4)
    last_layer_lr.schedule[:2] = 0  # Meta freezes the last layer for freeze_last_layer_epochs this way
    wd = CosineScheduler(0.04, 0.4, 4)

    def step(it):
        apply_optim_scheduler(optimizer, lr[it], wd[it], last_layer_lr[it])
        optimizer.zero_grad()
        head(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()

    last_before = [p.detach().clone() for p in head.last_layer.parameters()]
    mlp_before = head.mlp[0].weight.detach().clone()
    for it in range(2):
        step(it)
    assert all(torch.equal(a, b) for a, b in zip(last_before, head.last_layer.parameters()))
    assert not torch.equal(mlp_before, head.mlp[0].weight)
    step(2)
    assert not all(torch.equal(a, b) for a, b in zip(last_before, head.last_layer.parameters()))
    for group in optimizer.param_groups:
        expected_lr = (last_layer_lr[2] if group["is_last_layer"] else lr[2]) * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(wd[2] * group["wd_multiplier"])
