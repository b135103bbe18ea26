"""int8 inference in PyTorch: the transformer blocks' Linear layers dynamically quantised (int8 weights, per
output channel by default; activations quantised per call), everything else (patch embedding, LayerNorm,
attention products, softmax, GELU) in float32.

The kernel library is chosen by measurement (`dinokit.layers.kernel_choice`): the model's largest block Linear is
quantised for each engine this build has (`x86`/fbgemm: VNNI/AVX2; `onednn`: AMX int8 tiles, 3-5x faster than
float32 MKL on ViT-S/14's linears on a Sapphire Rapids) and timed on 2,048 rows; `x86` unless the other is faster
by more than the margin. `DINOKIT_INT8_ENGINE=x86|onednn|...` pins it.
LayerScale gains are folded into the projection weights before quantising, so each residual branch is one int8
GEMM and one add. The CLS cosine to float32 and the k-NN change are measured by `benchmarks/int8_accuracy.py`.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from dinokit.layers.kernel_choice import decision, pinned
from dinokit.layers.layer_scale import LayerScale

PROBE_ROWS = 2048  # ViT-S/B at 224 x8 (2,056 tokens); the CPU block split keeps larger batches near it


def int8_engine(probe: nn.Linear | None = None) -> str:
    """The quantised-kernel engine: pinned by `DINOKIT_INT8_ENGINE`, else the faster of `x86` and `onednn` on
    `probe` (a float Linear of the model), else the first this build has."""
    engines = [e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in torch.backends.quantized.supported_engines]
    if not engines:
        raise RuntimeError("this PyTorch build has no quantised CPU kernels; use the onnxruntime-int8 backend")
    chosen = pinned("DINOKIT_INT8_ENGINE", engines)
    if chosen is not None:
        return chosen
    candidates = [e for e in ("x86", "onednn") if e in engines]
    if probe is None or len(candidates) < 2:
        return engines[0]
    layers = {engine: _quantized_copy(probe, engine) for engine in candidates}
    x = torch.randn(PROBE_ROWS, probe.in_features, generator=torch.Generator().manual_seed(0))

    def run(engine: str):
        with torch.no_grad():
            return layers[engine](x)

    return decision("int8-engine", (PROBE_ROWS, probe.in_features, probe.out_features), candidates, run,
                    plain=candidates[0])


def _quantized_copy(layer: nn.Linear, engine: str) -> nn.Module:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(layer).float().cpu()),
                {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous


def fold_layer_scale(vit: nn.Module) -> nn.Module:
    """Multiply each block's LayerScale gain into the Linear in front of it (attn.proj; mlp.fc2 or the SwiGLU
    output) and replace the LayerScale by Identity: the same function, one pass fewer per branch."""
    for block in vit.blocks:
        for ls_name, proj in (("ls1", block.attn.proj), ("ls2", _ffn_output(block.mlp))):
            scale = getattr(block, ls_name)
            if not isinstance(scale, LayerScale):
                continue
            with torch.no_grad():
                proj.weight.mul_(scale.gamma[:, None])
                if proj.bias is not None:
                    proj.bias.mul_(scale.gamma)
            setattr(block, ls_name, nn.Identity())
    return vit


def _ffn_output(mlp: nn.Module) -> nn.Linear:
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.w3


def quantize_int8(model: nn.Module, *, per_channel: bool = True, engine: str | None = None) -> nn.Module:
    """A copy of `model` (on the CPU, float32, eval mode) whose blocks run int8 Linear layers; `model` is left
    as it is. `per_channel=False` uses one weight scale per matrix (a little faster, less exact)."""
    from dinokit.export.onnx import backbone_of

    if torch.is_inference_mode_enabled():
        raise RuntimeError("quantize_int8 copies the model: call it outside torch.inference_mode()")
    quantized = copy.deepcopy(model).float().cpu().eval()
    vit = fold_layer_scale(backbone_of(quantized))
    engine = engine or int8_engine(probe=max((m for m in vit.blocks[0].modules() if isinstance(m, nn.Linear)),
                                             key=lambda m: m.weight.numel()))
    qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
               else torch.ao.quantization.default_dynamic_qconfig)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # the weights are packed for this engine's kernels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's notice that eager quantisation is moving to torchao
            torch.ao.quantization.quantize_dynamic(vit.blocks, {nn.Linear: qconfig}, dtype=torch.qint8,
                                                   inplace=True)
    finally:
        torch.backends.quantized.engine = previous
    quantized.int8_engine = engine
    return quantized
