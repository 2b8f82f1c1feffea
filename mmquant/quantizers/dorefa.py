"""DoReFa-Net quantizers (Zhou et al., 2016)."""
import torch

from .functional import round_ste
from .learned import QATQuantizer


def quantize_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's ``quantize_k`` on [0, 1]: ``round((2^k - 1) x) / (2^k - 1)``, straight-through.

    >>> quantize_k(torch.tensor([0.0, 0.2, 0.5, 1.0]), 2).tolist()
    [0.0, 0.3333333432674408, 0.6666666865348816, 1.0]
    """
    n = 2 ** bits - 1
    return round_ste(x * n) / n


class _SignMean(torch.autograd.Function):
    """``E(|w|) * sign(w)`` forward, identity backward (DoReFa's 1-bit weights)."""

    @staticmethod
    def forward(ctx, w):
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()

    @staticmethod
    def backward(ctx, grad):
        return grad


class DoReFaWeightQuantizer(QATQuantizer):
    """k >= 2: ``w' = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``q = 2 quantize_k(w') - 1`` in [-1, 1];
    k = 1: ``E(|w|) sign(w)``; gradients straight through ``quantize_k`` / ``sign``.

    ``rescale=True`` multiplies the k >= 2 result by the layer's current ``max|w|`` (a constant to
    autograd), so a layer that no normalisation follows (FPN convs, a classifier) keeps its output
    scale; with a norm layer after the conv it changes nothing. ``rescale=False`` gives the paper's
    weights in [-1, 1] exactly.

    >>> q = DoReFaWeightQuantizer(bits=2, rescale=False)
    >>> [round(v, 4) for v in q(torch.tensor([-1.0, -0.1, 0.1, 1.0])).tolist()]
    [-1.0, -0.3333, 0.3333, 1.0]
    """
    min_bits = 1

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, rescale: bool = True):
        if kind != 'weight':
            raise ValueError('DoReFaWeightQuantizer quantizes weights; use DoReFaActQuantizer for activations')
        super().__init__(bits, kind, num_channels, ch_axis, False, True)
        self.rescale = rescale
        self.learned = False

    def quantize(self, w):
        if self.bits == 1:
            return _SignMean.apply(w)
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
        q = 2 * quantize_k(t, self.bits) - 1
        return q * w.detach().abs().max() if self.rescale else q


class DoReFaActQuantizer(QATQuantizer):
    """``quantize_k(clip(x, 0, 1))``: gradient 1 inside [0, 1], 0 outside. For inputs that can be
    negative (FPN levels, heads) the signed grid ``2 quantize_k((clip(x, -1, 1) + 1) / 2) - 1``.

    >>> q = DoReFaActQuantizer(bits=2, signed=False)
    >>> [round(v, 4) for v in q(torch.tensor([-0.5, 0.2, 0.5, 3.0])).tolist()]
    [0.0, 0.3333, 0.6667, 1.0]
    """
    min_bits = 1

    def __init__(self, bits: int, kind: str = 'act', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None):
        if kind != 'act':
            raise ValueError('DoReFaActQuantizer quantizes activations; use DoReFaWeightQuantizer for weights')
        super().__init__(bits, kind, num_channels, ch_axis, False, signed)
        self.learned = False

    def quantize(self, x):
        if bool(self.signed):
            return 2 * quantize_k((torch.clamp(x, -1, 1) + 1) / 2, self.bits) - 1
        return quantize_k(torch.clamp(x, 0, 1), self.bits)
