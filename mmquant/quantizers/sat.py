"""SAT: scale-adjusted training (Jin, Yang & Liao, "Towards Efficient Training for Neural Network
Quantization", arXiv 1912.10207).

Two parts, one quantizer each:

* weights: DoReFa's tanh-normalised uniform grid ``Q(w)`` in [-1, 1], then rescaled to
  ``Q*(w) = Q(w) / sqrt(n_out Var[Q(w)])`` so the effective weights have the variance of a
  well-initialised float layer (``1 / n_out``) whatever the bit width: the paper's remedy for the
  "efficient learning rate" that quantization otherwise changes (it matters most where no
  normalisation follows, e.g. the classifier; after a BatchNorm it is absorbed);
* activations: PACT with the calibrated gradient (CG-PACT): the straight-through gradient to the
  clip level that takes the rounding into account, ``(y - x) / alpha`` inside the clip range.
"""
import math

import torch

from .dorefa import _TanhQuantize
from .learned import QATQuantizer
from .pact import _PACT, PACTQuantizer


class _CGPACT(torch.autograd.Function):
    """PACT's forward (``y = round(clip(x, lo, alpha) / d) * d``, ``d = (alpha - lo) / levels``,
    ``lo`` = 0 or ``-alpha``) with SAT's calibrated gradients. ``y`` written as ``alpha`` times a
    function of ``x / alpha``, rounding straight through, gives ``dy/dalpha = (y - x) / alpha``
    on the grid (unsigned and signed alike), 1 above it, -1 below it (signed) and 0 below
    it (unsigned, where ``y = 0``); to ``x``: 1 inside, 0 where clipped (as PACT)."""

    @staticmethod
    def forward(ctx, x, alpha, levels: int, signed: bool):
        y = _PACT.forward(ctx, x, alpha, levels, signed)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        a = ctx.a
        above = x >= a
        below = x <= (-a if ctx.signed else 0.0)
        clipped = above | below
        grad_x = grad.masked_fill(clipped, 0)
        d_alpha = ((y - x) / a).masked_fill_(above, 1.0).masked_fill_(below, -1.0 if ctx.signed else 0.0)
        grad_alpha = (grad * d_alpha).sum()
        return grad_x, grad_alpha.reshape(ctx.alpha_shape), None, None


def cg_pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """PACT's clip-and-quantize (:func:`mmquant.quantizers.pact_quantize`) with the calibrated
    gradient to ``alpha``: ``(y - x) / alpha`` for ``lo < x < alpha``, 1 for ``x >= alpha``, and
    for ``x <= lo`` 0 (unsigned, ``lo = 0``) or -1 (signed, ``lo = -alpha``).

    >>> a = torch.tensor(3.0, requires_grad=True)
    >>> x = torch.tensor([-1.0, 0.4, 1.4, 5.0], requires_grad=True)
    >>> y = cg_pact_quantize(x, a, bits=2); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([0.0, 0.0, 1.0, 3.0], [0.0, 1.0, 1.0, 0.0])
    >>> round(float(a.grad), 4)      # 0 + (0 - 0.4) / 3 + (1 - 1.4) / 3 + 1 (PACT: 1)
    0.7333
    """
    return _CGPACT.apply(x, alpha, 2 ** bits - 1, signed)


class CGPACTQuantizer(PACTQuantizer):
    """SAT's activation quantizer: :class:`PACTQuantizer` (the same clip level ``alpha``, its
    initialisation, signed grids and export) with the calibrated gradient to ``alpha``
    (:func:`cg_pact_quantize`). Give ``alpha`` weight decay as for PACT (the scheme configs'
    ``quantizer.alpha`` key does)."""

    def __init__(self, bits: int, kind: str = 'act', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, alpha_init=None):
        if kind != 'act':
            raise ValueError('CG-PACT quantizes activations; SAT weights use SATWeightQuantizer (quantizer sat)')
        super().__init__(bits, kind, num_channels, ch_axis, per_channel, signed, alpha_init)

    def quantize(self, x):
        return cg_pact_quantize(x, self.alpha.abs().clamp_min(1e-4), self.bits, bool(self.signed))


class SATWeightQuantizer(QATQuantizer):
    """SAT's scale-adjusted DoReFa weights: ``Q(w) = 2 quantize_k(tanh(w) / 2max|tanh w| + 1/2) - 1``
    (``2^k`` uniform levels in [-1, 1], straight through the rounding), then
    ``Q*(w) = Q(w) / sqrt(n_out Var[Q(w)])``.

    ``n_out``, the layer's output neurons, comes from the weight's shape:
    ``shape[ch_axis] * prod(shape[2:])``, i.e. out_channels x kernel area for a conv,
    out_features for a linear layer (``ch_axis`` = 1 for transposed convs, as the converter
    passes: their per-group output channels). ``Var`` is the population variance over all elements
    (``mean((q - mean q)^2)``); ``Var[Q*(w)] = 1 / n_out`` exactly. One scalar per layer, so the
    result is still a uniform grid with one scale per tensor, but like DoReFa's weights zero lies
    between two levels (no integer zero point): no integer / QDQ export.

    ``detach_scale=True`` (default) treats the rescale factor as a constant in the backward
    pass, as the authors' released code does (its std is taken of the detached quantized weight);
    ``False`` backpropagates through ``Var[Q(w)]`` as autograd gives (the gradient then loses its
    component along ``Q(w)``'s scale, as under a weight normalisation).

    >>> q = SATWeightQuantizer(bits=2)
    >>> w = torch.tensor([[-1.0, -0.1, 0.1, 1.0]])      # linear: n_out = 1; Q(w) = [-1, -1/3, 1/3, 1]
    >>> [round(v, 4) for v in q(w).flatten().tolist()]   # Var Q = 5/9: Q * 3 / sqrt(5)
    [-1.3416, -0.4472, 0.4472, 1.3416]
    """

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, detach_scale: bool = True):
        if kind != 'weight':
            raise ValueError('SATWeightQuantizer quantizes weights; SAT activations use CGPACTQuantizer '
                             '(quantizer sat)')
        super().__init__(bits, kind, num_channels, ch_axis, False, True)
        self.detach_scale = bool(detach_scale)
        self.learned = False

    def fan_out(self, w: torch.Tensor) -> int:
        """``n_out`` of the layer whose weight is ``w``."""
        if w.dim() < 2:
            return int(w.numel())
        return int(w.shape[self.ch_axis]) * math.prod(w.shape[2:])

    def grid(self, w: torch.Tensor) -> torch.Tensor:
        """DoReFa's ``Q(w)`` in [-1, 1], before the scale adjustment."""
        return _TanhQuantize.apply(w, self.bits, 1.0)

    def rescale_factor(self, q: torch.Tensor, n_out: int) -> torch.Tensor:
        """``1 / sqrt(n_out Var[q])`` (``E[q^2]`` in place of a zero variance: every element on one
        level; DoReFa's levels are never 0, so that is never 0)."""
        v = q.detach() if self.detach_scale else q
        var = v.var(unbiased=False)
        var = torch.where(var > 1e-12, var, v.square().mean())
        return (var * n_out).rsqrt()

    def quantize(self, w):
        q = self.grid(w)
        return q * self.rescale_factor(q, self.fan_out(w))

    def extra_repr(self):
        return super().extra_repr() + f', detach_scale={self.detach_scale}'
