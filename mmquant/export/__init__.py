"""ONNX export of quantized models (torch + onnx; onnxruntime for the checks)."""
from .qdq import QDQExportError, affine_grid, export_qdq, qdq_mode

__all__ = ['QDQExportError', 'affine_grid', 'export_qdq', 'qdq_mode']
