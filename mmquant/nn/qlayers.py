"""Quantized twins of ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear``.

Each twin *is* a ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` (subclass), shares the float layer's weight and
bias Parameters, and adds two quantizers: ``weight_quantizer`` and ``input_quantizer``
(``None`` for weight-only quantization). Code that checks ``isinstance(m, nn.Conv2d)`` (weight
init, BN folding, FLOP counters) keeps working on the converted model.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _QuantMixin:
    weight_quantizer: nn.Module
    input_quantizer: Optional[nn.Module]

    @classmethod
    def from_float(cls, float_layer: nn.Module, weight_quantizer, input_quantizer=None):
        """The twin of ``float_layer``: its parameters, buffers, hooks and training flag (the same
        Parameter objects, so optimizers holding them keep working) plus the quantizers."""
        q = cls.__new__(cls)
        for k, v in float_layer.__dict__.items():   # dicts copied so the two never alias
            q.__dict__[k] = v.copy() if isinstance(v, dict) else v
        q.weight_quantizer = weight_quantizer
        q.input_quantizer = input_quantizer
        q.float_type = type(float_layer).__name__
        return q

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quant_input(self, x):
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _output_scale(self, x):
        """A per-position output scale from the input quantizer (XNOR-Net's K), or ``None``."""
        fn = getattr(self.input_quantizer, 'output_scale', None)
        return None if fn is None else fn(x, self)


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` (grouped and depthwise included) with quantized weight and input."""

    def forward(self, x):
        k = self._output_scale(x)
        if k is None:
            return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)
        y = self._conv_forward(self._quant_input(x), self.quantized_weight(), None) * k
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with quantized weight and input."""

    def forward(self, x):
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (e.g. Mask R-CNN's mask upsampler) with quantized weight and input.
    Its weight is ``[in, out / groups, kh, kw]``: per-channel scales run along axis 1."""

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(self._quant_input(x), self.quantized_weight(), self.bias, self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)


QUANT_LAYERS = (QConv2d, QConvTranspose2d, QLinear)
