"""DINOv3 ViT: dinokit vs transformers' DINOv3ViTModel/Backbone and timm's `vit_*_patch16_dinov3*` on the same
random weights, for every released variant's shape (real widths, heads and FFN rules, depth cut to 2-3), fp32 CPU.

The reference models are built with random weights; dinokit gets them through its own checkpoint readers, so
the key maps are exercised too. timm asserts sizes divisible by 16, so the non-multiple size is checked
against transformers only (both floor the grid, dinov3.md §0.9).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dinokit import checkpoints_dinov3 as ckpt3
from dinokit.models.dinov3_vit import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel

from helpers import images, max_diff, randomize_

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-5
SIZES = [(224, 224), (256, 320), (232, 250)]  # the last is not a multiple of 16
# 7B's width at 80 patches keeps the test in seconds, not minutes (224² costs ~25 s a forward on 2 cores); the
# second size is not a multiple of 16 and floors to the same 8 x 10 grid
HUGE_SIZES = [(128, 160), (136, 170)]

# name -> (transformers config kwargs with the real width/heads/FFN, depth, timm model name, sizes)
VARIANTS = {
    "vits16": (dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536), 3,
               "vit_small_patch16_dinov3_qkvb", SIZES),
    "vits16plus": (dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, use_gated_mlp=True,
                        hidden_act="silu"), 3, "vit_small_plus_patch16_dinov3_qkvb", SIZES),
    "vitb16": (dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072), 3,
               "vit_base_patch16_dinov3_qkvb", SIZES),
    "vitl16": (dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096), 2,
               "vit_large_patch16_dinov3_qkvb", SIZES),
    "vith16plus": (dict(hidden_size=1280, num_attention_heads=20, intermediate_size=5120, use_gated_mlp=True,
                        hidden_act="silu"), 2, "vit_huge_plus_patch16_dinov3_qkvb", SIZES),
    "vit7b16": (dict(hidden_size=4096, num_attention_heads=32, intermediate_size=8192, use_gated_mlp=True,
                     hidden_act="silu", query_bias=False, value_bias=False), 2, "vit_7b_patch16_dinov3",
                HUGE_SIZES),
}
# Ordered by variant so each variant's models are built once (the cache holds one variant at a time).
CASES = [(name, ref, size) for name, spec in VARIANTS.items() for ref in ("transformers", "timm")
         for size in spec[3] if ref == "transformers" or (size[0] % 16 == 0 and size[1] % 16 == 0)]


def _ids(case):
    return f"{case[0]}-{case[1]}-{case[2][0]}x{case[2][1]}"


@functools.lru_cache(maxsize=1)
def _models(name: str):
    """(transformers model, transformers backbone, dinokit model, dinokit backbone) on the same random weights."""
    kwargs, depth, _, _ = VARIANTS[name]
    hf_config = transformers.DINOv3ViTConfig(num_hidden_layers=depth, num_register_tokens=4,
                                             out_indices=list(range(depth + 1)), **kwargs)
    hf_config._attn_implementation = "eager"
    theirs = randomize_(transformers.DINOv3ViTModel(hf_config), seed=len(name)).eval()
    state = theirs.state_dict()
    hf_backbone = transformers.DINOv3ViTBackbone(hf_config).eval()
    for part in ("embeddings", "rope_embeddings", "model", "norm"):  # the same weights, shared, not copied
        setattr(hf_backbone, part, getattr(theirs, part))
    normal, layout = ckpt3.to_normal(state)
    assert layout == "hf"
    config = DINOv3ViTConfig(**ckpt3.infer_config_kwargs(normal, layout), out_indices=list(range(depth + 1)))
    if name == "vit7b16":
        # 7B carries Meta's untied local-crop CLS norm; it must be present yet change nothing at inference (random
        # values, unlike the final norm's, so that applying it to the CLS would show)
        config.untie_global_and_local_cls_norm = True
        gen = torch.Generator().manual_seed(7)
        normal = {**normal, "local_cls_norm.weight": 2.0 + torch.rand(4096, generator=gen),
                  "local_cls_norm.bias": torch.randn(4096, generator=gen)}
    ours = DINOv3ViTModel(config).eval()
    ours.load_meta_state_dict(normal)
    if config.untie_global_and_local_cls_norm:
        assert torch.equal(ours.vit.local_cls_norm.weight, normal["local_cls_norm.weight"])
    tiny = {k: v for k, v in config.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
    backbone = DINOv3ViTBackbone(DINOv3ViTConfig(**{**tiny, "num_hidden_layers": 1})).eval()
    backbone.vit = ours.vit  # shared weights
    backbone.config = config
    return theirs, hf_backbone, ours, backbone


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dinov3_vit_parity(case):
    name, reference, size = case
    if reference == "timm":
        _check_timm(name, size)
    else:
        _check_transformers(name, size)


def _check_transformers(name, size):
    """last_hidden_state, pooler_output, every hidden_states entry and every backbone feature map <= 1e-5."""
    height, width = size
    theirs, hf_backbone, ours, backbone = _models(name)
    x = images(2 if height * width <= 256 * 320 and ours.config.hidden_size < 1280 else 1, height, width)
    with torch.no_grad():
        a = ours(x, output_hidden_states=True)
        b = theirs(pixel_values=x, output_hidden_states=True)
        maps_ours = backbone(x).feature_maps
        maps_theirs = hf_backbone(pixel_values=x).feature_maps
    assert a.last_hidden_state.shape == (x.shape[0], 5 + (height // 16) * (width // 16), ours.config.hidden_size)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) < TOL
    assert max_diff(a.pooler_output, b.pooler_output) < TOL
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
    for mine, ref in zip(a.hidden_states, b.hidden_states):
        assert max_diff(mine, ref) < TOL
    assert len(maps_ours) == len(maps_theirs) == ours.config.num_hidden_layers + 1
    for mine, ref in zip(maps_ours, maps_theirs):
        assert mine.shape == ref.shape == (x.shape[0], ours.config.hidden_size, height // 16, width // 16)
        assert max_diff(mine, ref) < TOL


def _check_timm(name, size):
    """timm's forward_features (the normed tokens) <= 1e-5, with fp32 periods, loaded from dinokit's timm layout."""
    height, width = size
    _, depth, timm_name, _ = VARIANTS[name]
    _, _, ours, _ = _models(name)
    reference = timm.create_model(timm_name, pretrained=False, depth=depth, num_classes=0).eval()
    backbone, _ = ours.meta_state_dict()
    reference.load_state_dict(ckpt3.normal_to_timm(backbone), strict=True)
    assert ours.config.rope_periods == "fp32"
    x = images(1, height, width, seed=1)
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, reference.forward_features(x)) < TOL


def test_attentions_and_masked_positions_match_transformers():
    theirs, _, ours, _ = _models("vits16")
    x = images(2, 224, 224)
    mask = torch.rand(2, 196, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        mask_token = torch.randn(1, 1, 384)
        theirs.embeddings.mask_token.copy_(mask_token)
        ours.vit.mask_token.copy_(mask_token[0])
        a = ours(x, bool_masked_pos=mask, output_attentions=True)
        b = theirs(pixel_values=x, bool_masked_pos=mask, output_attentions=True)
        tuple_out = ours(x, return_dict=False, output_hidden_states=True)
        tuple_ref = theirs(pixel_values=x, return_dict=False, output_hidden_states=True)
    assert len(a.attentions) == len(b.attentions) == 3
    for mine, ref in zip(a.attentions, b.attentions):
        assert mine.shape == (2, 6, 201, 201) and max_diff(mine, ref) < TOL
    assert max_diff(a.last_hidden_state, b.last_hidden_state) < TOL
    # return_dict=False: transformers' tuple, element for element (last_hidden_state, pooler_output, hidden_states)
    assert isinstance(tuple_out, tuple) and len(tuple_out) == len(tuple_ref) == 3
    assert max_diff(list(tuple_out), list(tuple_ref)) < TOL


# ---------------------------------------------------------------------------------------------- Meta's periods
def _reference_meta_forward(meta: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv3 written out from the spec's formulas on a Meta-layout state dict (independent of dinokit's code):
    storage tokens after CLS, bias * bias_mask, RoPE with the file's periods on patch q/k, SwiGLU w3(silu(w1) * w2)."""
    import torch.nn.functional as F

    dim = meta["cls_token"].shape[-1]
    head_dim = dim // heads
    tokens = F.conv2d(x, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=16)
    h, w = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    b = x.shape[0]
    t = torch.cat([meta["cls_token"].expand(b, -1, -1), meta["storage_tokens"].expand(b, -1, -1), tokens], dim=1)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    periods = meta["rope_embed.periods"].double()
    ang_y = 2 * math.pi * yy.reshape(-1, 1) / periods
    ang_x = 2 * math.pi * xx.reshape(-1, 1) / periods
    angles = torch.cat([ang_y, ang_x, ang_y, ang_x], dim=1)
    cos, sin = angles.cos(), angles.sin()

    def rope(v):
        pre, pat = v[:, :, :5], v[:, :, 5:].double()
        a, c = pat[..., : head_dim // 2], pat[..., head_dim // 2:]
        return torch.cat([pre, (pat * cos + torch.cat([-c, a], -1) * sin).to(v.dtype)], dim=2)

    depth = 1 + max(int(k.split(".")[1]) for k in meta if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), meta[p + "norm1.weight"], meta[p + "norm1.bias"], eps=1e-5)
        bias = meta[p + "attn.qkv.bias"] * meta[p + "attn.qkv.bias_mask"]
        q, k, v = F.linear(y, meta[p + "attn.qkv.weight"], bias).reshape(b, -1, 3, heads, head_dim).permute(
            2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(b, -1, dim), meta[p + "attn.proj.weight"], meta[p + "attn.proj.bias"])
        t = t + meta[p + "ls1.gamma"] * att
        y = F.layer_norm(t, (dim,), meta[p + "norm2.weight"], meta[p + "norm2.bias"], eps=1e-5)
        gate = F.linear(y, meta[p + "mlp.w1.weight"], meta[p + "mlp.w1.bias"])
        up = F.linear(y, meta[p + "mlp.w2.weight"], meta[p + "mlp.w2.bias"])
        t = t + meta[p + "ls2.gamma"] * F.linear(F.silu(gate) * up, meta[p + "mlp.w3.weight"], meta[p + "mlp.w3.bias"])
    return F.layer_norm(t, (dim,), meta["norm.weight"], meta["norm.bias"], eps=1e-5)


def _meta_file(tmp_path):
    """A Meta-layout ViT-S+ file as Meta's hub writes it: bf16-valued periods, a 1/0/1 bias_mask with a non-zero
    value under the masked key part, [1, D] mask token, storage tokens, w1/w2/w3."""
    _, _, ours, _ = _models("vits16plus")
    backbone, _ = ours.meta_state_dict()
    meta = ckpt3.normal_to_meta(backbone)
    meta["rope_embed.periods"] = (100 ** (torch.arange(16) / 16)).to(torch.bfloat16).float()
    for key in [k for k in meta if k.endswith("qkv.bias")]:
        meta[key] = meta[key].clone()
        meta[key][384:768] = 3.0  # Meta's forward multiplies it by the mask's 0: it must not leak in
    torch.save(meta, tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth")
    return tmp_path / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", meta


def test_meta_file_runs_with_its_bf16_periods_as_the_formulas_say(tmp_path):
    from dinokit import load_checkpoint

    path, meta = _meta_file(tmp_path)
    assert set(meta["rope_embed.periods"].tolist()) >= {1.3359375, 1.78125, 75.0}  # the values in dinov3.md §0.1
    model = load_checkpoint(path)
    assert type(model).__name__ == "DINOv3ViTModel" and model.config.rope_periods == "bf16"
    assert torch.equal(model.vit.rope_embed.periods, meta["rope_embed.periods"])
    x = images(2, 224, 288)
    with torch.no_grad():
        expected = _reference_meta_forward(meta, x, heads=6)
        assert max_diff(model(x).last_hidden_state, expected) < TOL
        # the choice is overridable, and it matters far beyond the tolerance (why it is a per-load setting)
        fp32 = load_checkpoint(path, rope_periods="fp32")
        assert fp32.config.rope_periods == "fp32"
        assert max_diff(fp32(x).last_hidden_state, expected) > 10 * TOL


def test_periods_follow_the_formula():
    from dinokit.layers.rope import rope_periods

    assert torch.allclose(rope_periods(64), torch.tensor([100 ** (i / 16) for i in range(16)]), rtol=1e-6)
    assert rope_periods(64, periods_dtype="bf16")[:3].tolist() == [1.0, 1.3359375, 1.78125]
    assert rope_periods(128).shape == (32,) and abs(rope_periods(128)[-1].item() - 100 ** (31 / 32)) < 1e-3
