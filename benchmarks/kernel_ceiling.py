"""How fast this CPU can run the kernels a ViT is made of, whoever calls them: the ceiling on any speed-up.

    .venv/bin/python benchmarks/kernel_ceiling.py [--json benchmarks/results_kernel_ceiling_<machine>.json]

dinokit, transformers and timm all spend 85-95% of a forward in the same two kinds of kernel: float32 GEMMs (MKL or
oneDNN) and `F.scaled_dot_product_attention`'s flash kernel. So dinokit's lead over them can come only from the
GEMM library that is faster on this CPU, from fused epilogues, and from the elementwise work it removes. This
script measures, in one process, interleaved (median of `--rounds`):

- float32 GEMM throughput at each ViT-S/B linear shape (2,048 rows: ViT 224 x8) with MKL `addmm`, oneDNN
  pre-packed, and a large square GEMM (the library's best case), in GFLOP/s;
- int8 throughput of the same shapes with each quantized engine (dynamic quantisation as `torch-int8` runs it, and
  static, input already quantised), in GOP/s: int8 can only beat float32 by the ratio of these two;
- the attention kernel against attention written as two matmuls and a softmax (the only alternative kernel).

Where int8 GOP/s are no higher than float32 GFLOP/s (CPUs without VNNI and with 128-bit vector units), no engine
can make int8 faster than float32; where float32 GEMMs already run near the library's square-GEMM rate, no kernel
choice can lift a GEMM-bound forward much further.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F
from machine import cpu_description

from dinokit.layers import kernel_choice

warnings.filterwarnings("ignore")

ROWS = 2048  # ViT 224x8: 8 x 257 tokens
SHAPES = {"vits14": [(384, 1152), (384, 384), (384, 1536), (1536, 384)],
          "vitb14": [(768, 2304), (768, 768), (768, 3072), (3072, 768)]}
ATTENTION = [(8, 6, 257, 64), (1, 6, 1370, 64), (8, 12, 257, 64), (1, 12, 1370, 64)]  # batch, heads, tokens, dim


def median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds of each function: the interleaved, rotated timing the kernel choice itself uses."""
    return kernel_choice.measure(list(fns), lambda name: fns[name](), rounds)


def gemm_candidates(k: int, n: int) -> dict:
    x, linear = torch.randn(ROWS, k), torch.nn.Linear(k, n)
    fns = {"fp32 MKL addmm": lambda: torch.addmm(linear.bias, x, linear.weight.t())}
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        fns["fp32 oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none",
                                                                              [], "")
    for engine in ("x86", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        quantised = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        fns[f"int8 dynamic {engine}"] = (lambda q=quantised, e=engine: _with_engine(e, q, x))
        weight = torch.quantize_per_tensor(linear.weight.detach(), 0.01, 0, torch.qint8)
        prepacked = torch.ops.quantized.linear_prepack(weight, linear.bias.detach())
        xq = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
        fns[f"int8 static {engine}"] = (lambda p=prepacked, e=engine, xq=xq: _with_engine(
            e, lambda: torch.ops.quantized.linear(xq, p, 0.1, 128)))
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else \
        torch.backends.quantized.engine
    return fns


def _with_engine(engine: str, fn, *args):
    torch.backends.quantized.engine = engine
    return fn(*args)


def attention_candidates(b: int, h: int, n: int, d: int) -> dict:
    q, k, v = (torch.randn(b, n, h, d).transpose(1, 2) for _ in range(3))

    def matmuls():
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(d ** -0.5)
        return torch.matmul(scores.softmax(-1), v)

    return {"SDPA (flash)": lambda: F.scaled_dot_product_attention(q, k, v), "matmul-softmax-matmul": matmuls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = cpu_description()
    print(f"machine: {machine}; torch {torch.__version__}\n")
    results = {"machine": machine, "torch": torch.__version__, "rounds": args.rounds, "gemm": [], "attention": []}
    with torch.inference_mode():
        square = median_ms({"square": lambda a=torch.randn(2048, 2048): torch.mm(a, a)}, args.rounds)["square"]
        square_rate = 2 * 2048 ** 3 / square / 1e6
        results["square_gemm_gflops"] = square_rate
        print(f"float32 2048^3 GEMM (MKL): {square_rate:.1f} GFLOP/s\n")
        print("| model | in -> out | " + " | ".join(gemm_candidates(8, 8)) + " |")
        print("|---|---|" + "---|" * len(gemm_candidates(8, 8)))
        for model, shapes in SHAPES.items():
            for k, n in shapes:
                ms = median_ms(gemm_candidates(k, n), args.rounds)
                rate = {name: 2 * ROWS * k * n / t / 1e6 for name, t in ms.items()}
                results["gemm"].append({"model": model, "in": k, "out": n, "rows": ROWS, "ms": ms, "rate": rate})
                print(f"| {model} | {k} -> {n} | " + " | ".join(f"{r:.0f}" for r in rate.values()) + " |")
        print("\n(GFLOP/s for float32, GOP/s for int8; 2,048 rows)\n")
        print("| batch x heads x tokens x dim | SDPA ms | matmul-softmax-matmul ms |")
        print("|---|---|---|")
        for shape in ATTENTION:
            ms = median_ms(attention_candidates(*shape), args.rounds)
            results["attention"].append({"shape": shape, "ms": ms})
            print(f"| {' x '.join(map(str, shape))} | {ms['SDPA (flash)']:.1f} | {ms['matmul-softmax-matmul']:.1f} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
