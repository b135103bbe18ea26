"""timm parity on converted weights, Meta's offset interpolation against a direct computation, Meta layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit import checkpoints as ckpt
from dinokit.loading import load_checkpoint

from helpers import images, max_diff, randomize_, small_config

TOL = 1e-5
SIZES = [(224, 224), (518, 518), (224, 308)]
# The test models are 128 wide, not a released DINOv2 width, so their head count has to be given.
HEADS = {"num_attention_heads": 2}


@pytest.mark.parametrize("name,registers", [("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 4)])
def test_timm_matches_dinokit_on_converted_weights(tmp_path, name, registers):
    timm = pytest.importorskip("timm")
    # timm's DINOv2 recipe (LayerScale, registers, folded class position) at a smaller width and depth
    small = dict(pretrained=False, dynamic_img_size=True, num_classes=0, embed_dim=128, depth=3, num_heads=2)
    theirs = timm.create_model(name, **small).eval()
    randomize_(theirs, seed=11)
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    ours = load_checkpoint(path, **HEADS)  # timm layout detected: antialiased size mode, like timm
    assert ours.config.num_register_tokens == registers
    assert ours.config.interpolate_antialias and ours.config.interpolate_offset == 0.0
    for size in SIZES:
        x = images(2, *size, seed=12)
        with torch.no_grad():
            assert max_diff(ours(x).last_hidden_state, theirs.forward_features(x)) < TOL
    # and back: dinokit -> timm layout loads strictly into timm
    timm_state = ckpt.meta_to_timm(ours.meta_state_dict()[0])
    again = timm.create_model(name, **small).eval()
    again.load_state_dict(timm_state, strict=True)
    x = images(1, 224, 308, seed=13)
    with torch.no_grad():
        assert max_diff(again.forward_features(x), theirs.forward_features(x)) < TOL


def reference_meta_forward(state: dict, x: torch.Tensor, heads: int, offset: float = 0.1) -> torch.Tensor:
    """model.md §2-§3 written out directly on a Meta state dict: final-normed tokens."""
    B, _, H, W = x.shape
    p = state["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=p)
    h0, w0 = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    pos = state["pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    dim = pos.shape[-1]
    if h0 * w0 == M * M and H == W:
        patch_pos = pos[:, 1:]
    else:
        grid = pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + offset) / M, (w0 + offset) / M), mode="bicubic",
                             antialias=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    x = torch.cat([state["cls_token"].expand(B, -1, -1) + pos[:, :1], tokens + patch_pos], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = lambda n, i=i: state[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(x, (dim,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, b("attn.qkv.weight"), b("attn.qkv.bias")).reshape(B, -1, 3, heads, dim // heads) \
            .permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, -1, dim)
        x = x + b("ls1.gamma") * F.linear(y, b("attn.proj.weight"), b("attn.proj.bias"))
        y = F.layer_norm(x, (dim,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"),
                     b("mlp.fc2.bias"))
        x = x + b("ls2.gamma") * y
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def meta_state():
    model = randomize_(dinokit.Dinov2Model(small_config()), seed=21)
    return {k: v.clone() for k, v in model.meta_state_dict()[0].items()}


@pytest.mark.parametrize("size", [(224, 224), (308, 224), (518, 518)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_meta_checkpoint_uses_offset_interpolation_exactly(tmp_path, meta_state, size):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(meta_state, path)
    ours = load_checkpoint(path, **HEADS)
    assert ours.config.interpolate_offset == 0.1 and not ours.config.interpolate_antialias
    x = images(2, *size, seed=22)
    with torch.no_grad():
        expected = reference_meta_forward(meta_state, x, heads=2)
        assert max_diff(ours(x).last_hidden_state, expected) < TOL
        assert max_diff(ours.forward_features(x)["x_norm_clstoken"], expected[:, 0]) < TOL


def test_interpolation_modes_differ_off_the_native_grid(meta_state):
    """The three behaviours of model.md §3 are really distinct at 224 (and identical at 518)."""
    outs = {}
    for offset, antialias in [(0.1, False), (0.0, True), (0.0, False)]:
        model = dinokit.Dinov2Model(small_config(interpolate_offset=offset, interpolate_antialias=antialias))
        model.load_meta_state_dict(meta_state)
        with torch.no_grad():
            outs[(offset, antialias)] = (model(images(1, 224, 224)).last_hidden_state,
                                         model(images(1, 518, 518)).last_hidden_state)
    values = list(outs.values())
    for i in range(3):
        for j in range(i + 1, 3):
            assert max_diff(values[i][0], values[j][0]) > 1e-4
            assert max_diff(values[i][1], values[j][1]) == 0.0


def test_training_checkpoint_layouts_load_the_teacher_backbone(tmp_path, meta_state):
    chunked = {}
    for key, value in meta_state.items():  # block_chunks=2 with 3 blocks: chunk 0 has blocks 0-1, chunk 1 block 2
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // 2}.{i}." + key.split(".", 2)[2]
        chunked[key] = value
    nested = {"teacher": {**{f"backbone.{k}": v for k, v in chunked.items()},
                          "dino_head.last_layer.weight_g": torch.ones(8, 1)}}
    flat = {**{f"teacher.backbone.{k}": v for k, v in meta_state.items()},
            **{f"student.backbone.{k}": v * 2 for k, v in meta_state.items()}}
    x = images(1, 224, 224, seed=23)
    with torch.no_grad():
        expected = reference_meta_forward(meta_state, x, heads=2)
        for name, state in [("chunked.pth", chunked), ("teacher_checkpoint.pth", nested), ("model.pth", flat)]:
            torch.save(state, tmp_path / name)
            assert max_diff(load_checkpoint(tmp_path / name, **HEADS)(x).last_hidden_state, expected) < TOL, name


def test_meta_linear_head_follows_meta_classifier(tmp_path, meta_state):
    torch.save(meta_state, tmp_path / "backbone.pth")
    head = {"weight": torch.randn(10, 128 * 2), "bias": torch.randn(10)}
    torch.save(head, tmp_path / "linear_head.pth")
    model = load_checkpoint(tmp_path / "backbone.pth", head=tmp_path / "linear_head.pth", **HEADS)
    assert isinstance(model, dinokit.Dinov2ForImageClassification)
    x = images(2, 224, 224, seed=24)
    with torch.no_grad():  # Meta's _LinearClassifierWrapper, layers=1
        f = model.dinov2.vit.forward_features(x)
        linear_input = torch.cat([f["x_norm_clstoken"], f["x_norm_patchtokens"].mean(1)], dim=1)
        assert max_diff(model(x).logits, F.linear(linear_input, head["weight"], head["bias"])) < TOL


def test_linear4_head_on_four_block_model(tmp_path):
    model = randomize_(dinokit.Dinov2Model(small_config(num_hidden_layers=5)), seed=25)
    torch.save(model.meta_state_dict()[0], tmp_path / "b.pth")
    head = {"weight": torch.randn(6, 128 * 5), "bias": torch.randn(6)}
    torch.save(head, tmp_path / "linear4.pth")
    clf = load_checkpoint(tmp_path / "b.pth", head=tmp_path / "linear4.pth", **HEADS)
    x = images(2, 224, 308, seed=26)
    with torch.no_grad():
        o = clf.dinov2.vit.get_intermediate_layers(x, n=4, return_class_token=True)
        linear_input = torch.cat([o[0][1], o[1][1], o[2][1], o[3][1], o[3][0].mean(dim=1)], dim=1)
        assert max_diff(clf(x).logits, F.linear(linear_input, head["weight"], head["bias"])) < TOL
    clf.save_pretrained(tmp_path / "hf")
    again = dinokit.AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    assert again.config.num_classifier_layers == 4
    with torch.no_grad():
        assert max_diff(again(x).logits, clf(x).logits) == 0.0


def test_swiglu_meta_hf_timm_layouts_round_trip(tmp_path):
    model = randomize_(dinokit.Dinov2Model(small_config(swiglu=True, registers=4)), seed=27).eval()
    meta = model.meta_state_dict()[0]
    assert "blocks.0.mlp.w12.weight" in meta
    x = images(1, 224, 308, seed=28)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    for layout, state in [("meta", meta), ("timm", ckpt.meta_to_timm(meta)), ("hf", model.hf_state_dict())]:
        path = tmp_path / f"{layout}.safetensors"
        ckpt.save_file_atomic(state, path)
        loaded = load_checkpoint(path, **HEADS)
        assert loaded.config.use_swiglu_ffn and loaded.config.num_register_tokens == 4
        with torch.no_grad():
            assert max_diff(loaded(x).last_hidden_state, expected) < TOL, layout


@pytest.mark.parametrize("to", ["hf", "meta", "timm"])
def test_convert_cli_writes_each_layout(tmp_path, meta_state, to):
    from dinokit.cli import main

    src = tmp_path / "src.pth"
    torch.save(meta_state, src)
    (tmp_path / "src.config.json").write_text(json.dumps(HEADS))
    dst = tmp_path / ("out" if to == "hf" else f"out_{to}.pth")
    assert main(["convert", str(src), str(dst), "--to", to]) == 0
    loaded = dinokit.load_model(dst)
    x = images(1, 224, 224, seed=29)
    with torch.no_grad():
        expected = load_checkpoint(src, **HEADS)(x).last_hidden_state
        got = loaded(x).last_hidden_state
    if to == "timm":  # timm's interpolation (antialias) differs off the native grid; equal at 518
        x = images(1, 518, 518, seed=29)
        with torch.no_grad():
            expected, got = load_checkpoint(src, **HEADS)(x).last_hidden_state, loaded(x).last_hidden_state
    assert max_diff(got, expected) < TOL


def test_presets_have_the_published_parameter_counts():
    from dinokit.config import preset_config
    from dinokit.hf import build_vit
    from dinokit.vision_transformer import count_parameters

    expected = {"vits14": 22_056_576, "vitb14": 86_580_480, "vitl14": 304_368_640}
    for name, count in expected.items():
        config = preset_config(name)
        with torch.device("meta"):
            assert count_parameters(build_vit(config)) == count
            assert count_parameters(build_vit(preset_config(name + "_reg4"))) == count + 4 * config.hidden_size
    with torch.device("meta"):
        assert count_parameters(build_vit(preset_config("vitg14"))) == 1_136_480_768
