"""ViT-S/14 fp32 inference: dinokit vs transformers (SDPA) vs timm on the same weights, interleaved.

    .venv/bin/python benchmarks/core_throughput.py --rounds 5

Each round times every implementation once (in rotating order), so machine noise hits all of them alike;
the table reports the median img/s over rounds and the median of the per-round ratios to the fastest peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

import dinokit
from dinokit.checkpoints import meta_to_timm
from dinokit.config import preset_config


def build_models(name: str):
    import timm
    import transformers

    torch.manual_seed(0)
    ours = dinokit.Dinov2Model(preset_config(name)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.AutoModel.from_pretrained(tmp, attn_implementation="sdpa").eval()
    timm_name = {"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2"}[name]
    tm = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, num_classes=0).eval()
    tm.load_state_dict(meta_to_timm(ours.meta_state_dict()[0]))
    return {
        "dinokit": lambda x: ours(x).last_hidden_state,
        "transformers": lambda x: hf(pixel_values=x).last_hidden_state,
        "timm": lambda x: tm.forward_features(x),
    }


def time_call(fn, x, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * x.shape[0] / (time.perf_counter() - start)


def run(name: str, size: int, batch: int, rounds: int, iters: int) -> dict:
    models = build_models(name)
    x = torch.randn(batch, 3, size, size)
    results: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        outs = {k: fn(x) for k, fn in models.items()}  # warm-up + agreement check
        diffs = {k: (outs[k] - outs["dinokit"]).abs().max().item() for k in models}
        names = list(models)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                results[k].append(time_call(models[k], x, iters))
    peer = max(("transformers", "timm"), key=lambda k: statistics.median(results[k]))
    ratios = {k: statistics.median(a / b for a, b in zip(results[k], results[peer])) for k in models}
    return {"model": name, "size": size, "batch": batch, "rounds": rounds, "iters": iters,
            "img_per_s": {k: statistics.median(v) for k, v in results.items()},
            "ratio_to_fastest_peer": ratios, "fastest_peer": peer, "max_abs_diff_vs_dinokit": diffs,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vits14", choices=["vits14", "vitb14"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [run(args.model, 224, 8, args.rounds, iters=2), run(args.model, 518, 1, args.rounds, iters=2)]
    print(f"\n{args.model} fp32, {rows[0]['threads']} threads, {args.rounds} interleaved rounds (median)\n")
    print("| input | dinokit img/s | transformers img/s | timm img/s | dinokit / fastest peer | max abs diff (hf, timm) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["img_per_s"]
        print(f"| {r['size']}² ×{r['batch']} | {s['dinokit']:.2f} | {s['transformers']:.2f} | {s['timm']:.2f} | "
              f"{r['ratio_to_fastest_peer']['dinokit']:.3f}× ({r['fastest_peer']}) | "
              f"{r['max_abs_diff_vs_dinokit']['transformers']:.1e}, {r['max_abs_diff_vs_dinokit']['timm']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
