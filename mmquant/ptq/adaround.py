"""AdaRound (Nagel et al., ICML 2020): learned rounding of a weight on a fixed grid, torch only.

The quantized weight is ``s * (clip(floor(w / s) + h(V) + z, qmin, qmax) - z)`` with the rectified
sigmoid ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (``zeta = 1.1``,
``gamma = -0.1``): a soft choice between rounding down (``h = 0``) and up (``h = 1``) that can
reach both ends exactly. ``V`` starts where ``h(V)`` equals the fractional part of ``w / s``, so the
soft weight starts at the float weight (inside the grid). The regulariser
``sum(1 - |2 h(V) - 1| ** beta)`` pushes every ``h`` to 0 or 1 as ``beta`` is annealed from 20
down to 2 (:class:`BetaSchedule`); at the end the rounding is made hard (``V >= 0`` rounds up).
"""
import math
from typing import Optional

import torch
from torch import nn

from ..quantizers.functional import broadcast_param

try:   # the fused soft weight (setup.py builds it; same result, faster)
    from . import _adaround_soft as _soft_ext
except ImportError:  # pragma: no cover - not built (e.g. installed without torch at build time)
    _soft_ext = None

__all__ = ['ZETA', 'GAMMA', 'rectified_sigmoid', 'init_v', 'rounding_regularizer', 'BetaSchedule',
           'AdaRoundWeight']

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = frac`` for ``frac`` in ``[0, 1)`` (the inverse of the rectified sigmoid
    inside its linear range)."""
    p = (frac - GAMMA) / (ZETA - GAMMA)                     # sigmoid(V), in (1/12, 11/12) for frac in [0, 1)
    return torch.log(p / (1 - p))


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1, larger the more are near 1/2."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """The regulariser's exponent over ``iters`` iterations: no regulariser (``None``) for the first
    ``warmup`` fraction, then ``beta`` falls linearly from ``start`` to ``end``."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        if iters < 1 or not 0 <= warmup < 1 or start < end or end <= 0:
            raise ValueError(f'BetaSchedule: need iters >= 1, 0 <= warmup < 1, start >= end > 0; got '
                             f'iters={iters}, warmup={warmup}, start={start}, end={end}')
        self.iters, self.warmup, self.start, self.end = iters, warmup, start, end
        self.begin = int(math.ceil(warmup * iters))

    def __call__(self, t: int) -> Optional[float]:
        if t < self.begin:
            return None
        rel = (t - self.begin) / max(1, self.iters - self.begin)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


class _FusedSoft(torch.autograd.Function):
    """``(soft weight, regulariser)`` from the C++ kernels; ``beta <= 0``: regulariser not computed (0)."""

    @staticmethod
    def forward(ctx, v, floor, s, z, qmin, qmax, inner, beta):
        w, reg = _soft_ext.soft_forward(v, floor, s, z, float(qmin), float(qmax), inner, float(beta))
        ctx.save_for_backward(v, floor, s, z)
        ctx.args = (float(qmin), float(qmax), inner, float(beta))
        return w, reg

    @staticmethod
    def backward(ctx, grad_w, grad_reg):
        v, floor, s, z = ctx.saved_tensors
        qmin, qmax, inner, beta = ctx.args
        if grad_w is None:
            grad_w = torch.zeros_like(v)
        g_reg = 0.0 if grad_reg is None else float(grad_reg)
        gv = _soft_ext.soft_backward(grad_w.contiguous(), v, floor, s, z, qmin, qmax, inner, beta, g_reg)
        return gv, None, None, None, None, None, None, None


class AdaRoundWeight(nn.Module):
    """The learnable rounding of one weight tensor on a fixed grid (``scale`` / ``zero_point``
    per channel along ``ch_axis``, or per tensor, integers in ``[qmin, qmax]``).

    ``forward()`` returns the soft quantized weight (differentiable in ``V``); after
    :meth:`harden` it returns the hard one. :meth:`integers` gives the integer codes. With
    :attr:`beta` set, ``forward()`` also leaves the rounding regulariser of that exponent in
    :attr:`reg` (computed in the same pass where the fused kernel runs), for the caller's loss.
    ``fused=False`` forces the composed torch ops.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 qmin: int, qmax: int, ch_axis: int = 0):
        super().__init__()
        w = weight.detach()
        s = broadcast_param(scale.detach().to(w.dtype), w, ch_axis)
        z = broadcast_param(zero_point.detach().to(w.dtype), w, ch_axis)
        self.register_buffer('s', s.clone())
        self.register_buffer('z', z.clone())
        floor = torch.floor(w / s)
        self.register_buffer('floor', floor)
        self.v = nn.Parameter(init_v(w / s - floor))
        self.qmin, self.qmax = qmin, qmax
        self.hard = False
        # the stride between channels in the weight, for the fused kernel (which takes s, z flat)
        self.inner = 1 if self.s.numel() == 1 else int(math.prod(w.shape[ch_axis + 1:]))
        self.beta: Optional[float] = None
        self.reg: Optional[torch.Tensor] = None
        self.fused = True

    def rounding(self) -> torch.Tensor:
        """``h(V)`` (soft), or 0/1 once hardened."""
        return (self.v >= 0).to(self.v.dtype) if self.hard else rectified_sigmoid(self.v)

    def integers(self) -> torch.Tensor:
        """The integer codes the hard rounding gives (``V >= 0`` rounds up)."""
        up = (self.v.detach() >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up + self.z, self.qmin, self.qmax)

    def _use_kernel(self) -> bool:
        return (self.fused and _soft_ext is not None and self.v.device.type == 'cpu'
                and self.v.dtype == torch.float32 and self.v.is_contiguous())

    def forward(self) -> torch.Tensor:
        if not self.hard and self._use_kernel():
            beta = self.beta if self.beta is not None else 0.0
            w, reg = _FusedSoft.apply(self.v, self.floor, self.s.reshape(-1), self.z.reshape(-1), self.qmin,
                                      self.qmax, self.inner, beta)
            self.reg = reg if self.beta is not None else None
            return w
        q = torch.clamp(self.floor + self.rounding() + self.z, self.qmin, self.qmax)
        self.reg = None if self.beta is None or self.hard else self.regularizer(self.beta)
        return (q - self.z) * self.s

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.v, beta)

    def harden(self):
        """Fix every rounding to down (``V < 0``) or up (``V >= 0``)."""
        self.hard = True
