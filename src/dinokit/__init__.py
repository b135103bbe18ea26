"""dinokit: DINOv2 and DINOv3, complete — models with the transformers API, training, evaluation, embedding tools, export."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported lazily so that `import dinokit` stays cheap and optional extras stay optional.
_EXPORTS = {
    "Dinov2Config": "dinokit.config",
    "Dinov2WithRegistersConfig": "dinokit.config",
    "DinoVisionTransformer": "dinokit.vision_transformer",
    "Dinov2PreTrainedModel": "dinokit.hf",
    "Dinov2Model": "dinokit.hf",
    "Dinov2WithRegistersModel": "dinokit.hf",
    "Dinov2ForImageClassification": "dinokit.hf",
    "Dinov2WithRegistersForImageClassification": "dinokit.hf",
    "Dinov2Backbone": "dinokit.hf",
    "Dinov2WithRegistersBackbone": "dinokit.hf",
    "Dinov2ForSemanticSegmentation": "dinokit.dense.segmentation",
    "Dinov2ForDepthEstimation": "dinokit.dense.depth",
    "DINOv3ViTConfig": "dinokit.models.dinov3_vit",
    "DINOv3ViTModel": "dinokit.models.dinov3_vit",
    "DINOv3ViTBackbone": "dinokit.models.dinov3_vit",
    "DINOv3ViTPreTrainedModel": "dinokit.models.dinov3_vit",
    "AutoConfig": "dinokit.auto",
    "AutoModel": "dinokit.auto",
    "AutoModelForImageClassification": "dinokit.auto",
    "AutoBackbone": "dinokit.auto",
    "load_model": "dinokit.loading",
    "load_checkpoint": "dinokit.loading",
    "Dinov2ImageProcessor": "dinokit.processing",
    "BitImageProcessor": "dinokit.processing",
    "DINOv3ViTImageProcessor": "dinokit.processing",
    "DINOv3ConvNextConfig": "dinokit.models.dinov3_convnext",
    "DINOv3ConvNextModel": "dinokit.models.dinov3_convnext",
    "DINOv3ConvNextBackbone": "dinokit.models.dinov3_convnext",
    "AutoImageProcessor": "dinokit.processing",
    "eval_transform": "dinokit.processing",
    "preprocess_tensor_batch": "dinokit.processing",
    "load_image": "dinokit.processing",
    "ImageReadError": "dinokit.data.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dinokit' has no attribute {name!r}")
