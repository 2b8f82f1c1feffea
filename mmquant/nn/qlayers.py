"""Quantized twins of ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear``.

Each twin *is* a ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` (subclass), shares the float layer's weight and
bias Parameters, and adds two quantizers: ``weight_quantizer`` and ``input_quantizer``
(``None`` for weight-only quantization). Code that checks ``isinstance(m, nn.Conv2d)`` (weight
init, BN folding, FLOP counters) keeps working on the converted model.

An input quantizer with an ``input_scaling(x)`` method (F8Net's PACT as fixed point) makes the
layer compute ``op(Q_in(x / eta), Q_w(eta w))``: the clipping level moves out of the activation
grid into the weight, and both quantizers keep power-of-two grids.

Two per-layer options of the low-bit training literature (QTool's model variants), both off by
default and set by :class:`mmquant.qconfig.LayerQConfig`:

* ``weight_standardization`` (an ``eps``, or ``None``): the weight is standardised per output
  channel, ``(W - mean) / (std + eps)`` (Qiao et al., "Micro-Batch Training with Batch-Channel
  Normalization and Weight Standardization", 2019; mmcv's ``ConvWS``), *before* the weight
  quantizer rounds it. A converted mmcv ``ConvWS2d`` keeps its standardisation this way.
* ``padding_after_quant`` (conv only; ``True`` by default): zero padding is applied to the
  quantized input, so the padded value is the grid's zero. ``False`` pads the float input with
  zeros first and quantizes the padded tensor: the same for grids that hold 0 (every uniform
  grid here), but a binary activation then pads with ``sign(0) = +1`` instead of a 0 that a
  binary kernel cannot hold (QTool's ``padding_after_quant``: padding after a sign makes a
  binary network ternary at the borders).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .weight_std import standardize
from .gemm_conv import gemm_conv2d, small_map


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
        q.weight_standardization = getattr(float_layer, 'eps', None) if q.float_type == 'ConvWS2d' else None
        q.padding_after_quant = True
        return q

    def standardized_weight(self) -> torch.Tensor:
        """The weight, standardised per output channel when ``weight_standardization`` is set
        (unbiased std, as mmcv's ``conv_ws_2d``)."""
        eps = getattr(self, 'weight_standardization', None)
        if eps is None:
            return self.weight
        return standardize(self.weight, eps, 1 if isinstance(self, nn.ConvTranspose2d) else 0)

    def _input_scaling(self, x=None) -> Optional[torch.Tensor]:
        """``eta`` of an input quantizer that normalizes its input (F8Net's PACT), else ``None``;
        ``x`` initialises an uncalibrated one. Computed once per forward pass."""
        fn = getattr(self.input_quantizer, 'input_scaling', None)
        return None if fn is None else fn(x)

    def weight_to_quantize(self, eta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor the weight quantizer rounds: the weight, times ``eta`` under a normalizing
        input quantizer (by default its current ``eta``)."""
        eta = self._input_scaling() if eta is None else eta
        w = self.standardized_weight()
        return w if eta is None else w * eta

    def quantized_weight(self, eta: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.weight_quantizer(self.weight_to_quantize(eta))

    def _quant_input(self, x, eta: Optional[torch.Tensor] = None):
        if self.input_quantizer is None:
            return x
        return self.input_quantizer(x if eta is None else x / eta)

    def _output_scale(self, x):
        """A per-position output scale from the input quantizer (XNOR-Net's K), or ``None``."""
        fn = getattr(self.input_quantizer, 'output_scale', None)
        return None if fn is None else fn(x, self)


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` (grouped and depthwise included) with quantized weight and input."""

    def forward(self, x):
        eta = self._input_scaling(x)
        k = self._output_scale(x)
        xq, wq = self._quant_input(self._pad_first(x), eta), self.quantized_weight(eta)
        if k is None:
            return self._conv(xq, wq, self.bias)
        y = self._conv(xq, wq, None) * k
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def _pads_before_quant(self) -> bool:
        return not getattr(self, 'padding_after_quant', True) and any(self.padding) \
            and self.input_quantizer is not None

    def _pad_first(self, x):
        """Under ``padding_after_quant=False``: ``x`` zero-padded, so the quantizer sees the pads."""
        if not self._pads_before_quant():
            return x
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph))

    # set on an instance (BRECQ's reconstruction does, for its training loop): convolutions with at most
    # gemm_conv.SMALL_MAP_POSITIONS output positions run as one matrix product (faster there, same result)
    gemm_small_maps = False

    def _conv(self, x, w, b):
        if self.gemm_small_maps and not self._pads_before_quant() and small_map(self, x):
            return gemm_conv2d(x, w, b, self.stride, self.padding)
        if not self._pads_before_quant():
            return self._conv_forward(x, w, b)
        return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with quantized weight and input."""

    def forward(self, x):
        eta = self._input_scaling(x)
        return F.linear(self._quant_input(x, eta), self.quantized_weight(eta), self.bias)


class QConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (e.g. Mask R-CNN's mask upsampler) with quantized weight and input.
    Its weight is ``[in, out / groups, kh, kw]``: per-channel scales run along axis 1."""

    def forward(self, x, output_size=None):
        output_padding = self._output_padding(x, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        eta = self._input_scaling(x)
        return F.conv_transpose2d(self._quant_input(x, eta), self.quantized_weight(eta), self.bias, self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)


QUANT_LAYERS = (QConv2d, QConvTranspose2d, QLinear)
