"""Binary (1-bit) quantizers: XNOR-Net, XNOR-Net++, Bi-Real Net, Group-Net.

Every binary value is +1 or -1 (``sign(0) = +1``, so no zero slips into a binary tensor).
"""
import torch
import torch.nn.functional as F

from .learned import QATQuantizer, channel_view


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _Sign(torch.autograd.Function):
    """sign forward. Backward: the clipped straight-through estimator (1 on |x| <= 1, else 0),
    or with ``approx`` Bi-Real Net's ApproxSign gradient ``2 - 2|x|`` on |x| < 1, else 0."""

    @staticmethod
    def forward(ctx, x, approx: bool):
        ctx.save_for_backward(x)
        ctx.approx = approx
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        if ctx.approx:
            return grad * (2 - 2 * x.abs()).clamp_min(0), None
        return grad * (x.abs() <= 1).to(grad.dtype), None


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """>>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
    >>> y = sign_ste(x); y.sum().backward(); y.tolist(), x.grad.tolist()
    ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    return _Sign.apply(x, False)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """>>> x = torch.tensor([-2.0, -0.5, 0.0, 0.75], requires_grad=True)
    >>> y = approx_sign(x); y.sum().backward(); y.tolist(), x.grad.tolist()
    ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 0.5])
    """
    return _Sign.apply(x, True)


class BinaryQuantizer(QATQuantizer):
    """Base of the 1-bit quantizers (no calibration needed: nothing to initialise from data
    except where a subclass says)."""
    min_bits = max_bits = 1

    def __init__(self, bits: int = 1, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = True, signed=None):
        super().__init__(bits, kind, num_channels, ch_axis, per_channel, True)
        self.learned = False

    def mean_abs(self, w: torch.Tensor) -> torch.Tensor:
        """Per-output-channel mean |w|, shaped to broadcast against ``w``."""
        return self.param_view(channel_view(w, self.ch_axis).abs().mean(1), w)


class XNORWeightQuantizer(BinaryQuantizer):
    """XNOR-Net weights ``alpha sign(W)``, ``alpha = mean |W|`` per output filter. Autograd runs
    through ``alpha`` and the clipped straight-through sign (the paper's gradient).

    >>> q = XNORWeightQuantizer(kind='weight', num_channels=2)
    >>> q(torch.tensor([[0.5, -1.5], [2.0, 1.0]])).tolist()
    [[1.0, -1.0], [1.5, 1.5]]
    """

    def quantize(self, w):
        return self.mean_abs(w) * sign_ste(w)


class BiRealWeightQuantizer(BinaryQuantizer):
    """Bi-Real Net weights: ``mean|W| sign(W)`` per output channel in the forward pass (the scale
    a constant to autograd); the gradient to the real weight is that of ``clip(W, -1, 1)``,
    Bi-Real's magnitude-aware straight-through update."""

    def quantize(self, w):
        binary = self.mean_abs(w).detach() * _sign(w)
        clipped = w.clamp(-1, 1)
        return binary.detach() + clipped - clipped.detach()


class XNORPPWeightQuantizer(BinaryQuantizer):
    """XNOR-Net++ weights: ``gamma sign(W)`` with ``gamma`` a learned per-output-channel scale
    (the paper's factor Gamma in its per-channel form; initialised to mean |W|). Folding the
    output scale into the weight is exact because a convolution is linear in its weight."""

    def __init__(self, bits: int = 1, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = True, signed=None):
        super().__init__(bits, kind, num_channels, ch_axis, True, signed)
        self.gamma = torch.nn.Parameter(torch.ones(self.num_channels))
        self.learned = True

    def init_params(self, stats):
        self.gamma.data.copy_(stats.mean_abs().expand_as(self.gamma))

    def quantize(self, w):
        return self.param_view(self.gamma, w) * sign_ste(w)


class SignActQuantizer(BinaryQuantizer):
    """Binary activations ``sign(x)``. ``grad='ste'``: clipped straight-through (XNOR-Net,
    XNOR-Net++, Group-Net); ``grad='approx'``: Bi-Real's ApproxSign.

    ``scaling=True`` adds XNOR-Net's activation scale: the layer multiplies its output by
    ``K = box_filter(mean_c |x|)`` at every output position (:meth:`output_scale`).
    """

    def __init__(self, bits: int = 1, kind: str = 'act', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, grad: str = 'ste', scaling: bool = False):
        if grad not in ('ste', 'approx'):
            raise ValueError(f"grad={grad!r}; accepted: 'ste', 'approx'")
        super().__init__(bits, 'act', 1, ch_axis, False, signed)
        self.grad = grad
        self.scaling = scaling

    def quantize(self, x):
        return approx_sign(x) if self.grad == 'approx' else sign_ste(x)

    def output_scale(self, x: torch.Tensor, layer):
        """XNOR-Net's K for ``layer``'s output, or ``None`` (no scaling / not a 2-d conv / the
        input passes through unquantized: disabled or observing)."""
        if not self.scaling or not self.enabled or self.observing or x.dim() != 4 \
                or not hasattr(layer, 'kernel_size'):
            return None
        a = x.abs().mean(1, keepdim=True)
        kh, kw = layer.kernel_size
        box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
        return F.conv2d(a, box, None, layer.stride, layer.padding, layer.dilation)
