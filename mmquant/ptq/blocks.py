"""Reconstruction units of a converted model: residual blocks, and single layers elsewhere.

Block reconstruction (BRECQ) fits the quantized weights of a unit to the float output of the
whole unit. A residual unit (ResNet's BasicBlock / Bottleneck in mmpretrain, mmdet and
torchvision, MobileNetV2's InvertedResidual, mmquant's OrderedBasicBlock, ...) is one unit: its convs, its shortcut and the
add are reconstructed together. Layers outside residual units (a stem, VGG's convs, FPN convs,
head convs, RoI-head FCs) are units of one layer each; where the layer sits in a conv-norm-act
wrapper (mmcv's ``ConvModule``: VGG's convs, FPN and head convs) the wrapper is the unit, so the
output matched is the one after the activation, as the next layer sees it (matching the conv's
output before a ReLU spends the fit on negative values the ReLU throws away). A config may name the
units itself.
"""
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from torch import nn

from ..nn import QUANT_LAYERS

__all__ = ['Unit', 'RESIDUAL_BLOCKS', 'LAYER_WRAPPERS', 'find_units']

# class names of residual units, whichever library defines them
RESIDUAL_BLOCKS = ('BasicBlock', 'Bottleneck', 'InvertedResidual', 'OrderedBasicBlock')
# class names of modules that wrap one quantized layer with its norm and activation
LAYER_WRAPPERS = ('ConvModule',)


@dataclass
class Unit:
    """A module reconstructed as a whole (``name`` is its path in the model) and the quantized
    layers inside it (paths in the model); a single layer is a unit of itself."""
    name: str
    module: nn.Module = field(repr=False)
    layers: List[str]

    @property
    def is_block(self) -> bool:
        """Several quantized layers reconstructed together (a single layer, with or without its
        norm and activation, is not a block)."""
        return len(self.layers) > 1


def _quant_layers_in(module: nn.Module, prefix: str) -> List[str]:
    return [f'{prefix}.{n}' if n else prefix for n, m in module.named_modules() if isinstance(m, QUANT_LAYERS)]


def find_units(model: nn.Module, blocks: Optional[Sequence[str]] = None,
               block_types: Iterable[str] = RESIDUAL_BLOCKS) -> List[Unit]:
    """The units of ``model`` (already converted), in module-tree order.

    ``blocks``: module paths to use as units instead of the automatic choice (each must exist and
    hold quantized layers; the layers outside them are found automatically); ``block_types``:
    class names of the modules that are units when ``blocks`` does not say.
    """
    modules = dict(model.named_modules())
    chosen = {}
    for name in blocks or ():
        if name not in modules:
            raise ValueError(f'block {name!r} is not a module of the model')
        if not _quant_layers_in(modules[name], name):
            raise ValueError(f'block {name!r} holds no quantized layer')
        chosen[name] = modules[name]
    names = sorted(chosen)
    for a, b in zip(names, names[1:]):
        if b.startswith(a + '.'):
            raise ValueError(f'blocks {a!r} and {b!r} overlap; name disjoint modules')
    types = tuple(block_types)
    units: List[Unit] = []

    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            path = f'{prefix}.{child_name}' if prefix else child_name
            if path in chosen:
                units.append(Unit(path, child, _quant_layers_in(child, path)))
            elif isinstance(child, QUANT_LAYERS):
                units.append(Unit(path, child, [path]))
            elif type(child).__name__ in types and not any(c.startswith(path + '.') for c in chosen):
                layers = _quant_layers_in(child, path)
                if layers:
                    units.append(Unit(path, child, layers))
            else:
                wrapped = _quant_layers_in(child, path) if type(child).__name__ in LAYER_WRAPPERS else []
                if len(wrapped) == 1 and not any(c.startswith(path + '.') for c in chosen):
                    units.append(Unit(path, child, wrapped))
                else:
                    walk(child, path)

    walk(model, '')
    return units
