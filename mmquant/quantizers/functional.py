"""Fake quantization with straight-through gradients, and the scale / zero-point arithmetic."""
import torch

from .scheme import QScheme

_EPS = 1e-12


class _RoundSTE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with the identity as gradient."""
    return _RoundSTE.apply(x)


def broadcast_param(p: torch.Tensor, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """Shape a per-channel (or per-tensor) parameter to broadcast against ``x`` along ``ch_axis``."""
    if p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return p.reshape(shape)


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int, ch_axis: int = 0):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the straight-through estimator.

    The gradient to ``x`` is 1 inside the grid and 0 where the value was clamped; ``scale`` also
    receives its gradient (used by learned-step methods).

    >>> fake_quantize(torch.tensor([0.26, -3.0, 9.0]), torch.tensor(0.5), torch.tensor(0.), -4, 3)
    tensor([ 0.5000, -2.0000,  1.5000])
    """
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s


def quantize(x, scale, zero_point, qmin: int, qmax: int, ch_axis: int = 0) -> torch.Tensor:
    """Integer codes (int32) of ``x`` on the grid; what an integer kernel or exporter consumes."""
    s = broadcast_param(scale, x, ch_axis)
    z = broadcast_param(zero_point, x, ch_axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q, scale, zero_point, ch_axis: int = 0) -> torch.Tensor:
    s = broadcast_param(scale, q, ch_axis)
    z = broadcast_param(zero_point, q, ch_axis)
    return (q.to(s.dtype) - z) * s


def calc_qparams(min_val: torch.Tensor, max_val: torch.Tensor, scheme: QScheme, signed: bool):
    """Scale and zero point that map ``[min_val, max_val]`` onto the grid of ``scheme``.

    Symmetric grids put 0 on code 0 and cover ``max(|min|, |max|)``; affine grids cover
    ``[min(min, 0), max(max, 0)]`` with an integer zero point, so that 0 is exactly representable.

    >>> s, z = calc_qparams(torch.tensor(-1.), torch.tensor(2.), QScheme(bits=8), signed=True)
    >>> round(float(s * 127), 6), float(z)
    (2.0, 0.0)
    >>> s, z = calc_qparams(torch.tensor(-1.), torch.tensor(2.), QScheme(bits=8, symmetric=False), True)
    >>> round(float(s * 255), 6), float(z)
    (3.0, -43.0)
    """
    qmin, qmax = scheme.qrange(signed)
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    if scheme.symmetric:
        if signed:
            scale = torch.maximum(-min_val, max_val) / qmax
        else:
            scale = max_val / qmax
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale.float(), zero_point.float()
