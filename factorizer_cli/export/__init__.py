"""ONNX export and verification: ``export_onnx(package, "model.onnx")`` writes a graph that ONNX Runtime
runs without PyTorch, with the model card in its metadata (``zoo.onnx_file.open_onnx`` reads it)."""

from .exporter import ExportedFile, ExportOptions, cached_onnx, export_onnx, verify_model

__all__ = ["export_onnx", "ExportOptions", "ExportedFile", "verify_model", "cached_onnx"]
