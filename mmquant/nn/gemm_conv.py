"""Convolution as one matrix product, for small feature maps, torch only.

On maps of a few positions (ResNet's last stages on small images: 2x2, 1x1) a CPU convolution
kernel spends its time on layout work rather than arithmetic: measured on one thread, batch 32,
forward and backward, a 512 -> 512 3x3 convolution on a 1x1 map took 41 ms through
``F.conv2d`` and 16 ms as unfold + matrix product, 256 -> 512 stride 2 on 2x2 21 ms against
8 ms; from 16 output positions up the convolution kernel is as fast or faster. Where a single
tap of the kernel ever touches the input (on a 1x1 map with padding 1, the centre tap of a 3x3
kernel), the product uses that tap alone: the others multiply only padding, contribute nothing
to the output and get a zero gradient either way (16 ms -> 7 ms in the example above).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['used_taps', 'gemm_conv2d', 'small_map', 'SMALL_MAP_POSITIONS']

SMALL_MAP_POSITIONS = 4     # output positions up to which the matrix product is used (see above)


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def used_taps(size: int, k: int, stride: int, pad: int) -> Tuple[int, int]:
    """First and last kernel tap (along one axis) that reaches an input element at some output
    position, for an input of ``size`` elements padded by ``pad`` on each side.

    >>> used_taps(1, 3, 1, 1)        # 1x1 map, 3x3 kernel, padding 1: only the centre tap
    (1, 1)
    >>> used_taps(2, 3, 2, 1)        # 2 elements, stride 2: one output, taps 1 and 2
    (1, 2)
    >>> used_taps(7, 3, 1, 1)
    (0, 2)
    """
    taps = [i for i in range(k)
            if any(0 <= o * stride - pad + i < size for o in range(_out_size(size, k, stride, pad)))]
    if not taps:
        raise ValueError(f'no kernel tap reaches the input (size {size}, kernel {k}, stride {stride}, pad {pad})')
    return taps[0], taps[-1]


def small_map(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` qualifies for :func:`gemm_conv2d` and has at most
    :data:`SMALL_MAP_POSITIONS` output positions (groups 1, dilation 1, integer zero padding)."""
    pad = conv.padding
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or isinstance(pad, str) or conv.padding_mode != 'zeros' \
            or x.dim() != 4:
        return False
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    ho, wo = _out_size(x.shape[2], kh, sh, pad[0]), _out_size(x.shape[3], kw, sw, pad[1])
    if not 0 < ho * wo <= SMALL_MAP_POSITIONS:
        return False
    try:                                # windows on padding only (output = bias): left to F.conv2d
        used_taps(x.shape[2], kh, sh, pad[0]), used_taps(x.shape[3], kw, sw, pad[1])
    except ValueError:
        return False
    return True


def gemm_conv2d(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """``F.conv2d(x, w, b, stride, padding)`` (groups 1, dilation 1) as unfold + one matrix
    product, the kernel cut to its one tap where only one reaches the input. Same result up to float
    summation order; differentiable in ``x``, ``w`` and ``b``."""
    n, _, h, wd = x.shape
    out_ch, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = _out_size(h, kh, sh, ph), _out_size(wd, kw, sw, pw)
    i0, i1 = used_taps(h, kh, sh, ph)
    j0, j1 = used_taps(wd, kw, sw, pw)
    if i0 == i1 and j0 == j1:
        # one tap reaches the input: a strided pick of the input elements it meets, times that tap
        w = w[:, :, i0:i1 + 1, j0:j1 + 1]
        r0, c0 = i0 - ph, j0 - pw                           # input row / column the first window's tap meets
        below = max(0, r0 + (ho - 1) * sh + 1 - h)          # windows whose tap meets the bottom / right padding
        right = max(0, c0 + (wo - 1) * sw + 1 - wd)
        x = F.pad(x, (max(0, -c0), right, max(0, -r0), below))
        x = x[:, :, max(0, r0)::sh, max(0, c0)::sw][:, :, :ho, :wo]
        cols = x.reshape(n, x.shape[1], ho * wo)
    else:
        # several taps do: the whole kernel (cropping 3x3 to 2x2 measured slower, the copy of the cropped
        # weight and of its gradient costing more than the smaller product saves)
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))     # (n, c * kh * kw, ho * wo)
    # one product with the batch and the positions as rows, (n * L, c * kh * kw) x (c * kh * kw, out): a
    # weight-first product would broadcast the weight over the batch (a batched product, 8x slower at n = 256)
    y = torch.matmul(cols.transpose(1, 2), w.reshape(out_ch, -1).t())      # (n, ho * wo, out)
    y = y.transpose(1, 2).reshape(n, out_ch, ho, wo)
    return y if b is None else y + b.reshape(1, -1, 1, 1)
