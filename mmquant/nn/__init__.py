"""Quantized layer twins (depends on quantizers only)."""
from .qlayers import QUANT_LAYERS, QConv2d, QConvTranspose2d, QLinear

__all__ = ['QConv2d', 'QConvTranspose2d', 'QLinear', 'QUANT_LAYERS']
