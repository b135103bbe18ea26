"""TorchScript export: `torch.jit.trace` of the inference graph, valid at every input size and batch size.

Tracing `model(x, return_dict=False)` directly would freeze Meta's offset-mode scale factor (a Python float) into
the trace, so the trace is taken of `dinokit.export.graph.InferenceGraph`, whose position grid is computed from
the input's shape with tensor operations in every mode. Outputs: the tuple (last_hidden_state, pooler_output),
like a transformers model with `return_dict=False`. Measured max |Δ| vs eager: 0 in size modes, ≈ 1e-6 in
offset mode (tiny random models, 224x224 to 700x140).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinokit.export.graph import InferenceGraph, position_module
from dinokit.export.onnx import (
    DEFAULT_TOLERANCE,
    _choose_positions,
    backbone_of,
    check_sizes,
    check_sizes_for,
    eager_outputs,
    example_size,
    interpolation_name,
    prepare_model,
    staging_dir,
)


@dataclass
class TorchScriptReport:
    path: Path
    interpolation: str
    positions: str
    sizes: list[tuple[int, int]]
    checks: list[dict] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks), default=float("nan"))

    def summary(self) -> str:
        checked = ", ".join(f"{c['batch']}x{c['height']}x{c['width']}" for c in self.checks)
        return (f"{self.path}: TorchScript trace, interpolation {self.interpolation}, positions {self.positions}; "
                f"reloaded trace vs eager max |Δ| {self.max_abs_diff:.2e} over {checked}")


def trace_model(model, sizes=None, positions: str = "auto") -> torch.jit.ScriptModule:
    """The traced inference graph of a dinokit model (in memory)."""
    model = prepare_model(model)
    vit = backbone_of(model)
    sizes = check_sizes(sizes or [], vit.patch_size)
    positions = _choose_positions(vit, ANY_OPSET, positions, sizes)
    graph = InferenceGraph(model, position_module(model, positions, sizes)).eval()
    example = torch.randn(2, 3, *(sizes[0] if positions == "precomputed" else example_size(vit.patch_size)))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic: the checks below decide
        return torch.jit.trace(graph, (example,), check_trace=False)


ANY_OPSET = 10**6  # TorchScript keeps every interpolation op, so no opset limit applies


def export_torchscript(model, path: str | os.PathLike, *, sizes=None, positions: str = "auto",
                       batch_sizes=(1, 2), tolerance: float = DEFAULT_TOLERANCE) -> TorchScriptReport:
    """Trace, save to a temporary name, reload and compare with eager at `sizes` (default 224x224, the native
    size, 224x308) and two batch sizes, then move into place. Load with `torch.jit.load(path)`."""
    path = Path(path)
    model = prepare_model(model)
    vit = backbone_of(model)
    sizes = check_sizes(sizes or [], vit.patch_size)
    traced = trace_model(model, sizes, positions)
    positions_module = getattr(traced, "positions", None)  # none for RoPE: the tables are computed in the trace
    used = ("precomputed" if positions_module is not None and "PrecomputedPositions" in positions_module.original_name
            else "dynamic")
    report = TorchScriptReport(path, interpolation_name(vit), used, sizes)
    with staging_dir(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save/load are deprecated in favour of export
        staged = tmp / path.name
        torch.jit.save(traced, str(staged))
        reloaded = torch.jit.load(str(staged))
        generator = torch.Generator().manual_seed(0)
        for height, width in check_sizes_for(model, sizes):
            for batch in batch_sizes:
                pixels = torch.randn(batch, 3, height, width, generator=generator)
                reference = eager_outputs(model, pixels)
                with torch.inference_mode():
                    outputs = reloaded(pixels)
                diff = max(float((o - r).abs().max()) for o, r in zip(outputs, reference))
                allowed = tolerance * max(1.0, float(reference[0].abs().max()))
                report.checks.append({"batch": batch, "height": height, "width": width, "max_abs_diff": diff,
                                      "tolerance": allowed})
                if not diff <= allowed:
                    raise RuntimeError(f"the TorchScript trace differs from the eager model at {batch}x{height}x"
                                       f"{width}: max |Δ| {diff:.3g} > {allowed:.3g}; the file was not written")
        staged.replace(path)
    return report
