"""F8Net's residual blocks: one clipping level per residual stream, private fractional lengths
(torch only; ResNet basic and bottleneck blocks, recognised by their parts).

Under PACT as fixed point a layer reads ``Q(x / eta)``, ``eta = 2^FL alpha / qmax``, and in an
integer network the ``1 / eta`` is folded into whatever produced ``x``. A residual stream (the
tensor between two blocks) is read by the next block's first conv, by its downsample conv, and
by the identity shortcut, which adds it to the block's output: every reader of the stream, and of
the streams chained to it by identity shortcuts, must see it in the same units up to a power of
two. F8Net therefore gives all of them one clipping level ``alpha`` (a shared parameter) while
each keeps its own FL: their ``eta`` differ by ``2^(FL_i - FL_j)``, a shift. A block with a
downsample conv ends the chain: both inputs of its add come out of convs, which can fold any
scale, so its output starts a new stream (the authors' ResNet does the same).

The blocks keep their class and forward: the adds are exact in fixed point once aligned by
shifts, so only the clipping levels are tied.
"""
from typing import List

from torch import nn

from .binary_blocks import is_basic_block, is_bottleneck


def _downsample_conv(block: nn.Module, block_name: str):
    ds = getattr(block, 'downsample', None)
    if ds is None:
        return None
    if isinstance(ds, nn.Conv2d):
        return f'{block_name}.downsample'
    for name, m in ds.named_modules():
        if isinstance(m, nn.Conv2d):
            return f'{block_name}.downsample.{name}'
    return None


def residual_streams(model: nn.Module) -> List[List[str]]:
    """The conv names that read one residual stream (chained through identity shortcuts), in
    forward order, for every chain of ResNet blocks in ``model`` with at least two readers.

    >>> import torchvision
    >>> residual_streams(torchvision.models.resnet18())[0]
    ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0']
    """
    chains = {}
    for name, m in model.named_modules():
        if name and (is_basic_block(m) or is_bottleneck(m)):
            owner = name.rsplit('.', 2)[0] if name.count('.') >= 2 else ''
            chains.setdefault(owner, []).append((name, m))
    groups = []
    for blocks in chains.values():
        current = []
        for name, block in blocks:
            current.append(f'{name}.conv1')
            ds = _downsample_conv(block, name)
            if ds is not None:
                current.append(ds)
                groups.append(current)
                current = []
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def share_residual_clipping(model: nn.Module) -> List[List[str]]:
    """Tie the clipping level of the input quantizers of every residual stream's readers
    (:func:`residual_streams`) to the first one's; returns the tied groups. Readers without a
    ``clip='pact'`` input quantizer are left out."""
    modules = dict(model.named_modules())
    tied = []
    for group in residual_streams(model):
        members = [n for n in group
                   if getattr(getattr(modules.get(n), 'input_quantizer', None), 'clip', None) == 'pact']
        if len(members) < 2:
            continue
        owner = modules[members[0]].input_quantizer
        for n in members[1:]:
            modules[n].input_quantizer.share_clip(owner)
        tied.append(members)
    return tied


__all__ = ['residual_streams', 'share_residual_clipping']
