"""Weight standardisation baked into a trained model's convs, for post-training quantization.

A trained layer that standardises its weight in the forward pass (mmcv's ``ConvWS2d``, or a
quantized twin with ``weight_standardization`` set) computes a plain convolution with the
standardised weight, which is a constant once training is over. :func:`bake_weight_standardization`
writes that constant into the weight and makes the layer plain, so every PTQ method, BatchNorm
folding and the exporters see the weight the network really uses.
"""
from typing import List

import torch
from torch import nn


def standardize(weight: torch.Tensor, eps: float, axis: int = 0) -> torch.Tensor:
    """``(W - mean) / (std + eps)`` over everything but the output-channel ``axis`` (unbiased
    std, as mmcv's ``conv_ws_2d``)."""
    w = weight.transpose(0, axis) if axis else weight
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    w = (w - flat.mean(1).reshape(shape)) / (flat.std(1).reshape(shape) + eps)
    return w.transpose(0, axis) if axis else w


def _is_conv_ws(m: nn.Module) -> bool:
    return type(m).__name__ == 'ConvWS2d' and type(m).__module__.startswith('mmcv.') and hasattr(m, 'eps')


@torch.no_grad()
def bake_weight_standardization(model: nn.Module) -> List[str]:
    """Replace every mmcv ``ConvWS2d`` by an ``nn.Conv2d`` holding its standardised weight, and
    clear ``weight_standardization`` on quantized twins after writing theirs; returns the names.
    The model computes the same function afterwards."""
    baked = []
    for name, m in list(model.named_modules()):
        if _is_conv_ws(m):
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                             m.dilation, m.groups, m.bias is not None, device=m.weight.device,
                             dtype=m.weight.dtype)
            conv.weight.copy_(standardize(m.weight, m.eps))
            if m.bias is not None:
                conv.bias.copy_(m.bias)
            conv.train(m.training)
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, conv)
            baked.append(name)
        elif getattr(m, 'weight_standardization', None) is not None and hasattr(m, 'standardized_weight'):
            m.weight.copy_(m.standardized_weight())
            m.weight_standardization = None
            baked.append(name)
    return baked


__all__ = ['bake_weight_standardization', 'standardize']
