"""Shared test helpers: small DINOv2 configs with every parameter randomised (so each one matters)."""

from __future__ import annotations

import torch

from dinokit import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig


def small_config(registers: int = 0, swiglu: bool = False, image_size: int = 518, **kw) -> Dinov2Config:
    common = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=image_size,
                  patch_size=14, use_swiglu_ffn=swiglu)
    common.update(kw)
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    return Dinov2Config(**common)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random, non-trivial value (LayerScale around 1, norms around 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith(("gamma", "lambda1")) or ("norm" in name and name.endswith("weight")):
            param.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            param.copy_(0.02 * noise)
        elif "token" in name or "pos_embed" in name or "position_embeddings" in name:
            param.copy_(0.5 * noise)
        else:
            param.copy_(noise * (param.shape[-1] ** -0.5 if param.dim() > 1 else 0.02))
    return model


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"length {len(a)} vs {len(b)}"
        return max(max_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def save_tiny_model(path, image_size: int = 28, seed: int = 0) -> str:
    """A 32-wide, 1-block, 2-head ViT/14 (seeded init) saved with save_pretrained: the model of the app tests."""
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                             patch_size=14)).save_pretrained(path)
    return str(path)


def tiny_dinov3_config(**kw):
    """A DINOv3 ViT of the real shape rules, scaled down: patch 16, 4 registers, RoPE, 64 wide, 2 blocks, 2 heads."""
    from dinokit.models.dinov3_vit import DINOv3ViTConfig

    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_register_tokens=4, layerscale_value=1.0, image_size=32)
    return DINOv3ViTConfig(**{**settings, **kw})


def save_tiny_dinov3(path, seed: int = 0, **kw):
    """`tiny_dinov3_config(**kw)` with every parameter randomised (seeded), saved with save_pretrained."""
    from dinokit.models.dinov3_vit import DINOv3ViTModel

    torch.manual_seed(seed)
    randomize_(DINOv3ViTModel(tiny_dinov3_config(**kw)), seed=seed).save_pretrained(path)
    return path
