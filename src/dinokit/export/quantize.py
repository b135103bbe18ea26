"""int8 ONNX models (onnxruntime dynamic quantisation of the linear layers) and the accuracy check that goes with
them.

Dynamic quantisation: the weights of every MatMul with a constant operand (qkv, proj, fc1, fc2: 4 per block) are
stored as int8; activations are quantised to uint8 per call (`DynamicQuantizeLinear` + `MatMulInteger`). The
attention products, LayerNorm, softmax and GELU stay float32. Per-tensor weight scales are the default: on this
AVX2 CPU they ran 1.5-2.1x faster than fp32 onnxruntime for ViT-S/14 and ViT-B/14 (benchmarks/inference.py;
per-channel scales gained less, ~1.4x in a side test) at a CLS cosine of 0.999 (random weights);
`per_channel=True` trades speed for accuracy.

The check (`agreement`, `knn_delta`) compares int8 with fp32 CLS embeddings (`pooler_output`) on real images when
given (mean and min cosine) and, with a labelled ImageFolder, the k-NN top-1 accuracy of both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinokit.export.onnx import INPUT_NAME, move_into_place, ort_session, staging_dir
from dinokit.extras import optional_import

REPO_CHECK_IMAGES = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "imagenette" / "val"


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = False) -> Path:
    """Write the int8 version of the fp32 ONNX file `src` to `dst` (through a temporary name)."""
    quantization = optional_import("onnxruntime.quantization", purpose="int8 quantisation")
    QuantType, quantize_dynamic = quantization.QuantType, quantization.quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model {src} does not exist; export it first (dinokit export onnx)")
    if dst.resolve() == src.resolve():
        raise ValueError("the int8 model needs its own file name (e.g. model.int8.onnx)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing suggestion at WARNING on every call
    try:
        with staging_dir(dst) as tmp:
            staged = tmp / dst.name
            quantize_dynamic(str(src), str(staged), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             weight_type=QuantType.QInt8, use_external_data_format=src.with_name(
                                 src.name + ".data").exists())
            _copy_metadata(src, staged)
            move_into_place(staged, dst)
    finally:
        root.setLevel(level)
    return dst


def _copy_metadata(src: Path, dst: Path) -> None:
    """Keep dinokit's metadata (sizes, mode) on the quantised file, marked as int8."""
    from dinokit.export.onnx import read_metadata, stamp_metadata

    metadata = read_metadata(src)
    if metadata:
        stamp_metadata(dst, {**metadata, "quantization": "dynamic int8 (MatMul weights)"})


# ---------------------------------------------------------------------------------------------------- images
def default_check_images() -> Path | None:
    """The shared Imagenette validation split beside this checkout, when present."""
    path = REPO_CHECK_IMAGES.resolve()
    return path if path.is_dir() else None


def _height_width(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def generated_images(count: int = 32, size=224, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields with texture (normalised like real inputs) when no real images are available."""
    height, width = _height_width(size)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 7, 7, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    images = images + 0.15 * torch.randn(count, 3, height, width, generator=generator)  # texture
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean) / std


def folder_images(folder: str | os.PathLike, count: int = 64, size=224) -> torch.Tensor:
    """`count` images spread evenly over a folder (searched recursively), preprocessed like DINOv2 evaluation."""
    from dinokit.data.images import IMAGE_EXTENSIONS, find_image_files
    from dinokit.processing import eval_transform, load_image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = find_image_files(folder)
    if not files:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    step = max(1, len(files) // count)
    height, width = _height_width(size)
    transform = eval_transform(resize=round(max(height, width) * 256 / 224), crop=(height, width))
    return torch.stack([transform(load_image(p)) for p in files[::step][:count]])


# ---------------------------------------------------------------------------------------------------- checks
@dataclass
class Agreement:
    images: int
    source: str
    mean_cosine: float
    min_cosine: float

    def summary(self) -> str:
        return (f"int8 vs fp32 CLS embeddings over {self.images} {self.source}: mean cosine {self.mean_cosine:.4f}, "
                f"min {self.min_cosine:.4f}")


def _run(model, pixels: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """CLS embeddings (`pooler_output`) of `pixels` from an ONNX file path or a `dinokit.backends` backend."""
    if isinstance(model, (str, os.PathLike)):
        session = ort_session(model)
        run = lambda batch: session.run(["pooler_output"], {INPUT_NAME: batch.numpy()})[0]  # noqa: E731
    else:
        run = lambda batch: model(batch).pooler_output.float().cpu().numpy()  # noqa: E731
    return np.concatenate([run(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def agreement(fp32_path, int8_path, pixels: torch.Tensor, source: str = "images") -> Agreement:
    """Mean and min cosine between the int8 and fp32 CLS embeddings of `pixels` (N, 3, H, W); each model is an
    ONNX file or a backend (e.g. `get_backend(model, "torch-int8")`)."""
    reference = _run(fp32_path, pixels)
    quantized = _run(int8_path, pixels)
    cos = cosines(quantized, reference)
    return Agreement(len(pixels), source, float(cos.mean()), float(cos.min()))


@dataclass
class KnnDelta:
    train: int
    test: int
    k: int
    fp32_top1: float
    int8_top1: float

    @property
    def delta(self) -> float:
        return self.int8_top1 - self.fp32_top1

    def summary(self) -> str:
        return (f"k-NN (k={self.k}) top-1 on {self.test} images ({self.train} references): fp32 {self.fp32_top1:.2f}%, "
                f"int8 {self.int8_top1:.2f}% (delta {self.delta:+.2f} points)")


def knn_delta(fp32_path, int8_path, labelled_folder, per_class: int = 20, k: int = 10, size: int = 224) -> KnnDelta:
    """k-NN top-1 of fp32 and int8 CLS features on a labelled ImageFolder: `per_class` images of each class,
    alternately references and queries. The models are ONNX files or backends, as for `agreement`."""
    from dinokit.eval.data import load_split
    from dinokit.eval.knn import knn_evaluate
    from dinokit.processing import eval_transform, load_image

    split = load_split(labelled_folder, "k-NN image folder")
    chosen = []
    for label in sorted(set(split.labels)):
        members = [i for i, lab in enumerate(split.labels) if lab == label]
        chosen += members[:: max(1, len(members) // per_class)][:per_class]
    if len(chosen) < 4:
        raise ValueError(f"{labelled_folder} has too few images for a k-NN check ({len(chosen)})")
    transform = eval_transform(resize=round(size * 256 / 224), crop=size)
    pixels = torch.stack([transform(load_image(split.paths[i])) for i in chosen])
    labels = torch.tensor([split.labels[i] for i in chosen])
    train, test = torch.arange(0, len(chosen), 2), torch.arange(1, len(chosen), 2)
    k = min(k, len(train))
    accuracy = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        features = torch.from_numpy(_run(path, pixels))
        features = torch.nn.functional.normalize(features, dim=1)
        rows = knn_evaluate(features[train], labels[train], features[test], labels[test], ks=(k,))
        accuracy[name] = rows[0]["top1"]
    return KnnDelta(len(train), len(test), k, accuracy["fp32"], accuracy["int8"])
