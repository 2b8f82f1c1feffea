"""DoReFa-Net quantizers (Zhou et al., 2016). The paper's ``quantize_k(x) = round((2^k - 1) x) /
(2^k - 1)`` on [0, 1], straight-through, is the core of both."""
import torch

from .learned import QATQuantizer


class _ClipQuantize(torch.autograd.Function):
    """``quantize_k(clip(x, lo, 1))`` on ``[lo, 1]`` (lo = 0, or -1 for signed inputs) in one
    function: gradient 1 strictly inside, 0 where clipped."""

    @staticmethod
    def forward(ctx, x, bits: int, lo: float):
        n = (2 ** bits - 1) / (1.0 - lo)
        ctx.save_for_backward(x)
        ctx.lo = lo
        y = x.clamp(lo, 1.0)
        if lo:
            return y.sub_(lo).mul_(n).round_().div_(n).add_(lo)
        return y.mul_(n).round_().div_(n)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad.masked_fill((x <= ctx.lo) | (x >= 1.0), 0), None, None


class _TanhQuantize(torch.autograd.Function):
    """DoReFa's k-bit weight ``2 quantize_k(tanh(w) / 2max|tanh w| + 1/2) - 1`` times ``scale``
    in one function, straight through ``quantize_k``: the gradient is that of
    ``scale tanh(w) / max|tanh w|`` (through the max too)."""

    @staticmethod
    def forward(ctx, w, bits: int, scale: float):
        t = torch.tanh(w)
        idx = t.abs().argmax()
        m = t.reshape(-1)[idx].abs().clamp_min(1e-12)
        ctx.save_for_backward(t, idx, m)
        ctx.scale = scale
        n = 2 ** bits - 1
        # 2 round(n (t / 2m + 1/2)) / n - 1
        return (t * (n / (2 * m)) + n / 2).round_().mul_(2 * scale / n).sub_(scale)

    @staticmethod
    def backward(ctx, grad):
        t, idx, m = ctx.saved_tensors
        dt = 1 - t * t                               # d tanh
        gq = grad * (ctx.scale / m)                  # d(scale t / m) / dt at fixed m
        grad_w = gq * dt
        # through m = |t_idx|: d/dt_idx of (t / m) summed against grad = -sum(grad t) / m^2 sign(t_idx)
        flat = grad_w.reshape(-1)
        t_idx = t.reshape(-1)[idx]
        flat[idx] = flat[idx] - (grad * t).sum() * ctx.scale / (m * m) * torch.sign(t_idx) * dt.reshape(-1)[idx]
        return grad_w, None, None


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
        scale = float(w.detach().abs().max()) if self.rescale else 1.0
        return _TanhQuantize.apply(w, self.bits, scale)


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
        return _ClipQuantize.apply(x, self.bits, -1.0 if bool(self.signed) else 0.0)
