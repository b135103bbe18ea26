"""Inference backends: one callable interface over eager torch, torch.compile, onnxruntime and onnxruntime int8.

    backend = get_backend(model, "onnxruntime")        # model: a dinokit model or a load_model spec
    out = backend(pixel_values)                        # (B, 3, H, W) float tensor, H and W multiples of 14
    out.last_hidden_state, out.pooler_output           # torch tensors on the CPU (torch backends: model device)

Every backend computes the transformers `Dinov2Model` outputs (final-normed sequence and its CLS token) for any
batch size and any input size the model accepts. Each states its measured distance from the eager torch
reference in `distance` (tiny/ViT-S random-weight models; `benchmarks/inference.py` re-measures it on ViT-S/B),
and `measure_distance(pixel_values)` measures it on your inputs.

| name | what | distance from `torch` (max abs / CLS cosine) |
|---|---|---|
| `torch` | eager PyTorch, SDPA attention, cached position grids | the reference |
| `torch-int8` | eager PyTorch with the blocks' Linear layers in int8 (dynamic, per-channel; `dinokit.int8`) | ~0.2 / cosine ≈ 0.998 |
| `compile` | `torch.compile` of the blocks (opt-in; compiles once per input shape) | ~5e-6 |
| `onnxruntime` | the ONNX export (dynamic shapes), fp32 | ~6e-6 |
| `onnxruntime-int8` | the same with int8 linear layers (dynamic quantisation) | ~0.1 / cosine ≈ 0.999 |

(ViT-S/14 with random weights at 224 and 518; the eager path itself uses dinokit's CPU linear fast paths
(`dinokit.layers.linear`), which differ from `F.linear` by float32 rounding. On Imagenette val the int8 backends'
mean CLS cosine is 0.998 (torch-int8) and 0.999 (onnxruntime-int8): `benchmarks/int8_accuracy.py`.)

ONNX files are exported once per model and cached under `$DINOKIT_CACHE/onnx` (default `~/.cache/dinokit`),
keyed by the weights and config; pass `onnx_path=` to use (or create) a given file instead. A path ending in
`.onnx` in place of the model runs that file directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinokit.outputs import BaseModelOutputWithPooling

BACKENDS = ("torch", "torch-int8", "compile", "onnxruntime", "onnxruntime-int8")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DINOKIT_CACHE", Path.home() / ".cache" / "dinokit")).expanduser()


class Backend:
    """A model runner: `backend(pixel_values) -> BaseModelOutputWithPooling(last_hidden_state, pooler_output)`."""

    name = "base"
    distance = ""

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model  # the torch model it was built from (None for a bare .onnx file)

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def run(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, pixel_values: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPooling:
        if pixel_values is None:
            raise ValueError("pass pixel_values (a (batch, 3, height, width) float tensor)")
        if kwargs:
            raise TypeError(f"the {self.name} backend takes pixel_values only (no {', '.join(sorted(kwargs))}); use "
                            f"the torch model for masks, attentions or hidden states")
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
        hidden, pooled = self.run(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)

    def measure_distance(self, pixel_values: torch.Tensor, reference: Backend | None = None) -> dict[str, float]:
        """Max |Δ| of last_hidden_state and min/mean CLS cosine against eager torch (or `reference`)."""
        if reference is None:
            if self.model is None:
                raise ValueError("this backend runs a bare .onnx file: pass reference=get_backend(model, 'torch')")
            reference = TorchBackend(getattr(self, "source_model", None) or self.model)
        mine, theirs = self(pixel_values), reference(pixel_values)
        cos = torch.nn.functional.cosine_similarity(mine.pooler_output.float().cpu(),
                                                    theirs.pooler_output.float().cpu(), dim=-1)
        diff = (mine.last_hidden_state.float().cpu() - theirs.last_hidden_state.float().cpu()).abs().max()
        return {"max_abs_diff": float(diff), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _vit(model: nn.Module) -> nn.Module:
    from dinokit.export.onnx import backbone_of

    return backbone_of(model)


class TorchBackend(Backend):
    """Eager PyTorch on the model's device and dtype: SDPA attention, fused qkv, cached position grids."""

    name = "torch"
    distance = "the reference (0)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.eval())
        self.vit = _vit(model)

    @torch.inference_mode()
    def run(self, pixel_values):
        weight = self.vit.patch_embed.proj.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        hidden = self.vit.norm(self.vit.forward_features(pixel_values)["x_prenorm"])
        return hidden, hidden[:, 0]


class TorchInt8Backend(TorchBackend):
    """Eager PyTorch on an int8 copy of the model (`dinokit.int8.quantize_int8`: dynamic int8 Linear layers in
    the blocks, oneDNN/AMX kernels where the CPU has them); CPU only. The given model is not modified."""

    name = "torch-int8"
    distance = "max |Δ| ~0.2, CLS cosine ~0.998 (int8 linear layers)"

    def __init__(self, model: nn.Module, per_channel: bool = True) -> None:
        from dinokit.int8 import quantize_int8

        super().__init__(quantize_int8(model, per_channel=per_channel))
        self.source_model = model


class CompileBackend(TorchBackend):
    """`torch.compile` of the transformer blocks and final norm (inductor); the token embedding runs eagerly so
    the position grid keeps the model's exact interpolation and cache. The first call at each new input shape
    compiles (tens of seconds on a CPU). Measured: max |Δ| ≈ 5e-6 vs eager on ViT-S/14 (random weights).

    On CPUs it is currently slower than `torch`: dinokit's oneDNN fused-linear fast path switches itself off
    while compiling, so the compiled graph uses F.linear (MKL sgemm, the slow path on AMD CPUs)."""

    name = "compile"
    distance = "max |Δ| ~5e-6 (fused kernels reorder float sums)"

    def __init__(self, model: nn.Module, mode: str | None = None, dynamic: bool = False,
                 compiler: str = "inductor") -> None:
        super().__init__(model)
        self._encode = torch.compile(self._blocks, mode=mode, dynamic=dynamic, backend=compiler)

    def _blocks(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        for block in self.vit.blocks:
            x = block(x, rope=rope)
        return self.vit.norm(x)

    @torch.inference_mode()
    def run(self, pixel_values):
        weight = self.vit.patch_embed.proj.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        hidden = self._encode(self.vit.prepare_tokens_with_masks(pixel_values), self.vit.rope_for(pixel_values))
        return hidden, hidden[:, 0]


class OnnxRuntimeBackend(Backend):
    """onnxruntime (CPU) on the ONNX export of the model: fp32, or int8 linear layers with `int8=True`.

    Measured vs eager torch: fp32 max |Δ| ≈ 6e-6 (tiny models and ViT-S/14, random weights); int8
    (per-tensor dynamic quantisation) max |Δ| ≈ 0.1, CLS cosine ≈ 0.999 on ViT-S/14 with random weights, on
    real images (the export command prints the cosine for your weights)."""

    name = "onnxruntime"
    distance = "fp32: max |Δ| ~6e-6"

    def __init__(self, model: nn.Module | str | os.PathLike | None, *, onnx_path: str | os.PathLike | None = None,
                 int8: bool = False, threads: int | None = None, opset: int | None = None,
                 cache_dir: str | os.PathLike | None = None, per_channel: bool = False) -> None:
        from dinokit.export.onnx import DEFAULT_OPSET, read_metadata

        super().__init__(model if isinstance(model, nn.Module) else None)
        if int8:
            self.name, self.distance = "onnxruntime-int8", "max |Δ| ~0.1, CLS cosine ~0.999 (int8 linear layers)"
        opset = opset or DEFAULT_OPSET
        path = Path(onnx_path) if onnx_path is not None else None
        if self.model is None and path is None:
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"ONNX model {path} does not exist")
        if self.model is not None:
            path = path or _cached_path(self.model, opset, cache_dir)
            if not path.is_file():
                from dinokit.export.onnx import export_onnx

                export_onnx(self.model, path, opset=opset)
        if int8 and read_metadata(path).get("quantization") is None:
            fp32_path = path
            path = path.with_name(path.stem + (".int8-pc" if per_channel else ".int8") + ".onnx")
            if not path.is_file() or path.stat().st_mtime < fp32_path.stat().st_mtime:
                from dinokit.export.quantize import quantize_onnx

                quantize_onnx(fp32_path, path, per_channel=per_channel)
        self.path = path
        self.metadata = read_metadata(path)
        from dinokit.export.onnx import ort_session

        self.session = ort_session(path, threads)
        self.sizes = [tuple(s) for s in self.metadata.get("sizes", [])]
        self.fixed_sizes = self.metadata.get("positions") == "precomputed"
        self.patch_size = int(self.metadata.get("patch_size", 14))

    @property
    def config(self):
        if self.model is not None:
            return self.model.config
        from dinokit.config import CONFIG_CLASSES

        data = dict(self.metadata.get("config") or {})
        if not data:
            return None
        return CONFIG_CLASSES[data.get("model_type", "dinov2")].from_dict(data)

    def run(self, pixel_values):
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"the ONNX model takes heights and widths that are multiples of {self.patch_size}; got "
                             f"{height}x{width}: resize or crop the images (e.g. 224 or 518)")
        if self.fixed_sizes and (height, width) not in self.sizes:
            declared = ", ".join(f"{h}x{w}" for h, w in self.sizes)
            raise ValueError(f"{self.path} was exported with position grids for {declared} only; got {height}x{width}. "
                             f"Resize the inputs, or export again with --sizes including it")
        array = np.ascontiguousarray(pixel_values.detach().to("cpu", torch.float32).numpy())
        hidden, pooled = self.session.run(["last_hidden_state", "pooler_output"], {"pixel_values": array})
        return torch.from_numpy(hidden), torch.from_numpy(pooled)


def weights_key(model: nn.Module, *extra) -> str:
    """Hash of the weights, config and export options: names the cached ONNX file."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else None, sort_keys=True,
                             default=str).encode())
    digest.update(json.dumps([str(e) for e in extra]).encode())
    for name, tensor in _vit(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


def _cached_path(model: nn.Module, opset: int, cache_dir) -> Path:
    from dinokit.export.graph import EXPORT_FORMAT

    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "onnx"
    return directory / f"dinov2-{weights_key(model, opset, EXPORT_FORMAT)}.onnx"


def get_backend(model, name: str = "torch", **options) -> Backend:
    """A backend by name (see BACKENDS) for a dinokit model, a `dinokit.load_model` spec, or an .onnx file.

    Options: `torch-int8`: per_channel; `compile`: mode, dynamic, compiler (torch.compile's backend); `onnxruntime*`: onnx_path, threads, opset, cache_dir, per_channel.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if isinstance(model, Backend):
        model = model.model
    is_onnx_file = isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")
    if is_onnx_file and not name.startswith("onnxruntime"):
        raise ValueError(f"{model} is an ONNX file: use the onnxruntime or onnxruntime-int8 backend")
    if not is_onnx_file and not isinstance(model, nn.Module):
        from dinokit.loading import load_model

        model = load_model(model)
    if name == "torch":
        return TorchBackend(model, **options)
    if name == "torch-int8":
        return TorchInt8Backend(model, **options)
    if name == "compile":
        return CompileBackend(model, **options)
    return OnnxRuntimeBackend(model, int8=name == "onnxruntime-int8", **options)
