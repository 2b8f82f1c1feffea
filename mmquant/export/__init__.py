"""ONNX export of quantized models (torch + onnx; onnxruntime for the checks): QuantizeLinear /
DequantizeLinear graphs (:mod:`.qdq`), integer-only graphs (:mod:`.int_graph`) and the PyTorch
simulator of the integer arithmetic (:mod:`.int_sim`); convolution kernels cut to the taps that
meet data (:mod:`.pad_taps`)."""
from .int_graph import IntExportError, export_int, multiplier_census, op_census, to_integer
from .int_sim import IntegerSimulator
from .pad_taps import prune_padding_taps, useful_taps
from .qdq import QDQExportError, affine_grid, export_qdq, qdq_mode

__all__ = ['QDQExportError', 'IntExportError', 'affine_grid', 'export_qdq', 'qdq_mode', 'export_int',
           'to_integer', 'op_census', 'multiplier_census', 'IntegerSimulator',
           'prune_padding_taps', 'useful_taps']
