"""Conv-BatchNorm fusion for quantization-aware training (torch only): the conv quantizes the
weight an integer kernel would run, the BN-folded one.

A conv followed by BatchNorm is, per output channel, ``g (conv(x, w) + b - mean) + beta`` with
``g = gamma / sqrt(var + eps)``, i.e. ``conv(x, w_f) + b_f`` with ``w_f = g w`` and
``b_f = beta + g (b - mean)``. :class:`QConvBN2d` computes exactly that on quantized operands:

* evaluation (the BN's running statistics): ``conv(Q_in(x), Q_w(w_f)) + b_f``, one plain
  convolution with a bias, which is what an ONNX export traces (no BatchNorm node);
* training: the batch statistics of the float convolution ``y0 = conv(x_q, w) + b`` of the
  quantized input, folded the same way (gradients flow through them, as through BatchNorm), and
  the BN's running statistics updated from ``y0`` exactly as ``nn.BatchNorm2d`` updates them.

Under F8Net's PACT (an input quantizer with ``input_scaling``) the operands are
``Q_in(x / eta)`` and ``Q_w(eta w_f)``: the clipping level is absorbed into the folded weight.

The BatchNorm stays where it was, as a :class:`FoldedBatchNorm2d`: the same parameters and
buffers under the same names (a float checkpoint's ``bn1.weight``, ``bn1.running_mean``... load
unchanged), still a BatchNorm for optimizers' norm decay, ``norm_eval`` and freezing hooks (the
conv folds the running statistics whenever it or the BN is in eval mode), but an identity in the
forward pass, since the conv already applied it (mmcv's ``norm`` and mmpretrain's ``norm1``
properties keep working).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .qlayers import QConv2d


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose statistics and affine parameters the conv before it folds in; its own
    forward is the identity."""

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm) -> 'FoldedBatchNorm2d':
        folded = cls.__new__(cls)
        for k, v in bn.__dict__.items():
            folded.__dict__[k] = v.copy() if isinstance(v, dict) else v
        return folded

    def forward(self, x):
        return x


class QConvBN2d(QConv2d):
    """A quantized conv that owns the BatchNorm after it (see the module doc). ``bn`` is the
    :class:`FoldedBatchNorm2d` left in the BN's place (not a submodule of the conv: its state
    stays under the BN's own name)."""

    @classmethod
    def from_qconv(cls, qconv: QConv2d, bn: FoldedBatchNorm2d) -> 'QConvBN2d':
        if type(qconv) is not QConv2d:
            raise TypeError(f'QConvBN2d fuses a QConv2d, got {type(qconv).__name__}')
        if not isinstance(bn, FoldedBatchNorm2d) or bn.num_features != qconv.out_channels:
            raise ValueError(f'QConvBN2d needs a FoldedBatchNorm2d of {qconv.out_channels} features')
        if getattr(qconv, 'weight_standardization', None) is not None:
            raise ValueError('a weight-standardised conv cannot fold its BatchNorm while training '
                             '(the fold would be undone by the standardisation); use w_standardize=False')
        fused = cls.__new__(cls)
        for k, v in qconv.__dict__.items():
            fused.__dict__[k] = v.copy() if isinstance(v, dict) else v
        fused._bn = (bn, )
        return fused

    @property
    def bn(self) -> FoldedBatchNorm2d:
        return self._bn[0]

    def fold(self, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w_f, b_f)`` for the statistics ``mean`` / ``var``."""
        bn = self.bn
        g = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            g = g * bn.weight
        b = -mean if self.bias is None else self.bias - mean
        bias = g * b if bn.bias is None else bn.bias + g * b
        return self.weight * g.reshape(-1, 1, 1, 1), bias

    def uses_batch_stats(self) -> bool:
        """Batch statistics while the conv and its BN train (a BN put in eval mode inside training,
        e.g. by ``norm_eval`` or QATFreezeHook, keeps its running statistics), as BatchNorm does."""
        bn = self.bn
        return (self.training and bn.training) or not bn.track_running_stats

    def weight_to_quantize(self, eta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The folded weight with the running statistics (what evaluation and export quantize),
        times ``eta`` under a normalizing input quantizer."""
        eta = self._input_scaling() if eta is None else eta
        w, _ = self.fold(self.bn.running_mean, self.bn.running_var)
        return w if eta is None else w * eta

    def forward(self, x):
        eta = self._input_scaling(x)
        xq = self._quant_input(x, eta)
        if self.uses_batch_stats():
            y0 = self._conv_forward(xq if eta is None else xq * eta, self.weight, self.bias)
            mean = y0.mean((0, 2, 3))
            var = y0.var((0, 2, 3), unbiased=False)
            self._update_running_stats(mean.detach(), var.detach(), y0.numel() // y0.shape[1])
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        w, b = self.fold(mean, var)
        wq = self.weight_quantizer(w if eta is None else w * eta)
        return self._conv_forward(xq, wq, b)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, n: int):
        """``nn.BatchNorm2d``'s update: momentum (``None``: cumulative average), unbiased var."""
        bn = self.bn
        if not (self.training and bn.training and bn.track_running_stats):
            return
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - factor).add_(factor * mean)
        bn.running_var.mul_(1 - factor).add_(factor * var * (n / max(n - 1, 1)))

    def extra_repr(self):
        return super().extra_repr() + ', bn folded'


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fuse_conv_bn(model: nn.Module, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Fuse each ``(conv name, bn name)`` pair of ``model`` in place: the conv (a
    :class:`QConv2d`) becomes a :class:`QConvBN2d`, the BN a :class:`FoldedBatchNorm2d`. Pairs
    whose conv was not quantized, and BNs or convs that appear in more than one pair, are left
    alone. Returns the fused pairs."""
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    modules = dict(model.named_modules())
    fused = []
    for conv_name, bn_name in pairs:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if type(conv) is not QConv2d or not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, FoldedBatchNorm2d):
            continue
        if convs.count(conv_name) > 1 or bns.count(bn_name) > 1:
            continue
        folded = FoldedBatchNorm2d.from_bn(bn)
        _set(model, bn_name, folded)
        _set(model, conv_name, QConvBN2d.from_qconv(conv, folded))
        fused.append((conv_name, bn_name))
    return fused


__all__ = ['FoldedBatchNorm2d', 'QConvBN2d', 'fuse_conv_bn']
