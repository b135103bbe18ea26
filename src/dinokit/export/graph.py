"""The inference graph that the exporters trace: pixels -> (last_hidden_state, pooler_output), no mask input.

It runs the model's own modules (patch conv, blocks, norm); only the position grid is computed by an exportable
module, chosen per interpolation mode (model.md §3):

| mode (offset, antialias) | position module | in the exported graph |
|---|---|---|
| size (0, False) | `ResizedPositions` | bicubic Resize (a=-0.75, half_pixel): any size |
| size + antialias (0, True) | `ResizedPositions` | Resize with `antialias=1` (a=-0.5, ONNX opset >= 18): any size |
| offset (> 0, False) | `ScaleFactorPositions` | torch's scale-factor bicubic written as two small matrices: any size |
| any | `PrecomputedPositions` | eager grids for declared sizes, selected by the input shape; other sizes fail |
| RoPE (DINOv3) | none | the RoPE tables, computed from the patch grid in the graph: any size, no extra input |

Why `ScaleFactorPositions`: the exporters turn the Python-float scale factor of Meta's offset mode into a constant
(the graph then silently returns the grid of the example size at every size), and the reference skips the
resampling at the stored grid, a branch whose two sides have different shapes. Written as interpolation
matrices `A_h @ grid @ A_w.T` (A = identity at the stored grid), both stay in the graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dinokit.layers.position_embedding import interpolate_pos_embed

EXPORT_FORMAT = 1  # bump when the exported graph changes (names cached ONNX files)
CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic coefficient for the non-antialiased kernel


def _stored_side(pos_embed: torch.Tensor) -> int:
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"position table of {pos_embed.shape[1] - 1} patch positions is not a square grid")
    return side


class ResizedPositions(nn.Module):
    """Size modes: `F.interpolate(size=...)` exports to ONNX Resize, which reproduces it (see `export_onnx`)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.antialias = bool(vit.interpolate_antialias)

    def forward(self, pos_embed: torch.Tensor, grid_h, grid_w) -> torch.Tensor:
        return interpolate_pos_embed(pos_embed, grid_h, grid_w, 0.0, self.antialias)


def _cubic_matrix(out_size, in_size: int, inverse_scale: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix of torch's bicubic resampling (align_corners=False, borders replicated).

    Same arithmetic as ATen's `HelperInterpCubic`: source = inverse_scale * (i + 0.5) - 0.5, index clamped to
    the input, lambda clamped to [0, 1], four taps of the a=-0.75 kernel at clamped positions."""
    a = CUBIC_A
    i = torch.arange(out_size, dtype=torch.float32)
    source = inverse_scale * (i + 0.5) - 0.5
    index = torch.clamp(torch.floor(source), max=in_size - 1)
    t = torch.clamp(source - index, 0.0, 1.0)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack((far(t + 1), near(t), near(1 - t), far(2 - t)), dim=1)  # (out, 4)
    taps = (index.to(torch.int64).unsqueeze(1) + torch.arange(-1, 3)).clamp(0, in_size - 1)  # (out, 4)
    columns = torch.arange(in_size)
    one_hot = (taps.unsqueeze(-1) == columns).to(torch.float32)  # (out, 4, in)
    return (weights.unsqueeze(-1) * one_hot).sum(dim=1)


class ScaleFactorPositions(nn.Module):
    """Meta's offset mode: `F.interpolate(scale_factor=((h+offset)/M, (w+offset)/M), mode="bicubic")`, computed
    with shape-dependent interpolation matrices so it stays exact at every input size, including the reference's
    untouched table at the stored grid."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if vit.interpolate_antialias:
            raise ValueError("offset mode with antialias is not a reference configuration and cannot be exported "
                             "dynamically; export with fixed sizes (sizes=[...], positions='precomputed')")
        self.offset = float(vit.interpolate_offset)

    def forward(self, pos_embed: torch.Tensor, grid_h, grid_w) -> torch.Tensor:
        side = _stored_side(pos_embed)
        dim = pos_embed.shape[-1]
        sizes = torch.stack((torch.scalar_tensor(grid_h, dtype=torch.float64),
                             torch.scalar_tensor(grid_w, dtype=torch.float64)))
        # torch maps coordinates with float(1 / scale_factor), the scale factor being computed in double.
        inverse = (side / (sizes + self.offset)).to(torch.float32)
        native = (sizes == side).all()
        a_h = _cubic_matrix(grid_h, side, inverse[0])
        a_w = _cubic_matrix(grid_w, side, inverse[1])
        eye_h = torch.eye(grid_h, side, dtype=torch.float32)
        eye_w = torch.eye(grid_w, side, dtype=torch.float32)
        a_h = torch.where(native, eye_h, a_h)
        a_w = torch.where(native, eye_w, a_w)
        grid = pos_embed[:, 1:].float().reshape(side, side, dim).permute(2, 0, 1)  # (D, M, M)
        grid = a_h @ grid @ a_w.transpose(0, 1)  # (D, h, w)
        grid = grid.permute(1, 2, 0).reshape(1, -1, dim).to(pos_embed.dtype)
        return torch.cat((pos_embed[:, :1], grid), dim=1)


class PrecomputedPositions(nn.Module):
    """Eager position grids for a declared list of (height, width) inputs, picked by the grid of the input.

    The grids come from the model's own (reference) code path, so any mode is exact at the declared sizes.
    At another size the index runs past the table and the graph fails (ONNX Runtime: a Gather out of bounds;
    dinokit's runners check the declared sizes first and raise a clear error)."""

    def __init__(self, vit: nn.Module, sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        patch = vit.patch_size
        grids, starts, start = [], [], 0
        with torch.no_grad():
            for height, width in sizes:
                pos = vit.position_embedding(vit.pos_embed, height // patch, width // patch, height, width, False)
                grids.append(pos[0, 1:].detach().float())
                starts.append(start)
                start += grids[-1].shape[0]
        self.register_buffer("cls_pos", vit.pos_embed[0, :1].detach().float().clone(), persistent=False)
        self.register_buffer("table", torch.cat(grids), persistent=False)  # (sum of h*w, D)
        self.register_buffer("grid_hw", torch.tensor([[h // patch, w // patch] for h, w in sizes]),
                             persistent=False)
        self.register_buffer("starts", torch.tensor(starts), persistent=False)
        self.dtype = vit.pos_embed.dtype

    def forward(self, pos_embed: torch.Tensor, grid_h, grid_w) -> torch.Tensor:
        del pos_embed  # the grids were computed from it at construction
        wanted = torch.stack((torch.scalar_tensor(grid_h, dtype=torch.int64),
                              torch.scalar_tensor(grid_w, dtype=torch.int64)))
        match = (self.grid_hw == wanted).all(dim=1)
        # The first matching size, or len(sizes) (out of bounds: an error) when none matches.
        choice = torch.where(match.any(), match.to(torch.int64).argmax(), self.starts.shape[0])
        start = torch.index_select(self.starts, 0, choice.reshape(1))
        rows = start + torch.arange(grid_h * grid_w)
        grid = torch.index_select(self.table, 0, rows)
        return torch.cat((self.cls_pos, grid), dim=0).unsqueeze(0).to(self.dtype)


class InferenceGraph(nn.Module):
    """`model(pixel_values)` as exported: returns (last_hidden_state, pooler_output) like transformers' tuples.

    Same computation as `prepare_tokens_with_masks` without masks, then the blocks and the final norm. A RoPE
    model (DINOv3) has no position module: its blocks take the (cos, sin) tables of the input's patch grid,
    which the graph computes from that grid (`rope_embed` does not cache while tracing), so every size works
    and the only input stays `pixel_values`."""

    def __init__(self, model: nn.Module, positions: nn.Module | None) -> None:
        super().__init__()
        self.vit = model.vit_module if hasattr(model, "vit_module") else model
        self.positions = positions

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed.proj(pixel_values)  # (B, D, h, w)
        batch = x.shape[0]
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((vit.cls_token.expand(batch, -1, -1).to(x.dtype), x), dim=1)
        if self.positions is not None:
            x = x + self.positions(vit.pos_embed, grid_h, grid_w).to(x.dtype)
        if vit.register_tokens is not None:
            x = torch.cat((x[:, :1], vit.register_tokens.expand(batch, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        rope = self.sequence_rope(grid_h, grid_w)
        for block in vit.blocks:
            x = block(x, rope=rope)
        x = vit.norm(x)
        return x, x[:, 0]


    def sequence_rope(self, grid_h, grid_w) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE tables for the whole sequence: the identity rotation (cos 1, sin 0) for the CLS and registers, then
        the patch grid's. Exactly the eager result (x * 1 + rotate_half(x) * 0 = x), and the rotation then runs
        on whole tensors, not on a slice of symbolic length: the export traces in about a third of the time."""
        vit = self.vit
        if vit.rope_embed is None:
            return None
        cos, sin = vit.rope_embed(grid_h, grid_w)
        prefix = 1 + vit.num_register_tokens
        return (torch.cat((cos.new_ones(prefix, cos.shape[-1]), cos)),
                torch.cat((sin.new_zeros(prefix, sin.shape[-1]), sin)))


def position_module(model: nn.Module, positions: str = "dynamic", sizes: list[tuple[int, int]] | None = None):
    """The position module for `model`'s interpolation mode; `positions` is "dynamic" or "precomputed". None for
    a RoPE model, whose tables the graph computes at every size."""
    vit = model.vit_module if hasattr(model, "vit_module") else model
    if vit.pos_embed is None:
        return None
    if positions == "precomputed":
        if not sizes:
            raise ValueError("precomputed position grids need the list of input sizes (sizes=[(224, 224), ...])")
        return PrecomputedPositions(vit, sizes)
    if positions != "dynamic":
        raise ValueError(f"positions must be 'dynamic' or 'precomputed', got {positions!r}")
    if vit.interpolate_offset:
        return ScaleFactorPositions(vit)
    return ResizedPositions(vit)
