"""F8Net against closed forms: the fractional-length formula and its constants, the fixed-point
grid, the MSE search against a brute force, the BN-fused conv against conv + BatchNorm (evaluation
and training), the moving-average activation FL, PACT as fixed point, residual clipping sharing,
the QAT method on a small mmpretrain ResNet, the PTQ tiny fine-tune and the one-line errors.

Every expected value is written out by hand or computed independently of the code under test."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.testing import assert_close

from mmquant.calibrate import calibrate, disabled
from mmquant.convert import all_quantizers, quant_layers
from mmquant.nn import FoldedBatchNorm2d, QConv2d, QConvBN2d, residual_streams
from mmquant.ptq import build_ptq
from mmquant.qat import prepare_qat
from mmquant.qconfig import LayerQConfig
from mmquant.quantizers import FixedPointQuantizer, build_quantizer, fixed_point_quantize, pact_quantize
from mmquant.quantizers.fixed_point import fl_from_mse, fl_window
from mmquant.quantizers.fl_constants import FL_CONSTANTS, fl_constant

from conftest import randomise_bn


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def word(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


# ----------------------------------------------------------------------------------------------
# the FL formula and its constants


@pytest.mark.parametrize('bits, signed, sigma, expected', [
    (8, True, 0.05, 9),      # log2(40 / 0.05) = log2(800) = 9.64
    (8, True, 3.0, 3),       # log2(40 / 3) = 3.74
    (4, True, 0.1, 5),       # log2(3.9 / 0.1) = 5.29
    (8, False, 1.0, 6),      # relu of N(0, 1): std 0.5838, log2(70 / 0.5838) = 6.91
    (6, False, 0.01, 11),    # std 0.005838: log2(22 / 0.005838) = 11.88
])
def test_fl_formula_on_sampled_gaussians(bits, signed, sigma, expected):
    x = torch.randn(200_000, generator=gen(1)) * sigma
    if not signed:
        x = x.relu()
    std = float(x.std(correction=0))
    c = FL_CONSTANTS[bits][0 if signed else 1]
    assert math.floor(math.log2(c / std)) == expected          # the hand arithmetic above
    q = FixedPointQuantizer(bits=bits, kind='act', signed=signed)
    q.fit(x)
    assert q.frac_len.tolist() == [expected] and q.scale.tolist() == [2.0 ** -expected]
    w = FixedPointQuantizer(bits=bits, kind='weight')
    if signed:
        w.fit(x.reshape(1, -1))
        assert w.frac_len.tolist() == [expected]


def test_fl_formula_clamps_to_the_window():
    lo, hi = fl_window(8, True, normalized=False)
    assert (lo, hi) == (-8, 24) and fl_window(8, False, normalized=True) == (0, 8) \
        and fl_window(8, True, normalized=True) == (0, 7)
    q = FixedPointQuantizer(bits=8, kind='weight', fl_range=(2, 5))
    for scale, fl in ((1e-6, 5), (1e6, 2), (0.0, 5)):          # tiny, huge, constant zero
        q.fit(torch.randn(1, 1000, generator=gen(2)) * scale)
        assert int(q.frac_len) == fl


def test_constants_table_is_the_gaussian_analysis():
    """Below 8 bits: the closed-form analysis rounded to two digits; 8 bits: the paper's 40 / 70,
    which the analysis reproduces within 3 %."""
    def two_digits(v):
        return float(f'{v:.2g}')
    for bits in range(2, 8):
        for i, signed in enumerate((True, False)):
            assert FL_CONSTANTS[bits][i] == two_digits(fl_constant(bits, signed)), (bits, signed)
    assert FL_CONSTANTS[8] == (40.0, 70.0)
    assert fl_constant(8, True) == pytest.approx(40, rel=0.03)
    assert fl_constant(8, False) == pytest.approx(70, rel=0.035)


# ----------------------------------------------------------------------------------------------
# the grid


@pytest.mark.parametrize('bits, signed', [(8, True), (8, False), (4, True), (3, False)])
def test_codes_are_integers_times_two_to_minus_fl_and_clamp_to_the_word(bits, signed):
    qmin, qmax = word(bits, signed)
    x = (torch.randn(4, 3, 5, 5, generator=gen(3)) * 3).requires_grad_(True)
    fl = torch.tensor([1, 2, 3, 0])                          # per output channel (axis 0)
    y = fixed_point_quantize(x, fl, qmin, qmax, ch_axis=0)
    scaled = x.detach() * (2.0 ** fl.float()).reshape(-1, 1, 1, 1)
    codes = y.detach() * (2.0 ** fl.float()).reshape(-1, 1, 1, 1)
    assert torch.equal(codes, codes.round()) and codes.min() >= qmin and codes.max() <= qmax
    inside = (scaled.round() >= qmin) & (scaled.round() <= qmax)
    assert torch.equal(codes[inside], scaled.round()[inside])                   # round to nearest
    assert torch.equal(codes[~inside], scaled[~inside].round().clamp(qmin, qmax))  # clamped
    y.sum().backward()
    # straight through strictly inside the word, 0 on its end codes and beyond (the authors' rule)
    assert torch.equal(x.grad, ((scaled.round() > qmin) & (scaled.round() < qmax)).float())


def test_quantizer_exposes_scale_and_integer_frac_len():
    q = FixedPointQuantizer(bits=8, kind='weight', num_channels=3, per_channel=True)
    w = torch.randn(3, 4, 3, 3, generator=gen(4)) * torch.tensor([0.5, 0.01, 0.002]).reshape(3, 1, 1, 1)
    q.fit(w)
    stds = w.reshape(3, -1).std(1, correction=0)
    expected = [math.floor(math.log2(40 / float(s))) for s in stds]
    assert q.frac_len.dtype == torch.long and q.frac_len.tolist() == expected
    assert q.scale.shape == (3, ) and q.scale.tolist() == [2.0 ** -f for f in expected]
    assert q.qrange() == (-128, 127) and bool(q.calibrated)
    y = q(w)
    codes = y / q.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(codes, torch.clamp(torch.round(w / q.scale.reshape(-1, 1, 1, 1)), -128, 127))


# ----------------------------------------------------------------------------------------------
# the MSE search


def brute_force_fl(rows, qmin, qmax, lo, hi):
    """Every FL of the window, in float64; the least mean squared error, ties to the larger FL."""
    best = []
    for row in rows.double():
        errs = [float(((torch.clamp(torch.round(row * 2.0 ** fl), qmin, qmax) / 2.0 ** fl - row) ** 2).mean())
                for fl in range(lo, hi + 1)]
        m = min(errs)
        best.append(max(lo + i for i, e in enumerate(errs) if e == m))
    return best


@pytest.mark.parametrize('bits, signed', [(8, True), (8, False), (4, True), (2, False)])
def test_mse_search_picks_what_the_brute_force_picks(bits, signed):
    g = gen(5)
    rows = torch.randn(6, 700, generator=g) * torch.exp(2 * torch.randn(6, 1, generator=g))
    rows[1] = rows[1] / torch.rand(700, generator=g).clamp_min(0.02)          # heavy tails
    rows[2] = 0                                                               # a dead channel
    rows[3, :5] = 50.0                                                        # outliers
    if not signed:
        rows = rows.relu()
    qmin, qmax = word(bits, signed)
    lo, hi = fl_window(bits, signed, normalized=False)
    assert fl_from_mse(rows, qmin, qmax, lo, hi).tolist() == brute_force_fl(rows, qmin, qmax, lo, hi)
    if signed:
        q = FixedPointQuantizer(bits=bits, kind='weight', num_channels=6, per_channel=True, fl_search='mse')
        q.fit(rows)
        assert q.frac_len.tolist() == brute_force_fl(rows, qmin, qmax, lo, hi)


# ----------------------------------------------------------------------------------------------
# activations: the moving-average FL


def test_activation_fl_follows_a_moving_average_of_sigma_and_freezes_in_eval():
    q = FixedPointQuantizer(bits=8, kind='act', momentum=0.1)
    b1 = torch.randn(4, 8, 6, 6, generator=gen(6)) * 0.25         # signed (has negatives)
    b2 = torch.randn(4, 8, 6, 6, generator=gen(7)) * 2.0
    s1, s2 = float(b1.std(correction=0)), float(b2.std(correction=0))
    q.train()
    q(b1)                                                          # the first batch initialises
    assert bool(q.signed) and q.running_stat.item() == pytest.approx(s1, rel=1e-6)
    assert int(q.frac_len) == math.floor(math.log2(40 / s1)) == 7          # log2(40 / 0.25) = 7.3
    y2 = q(b2)                                                     # training: the batch's own FL
    assert torch.equal(y2, fixed_point_quantize(b2, torch.tensor([math.floor(math.log2(40 / s2))]), -128, 127))
    running = 0.9 * s1 + 0.1 * s2
    assert q.running_stat.item() == pytest.approx(running, rel=1e-6)
    assert int(q.frac_len) == math.floor(math.log2(40 / running)) == 6     # log2(40 / 0.425) = 6.6
    q.eval()                                                       # frozen: evaluation uses it
    y3 = q(b2 * 100)
    assert int(q.frac_len) == 6 and q.running_stat.item() == pytest.approx(running, rel=1e-6)
    assert torch.equal(y3, fixed_point_quantize(b2 * 100, torch.tensor([6]), -128, 127))


def test_cumulative_average_and_searched_fl():
    """``momentum=None``: the plain average, as BatchNorm; with ``fl_search='mse'`` the averaged
    statistic is the searched FL, rounded."""
    batches = [torch.randn(2, 3, 8, 8, generator=gen(8 + i)).relu() * s for i, s in enumerate((0.1, 1.0, 10.0))]
    q = FixedPointQuantizer(bits=8, kind='act', momentum=None, fl_search='mse')
    q.train()
    for b in batches:
        q(b)
    lo, hi = fl_window(8, False, normalized=False)
    fls = [brute_force_fl(b.reshape(1, -1), 0, 255, lo, hi)[0] for b in batches]
    assert not bool(q.signed) and q.running_stat.item() == pytest.approx(sum(fls) / 3)
    assert int(q.frac_len) == round(sum(fls) / 3) and int(q.num_batches_tracked) == 3


# ----------------------------------------------------------------------------------------------
# the BN-fused conv


def _conv_bn(bias=False, seed=0):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=bias), nn.BatchNorm2d(5)
    randomise_bn(nn.Sequential(bn), seed)
    return conv, bn


def _fused(conv, bn, per_channel=True, a_kwargs=None):
    wq = FixedPointQuantizer(bits=8, kind='weight', num_channels=5, per_channel=per_channel)
    aq = FixedPointQuantizer(bits=8, kind='act', **(a_kwargs or {}))
    folded = FoldedBatchNorm2d.from_bn(copy.deepcopy(bn))
    return QConvBN2d.from_qconv(QConv2d.from_float(copy.deepcopy(conv), wq, aq), folded), folded


@pytest.mark.parametrize('bias', [False, True])
def test_fused_conv_in_eval_is_conv_bn_float_and_the_folded_fake_quant_conv(bias):
    conv, bn = _conv_bn(bias)
    fused, folded = _fused(conv, bn)
    fused.eval(), folded.eval(), conv.eval(), bn.eval()
    x = torch.randn(2, 3, 7, 7, generator=gen(9))
    with torch.no_grad(), disabled([fused.weight_quantizer, fused.input_quantizer]):
        assert_close(folded(fused(x)), bn(conv(x)), rtol=1e-5, atol=1e-5)     # BN is now an identity
    with torch.no_grad():
        y = fused(x)
    # by hand: w_f = w gamma / sqrt(var + eps), b_f = beta + gamma (b - mean) / sqrt(var + eps)
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_f = conv.weight * g.reshape(-1, 1, 1, 1)
    b_f = bn.bias + g * ((conv.bias if bias else 0) - bn.running_mean)
    fl_w = torch.floor(torch.log2(40 / w_f.reshape(5, -1).std(1, correction=0))).long()
    w_q = torch.round(w_f * 2.0 ** fl_w.reshape(-1, 1, 1, 1)).clamp(-128, 127) / 2.0 ** fl_w.reshape(-1, 1, 1, 1)
    fl_x = int(fused.input_quantizer.frac_len)
    assert fl_x == math.floor(math.log2(40 / float(x.std(correction=0))))
    x_q = torch.round(x * 2.0 ** fl_x).clamp(-128, 127) / 2.0 ** fl_x
    assert_close(y, F.conv2d(x_q, w_q, b_f, padding=1), rtol=1e-5, atol=1e-5)
    assert fused.weight_quantizer.frac_len.tolist() == fl_w.tolist()


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
def test_fused_conv_eval_traces_to_one_convolution_without_batchnorm():
    """What an exporter traces: the quantizers' grids are constants (hence the tracer's warnings)
    and the folded weight and bias feed a single convolution."""
    conv, bn = _conv_bn(True)
    fused, folded = _fused(conv, bn)
    model = nn.Sequential(fused, folded).eval()                    # as in a model: conv, then its BN
    x = torch.randn(1, 3, 7, 7, generator=gen(10))
    model(x)                                                       # calibrate
    graph = str(torch.jit.trace(model, x).inlined_graph)
    assert graph.count('aten::_convolution') == 1 and 'batch_norm' not in graph


@pytest.mark.parametrize('momentum', [0.1, None])
def test_fused_conv_in_training_updates_running_stats_like_batchnorm(momentum):
    conv, bn = _conv_bn(True, seed=1)
    bn.momentum = momentum
    fused, folded = _fused(conv, bn)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    fused.train(), folded.train(), ref_conv.train(), ref_bn.train()
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, generator=gen(11 + step))
        with disabled([fused.weight_quantizer, fused.input_quantizer]):
            y = fused(x)
        expected = ref_bn(ref_conv(x))                             # training BN: batch statistics
        assert_close(y, expected, rtol=1e-4, atol=1e-4)
        y.square().sum().backward()
        expected.square().sum().backward()
        assert_close(fused.weight.grad, ref_conv.weight.grad, rtol=1e-3, atol=1e-3)
        assert_close(folded.weight.grad, ref_bn.weight.grad, rtol=1e-3, atol=1e-3)
        for p in (fused.weight, folded.weight, ref_conv.weight, ref_bn.weight):
            p.grad = None
    for key in ('running_mean', 'running_var', 'num_batches_tracked'):
        assert_close(getattr(folded, key), getattr(ref_bn, key), rtol=1e-5, atol=1e-6)


def test_fused_conv_training_folds_batch_statistics_of_the_quantized_input():
    conv, bn = _conv_bn(False, seed=2)
    fused, folded = _fused(conv, bn)
    fused.train()
    x = torch.randn(4, 3, 6, 6, generator=gen(12))
    y = fused(x)
    fl_x = torch.tensor([math.floor(math.log2(40 / float(x.std(correction=0))))])
    x_q = fixed_point_quantize(x, fl_x, -128, 127)
    y0 = F.conv2d(x_q, conv.weight, padding=1)
    mean, var = y0.mean((0, 2, 3)), y0.var((0, 2, 3), unbiased=False)
    g = bn.weight / torch.sqrt(var + bn.eps)
    w_f = conv.weight * g.reshape(-1, 1, 1, 1)
    b_f = bn.bias - g * mean
    w_q = fixed_point_quantize(w_f, fused.weight_quantizer.choose_fl(w_f), -128, 127)
    assert_close(y, F.conv2d(x_q, w_q, b_f, padding=1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# PACT as fixed point


def test_pact_as_fixed_point_gives_pact_codes_and_gradients():
    """``eta Q(x / eta)`` with ``eta = 2^FL alpha / (2^b - 1)`` is PACT's ``round(clip(x, 0, alpha)
    (2^b - 1) / alpha) alpha / (2^b - 1)``; a 1x1 conv of weight 1 (weights unquantized) shows it,
    and its gradient to alpha is that of the same function written in PACT's step."""
    x = (torch.rand(2, 1, 5, 5, generator=gen(13)) * 4 - 0.5)
    layer = QConv2d.from_float(nn.Conv2d(1, 1, 1, bias=False),
                               FixedPointQuantizer(bits=4, kind='weight'),
                               FixedPointQuantizer(bits=4, kind='act', signed=False, clip='pact', alpha_init=2.5))
    layer.weight.data.fill_(1.0)
    layer.weight_quantizer.enabled = False
    layer.eval()
    y = layer(x)                                                   # initialises alpha's FL
    q = layer.input_quantizer
    fl = int(q.frac_len)
    assert 0 <= fl <= 4 and q.scale.tolist() == [2.0 ** -fl]       # the word's window, unsigned
    assert_close(layer._input_scaling(), torch.tensor(2.0 ** fl * 2.5 / 15))
    assert_close(y, pact_quantize(x, torch.tensor(2.5), 4))
    y.sum().backward()
    alpha = torch.tensor(2.5, requires_grad=True)
    v = x * 15 / alpha
    ref = (torch.clamp(v.round() - v.detach() + v, 0, 15) * alpha / 15).sum()   # round with STE
    ref.backward()
    assert_close(q.alpha.grad, alpha.grad)


def test_pact_layer_quantizes_the_eta_scaled_weight():
    torch.manual_seed(3)
    layer = QConv2d.from_float(nn.Conv2d(2, 3, 3), FixedPointQuantizer(bits=8, kind='weight'),
                               FixedPointQuantizer(bits=8, kind='act', clip='pact', alpha_init=3.0))
    layer.eval()
    x = torch.rand(1, 2, 6, 6, generator=gen(14)) * 4
    y = layer(x)
    eta = layer._input_scaling()
    w_q = fixed_point_quantize(eta * layer.weight, layer.weight_quantizer.frac_len, -128, 127)
    x_q = fixed_point_quantize(x / eta, layer.input_quantizer.frac_len, 0, 255)
    assert_close(y, F.conv2d(x_q, w_q, layer.bias))
    assert layer.weight_quantizer.frac_len.tolist() == layer.weight_quantizer.choose_fl(eta * layer.weight).tolist()


# ----------------------------------------------------------------------------------------------
# residual streams


def test_residual_streams_of_basic_and_bottleneck_resnets():
    assert residual_streams(torchvision.models.resnet18()) == [
        ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0'],
        ['layer2.1.conv1', 'layer3.0.conv1', 'layer3.0.downsample.0'],
        ['layer3.1.conv1', 'layer4.0.conv1', 'layer4.0.downsample.0']]
    r50 = residual_streams(torchvision.models.resnet50())
    assert r50[0] == ['layer1.0.conv1', 'layer1.0.downsample.0']        # channel expansion
    assert r50[1] == ['layer1.1.conv1', 'layer1.2.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0']
    assert r50[3] == ['layer3.1.conv1', 'layer3.2.conv1', 'layer3.3.conv1', 'layer3.4.conv1',
                      'layer3.5.conv1', 'layer4.0.conv1', 'layer4.0.downsample.0']
    assert r50[4:] == [['layer4.1.conv1', 'layer4.2.conv1']]      # the last stream: two readers


def test_readers_of_a_stream_share_alpha_but_keep_their_fl():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32, generator=gen(15))
    report = prepare_qat(model, 'f8net', 'w8a8', example_forward=lambda: model(x))
    assert report.shared_clip == residual_streams(model)
    owner = model.layer1[0].conv1.input_quantizer
    follower = model.layer2[0].downsample[0].input_quantizer
    assert 'alpha' not in dict(follower.named_parameters())
    calibrate(model, [x])
    owner.alpha.data.fill_(1.75)
    assert follower.clip_level().item() == 1.75
    names = [n for n, _ in model.named_parameters() if n.endswith('alpha')]
    assert len(names) == 21 - 3 - 2 - 2                           # one per stream, not per reader
    assert 'layer2.0.downsample.0.input_quantizer.frac_len' in model.state_dict()   # a private FL


# ----------------------------------------------------------------------------------------------
# the QAT method on an mmpretrain ResNet


ARCH = dict(type='ImageClassifier', backbone=dict(type='ResNet', depth=18, in_channels=1),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=512))


@pytest.fixture(scope='module')
def mm_f8net():
    from mmengine.registry import MODELS, init_default_scope
    import mmquant  # noqa: F401  (registers QuantizedModel)
    init_default_scope('mmpretrain')
    preprocessor = dict(type='ClsDataPreprocessor', mean=[0.0], std=[1.0])
    torch.manual_seed(5)
    float_model = MODELS.build(dict(ARCH, data_preprocessor=preprocessor))
    randomise_bn(float_model, seed=5)
    model = MODELS.build(dict(type='QuantizedModel', architecture=ARCH, method='f8net', bits='w8a8',
                              data_preprocessor=preprocessor))
    return float_model, model


def test_qat_method_converts_an_mmpretrain_resnet_and_loads_its_float_checkpoint(mm_f8net):
    float_model, model = mm_f8net
    report = model.mmquant_report
    assert len(quant_layers(model)) == 21 and len(report.fused) == 20
    assert report.first_layers == ['backbone.conv1'] and report.last_layers == ['head.fc']
    assert isinstance(model.backbone.layer1[0].conv1, QConvBN2d) and type(model.head.fc).__name__ == 'QLinear'
    assert isinstance(model.backbone.layer1[0].norm1, FoldedBatchNorm2d)   # mmpretrain's property
    assert isinstance(model.backbone.layer2[0].downsample[1], FoldedBatchNorm2d)
    assert report.shared_clip[0] == ['backbone.layer1.0.conv1', 'backbone.layer1.1.conv1',
                                     'backbone.layer2.0.conv1', 'backbone.layer2.0.downsample.0']
    # the float checkpoint's keys all load (BN keys unchanged); only the quantizers' are new
    float_state = float_model.state_dict()
    result = model.load_state_dict(float_state, strict=False)
    assert result.unexpected_keys == [] and all('_quantizer.' in k for k in result.missing_keys)
    x = torch.randn(2, 1, 28, 28, generator=gen(16))
    model.eval(), float_model.eval()
    with torch.no_grad(), disabled(all_quantizers(model)):
        assert_close(model(x, mode='tensor'), float_model(x, mode='tensor'), rtol=1e-4, atol=1e-4)


def test_qat_method_trains_a_step(mm_f8net):
    float_model, model = mm_f8net
    from mmpretrain.structures import DataSample
    model.load_state_dict(float_model.state_dict(), strict=False)
    data = dict(inputs=[torch.rand(1, 28, 28, generator=gen(17 + i)) * 255 for i in range(4)],
                data_samples=[DataSample().set_gt_label(i) for i in range(4)])
    calibrate(model, [data], forward_fn=lambda m, d: m(**m.data_preprocessor(d, False), mode='tensor'))
    assert all(bool(q.calibrated) for q in all_quantizers(model))
    bn = model.backbone.layer1[0].bn1
    before = bn.running_mean.clone(), model.backbone.layer1[0].conv1.weight.detach().clone()
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    losses = model(**model.data_preprocessor(data, True), mode='loss')
    loss = sum(losses.values())
    loss.backward()
    alpha = model.backbone.layer1[0].conv1.input_quantizer.alpha
    assert torch.isfinite(loss) and alpha.grad is not None and alpha.grad.abs() > 0
    assert model.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0 and bn.weight.grad is not None
    optim.step()
    assert not torch.equal(bn.running_mean, before[0])                 # statistics of this batch
    assert not torch.equal(model.backbone.layer1[0].conv1.weight, before[1])
    model.eval()
    with torch.no_grad():
        assert model(**model.data_preprocessor(data, False), mode='tensor').shape == (4, 10)


# ----------------------------------------------------------------------------------------------
# the PTQ tiny fine-tune


def test_ptq_tiny_finetune_re_estimates_bn_statistics_without_gradient_steps():
    torch.manual_seed(6)
    model = torchvision.models.resnet18(num_classes=10)
    randomise_bn(model, seed=6)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith('weight')}
    batches = [torch.randn(4, 3, 32, 32, generator=gen(18 + i)) for i in range(3)]
    report = build_ptq('f8net', bits='w8a8')(model, batches)
    assert len(report.fused) == 20 and report.shared_clip == []
    stem = model.conv1
    assert isinstance(stem, QConvBN2d) and stem.input_quantizer.clip is None
    assert stem.weight_quantizer.fl_search == 'mse' and stem.weight_quantizer.per_channel
    for k, v in model.state_dict().items():                        # no parameter moved
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert int(model.bn1.num_batches_tracked) == 3 and model.bn1.momentum == 0.1   # restored
    # the stem's BN now holds the average of the batches' statistics of conv(Q(x), w)
    q = stem.input_quantizer
    means, vars_ = [], []
    for b in batches:
        fl = torch.tensor(brute_force_fl(b.reshape(1, -1), -128, 127, *fl_window(8, True, False)))
        y0 = F.conv2d(fixed_point_quantize(b, fl, -128, 127), stem.weight, None, 2, 3)
        n = y0.numel() // y0.shape[1]
        means.append(y0.mean((0, 2, 3)))
        vars_.append(y0.var((0, 2, 3), unbiased=False) * n / (n - 1))
    assert_close(model.bn1.running_mean, sum(means) / 3, rtol=1e-4, atol=1e-5)
    assert_close(model.bn1.running_var, sum(vars_) / 3, rtol=1e-4, atol=1e-5)
    assert int(q.num_batches_tracked) == 3 and all(bool(q.calibrated) for q in all_quantizers(model))
    model.eval()
    with torch.no_grad():
        assert model(batches[0]).shape == (4, 10)


def test_ptq_fold_bn_option_folds_the_float_statistics_instead():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    randomise_bn(model, seed=7)
    batches = [torch.randn(2, 3, 8, 8, generator=gen(21))]
    report = build_ptq('f8net', bits='w8a8', fold_bn=True)(model, batches)
    assert report.fused == [] and isinstance(model[1], nn.Identity) and model[0].bias is not None


# ----------------------------------------------------------------------------------------------
# life cycle and errors


def test_state_dict_round_trip_and_protocol():
    q = FixedPointQuantizer(bits=6, kind='act', clip='pact')
    q.observing = True
    q.observe(torch.rand(2, 3, 4, 4, generator=gen(19)) * 3)
    q.observing = False
    q.compute_qparams()
    assert bool(q.calibrated) and not bool(q.signed) and 0 <= int(q.frac_len) <= 6
    fresh = FixedPointQuantizer(bits=6, kind='act', clip='pact')
    fresh.load_state_dict(q.state_dict())
    for key, value in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh.enabled = False
    x = torch.randn(3)
    assert fresh(x) is x and fresh.input_scaling(x) is None
    with pytest.raises(ValueError, match='6-bit'):
        FixedPointQuantizer(bits=8, kind='act', clip='pact').load_state_dict(q.state_dict())


def test_weight_fl_refits_after_training_and_loading_only():
    w = torch.randn(4, 8, generator=gen(20))
    q = FixedPointQuantizer(bits=8, kind='weight')
    q.eval()
    q(w)
    fl = int(q.frac_len)
    q(w * 100)                                       # evaluation keeps the FL it fitted
    assert int(q.frac_len) == fl
    q.train()
    q(w * 128)                                       # training refits every pass
    assert int(q.frac_len) == fl - 7
    q.eval()
    q.train()
    q.eval()                                         # the weight may have trained: refit once
    q(w)
    assert int(q.frac_len) == fl
    q.train()
    q.frozen = True
    q(w * 128)
    assert int(q.frac_len) == fl


@pytest.mark.parametrize('make, message', [
    (lambda: FixedPointQuantizer(bits=9), 'FixedPointQuantizer takes 2..8 bits, got 9'),
    (lambda: FixedPointQuantizer(bits=1), 'FixedPointQuantizer takes 2..8 bits, got 1'),
    (lambda: FixedPointQuantizer(bits=8, fl_search='kl'),
     "fl_search='kl' is not supported; accepted: 'std' (the paper's formula), 'mse' (grid search)"),
    (lambda: FixedPointQuantizer(bits=8, kind='act', clip='relu6'),
     "clip='relu6' is not supported; accepted: None, 'pact'"),
    (lambda: FixedPointQuantizer(bits=8, kind='weight', clip='pact'),
     "clip='pact' clips activations; weights take clip=None"),
    (lambda: FixedPointQuantizer(bits=8, fl_range=(5, 2)),
     'fl_range=(5, 2) is not a window; accepted: (lo, hi) integers with lo <= hi, or None for the default'),
    (lambda: FixedPointQuantizer(bits=8, kind='act', momentum=2),
     'momentum=2 is out of range; accepted: a number in (0, 1] or None (cumulative average)'),
    (lambda: LayerQConfig(w_quantizer='fixed', w_bits=16),
     'w_bits=16 is out of range for the fixed quantizer: accepted 2..8'),
    (lambda: build_ptq('f8net', bits='w8a8', passes=0), 'passes=0 must be an integer >= 1'),
    (lambda: prepare_qat(nn.Sequential(nn.Conv2d(1, 1, 1)), 'f8net', 'w8a8'),
     'f8net finds its conv -> BatchNorm pairs by running the model once'),
])
def test_bad_input_is_a_one_line_value_error(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_registry_builds_both_forms():
    w = build_quantizer('fixed', 'weight', 8, num_channels=4, per_channel=True)
    a = build_quantizer('fixed', 'act', 4, signed=None, clip='pact')
    assert isinstance(w, FixedPointQuantizer) and w.frac_len.shape == (4, ) and w.kind == 'weight'
    assert a.clip == 'pact' and a.bits == 4 and a.kind == 'act'
