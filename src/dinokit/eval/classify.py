"""Top-k labels of images with a classifier checkpoint (e.g. one written by `dinokit finetune`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def load_classifier(model):
    """A `Dinov2ForImageClassification` and the image processor saved with it (the DINOv2 default otherwise)."""
    import dinokit
    from dinokit.processing import Dinov2ImageProcessor

    classifier = dinokit.load_model(model, task="classification")
    processor = Dinov2ImageProcessor()
    if not isinstance(model, torch.nn.Module) and (Path(model).expanduser() / "preprocessor_config.json").is_file():
        processor = Dinov2ImageProcessor.from_pretrained(model)
    return classifier, processor


@torch.no_grad()
def classify_images(images: Sequence[str | os.PathLike], model, *, top_k: int = 5, batch_size: int = 32,
                    device: str | torch.device = "cpu") -> list[dict]:
    """[{"image": path, "top_k": [{"label", "index", "score"}, ...]}] with softmax scores, best first."""
    from dinokit.data.images import read_image

    if not images:
        raise ValueError("No images given to classify.")
    classifier, processor = load_classifier(model)
    classifier = classifier.to(device).eval()
    labels = classifier.config.id2label
    k = min(top_k, classifier.config.num_labels)
    results = []
    for start in range(0, len(images), batch_size):
        paths = [str(p) for p in images[start:start + batch_size]]
        pixel_values = processor([read_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        probabilities = classifier(pixel_values=pixel_values.to(device)).logits.softmax(dim=1).cpu()
        scores, indices = probabilities.topk(k, dim=1)
        for path, row_scores, row_indices in zip(paths, scores.tolist(), indices.tolist()):
            results.append({"image": path, "top_k": [{"label": labels[i], "index": i, "score": s}
                                                     for s, i in zip(row_scores, row_indices)]})
    return results
