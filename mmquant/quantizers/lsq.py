"""LSQ: learned step size quantization (Esser et al., ICLR 2020)."""
import math

import torch

from .learned import QATQuantizer


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, g: float):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return _GradScale.apply(x, g)


class _LSQ(torch.autograd.Function):
    """LSQ's fake quantization with its gradients written out (fewer passes over the tensor than
    the composed ops: the training step's overhead is mostly these element-wise passes)."""

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, g: float):
        v = x / step
        ctx.save_for_backward(v)
        ctx.qn, ctx.qp, ctx.g, ctx.step_shape = qn, qp, g, step.shape
        return v.clamp(-qn, qp).round_().mul_(step)

    @staticmethod
    def backward(ctx, grad):
        v, = ctx.saved_tensors
        below, above = v < -ctx.qn, v > ctx.qp
        inside = ~(below | above)
        grad_x = grad * inside
        # d y / d s: round(v) - v inside, -Qn below, Qp above
        ds = torch.where(inside, v.round() - v, torch.where(below, float(-ctx.qn), float(ctx.qp))).mul_(grad)
        grad_s = ds.sum() if len(ctx.step_shape) == 0 else ds.sum_to_size(ctx.step_shape)
        return grad_x, grad_s.reshape(ctx.step_shape) * ctx.g, None, None, None


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """``round(clamp(x / s, -Qn, Qp)) * s`` with LSQ's gradients.

    To ``x``: 1 inside the grid, 0 where clamped. To ``s`` (before the scale ``g``):
    ``round(x/s) - x/s`` inside, ``-Qn`` below, ``Qp`` above (the paper's Eq. 3).

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(torch.tensor([0.3, 9.0, -9.0]), s, 4, 3, g=1.0)
    >>> y.sum().backward(); y.tolist(), round(float(s.grad), 4)
    ([0.5, 1.5, -2.0], -0.6)
    """
    return _LSQ.apply(x, step, qn, qp, g)


class LSQQuantizer(QATQuantizer):
    """Learned step size ``s`` (a Parameter; per output channel for weights when asked).

    Initialised as the paper does, ``s = 2 mean|v| / sqrt(Qp)``, from the weight or from the
    calibration batches. The step's gradient is scaled by ``g = 1 / sqrt(N Qp)`` where N is the
    number of weights per step (weights) or of features per sample (activations).

    >>> q = LSQQuantizer(bits=2, kind='weight')
    >>> w = torch.tensor([[-1.0, -0.2, 0.4, 1.0]])
    >>> q.fit(w); round(q.step.item(), 4)           # 2 * 0.65 / sqrt(1)
    1.3
    >>> [round(v, 4) + 0.0 for v in q(w).flatten().tolist()]
    [-1.3, 0.0, 0.0, 1.3]
    """

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None):
        super().__init__(bits, kind, num_channels, ch_axis, per_channel, signed)
        self.step = torch.nn.Parameter(torch.ones(self.num_channels))
        self.register_buffer('elements', torch.tensor(0))   # N of the gradient scale

    def qrange(self):
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    @property
    def scale(self) -> torch.Tensor:
        return self.step.detach().abs()

    def init_params(self, stats):
        qmin, qp = self.qrange()
        step = 2 * stats.mean_abs() / math.sqrt(qp)
        self.step.data.copy_(step.clamp_min(1e-8).expand_as(self.step))
        self.elements.fill_(int(stats.numel_per_item))

    def grad_factor(self) -> float:
        _, qp = self.qrange()
        return 1.0 / math.sqrt(max(int(self.elements), 1) * qp)

    def quantize(self, x):
        qmin, qp = self.qrange()
        step = self.param_view(self.step.abs().clamp_min(1e-8), x)
        return lsq_fake_quantize(x, step, -qmin, qp, self.grad_factor())
