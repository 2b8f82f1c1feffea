"""Fake-quant primitives with straight-through gradients (torch only)."""
from .functional import calc_qparams, dequantize, fake_quantize, quantize, round_ste
from .scheme import MAX_BITS, MIN_BITS, QScheme, check_bits
from .uniform import UniformQuantizer

__all__ = ['QScheme', 'check_bits', 'MIN_BITS', 'MAX_BITS', 'UniformQuantizer', 'fake_quantize',
           'quantize', 'dequantize', 'calc_qparams', 'round_ste']
