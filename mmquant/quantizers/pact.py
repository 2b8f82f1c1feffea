"""PACT: parameterized clipping activation (Choi et al., 2018)."""
import torch

from .learned import QATQuantizer


class _PACT(torch.autograd.Function):
    """``y = round(clip(x, lo, alpha) / d) * d`` with ``d = (alpha - lo) / levels``, ``lo`` = 0 or
    ``-alpha``. Gradients as in the paper (straight-through for the rounding): to ``x`` 1 on
    ``lo < x < alpha``; to ``alpha`` 1 where ``x >= alpha`` (and -1 where ``x <= -alpha`` for the
    signed grid)."""

    @staticmethod
    def forward(ctx, x, alpha, levels: int, signed: bool):
        a = float(alpha)
        lo = -a if signed else 0.0
        d = (a - lo) / levels
        ctx.save_for_backward(x)
        ctx.a, ctx.signed, ctx.alpha_shape = a, signed, alpha.shape
        y = x.clamp(lo, a)
        if signed:
            return y.sub_(lo).div_(d).round_().mul_(d).add_(lo)
        return y.div_(d).round_().mul_(d)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        above = x >= ctx.a
        below = x <= (-ctx.a if ctx.signed else 0.0)
        grad_x = grad.masked_fill(above | below, 0)
        grad_alpha = grad.masked_fill(~above, 0).sum()
        if ctx.signed:
            grad_alpha = grad_alpha - grad.masked_fill(~below, 0).sum()
        return grad_x, grad_alpha.reshape(ctx.alpha_shape), None, None


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """PACT's clip-and-quantize. Unsigned: ``2^bits - 1`` steps on ``[0, alpha]``; signed
    (inputs that can be negative, e.g. an FPN level): ``2^bits - 1`` steps on ``[-alpha, alpha]``.

    >>> a = torch.tensor(3.0, requires_grad=True)
    >>> x = torch.tensor([-1.0, 0.4, 1.6, 5.0], requires_grad=True)
    >>> y = pact_quantize(x, a, bits=2); y.sum().backward()
    >>> y.tolist(), x.grad.tolist(), float(a.grad)
    ([0.0, 0.0, 2.0, 3.0], [0.0, 1.0, 1.0, 0.0], 1.0)
    """
    return _PACT.apply(x, alpha, 2 ** bits - 1, signed)


class PACTQuantizer(QATQuantizer):
    """Activation quantizer with a learned clipping level ``alpha`` (one per layer).

    ``alpha_init``: a number (the paper trains from scratch with 10), or ``None`` to start from
    the calibration data at ``mean + 3 std`` (capped at the observed maximum), which suits a
    fine-tune from a float checkpoint. Give ``alpha`` its own weight decay through the optimizer
    (the scheme configs do: the paper regularises alpha with L2).
    """
    min_bits = 1

    def __init__(self, bits: int, kind: str = 'act', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, alpha_init=None):
        if kind != 'act':
            raise ValueError('PACT quantizes activations; weights use DoReFa (method pact)')
        super().__init__(bits, kind, num_channels, ch_axis, False, signed)
        self.alpha_init = alpha_init
        self.alpha = torch.nn.Parameter(torch.tensor(10.0 if alpha_init is None else float(alpha_init)))

    @property
    def scale(self) -> torch.Tensor:
        lo = -self.alpha.detach() if bool(self.signed) else 0.0
        return ((self.alpha.detach() - lo) / (2 ** self.bits - 1)).reshape(1)

    def init_params(self, stats):
        if self.alpha_init is not None:
            return
        top = stats.max.max() if not bool(self.signed) else torch.maximum(-stats.min.min(), stats.max.max())
        mean = (stats.sum / stats.n).abs().max()
        value = torch.minimum(mean + 3 * stats.std().max(), top).clamp_min(1e-3)
        self.alpha.data.fill_(float(value))

    def quantize(self, x):
        return pact_quantize(x, self.alpha.abs().clamp_min(1e-4), self.bits, bool(self.signed))
