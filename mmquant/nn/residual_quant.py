"""Quantized residual streams: a block rewrite that puts the residual add on integers.

The layer twins quantize what enters each conv; a ResNet block's shortcut and its add still
carry float tensors, so an exported graph keeps float between the convs (onnxruntime then fuses
only the convs whose output goes straight into a quantizer, about half of ResNet-18's). This
rewrite quantizes, in every basic / bottleneck block (mmpretrain, mmdet, torchvision style):

* ``in_quantizer``: the block input, which the first conv, the downsample and the identity share;
* ``branch_quantizer``: the residual branch's output before the add;
* ``shortcut_quantizer``: the downsample's output (blocks with one),

so ``out = relu(Qb(branch(Qi(x))) + Qs(shortcut(Qi(x))))``: every tensor between convs is on an
integer grid, as integer runtimes (TF-Lite's int8 ResNets) keep it. The convs, norms, downsample
and ReLU keep their names, so float checkpoints load; the quantizers are uniform, affine,
``bits`` wide, calibrated like the layers' input quantizers.
"""
from typing import List

import torch
from torch import nn

from ..observers import build_observer
from ..quantizers import QScheme, UniformQuantizer
from .binary_blocks import is_basic_block, is_bottleneck


def _stream_quantizer(bits: int, observer: str) -> UniformQuantizer:
    return UniformQuantizer(QScheme(bits=bits, symmetric=False, signed=None), observer=build_observer(observer))


class QuantResidualBlock(nn.Module):
    """A basic or bottleneck block whose input, branch output and shortcut output are quantized."""

    def __init__(self, block: nn.Module, bits: int = 8, observer: str = 'minmax'):
        super().__init__()
        self.bottleneck = is_bottleneck(block)
        self.convs = ['conv1', 'conv2'] + (['conv3'] if self.bottleneck else [])
        self.norm_names = [getattr(block, f'norm{i}_name', f'bn{i}') for i in range(1, len(self.convs) + 1)]
        for c, n in zip(self.convs, self.norm_names):
            self.add_module(c, getattr(block, c))
            self.add_module(n, getattr(block, n))
        self.downsample = block.downsample
        self.relu = getattr(block, 'relu', None) or nn.ReLU(inplace=False)
        device = block.conv1.weight.device
        self.in_quantizer = _stream_quantizer(bits, observer).to(device)
        self.branch_quantizer = _stream_quantizer(bits, observer).to(device)
        self.shortcut_quantizer = None if self.downsample is None else _stream_quantizer(bits, observer).to(device)
        for k in ('norm1_name', 'norm2_name', 'norm3_name'):     # mmpretrain's norm properties
            if hasattr(block, k):
                setattr(self, k, getattr(block, k))

    @property
    def norm1(self):
        return getattr(self, self.norm_names[0])

    @property
    def norm2(self):
        return getattr(self, self.norm_names[1])

    def stream_quantizers(self) -> List[UniformQuantizer]:
        return [q for q in (self.in_quantizer, self.branch_quantizer, self.shortcut_quantizer) if q is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quantizer(x)
        identity = x if self.downsample is None else self.shortcut_quantizer(self.downsample(x))
        out = x
        for i, (c, n) in enumerate(zip(self.convs, self.norm_names)):
            out = getattr(self, n)(getattr(self, c)(out))
            if i < len(self.convs) - 1:
                out = self.relu(out)
        return self.relu(self.branch_quantizer(out) + identity)


def quantize_residuals(model: nn.Module, bits: int = 8, observer: str = 'minmax') -> List[str]:
    """Rewrite every residual block of ``model`` in place (see the module doc); returns their names.
    One clear error if the model has none."""
    names = [n for n, m in model.named_modules()
             if (is_basic_block(m) or is_bottleneck(m)) and not isinstance(m, QuantResidualBlock)]
    if not names:
        raise ValueError('quant_residual: the model has no ResNet basic / bottleneck blocks to rewrite')
    for name in names:
        parent, _, child = name.rpartition('.')
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, QuantResidualBlock(getattr(owner, child), bits, observer))
    return names


def stream_quantizers(model: nn.Module):
    """``(name, quantizer)`` of every residual-stream quantizer in ``model``."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantResidualBlock):
            for attr in ('in_quantizer', 'branch_quantizer', 'shortcut_quantizer'):
                q = getattr(m, attr)
                if q is not None:
                    out.append((f'{name}.{attr}', q))
    return out
