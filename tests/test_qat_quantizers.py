"""Quantization-aware-training math against closed forms: the straight-through gradients of LSQ,
PACT, DoReFa and the binary quantizers, LQ-Net's encode / least-squares basis, the quantizers'
life cycle, the binary block rewrites and the QAT method configurations.

Every expected value is either written out by hand (the comments give the arithmetic) or
computed from the paper's formula independently of the code under test."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.testing import assert_close

from mmquant.nn import QConv2d
from mmquant.nn.binary_blocks import BinaryBasicBlock, GroupNetBlock, rewrite_binary_blocks
from mmquant.qat import prepare_qat, qat_qconfig
from mmquant.qconfig import LayerQConfig, QConfig
from mmquant.quantizers import (BiRealWeightQuantizer, DoReFaActQuantizer, DoReFaWeightQuantizer, LQNetQuantizer,
                                LSQQuantizer, PACTQuantizer, SignActQuantizer, UniformQuantizer,
                                XNORPPWeightQuantizer, XNORWeightQuantizer, approx_sign, lsq_fake_quantize,
                                pact_quantize, sign_ste)
from mmquant.quantizers.lqnet import binary_codes, encode, qem_basis

from conftest import randomise_bn


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def leaf(*values):
    return t(*values).requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# LSQ


def lsq_step_grad_reference(x, s, qn, qp):
    """The paper's Eq. 3, element by element (before the gradient scale g)."""
    out = []
    for v in x.flatten().tolist():
        r = v / s
        out.append(-qn if r <= -qn else qp if r >= qp else round(r) - r)
    return torch.tensor(out).reshape(x.shape)


def test_lsq_forward_round_ste_and_step_gradient_by_hand():
    # s = 0.5, Qn = 4, Qp = 3: x / s = 0.6, 18, -18, 1.6, -2.2
    x = leaf(0.3, 9.0, -9.0, 0.8, -1.1)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_fake_quantize(x, s, 4, 3, g=0.25)
    assert_close(y.detach(), t(0.5, 1.5, -2.0, 1.0, -1.0))
    up = t(1, 2, 3, 4, 5)
    y.backward(up)
    assert_close(x.grad, t(1, 0, 0, 4, 5))          # round STE: 1 inside, 0 where clamped
    # d y / d s: 0.4 | +3 (above) | -4 (below) | 0.4 | 0.2, weighted by up, times g = 0.25
    # (0.4 + 6 - 12 + 1.6 + 1.0) * 0.25 = -0.75
    assert float(s.grad) == pytest.approx(-0.75, abs=1e-5)


def test_lsq_quantizer_per_tensor_weight_gradient_scale_uses_all_weights():
    w = t(0.3, 9.0, -9.0, 0.8, -1.1, 0.1, 0.7, -0.4).reshape(2, 4).requires_grad_(True)
    q = LSQQuantizer(bits=3, kind='weight')                 # signed: Qn = 4, Qp = 3
    q.fit(w)
    assert int(q.elements) == 8                             # N = all 8 weights share the step
    q.step.data.fill_(0.5)
    up = torch.arange(1.0, 9.0).reshape(2, 4)
    q(w).backward(up)
    g = 1 / math.sqrt(8 * 3)
    expected = (lsq_step_grad_reference(w.detach(), 0.5, 4, 3) * up).sum() * g
    assert float(q.step.grad) == pytest.approx(float(expected), abs=1e-5)
    inside = ((w.detach() / 0.5 >= -4) & (w.detach() / 0.5 <= 3)).float()
    assert_close(w.grad, up * inside)


def test_lsq_quantizer_per_channel_weight_gradient():
    w = t(0.3, 9.0, -9.0, 0.8, -1.1, 0.1, 0.7, -0.4).reshape(2, 4).requires_grad_(True)
    q = LSQQuantizer(bits=3, kind='weight', num_channels=2, per_channel=True)
    q.fit(w)
    assert int(q.elements) == 4                             # N = weights per channel step
    steps = [0.5, 0.25]
    q.step.data.copy_(t(*steps))
    up = torch.arange(1.0, 9.0).reshape(2, 4)
    y = q(w)
    for c, s in enumerate(steps):                           # forward: round(clamp(w/s, -4, 3)) * s
        ref = [min(max(round(v / s), -4), 3) * s for v in w[c].tolist()]
        assert_close(y[c].detach(), torch.tensor(ref))
    y.backward(up)
    g = 1 / math.sqrt(4 * 3)
    for c, s in enumerate(steps):
        expected = (lsq_step_grad_reference(w[c].detach(), s, 4, 3) * up[c]).sum() * g
        assert float(q.step.grad[c]) == pytest.approx(float(expected), abs=1e-5)


def test_lsq_activation_gradient_scale_uses_features_per_sample():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 2) * 2                          # non-negative: unsigned, Qn = 0, Qp = 3
    q = LSQQuantizer(bits=2, kind='act')
    q(x)                                                    # initialises from its first input
    assert not bool(q.signed)
    assert int(q.elements) == 12                            # 3 * 2 * 2 features per sample
    assert q.grad_factor() == pytest.approx(1 / 6)          # 1 / sqrt(12 * 3)
    q.step.data.fill_(0.4)
    q.step.grad = None
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    expected = lsq_step_grad_reference(x, 0.4, 0, 3).sum() / 6
    assert float(q.step.grad) == pytest.approx(float(expected), abs=1e-5)
    assert_close(xg.grad, (x / 0.4 <= 3).float())


@pytest.mark.parametrize('shape,per_channel,n', [((4, 3, 3, 3), False, 108), ((4, 3, 3, 3), True, 27),
                                                 ((5, 7), False, 35), ((5, 7), True, 7)])
def test_lsq_weight_elements_per_step(shape, per_channel, n):
    q = LSQQuantizer(bits=4, kind='weight', num_channels=shape[0], per_channel=per_channel)
    q.fit(torch.randn(shape))
    assert int(q.elements) == n
    assert q.grad_factor() == pytest.approx(1 / math.sqrt(n * 7))


def test_lsq_init_step_is_twice_mean_abs_over_sqrt_qp():
    w = t(1, -1, 1, -1, 2, 2, -2, 2).reshape(2, 4)
    per_tensor = LSQQuantizer(bits=3, kind='weight')        # Qp = 3, mean |w| = 1.5
    per_tensor.fit(w)
    assert per_tensor.step.item() == pytest.approx(3 / math.sqrt(3))
    per_channel = LSQQuantizer(bits=3, kind='weight', num_channels=2, per_channel=True)
    per_channel.fit(w)                                      # mean |w| = 1 and 2
    assert_close(per_channel.step.detach(), t(2 / math.sqrt(3), 4 / math.sqrt(3)))
    act = LSQQuantizer(bits=4, kind='act')                  # unsigned after a ReLU: Qp = 15
    act.fit(t(0, 1, 2, 5).reshape(1, 4))                    # mean |x| = 2
    assert act.step.item() == pytest.approx(4 / math.sqrt(15))
    assert LSQQuantizer(bits=2, kind='act').qrange() == (-2, 1)


# ----------------------------------------------------------------------------------------------
# PACT


def test_pact_unsigned_forward_and_gradients():
    # alpha = 3, 2 bits: 3 steps of d = 1 on [0, 3]
    x = leaf(-1.0, 0.4, 1.6, 5.0, 3.0, 2.4)
    alpha = torch.tensor(3.0, requires_grad=True)
    y = pact_quantize(x, alpha, bits=2)
    assert_close(y.detach(), t(0, 0, 2, 3, 3, 2))
    y.backward(t(1, 2, 3, 4, 5, 6))
    assert_close(x.grad, t(0, 2, 3, 0, 0, 6))               # 1 on 0 < x < alpha
    assert float(alpha.grad) == pytest.approx(4 + 5)        # x = 5 and x = 3 are >= alpha


def test_pact_signed_forward_and_gradients():
    # alpha = 2, 2 bits signed: 3 steps of d = 4/3 on [-2, 2]; (clip + 2) / d = 0, 0, 1.125, 1.875, 2.925, 3
    x = leaf(-3.0, -2.0, -0.5, 0.5, 1.9, 2.5)
    alpha = torch.tensor(2.0, requires_grad=True)
    y = pact_quantize(x, alpha, bits=2, signed=True)
    assert_close(y.detach(), t(-2, -2, -2 / 3, 2 / 3, 2, 2))
    y.backward(t(1, 2, 3, 4, 5, 6))
    assert_close(x.grad, t(0, 0, 3, 4, 5, 0))
    assert float(alpha.grad) == pytest.approx(6 - (1 + 2))  # +1 where x >= alpha, -1 where x <= -alpha


def test_pact_quantizer_learns_alpha_and_inits_from_data():
    q = PACTQuantizer(bits=2, alpha_init=3.0, signed=False)
    x = leaf(-1.0, 0.4, 1.6, 5.0)
    y = q(x)
    assert bool(q.calibrated) and q.alpha.item() == 3.0     # a given alpha_init is kept
    y.sum().backward()
    assert float(q.alpha.grad) == 1.0
    assert_close(y.detach(), t(0, 0, 2, 3))
    # from data: mean + 3 std (population std), capped at the maximum
    heavy = PACTQuantizer(bits=4)
    heavy(torch.cat([torch.zeros(99), t(100)]))            # mean 1, E x^2 = 100, std = sqrt(99)
    assert heavy.alpha.item() == pytest.approx(1 + 3 * math.sqrt(99), rel=1e-5)
    capped = PACTQuantizer(bits=4)
    capped(t(0, 0, 0, 4))                                  # 1 + 3 sqrt(3) > 4: capped at 4
    assert capped.alpha.item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match='activations'):
        PACTQuantizer(bits=4, kind='weight')


# ----------------------------------------------------------------------------------------------
# DoReFa


def dorefa_weight_reference(w, bits):
    th = [math.tanh(v) for v in w]
    m = max(abs(v) for v in th)
    n = 2 ** bits - 1
    return [2 * round((v / (2 * m) + 0.5) * n) / n - 1 for v in th]


@pytest.mark.parametrize('rescale', [False, True])
def test_dorefa_weight_multibit_forward_and_gradient(rescale):
    w = leaf(-2.0, -0.3, 0.05, 0.6, 2.0)
    q = DoReFaWeightQuantizer(bits=2, rescale=rescale)
    y = q(w)
    # tanh-normalised to [0, 1]: 0, 0.349, 0.526, 0.779, 1 -> x3 rounds to 0, 1, 2, 2, 3
    expected = t(-1, -1 / 3, 1 / 3, 1 / 3, 1)
    assert dorefa_weight_reference(w.tolist(), 2) == pytest.approx(expected.tolist(), abs=1e-6)
    factor = 2.0 if rescale else 1.0                        # rescale: times max |w| = 2
    assert_close(y.detach(), expected * factor)
    y.backward(t(1, 2, 3, 4, 5))
    # straight through quantize_k: d q / d w = 2 * tanh'(w) / (2 max|tanh w|)  (away from the max)
    m = math.tanh(2.0)
    for i, up in ((1, 2.0), (2, 3.0), (3, 4.0)):
        v = w[i].item()
        assert float(w.grad[i]) == pytest.approx(up * factor * (1 - math.tanh(v) ** 2) / m, rel=1e-5)


def test_dorefa_weight_three_bits_matches_reference():
    w = torch.randn(6, 5)
    q = DoReFaWeightQuantizer(bits=3, rescale=False)
    assert q(w).flatten().tolist() == pytest.approx(dorefa_weight_reference(w.flatten().tolist(), 3), abs=1e-5)


def test_dorefa_weight_one_bit_is_mean_abs_sign_with_identity_gradient():
    w = leaf(-2.0, 1.0, 0.5, 0.0)                            # E|w| = 0.875, sign(0) = +1
    y = DoReFaWeightQuantizer(bits=1)(w)
    assert_close(y.detach(), t(-0.875, 0.875, 0.875, 0.875))
    y.backward(t(1, 2, 3, 4))
    assert_close(w.grad, t(1, 2, 3, 4))


def test_dorefa_activation_unsigned_and_signed():
    x = leaf(-0.5, 0.2, 0.7, 3.0)                           # clip to [0, 1], x3: 0, 0.6, 2.1, 3
    y = DoReFaActQuantizer(bits=2, signed=False)(x)
    assert_close(y.detach(), t(0, 1 / 3, 2 / 3, 1))
    y.backward(t(1, 2, 3, 4))
    assert_close(x.grad, t(0, 2, 3, 0))
    # signed: (clip(x, -1, 1) + 1) / 2 * 3 = 0, 0.3, 1.65, 2.25, 3 -> 0, 0, 2, 2, 3
    xs = leaf(-3.0, -0.8, 0.1, 0.5, 2.0)
    ys = DoReFaActQuantizer(bits=2, signed=True)(xs)
    assert_close(ys.detach(), t(-1, -1, 1 / 3, 1 / 3, 1))
    ys.backward(t(1, 2, 3, 4, 5))
    assert_close(xs.grad, t(0, 2, 3, 4, 0))                 # 2 * 1/2 inside (-1, 1)


# ----------------------------------------------------------------------------------------------
# binary quantizers


def test_sign_ste_and_approx_sign_gradients():
    x = leaf(-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    y = sign_ste(x)
    assert_close(y.detach(), t(-1, -1, -1, 1, 1, 1, 1))
    y.sum().backward()
    assert_close(x.grad, t(0, 1, 1, 1, 1, 1, 0))            # 1 on |x| <= 1
    x = leaf(-2.0, -0.5, 0.0, 0.25, 0.75, 1.0)
    y = approx_sign(x)
    assert_close(y.detach(), t(-1, -1, 1, 1, 1, 1))
    y.sum().backward()
    assert_close(x.grad, t(0, 1, 2, 1.5, 0.5, 0))           # 2 - 2|x| on |x| < 1


def test_xnor_weight_alpha_per_filter_and_gradient():
    w = t(0.5, -1.5, 2.0, 1.0).reshape(2, 2).requires_grad_(True)
    q = XNORWeightQuantizer(num_channels=2)
    y = q(w)                                                # alpha = 1, 1.5
    assert_close(y.detach(), t(1, -1, 1.5, 1.5).reshape(2, 2))
    y.backward(t(1, 2, 3, 4).reshape(2, 2))
    # dW_ij = sign(W_ij) / n * sum_k G_ik sign(W_ik)  +  G_ij alpha_i [|W_ij| <= 1]
    # row 0: -1/2 * (1, -1) + (1*1, 0) = (0.5, 0.5); row 1: 7/2 * (1, 1) + (0, 4*1.5) = (3.5, 9.5)
    assert_close(w.grad, t(0.5, 0.5, 3.5, 9.5).reshape(2, 2))
    conv_w = torch.randn(4, 3, 3, 3)
    alpha = conv_w.abs().mean((1, 2, 3))
    out = XNORWeightQuantizer(num_channels=4)(conv_w)
    assert_close(out, alpha[:, None, None, None] * torch.where(conv_w >= 0, 1.0, -1.0))


def test_bireal_weight_forward_scale_and_clip_gradient():
    w = t(0.5, -1.5, 2.0, 0.25).reshape(2, 2).requires_grad_(True)
    y = BiRealWeightQuantizer(num_channels=2)(w)            # mean |W| = 1, 1.125
    assert_close(y.detach(), t(1, -1, 1.125, 1.125).reshape(2, 2))
    y.backward(t(1, 2, 3, 4).reshape(2, 2))
    assert_close(w.grad, t(1, 0, 0, 4).reshape(2, 2))       # clip's gradient: 1 on |W| < 1


def test_xnorpp_gamma_init_and_gradient():
    w = t(0.5, -1.5, 2.0, 1.0).reshape(2, 2).requires_grad_(True)
    q = XNORPPWeightQuantizer(num_channels=2)
    y = q(w)                                                # gamma initialised to mean |W| = 1, 1.5
    assert_close(q.gamma.detach(), t(1.0, 1.5))
    assert_close(y.detach(), t(1, -1, 1.5, 1.5).reshape(2, 2))
    y.backward(t(1, 2, 3, 4).reshape(2, 2))
    assert_close(q.gamma.grad, t(1 - 2, 3 + 4))             # sum_j G_ij sign(W_ij)
    assert_close(w.grad, t(1, 0, 0, 6).reshape(2, 2))       # G gamma [|W| <= 1]


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0)


@pytest.mark.parametrize('stride,padding,bias', [(1, 1, True), (2, 1, False), (2, 0, True)])
def test_xnor_activation_scaling_matches_box_filter(stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, 3, 7, 7)
    layer = QConv2d.from_float(conv, XNORWeightQuantizer(num_channels=4), SignActQuantizer(scaling=True))
    w_bin = conv.weight.detach().abs().mean((1, 2, 3))[:, None, None, None] * _sign(conv.weight.detach())
    k = F.avg_pool2d(x.abs().mean(1, keepdim=True), 3, stride, padding, count_include_pad=True)
    expected = F.conv2d(_sign(x), w_bin, None, stride, padding) * k
    if bias:
        expected = expected + conv.bias.detach()[None, :, None, None]
    assert_close(layer(x).detach(), expected)


def test_xnor_activation_scaling_explicit_loops_with_dilation():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 2, padding=1, dilation=2, bias=False)
    x = torch.randn(1, 2, 4, 5)
    layer = QConv2d.from_float(conv, XNORWeightQuantizer(num_channels=3), SignActQuantizer(scaling=True))
    y = layer(x).detach()
    a = x.abs().mean(1)[0]                                  # [H, W]
    h, w = a.shape
    out_h, out_w = h + 2 - 2 * 1, w + 2 - 2 * 1             # H + 2p - d (k - 1)
    assert y.shape[-2:] == (out_h, out_w)
    conv_bin = F.conv2d(_sign(x), layer.weight_quantizer(conv.weight).detach(), None, 1, 1, 2)
    for i in range(out_h):
        for j in range(out_w):
            total = 0.0
            for di in range(2):
                for dj in range(2):
                    r, c = i - 1 + 2 * di, j - 1 + 2 * dj
                    if 0 <= r < h and 0 <= c < w:
                        total += float(a[r, c])
            assert_close(y[0, :, i, j], conv_bin[0, :, i, j] * (total / 4))


def test_xnor_activation_scaling_off_while_observing_or_disabled():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    layer = QConv2d.from_float(conv, XNORWeightQuantizer(num_channels=4), SignActQuantizer(scaling=True))
    layer.weight_quantizer.enabled = False
    layer.input_quantizer.observing = True                 # calibration: the float network
    assert_close(layer(x), conv(x))
    layer.input_quantizer.observing = False
    layer.input_quantizer.enabled = False
    assert_close(layer(x), conv(x))


# ----------------------------------------------------------------------------------------------
# LQ-Net


def test_lqnet_encode_by_hand_and_nearest_level():
    basis = t(0.5, 1.0).reshape(1, 2)
    codes = binary_codes(2, signed=True)                    # rows (-1,-1), (-1,1), (1,-1), (1,1)
    assert_close(codes, t(-1, -1, -1, 1, 1, -1, 1, 1).reshape(4, 2))
    v = t(-2.0, -0.9, -0.1, 0.2, 0.99, 1.1).reshape(1, 6)  # levels -1.5, -0.5, 0.5, 1.5
    q, index = encode(v, basis, codes)
    assert_close(q, t(-1.5, -0.5, -0.5, 0.5, 0.5, 1.5).reshape(1, 6))
    assert index.tolist() == [[0, 2, 2, 1, 1, 3]]
    assert_close(codes[index[0]] @ basis[0], q[0])
    torch.manual_seed(0)
    basis = torch.rand(3, 3) + 0.1
    codes = binary_codes(3, signed=True)
    v = torch.randn(3, 200)
    q, index = encode(v, basis, codes)
    levels = basis @ codes.t()                              # [3, 8]
    nearest = levels.gather(1, (v[:, :, None] - levels[:, None, :]).abs().argmin(2))
    assert_close(q, nearest)
    assert_close(torch.einsum('cmk,ck->cm', codes[index], basis), q)


@pytest.mark.parametrize('signed', [True, False])
def test_lqnet_qem_basis_is_least_squares(signed):
    torch.manual_seed(0)
    codes = binary_codes(3, signed)
    v = torch.randn(2, 300) if signed else torch.rand(2, 300) * 3
    basis = torch.tensor([[0.3, 0.6, 1.2], [0.2, 0.5, 0.9]])
    _, index = encode(v, basis, codes)
    got = qem_basis(v, index, codes)
    for c in range(2):
        b = codes[index[c]]                                 # the explicit [M, K] code matrix
        ref = torch.linalg.lstsq(b.double(), v[c].double()[:, None]).solution[:, 0].float()
        assert_close(got[c], ref, rtol=1e-4, atol=1e-5)


def test_lqnet_one_bit_basis_is_mean_abs():
    torch.manual_seed(0)
    w = torch.randn(4, 50)
    q = LQNetQuantizer(bits=1, kind='weight', num_channels=4, per_channel=True)
    q.fit(w)                                                # LS for codes sign(w): mean |w| per row
    assert_close(q.basis[:, 0], w.abs().mean(1), rtol=1e-5, atol=1e-6)
    assert_close(q(w).detach(), w.abs().mean(1, keepdim=True) * _sign(w))


def _lq_error(q, x):
    v = q.rows(x)
    levels, _ = encode(v, q.basis, q.codes(v))
    return float(((levels - v) ** 2).sum())


def test_lqnet_refit_never_increases_the_error():
    torch.manual_seed(0)
    x = torch.randn(4000)
    q = LQNetQuantizer(bits=3, kind='weight', momentum=0.0)
    q.basis.copy_(t(0.05, 0.3, 2.0).reshape(1, 3))          # a poor start
    errors = [_lq_error(q, x)]
    for _ in range(8):
        q.refit(x)
        errors.append(_lq_error(q, x))
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-5)
    assert errors[-1] < 0.5 * errors[0]
    # the moving average (momentum 0.9) also lowers the error over a few steps
    slow = LQNetQuantizer(bits=2, kind='weight', momentum=0.9)
    slow.basis.copy_(t(0.05, 2.0).reshape(1, 2))
    start = _lq_error(slow, x)
    for _ in range(5):
        slow.refit(x)
    assert _lq_error(slow, x) < start


def test_lqnet_init_levels_cover_the_data_and_doc_example():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = LQNetQuantizer(bits=2, kind='weight')
    q.fit(w)
    levels = (q.basis @ q.codes(w).t()).flatten().sort().values
    lo, hi = torch.quantile(w.flatten(), torch.tensor([0.1, 0.9]))
    assert w.min() < levels[0] < lo and hi < levels[-1] < w.max()
    q.eval()
    mse = float(((q(w) - w) ** 2).mean())                   # 4-level Lloyd-Max on N(0, 1): 0.1175;
    assert mse < 0.14 * float(w.var())                      # this 1024-sample draw's optimum: 0.131
    doc = LQNetQuantizer(bits=2, kind='weight')
    x = t(-1.5, -0.5, 0.5, 1.5, -1.4, 0.6).reshape(1, 6)
    doc.fit(x)
    assert sorted(set(doc(x).flatten().tolist())) == pytest.approx([-1.4667, -0.5333, 0.5333, 1.4667], abs=1e-3)


def test_lqnet_unsigned_activation_uses_zero_one_codes_and_straight_through():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 3, 5, 5))
    q = LQNetQuantizer(bits=2, kind='act')
    q.fit(x)
    assert not bool(q.signed)
    assert_close(q.codes(x), t(0, 0, 0, 1, 1, 0, 1, 1).reshape(4, 2))
    q.eval()                                                # no refit in the forward
    xg = torch.cat([x.flatten()[:50], t(0.0, 1e3)]).requires_grad_(True)
    y = q(xg)
    levels = (q.basis @ q.codes(x).t()).flatten()
    assert y[-2].item() == 0.0 and bool((y >= 0).all())
    assert_close(y[:-1].detach(), levels[(xg[:-1, None].detach() - levels).abs().argmin(1)])
    y.sum().backward()
    top = float(levels.max())                               # gradient 1 on [0, top level], else 0
    assert_close(xg.grad, (xg.detach() <= top).float())
    assert xg.grad[-1].item() == 0.0 and xg.grad[-2].item() == 1.0


# ----------------------------------------------------------------------------------------------
# life cycle


def test_used_before_calibration_initialises_from_first_input_once():
    x = t(0, 1, 2, 5).reshape(1, 4)
    q = LSQQuantizer(bits=4, kind='act')
    assert not bool(q.calibrated)
    q(x)
    assert bool(q.calibrated) and q.step.item() == pytest.approx(4 / math.sqrt(15))
    q(x * 100)
    assert q.step.item() == pytest.approx(4 / math.sqrt(15))  # not re-initialised


def test_fit_does_not_overwrite_a_learned_step():
    w = torch.randn(4, 8)
    q = LSQQuantizer(bits=4, kind='weight')
    q.fit(w)
    q.step.data.fill_(0.123)                                # as if trained
    q.fit(w * 10)
    assert q.step.item() == pytest.approx(0.123)
    unfitted = LSQQuantizer(bits=4, kind='weight')
    unfitted.fit(w * 10)
    assert unfitted.step.item() == pytest.approx(2 * float((w * 10).abs().mean()) / math.sqrt(7), rel=1e-5)


def _quantizers():
    return {
        'lsq': (lambda bits: LSQQuantizer(bits=bits, kind='weight', num_channels=3, per_channel=True),
                torch.randn(3, 2, 3, 3)),
        'pact': (lambda bits: PACTQuantizer(bits=bits), torch.randn(2, 3, 4, 4)),
        'lqnet': (lambda bits: LQNetQuantizer(bits=bits, kind='act'), torch.relu(torch.randn(2, 3, 4, 4))),
        'xnorpp': (lambda bits: XNORPPWeightQuantizer(num_channels=3), torch.randn(3, 2, 3, 3)),
    }


@pytest.mark.parametrize('name', ['lsq', 'pact', 'lqnet', 'xnorpp'])
def test_state_dict_round_trip_restores_parameters_exactly(name):
    torch.manual_seed(0)
    make, x = _quantizers()[name]
    bits = 1 if name == 'xnorpp' else 3
    q = make(bits)
    q.fit(x)
    for p in q.parameters():                                # "trained": move off the initial values
        p.data.mul_(1.37)
    if name == 'lqnet':
        q.basis.mul_(1.37)
    state = q.state_dict()
    fresh = make(bits)
    fresh.load_state_dict(state)
    assert bool(fresh.calibrated)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh.fit(x)                                            # calibrated: fit leaves it alone
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    q.eval(), fresh.eval()
    assert torch.equal(q(x), fresh(x))


@pytest.mark.parametrize('name', ['lsq', 'pact', 'lqnet'])
def test_loading_another_bit_width_is_a_value_error(name):
    make, x = _quantizers()[name]
    q = make(4)
    q.fit(x)
    with pytest.raises(ValueError, match='4-bit'):
        make(2).load_state_dict(q.state_dict())


def test_loading_another_bit_width_into_a_layer_names_the_quantizer():
    layer = QConv2d.from_float(nn.Conv2d(2, 3, 1), LSQQuantizer(bits=4, kind='weight'))
    other = QConv2d.from_float(nn.Conv2d(2, 3, 1), LSQQuantizer(bits=3, kind='weight'))
    with pytest.raises(ValueError, match='weight_quantizer'):
        other.load_state_dict(layer.state_dict())


# ----------------------------------------------------------------------------------------------
# binary block rewrites


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize('style', ['plain', 'bireal', 'groupnet'])
def test_rewrite_resnet18_blocks_and_stem_relu(style):
    model = _resnet18()
    names = rewrite_binary_blocks(model, style, branches=2)
    assert names == [f'layer{i}.{j}' for i in range(1, 5) for j in range(2)]
    assert isinstance(model.relu, nn.Identity)
    kind = GroupNetBlock if style == 'groupnet' else BinaryBasicBlock
    assert all(isinstance(model.get_submodule(n), kind) for n in names)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize('style', ['plain', 'bireal'])
def test_binary_block_forward_formula(style):
    model = _resnet18()
    randomise_bn(model, seed=3)
    rewrite_binary_blocks(model, style)
    model.eval()
    torch.manual_seed(1)
    for name, x in (('layer1.1', torch.randn(2, 64, 6, 6)), ('layer2.0', torch.randn(2, 64, 8, 8))):
        b = model.get_submodule(name)
        with torch.no_grad():
            short = x if b.downsample is None else b.downsample[1](b.downsample[0](x))
            if style == 'bireal':
                y = b.bn1(b.conv1(x)) + short
                expected = b.bn2(b.conv2(y)) + y
            else:
                expected = b.bn2(b.conv2(b.bn1(b.conv1(x)))) + short
            assert_close(b(x), expected)


def test_groupnet_block_loads_a_float_block_into_every_branch():
    model = _resnet18()
    randomise_bn(model, seed=3)
    float_block = model.layer2[0]
    state = {k: v.clone() for k, v in float_block.state_dict().items()}
    g = GroupNetBlock(copy.deepcopy(float_block), branches=3)
    for p in g.parameters():                                # forget the copied values
        p.data.zero_()
    result = g.load_state_dict(state, strict=False)
    assert result.missing_keys == ['lambdas'] and result.unexpected_keys == []
    assert_close(g.lambdas.detach(), torch.full((3, ), 0.0))  # zeroed above, not in the float state
    branch_states = [b.state_dict() for b in g.branches]
    for key, value in state.items():
        assert torch.equal(branch_states[0][key], value), key
        for k in (1, 2):
            if key.endswith('weight') and value.dim() == 4:  # conv weights: perturbed, but close
                diff = (branch_states[k][key] - value).abs()
                assert float(diff.max()) > 0
                assert float(diff.max()) < 0.05 * float(value.std()) * 6
            else:
                assert torch.equal(branch_states[k][key], value), key
    assert not torch.equal(branch_states[1]['conv1.weight'], branch_states[2]['conv1.weight'])
    # lambdas start at 1/K, and the forward is the lambda-weighted sum of the plain branches
    fresh = GroupNetBlock(copy.deepcopy(float_block), branches=4)
    assert_close(fresh.lambdas.detach(), torch.full((4, ), 0.25))
    fresh.eval()
    x = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        assert_close(fresh(x), sum(0.25 * b(x) for b in fresh.branches))
    # a full float checkpoint loads into a groupnet-rewritten model, missing only the lambdas
    float_state = model.state_dict()
    binary = _resnet18()
    rewrite_binary_blocks(binary, 'groupnet', branches=2)
    result = binary.load_state_dict(float_state, strict=False)
    assert sorted(result.missing_keys) == sorted(f'layer{i}.{j}.lambdas' for i in range(1, 5) for j in range(2))
    assert result.unexpected_keys == []
    assert torch.equal(binary.layer3[1].branches[0].bn2.running_var, model.layer3[1].bn2.running_var)


def test_rewrite_needs_basic_blocks():
    vgg = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.LazyLinear(10))
    with pytest.raises(ValueError, match='basic blocks'):
        rewrite_binary_blocks(vgg, 'bireal')
    with pytest.raises(ValueError, match='style'):
        rewrite_binary_blocks(_resnet18(), 'nope')


# ----------------------------------------------------------------------------------------------
# QAT methods


def _by_name(report):
    return {r.name: r for r in report.quantized}


def test_prepare_qat_lsq_keeps_first_and_last_layers_at_8_bits():
    model = _resnet18()
    report = prepare_qat(model, 'lsq', 'w4a4')
    rec = _by_name(report)
    assert rec['conv1'].role == 'first' and (rec['conv1'].w_bits, rec['conv1'].a_bits) == (8, 8)
    assert rec['fc'].role == 'last' and (rec['fc'].w_bits, rec['fc'].a_bits) == (8, 8)
    assert (rec['layer1.0.conv1'].w_bits, rec['layer1.0.conv1'].a_bits) == (4, 4)
    assert isinstance(model.conv1.weight_quantizer, LSQQuantizer) and model.conv1.weight_quantizer.bits == 8
    assert isinstance(model.fc.input_quantizer, LSQQuantizer) and model.fc.input_quantizer.bits == 8
    assert model.layer3[0].conv2.weight_quantizer.bits == 4 and model.layer3[0].conv2.input_quantizer.bits == 4
    assert report.rewritten == []


@pytest.mark.parametrize('method,w_cls,grad,scaling', [('xnor', XNORWeightQuantizer, 'ste', True),
                                                       ('xnorpp', XNORPPWeightQuantizer, 'ste', False),
                                                       ('bireal', BiRealWeightQuantizer, 'approx', False)])
def test_prepare_qat_binary_methods(method, w_cls, grad, scaling):
    model = _resnet18()
    report = prepare_qat(model, method, 'w1a1')
    assert len(report.rewritten) == 8 and isinstance(model.relu, nn.Identity)
    rec = _by_name(report)
    for name in ('conv1', 'fc', 'layer2.0.downsample.0', 'layer4.0.downsample.0'):
        layer = model.get_submodule(name)
        assert (rec[name].w_bits, rec[name].a_bits) == (8, 8), name
        assert isinstance(layer.weight_quantizer, UniformQuantizer) and layer.weight_quantizer.bits == 8
        assert isinstance(layer.input_quantizer, UniformQuantizer) and layer.input_quantizer.bits == 8
    assert rec['conv1'].role == 'first' and rec['fc'].role == 'last'
    for name in ('layer1.0.conv1', 'layer2.0.conv1', 'layer4.1.conv2'):
        layer = model.get_submodule(name)
        assert isinstance(layer.weight_quantizer, w_cls)
        assert isinstance(layer.input_quantizer, SignActQuantizer)
        assert layer.input_quantizer.grad == grad and layer.input_quantizer.scaling == scaling


def test_prepare_qat_groupnet_branches():
    model = _resnet18()
    report = prepare_qat(model, 'groupnet', 'w1a1', branches=2)
    rec = _by_name(report)
    assert len(report.rewritten) == 8
    assert isinstance(model.layer2[0].branches[1].conv1.weight_quantizer, XNORWeightQuantizer)
    assert (rec['layer2.0.branches.1.downsample.0'].w_bits, rec['layer2.0.branches.1.downsample.0'].a_bits) == (8, 8)
    assert isinstance(model.layer2[0].branches[1].downsample[0].weight_quantizer, UniformQuantizer)
    assert isinstance(model.conv1.weight_quantizer, UniformQuantizer)


def test_qat_qconfig_io_layer_and_errors():
    qc = qat_qconfig('xnor', 'w1a1')
    assert qc.io_layer == dict(w_quantizer='uniform', a_quantizer='uniform')
    assert qc.first_layer_bits == qc.last_layer_bits == 8
    assert (qc.default.w_quantizer, qc.default.a_quantizer) == ('xnor', 'sign')
    assert qat_qconfig('pact', 'w4a4').default.w_quantizer == 'dorefa'
    assert qat_qconfig('dorefa', 'w1a2').default.w_bits == 1
    with pytest.raises(ValueError, match="unknown QAT method 'foo'"):
        qat_qconfig('foo', 'w4a4')
    with pytest.raises(ValueError, match='lsq'):
        qat_qconfig('lsq', 'w1a1')
    with pytest.raises(ValueError, match='xnor.*1-bit'):
        qat_qconfig('xnor', 'w2a2')
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        qat_qconfig('lsq', 'w4a4', dict(default=dict(w_quantizer='nope')))
    with pytest.raises(ValueError, match="'pact' has no weight form"):
        qat_qconfig('lsq', 'w4a4', dict(default=dict(w_quantizer='pact')))
    with pytest.raises(ValueError, match="'pact' has no weight form"):
        LayerQConfig(w_quantizer='pact', w_bits=4)
    with pytest.raises(ValueError, match='io_layer'):
        QConfig(io_layer=dict(bits=3))
