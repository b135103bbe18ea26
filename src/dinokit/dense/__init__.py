"""Dense prediction on DINOv2 patch features: segmentation and depth heads, their training on frozen features,
metrics and the `dinokit segment` / `dinokit depth` commands. Plain torch (no mmcv / mmsegmentation).

Heads follow Meta's code (dinov2/hub/depth, dinov2/eval/segmentation) and transformers' DPT / Depth Anything;
docs/dense.md says what was taken from where and what dinokit chose where the references are silent.
"""

from dinokit.dense.depth import DepthConfig, DepthEstimatorOutput, Dinov2ForDepthEstimation
from dinokit.dense.segmentation import Dinov2ForSemanticSegmentation, SemanticSegmenterOutput
from dinokit.processing import post_process_semantic_segmentation

__all__ = ["DepthConfig", "DepthEstimatorOutput", "Dinov2ForDepthEstimation", "Dinov2ForSemanticSegmentation",
           "SemanticSegmenterOutput", "post_process_semantic_segmentation"]
