"""Export of dinokit models: ONNX (dynamic shapes, fp32 and int8) and TorchScript."""

from dinokit.export.onnx import ExportReport, export_onnx, parse_sizes, read_metadata
from dinokit.export.quantize import agreement, knn_delta, quantize_onnx
from dinokit.export.torchscript import TorchScriptReport, export_torchscript, trace_model

__all__ = ["ExportReport", "TorchScriptReport", "agreement", "export_onnx", "export_torchscript", "knn_delta",
           "parse_sizes", "quantize_onnx", "read_metadata", "trace_model"]
