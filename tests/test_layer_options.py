"""Per-layer training options of the low-bit literature: weight standardisation before the weight
quantizer (and mmcv ConvWS layers), and the order of zero padding and activation quantization."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.conv_ws import ConvWS2d
from torch import nn

from mmquant.api import quantize
from mmquant.calibrate import calibrate, disabled
from mmquant.convert import all_quantizers, convert
from mmquant.nn import QConv2d, bake_weight_standardization, standardize
from mmquant.ptq import build_ptq
from mmquant.qconfig import QConfig


def ws_net():
    torch.manual_seed(0)
    net = nn.Sequential(ConvWS2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        ConvWS2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_standardize_matches_mmcv_conv_ws():
    conv = ws_net()[0]
    w = standardize(conv.weight, conv.eps)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(F.conv2d(x, w, conv.bias, padding=1), conv(x))
    flat = w.reshape(8, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(8), atol=1e-3, rtol=0)   # std / (std + eps)


def test_conv_ws_twin_standardizes_before_quantizing():
    net = ws_net()
    x = torch.randn(4, 3, 9, 9)
    ref = net(x)
    convert(net, QConfig.build(dict(first_layer_bits=None, last_layer_bits=None), bits='w8a8'))
    twin = net[0]
    assert isinstance(twin, QConv2d) and twin.weight_standardization == 1e-5
    quantizers = all_quantizers(net)
    with disabled(quantizers):
        torch.testing.assert_close(net(x), ref)              # the float function is kept
    calibrate(net, [x])
    # the weight quantizer rounds the standardised weight: its grid spans the standardised range
    w_std = standardize(twin.weight, 1e-5)
    torch.testing.assert_close(twin.weight_to_quantize(), w_std)
    q = twin.quantized_weight()
    assert (q - w_std).abs().max() <= twin.weight_quantizer.scale.max() / 2 + 1e-6
    assert (net(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_w_standardize_flag_on_plain_convs_for_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    convert(net, QConfig.build(dict(default=dict(w_standardize=True), first_layer_bits=None,
                                    last_layer_bits=None), bits='w4a4'))
    for m in net:
        if isinstance(m, QConv2d):
            flat = m.weight_to_quantize().reshape(4, -1)
            torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-6, rtol=0)
    # gradients reach the float weight through the standardisation (training works)
    calibrate(net, [torch.randn(2, 3, 8, 8)])
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_ptq_bakes_conv_ws_then_folds_bn():
    net = ws_net()
    x = torch.randn(16, 3, 9, 9)
    ref = net(x)
    baked = bake_weight_standardization(ws_net())
    assert baked == ['0', '3']
    net2 = ws_net()
    bake_weight_standardization(net2)
    assert type(net2[0]) is nn.Conv2d
    torch.testing.assert_close(net2(x), ref, atol=1e-5, rtol=1e-5)
    # the whole PTQ path: bake, fold the BatchNorm, quantize at 8 bits
    quantize(net, [x], 'minmax', 'w8a8', fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(getattr(m, 'weight_standardization', None) is None for m in net.modules())
    assert (net(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_ptq_refuses_w_standardize():
    with pytest.raises(ValueError, match='w_standardize .*training option'):
        build_ptq('minmax', dict(default=dict(w_standardize=True)))


def binary_conv(padding_after_quant):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    convert(net, QConfig.build(dict(default=dict(w_quantizer='xnor', a_quantizer='sign', w_bits=1, a_bits=1,
                                                 padding_after_quant=padding_after_quant),
                                    first_layer_bits=None, last_layer_bits=None), bits='w1a1'))
    return net[0]


def test_padding_before_quant_pads_binary_inputs_with_plus_one():
    x = torch.randn(2, 3, 6, 6)
    after, before = binary_conv(True), binary_conv(False)
    w = after.quantized_weight().detach()
    s = torch.where(x >= 0, 1.0, -1.0)                       # sign(0) = +1
    # padding after the sign: zeros at the border (a ternary input there)
    torch.testing.assert_close(after(x), F.conv2d(s, w, after.bias, padding=1))
    # padding before the sign: the pads become +1, the input stays binary
    padded = F.pad(s, (1, 1, 1, 1), value=1.0)
    torch.testing.assert_close(before(x), F.conv2d(padded, w, before.bias))
    # the interior, which sees no padding, is the same either way
    torch.testing.assert_close(after(x)[..., 1:-1, 1:-1], before(x)[..., 1:-1, 1:-1])


def test_padding_order_is_the_same_on_uniform_grids():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=(1, 2), stride=2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 3, 9, 9)
    for net, after in zip(nets, (True, False)):
        convert(net, QConfig.build(dict(default=dict(padding_after_quant=after, a_symmetric=False),
                                        first_layer_bits=None, last_layer_bits=None), bits='w4a4'))
        calibrate(net, [x])
    assert nets[1][0].padding_after_quant is False
    torch.testing.assert_close(nets[0](x), nets[1](x))


def test_padding_before_quant_needs_numeric_padding():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding='same'))
    with pytest.raises(ValueError, match="padding_after_quant=False needs numeric padding"):
        convert(net, QConfig.build(dict(default=dict(padding_after_quant=False), first_layer_bits=None,
                                        last_layer_bits=None)))
