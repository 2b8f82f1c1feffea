"""gemm_conv2d against F.conv2d (output and gradients), the cropped taps, and the switch BRECQ's
reconstruction uses in QConv2d."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmquant.nn.gemm_conv import gemm_conv2d, small_map, used_taps
from mmquant.nn.qlayers import QConv2d


def brute_taps(size, k, stride, pad):
    out = (size + 2 * pad - k) // stride + 1
    taps = [i for i in range(k) if any(0 <= o * stride - pad + i < size for o in range(out))]
    return (taps[0], taps[-1]) if taps else None


@pytest.mark.parametrize('size, k, stride, pad', [
    (s, k, st, p) for s, k, st, p in itertools.product((1, 2, 3, 5, 7), (1, 3, 5), (1, 2), (0, 1, 2))
    if s + 2 * p >= k])
def test_used_taps_are_the_taps_that_reach_the_input(size, k, stride, pad):
    want = brute_taps(size, k, stride, pad)
    if want is None:                  # every window on padding only: small_map leaves these to F.conv2d
        with pytest.raises(ValueError, match='no kernel tap reaches the input'):
            used_taps(size, k, stride, pad)
        conv = q(nn.Conv2d(2, 2, k, stride, pad))
        assert not small_map(conv, torch.zeros(1, 2, size, size))
    else:
        assert used_taps(size, k, stride, pad) == want


@pytest.mark.parametrize('h, w, k, stride, pad, bias', [
    (1, 1, 3, 1, 1, False), (2, 2, 3, 1, 1, True), (2, 2, 3, 2, 1, False), (2, 2, 1, 2, 0, False),
    (4, 4, 3, 2, 1, True), (7, 7, 3, 1, 1, False), (7, 5, 3, 2, 1, True), (5, 7, 5, 2, 2, False),
    (3, 3, 3, 1, 0, True), (1, 1, 1, 1, 0, False), (28, 28, 7, 2, 3, False), (6, 6, 3, 3, 1, True)]
    + [(h, w, k, st, p, False) for h, w, k, st, p in itertools.product((1, 2, 3), (1, 4), (1, 3), (1, 2, 3), (0, 1, 2))
       if min(h, w) + 2 * p >= k and brute_taps(h, k, st, p) and brute_taps(w, k, st, p)])
def test_gemm_conv2d_matches_conv2d_and_its_gradients(h, w, k, stride, pad, bias):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + k)
    x = torch.randn(3, 5, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(4, 5, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref = F.conv2d(x, wt, b, stride, pad)
    out = gemm_conv2d(x, wt, b, (stride, stride), (pad, pad))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = [x, wt] + ([b] if bias else [])
    want = torch.autograd.grad(ref, params, go)
    got = torch.autograd.grad(out, params, go)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def q(conv):
    return QConv2d.from_float(conv, nn.Identity(), None)


def test_small_map_rule_and_the_qconv2d_switch():
    conv = q(nn.Conv2d(8, 8, 3, padding=1))
    assert small_map(conv, torch.zeros(2, 8, 2, 2)) and small_map(conv, torch.zeros(2, 8, 1, 1))
    assert not small_map(conv, torch.zeros(2, 8, 3, 3))              # 9 output positions
    assert not small_map(q(nn.Conv2d(8, 8, 3, padding=1, groups=2)), torch.zeros(2, 8, 1, 1))
    assert not small_map(q(nn.Conv2d(8, 8, 3, padding='same')), torch.zeros(2, 8, 1, 1))
    assert not small_map(q(nn.Conv2d(8, 8, 3, padding=2, dilation=2)), torch.zeros(2, 8, 1, 1))
    x = torch.randn(2, 8, 2, 2)
    ref = conv(x)
    conv.gemm_small_maps = True
    calls = []
    import mmquant.nn.qlayers as ql
    real = ql.gemm_conv2d
    ql.gemm_conv2d = lambda *a: calls.append(1) or real(*a)
    try:
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-6)
        conv(torch.randn(2, 8, 5, 5))                                 # 25 positions: the ordinary kernel
    finally:
        ql.gemm_conv2d = real
    assert len(calls) == 1
