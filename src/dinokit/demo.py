"""`make demo`: DINOv2 pretraining on the CPU, then the transformers example, end to end and offline.

Part 1 (the main job, `dinokit.ssl.demo`): a few minutes of self-supervised pretraining of a tiny DINOv2 on
scikit-learn's handwritten digits (or `--data DIR`); k-NN accuracy of random init, raw pixels and the trained
model side by side; two pictures: nearest neighbours of a few digits, and the patch features (PCA -> RGB).
Part 2: builds a ViT-S/14 (random weights: nothing can be downloaded here), saves it in Hugging Face layout,
loads it back with `AutoModel` / `AutoImageProcessor`, embeds the real photographs that ship with scikit-learn,
and prints shapes, norms and timing.
`--skip-training` runs part 2 only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def sample_photographs():
    """scikit-learn ships two real JPEG photographs (china.jpg, flower.jpg) inside its wheel."""
    from dinokit.data.images import read_image
    from dinokit.extras import optional_import

    datasets = optional_import("sklearn.datasets", purpose="the demo's sample photographs (shipped with scikit-learn)")
    folder = Path(datasets.__file__).parent / "images"
    return [(p.name, read_image(p)) for p in sorted(folder.glob("*.jpg"))]


def inference_demo(workdir: Path) -> None:
    from dinokit import AutoImageProcessor, AutoModel, Dinov2ImageProcessor, Dinov2Model
    from dinokit.config import preset_config

    torch.manual_seed(0)
    print("1. Build a ViT-S/14 (facebook/dinov2-small config, random weights) and save it in Hugging Face layout")
    model = Dinov2Model(preset_config("vits14"))
    model.save_pretrained(workdir)
    Dinov2ImageProcessor().save_pretrained(workdir)
    print(f"   {workdir}: {', '.join(sorted(p.name for p in workdir.iterdir()))}  "
          f"({model.num_parameters():,} parameters)")

    print("2. Load it back exactly as the transformers example does")
    processor = AutoImageProcessor.from_pretrained(workdir)
    model = AutoModel.from_pretrained(workdir)

    photos = sample_photographs()
    names = [name for name, _ in photos]
    print(f"3. Embed real photographs shipped with scikit-learn: {names} "
          f"(sizes {[img.size for _, img in photos]})")
    t0 = time.perf_counter()
    inputs = processor(images=[img for _, img in photos], return_tensors="pt")
    t1 = time.perf_counter()
    with torch.inference_mode():
        outputs = model(**inputs)
        t2 = time.perf_counter()
        outputs = model(**inputs)  # second call: interpolated position embeddings come from the cache
        t3 = time.perf_counter()
    print(f"   pixel_values       {tuple(inputs['pixel_values'].shape)}")
    print(f"   last_hidden_state  {tuple(outputs.last_hidden_state.shape)}  (CLS + 16x16 patches)")
    print(f"   pooler_output      {tuple(outputs.pooler_output.shape)}")
    for name, norm in zip(names, outputs.pooler_output.norm(dim=-1).tolist()):
        print(f"   |pooled| {name:<10} {norm:.4f}")
    print(f"   (at init the final LayerNorm has unit gain and zero bias, so every norm is sqrt(384) = "
          f"{384 ** 0.5:.4f})")
    cos = torch.nn.functional.cosine_similarity(outputs.pooler_output[0], outputs.pooler_output[1], dim=0)
    print(f"   cosine(china, flower) = {cos.item():.4f}  (random weights: not meaningful yet)")
    print(f"   timing: preprocess {1e3 * (t1 - t0):.1f} ms, first forward {1e3 * (t2 - t1):.1f} ms, "
          f"second forward {1e3 * (t3 - t2):.1f} ms for {len(photos)} images")

    print("4. Meta's API on the same model")
    with torch.inference_mode():
        feats = model.forward_features(inputs["pixel_values"])
        maps = model.get_intermediate_layers(inputs["pixel_values"], n=4, reshape=True)
    print(f"   forward_features: x_norm_clstoken {tuple(feats['x_norm_clstoken'].shape)}, "
          f"x_norm_patchtokens {tuple(feats['x_norm_patchtokens'].shape)}")
    print(f"   get_intermediate_layers(n=4, reshape=True): {[tuple(m.shape) for m in maps]}")
    same = torch.allclose(feats["x_norm_clstoken"], outputs.pooler_output, atol=1e-6)
    print(f"   x_norm_clstoken == pooler_output: {same}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=None, help="keep the saved model here")
    parser.add_argument("--data", default=None, help="pretrain on this image folder instead of the digits")
    parser.add_argument("--minutes", type=float, default=3.5, help="pretraining wall-clock budget")
    parser.add_argument("--demo-dir", type=Path, default=Path("dinokit_demo"),
                        help="where part 1 writes its run, images and picture")
    parser.add_argument("--skip-training", action="store_true", help="run the inference part only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = None
    if not args.skip_training:
        import logging

        from dinokit.ssl.demo import run_demo

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        source = args.data or "scikit-learn's handwritten digits"
        print(f"Part 1. DINOv2 pretraining on the CPU: {args.minutes:g} min on {source}")
        result = run_demo(args.demo_dir, args.data, args.minutes)
        print("\nPart 2. The transformers example on dinokit")
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        inference_demo(args.output)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            inference_demo(Path(tmp))
    if result is not None:
        print(summary(result, time.perf_counter() - start))
    return 0


def summary(result: dict, seconds: float) -> str:
    """The demo's last lines: what part 1 measured and where its pictures are."""
    lines = [f"\nSummary ({seconds / 60:.1f} min in all): {result['iterations']} DINOv2 steps "
             f"(preset {result['preset']})."]
    if "knn_trained" in result:
        lines.append(f"  k-NN top-1: random init {result['knn_random_init']:.1f}%, raw pixels "
                     f"{result['knn_raw_pixels']:.1f}%, trained {result['knn_trained']:.1f}%")
        lines.append(f"  nearest neighbours: {result['neighbours_picture']}")
    lines.append(f"  patch-feature PCA:  {result['pca_picture']}")
    lines.append(f"  trained model (Hugging Face layout): {result['exported']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
