"""Module swapping, qconfig resolution and the calibration baselines on plain torch models."""
import pytest
import torch
from torch import nn

from mmquant import QConfig, convert, parse_bits, quantize
from mmquant.calibrate import calibrate
from mmquant.convert import find_io_layers
from mmquant.nn import QConv2d, QConvTranspose2d, QLinear
from mmquant.ptq import build_ptq


class TwoHeads(nn.Module):
    """stem -> residual block (grouped + depthwise convs) -> two heads; one Conv1d, one custom conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8))
        self.cls = nn.Linear(8, 5)
        self.reg = nn.Linear(8, 4)
        self.up = nn.ConvTranspose2d(8, 8, 2)
        self.seq = nn.Conv1d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        f = x.mean((2, 3))
        return self.cls(f), self.reg(f)


def _calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


def test_every_conv_and_linear_swapped_with_shared_parameters():
    model = TwoHeads()
    w = model.block[0].weight
    report = convert(model, QConfig())
    assert isinstance(model.stem, QConv2d) and isinstance(model.block[2], QConv2d)
    assert isinstance(model.cls, QLinear) and isinstance(model.block[0], nn.Conv2d)
    assert model.block[0].weight is w and model.block[0].groups == 2
    assert isinstance(model.up, QConvTranspose2d)
    assert {r.name for r in report.quantized} == {'stem', 'block.0', 'block.2', 'cls', 'reg', 'up'}
    assert [(r.name, r.reason) for r in report.kept_float] == [('seq', 'Conv1d has no quantized twin yet')]


def test_transposed_conv_twin_matches_float_and_quantizes_per_output_channel():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, 2, stride=2)
    x = torch.randn(2, 4, 5, 5)
    ref = up(x)
    model = nn.Sequential(up)
    convert(model, QConfig.build(dict(default=dict(w_per_channel=True), first_layer_bits=None,
                                      last_layer_bits=None), bits='w8a8'))
    q = model[0]
    assert torch.equal(q(x), ref) and q(x, output_size=[11, 11]).shape[-1] == 11
    calibrate(model, [x])
    assert q.weight_quantizer.scale.shape == (6,)
    assert torch.allclose(q.weight_quantizer.scale, up.weight.abs().amax((0, 2, 3)) / 127)
    assert torch.allclose(q(x), ref, atol=0.05)


def test_uncalibrated_model_is_exactly_float_and_16_bit_is_nearly_float():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    convert(model, QConfig.build(dict(first_layer_bits=None, last_layer_bits=None), bits='w16a16'))
    assert all(torch.equal(a, b) for a, b in zip(model(x), ref))
    calibrate(model, [x])
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(model(x), ref))


def test_io_layers_found_through_residual_add_and_two_heads():
    model = TwoHeads()
    names = ['stem', 'block.0', 'block.2', 'cls', 'reg']
    first, last = find_io_layers(model, names, lambda: model(torch.randn(1, 3, 8, 8)))
    assert first == {'stem'} and last == {'cls', 'reg'}


def test_first_and_last_layers_stay_8_bit_and_overrides_win():
    model = TwoHeads()
    qc = QConfig.build(dict(overrides={'reg': dict(w_bits=6)}), bits='w2a4')
    report = quantize(model, _calib(), 'minmax', qconfig=qc.to_dict(), bits='w2a4')
    bits = {r.name: (r.w_bits, r.a_bits) for r in report.quantized}
    assert bits == {'stem': (8, 8), 'block.0': (2, 4), 'block.2': (2, 4), 'cls': (8, 8), 'reg': (6, 8), 'up': (2, 4)}
    assert model.block[0].weight_quantizer.bits == 2 and model.block[0].input_quantizer.bits == 4


def test_weight_only_has_no_input_quantizer():
    model = TwoHeads()
    convert(model, QConfig.build(bits='w3'))
    assert model.block[0].input_quantizer is None and model.stem.input_quantizer is None


def test_skip_and_unmatched_patterns():
    model = TwoHeads()
    report = convert(model, QConfig(skip=['block.*']))
    assert not isinstance(model.block[0], QConv2d)
    assert {r.name for r in report.kept_float} >= {'block.0', 'block.2'}
    with pytest.raises(ValueError, match="skip pattern 'neck.*' matches no quantizable layer"):
        convert(TwoHeads(), QConfig(skip=['neck.*']))
    with pytest.raises(ValueError, match="override pattern 'head' matches no quantizable layer"):
        convert(TwoHeads(), QConfig(overrides={'head': dict(w_bits=4)}))


def test_subclass_with_own_forward_is_kept_float_with_reason():
    class WSConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(WSConv(1, 1, 1), nn.Conv2d(1, 1, 1))
    report = convert(model, QConfig())
    assert isinstance(model[1], QConv2d) and type(model[0]) is WSConv
    assert 'changes the Conv2d forward' in report.kept_float[0].reason


def test_minmax_is_tflite_style():
    torch.manual_seed(0)
    model = TwoHeads()
    batches = _calib()
    # record the float inputs of block.2 for the activation range
    seen = []
    h = model.block[2].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    quantize(model, batches, 'minmax', 'w4a4')
    wq, aq = model.block[2].weight_quantizer, model.block[2].input_quantizer
    assert torch.isclose(wq.scale, model.block[2].weight.abs().max() / 7).all()
    lo = min(t.min() for t in seen)
    hi = max(t.max() for t in seen)
    assert lo >= 0 and not bool(aq.signed)          # after a ReLU: unsigned grid, zero point 0
    assert torch.isclose(aq.scale, hi / 15).all() and aq.zero_point.item() == 0


@pytest.mark.parametrize('method', ['minmax', 'percentile', 'mse', 'kl'])
def test_every_baseline_runs_and_beats_2_bit_noise(method):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)[0]
    quantize(model, _calib(8), method, 'w8a8')
    assert torch.allclose(model(x)[0], ref, atol=0.05)


def test_parse_bits_and_unknown_method_errors():
    assert parse_bits('w4a8') == (4, 8) and parse_bits('w3') == (3, None)
    with pytest.raises(ValueError, match='out of range'):
        parse_bits('w0a8')
    with pytest.raises(ValueError, match='bad bit spec'):
        parse_bits('int8')
    with pytest.raises(ValueError, match="unknown quantization method 'nosuch'; accepted: aciq, bitsplit, brecq, f8net, kl, lapq, minmax, mse, percentile"):
        build_ptq('nosuch')
    with pytest.raises(ValueError, match="unknown qconfig keys \\['bitz'\\]"):
        QConfig.build(dict(bitz=3))
