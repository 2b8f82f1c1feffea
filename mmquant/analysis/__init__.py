"""Analysis of quantized models (torch only): per-layer sensitivity and mixed-precision suggestions."""
from .sensitivity import (LayerSensitivity, compare, flat_outputs, float_outputs, layer_sensitivity, suggest_bits,
                          weight_noise)

__all__ = ['LayerSensitivity', 'compare', 'flat_outputs', 'float_outputs', 'layer_sensitivity', 'suggest_bits',
           'weight_noise']
