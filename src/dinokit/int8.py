"""int8 inference in PyTorch: the transformer blocks' Linear layers dynamically quantised (int8 weights, per
output channel by default; activations quantised per call), everything else (patch embedding, LayerNorm,
attention products, softmax, GELU) in float32.

The kernel library is chosen for the CPU: oneDNN where the CPU has AMX int8 tiles (Sapphire Rapids and later:
3-5x faster than float32 MKL on ViT-S/14's linears here), the `x86` engine (fbgemm, VNNI/AVX2) elsewhere.
LayerScale gains are folded into the projection weights before quantising, so each residual branch is one int8
GEMM and one add. The CLS cosine to float32 and the k-NN change are measured by `benchmarks/int8_accuracy.py`.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from dinokit.layers.layer_scale import LayerScale
from dinokit.layers.linear import cpuinfo


def int8_engine() -> str:
    """The quantised-kernel engine for this CPU: 'onednn' with AMX int8, else 'x86' (or what this build has)."""
    engines = torch.backends.quantized.supported_engines
    if "amx_int8" in cpuinfo("flags").split() and "onednn" in engines:
        return "onednn"
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise RuntimeError("this PyTorch build has no quantised CPU kernels; use the onnxruntime-int8 backend")


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
    engine = engine or int8_engine()
    quantized = copy.deepcopy(model).float().cpu().eval()
    vit = fold_layer_scale(backbone_of(quantized))
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
