"""One entry point for plain PyTorch users: ``quantize(model, batches, method, bits)``."""
from typing import Callable, Iterable, Optional

from torch import nn

from .convert import ConversionReport
from .ptq import build_ptq


def quantize(model: nn.Module, batches: Iterable, method: str = 'minmax', bits: str = 'w8a8',
             qconfig=None, forward_fn: Optional[Callable] = None, **options) -> ConversionReport:
    """Quantize ``model`` in place by a registered PTQ ``method`` calibrated on ``batches``;
    ``options`` go to the method (e.g. ``num_samples=2048`` for bitsplit).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3))
    >>> report = quantize(net, [torch.randn(2, 1, 8, 8)], 'minmax', 'w4a4')
    >>> [(r.name, r.w_bits, r.role) for r in report.quantized]   # first / last layers stay 8-bit
    [('0', 8, 'first'), ('3', 8, 'last')]
    """
    return build_ptq(method, qconfig, bits, **options)(model, batches, forward_fn)
