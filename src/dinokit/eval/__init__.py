"""Evaluation of frozen features (DINOv2's k-NN, linear probe and logistic regression) and classifier training.

    from dinokit.eval import evaluate
    report = evaluate("knn", "facebook/dinov2-small", "data/train", "data/val")

Modules: `data` (labelled image sets), `features` (extraction + disk cache), `knn`, `linear`, `logreg` (the
protocols on arrays), `evaluate` (model + folders -> report), `finetune` and `classify` (classifier checkpoints),
`cli` (the `dinokit eval | finetune | classify` commands).
"""

from __future__ import annotations

from dinokit.eval.evaluate import evaluate, format_table, write_json
from dinokit.eval.features import FeatureSet, extract_features
from dinokit.eval.knn import knn_evaluate
from dinokit.eval.linear import LinearProbeConfig, linear_probe_augmented, linear_probe_features
from dinokit.eval.logreg import logreg_evaluate

__all__ = ["FeatureSet", "LinearProbeConfig", "evaluate", "extract_features", "format_table", "knn_evaluate",
           "linear_probe_augmented", "linear_probe_features", "logreg_evaluate", "write_json"]
