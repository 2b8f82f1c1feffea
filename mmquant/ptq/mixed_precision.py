"""Mixed-precision weight bits under a size budget, torch only.

BRECQ's mixed precision: each unit's sensitivity at every candidate bit width (its output loss
on the calibration cache), then the bit widths that minimise the summed sensitivity while the
weights fit a size budget. The sum of per-unit losses and the size are both additive over units,
so the choice is a multiple-choice knapsack; :func:`choose_bits` solves it exactly by dynamic
programming over the Pareto front of (size, loss) of the units taken so far.
"""
import copy
import dataclasses
from typing import Dict, List, Sequence

from torch import nn

from ..convert import quant_layers
from ..quantizers import UniformQuantizer

__all__ = ['set_weight_bits', 'weight_bits', 'choose_bits']


def set_weight_bits(layer: nn.Module, bits: int):
    """Give ``layer`` a weight quantizer of ``bits`` bits (same scheme otherwise), its grid fitted
    to the weight by the layer's weight observer."""
    old = layer.weight_quantizer
    if old.bits == bits:
        return
    scheme = dataclasses.replace(old.scheme, bits=int(bits))
    new = UniformQuantizer(scheme, num_channels=old.scale.numel(), observer=copy.deepcopy(old.observer))
    new.to(old.scale.device)
    if new.observer is not None:
        new.fit(layer.weight)
    layer.weight_quantizer = new


def weight_bits(model: nn.Module) -> Dict[str, int]:
    """``{layer: weight bits}`` of every quantized layer."""
    return {n: m.weight_quantizer.bits for n, m in quant_layers(model)}


def choose_bits(sizes: Sequence[Sequence[float]], losses: Sequence[Sequence[float]], budget: float) -> List[int]:
    """For units ``u`` with options ``k`` of size ``sizes[u][k]`` and loss ``losses[u][k]``: the
    option index of every unit minimising the total loss with total size <= ``budget`` (exact).
    Raises ``ValueError`` when even the smallest options exceed the budget."""
    if len(sizes) != len(losses) or any(len(a) != len(b) for a, b in zip(sizes, losses)):
        raise ValueError('choose_bits: sizes and losses must have the same shape')
    smallest = sum(min(s) for s in sizes)
    if smallest > budget * (1 + 1e-12):
        raise ValueError(f'the size budget {budget:.6g} is below the smallest choice {smallest:.6g}')
    front = [(0.0, 0.0, ())]                     # (size, loss, choices) on the Pareto front
    for s_u, l_u in zip(sizes, losses):
        cand = sorted(((s + s_u[k], l + l_u[k], ch + (k,)) for s, l, ch in front for k in range(len(s_u))
                       if s + s_u[k] <= budget * (1 + 1e-12)), key=lambda t: (t[0], t[1]))
        front = []
        for item in cand:                        # keep the points no smaller point beats on loss
            if not front or item[1] < front[-1][1]:
                front.append(item)
    return list(min(front, key=lambda t: t[1])[2])
