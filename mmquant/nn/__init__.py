"""Quantized layer twins (depends on quantizers only)."""
from .conv_bn import FoldedBatchNorm2d, QConvBN2d, fuse_conv_bn
from .qlayers import QUANT_LAYERS, QConv2d, QConvTranspose2d, QLinear
from .residual_clip import residual_streams, share_residual_clipping
from .residual_quant import QuantResidualBlock, quantize_residuals, stream_quantizers
from .weight_std import bake_weight_standardization, standardize

__all__ = ['QConv2d', 'QConvTranspose2d', 'QLinear', 'QUANT_LAYERS', 'QConvBN2d', 'FoldedBatchNorm2d',
           'fuse_conv_bn', 'residual_streams', 'share_residual_clipping', 'QuantResidualBlock', 'quantize_residuals',
           'stream_quantizers', 'bake_weight_standardization', 'standardize']
