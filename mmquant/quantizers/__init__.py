"""Fake-quant primitives with straight-through gradients (torch only)."""
from .binary import (BiRealWeightQuantizer, SignActQuantizer, XNORPPWeightQuantizer, XNORWeightQuantizer,
                     approx_sign, sign_ste)
from .dorefa import DoReFaActQuantizer, DoReFaWeightQuantizer
from .fixed_point import FixedPointQuantizer, fixed_point_quantize
from .functional import calc_qparams, dequantize, fake_quantize, quantize, round_ste
from .learned import QATQuantizer
from .lqnet import LQNetQuantizer
from .lsq import LSQQuantizer, lsq_fake_quantize
from .pact import PACTQuantizer, pact_quantize
from .sat import CGPACTQuantizer, SATWeightQuantizer, cg_pact_quantize
from .registry import QUANTIZERS, build_quantizer, check_quantizer_bits, quantizer_class
from .scheme import MAX_BITS, MIN_BITS, QScheme, check_bits
from .uniform import UniformQuantizer

__all__ = ['QScheme', 'check_bits', 'MIN_BITS', 'MAX_BITS', 'UniformQuantizer', 'fake_quantize',
           'quantize', 'dequantize', 'calc_qparams', 'round_ste', 'QATQuantizer', 'LSQQuantizer',
           'lsq_fake_quantize', 'PACTQuantizer', 'pact_quantize', 'DoReFaWeightQuantizer',
           'DoReFaActQuantizer', 'LQNetQuantizer', 'XNORWeightQuantizer',
           'XNORPPWeightQuantizer', 'BiRealWeightQuantizer', 'SignActQuantizer', 'sign_ste',
           'approx_sign', 'QUANTIZERS', 'build_quantizer', 'check_quantizer_bits', 'quantizer_class',
           'FixedPointQuantizer', 'fixed_point_quantize', 'SATWeightQuantizer', 'CGPACTQuantizer',
           'cg_pact_quantize']
