"""Per-layer sensitivity and the mixed-precision suggestion, against closed forms on small nets."""
import math

import pytest
import torch
from torch import nn

from mmquant import QConfig, convert
from mmquant.analysis import compare, layer_sensitivity, suggest_bits, weight_noise
from mmquant.analysis.sensitivity import LayerSensitivity
from mmquant.calibrate import calibrate, disabled
from mmquant.convert import all_quantizers


def _net(bits='w3a4'):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    convert(net, QConfig.build(dict(first_layer_bits=None, last_layer_bits=None), bits=bits))
    batches = [torch.randn(32, 6) for _ in range(3)]
    calibrate(net, batches)
    return net, batches


def test_compare_gives_the_closed_form_sqnr_and_cosine():
    ref = [torch.ones(4, 10)]
    sqnr, cos = compare(ref, [torch.ones(4, 10) * 1.1])          # error 0.01 of the signal: 20 dB
    assert sqnr == pytest.approx(20.0) and cos == pytest.approx(1.0)
    sqnr, cos = compare(ref, ref)
    assert math.isinf(sqnr) and cos == pytest.approx(1.0)
    _, cos = compare([torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 2.0]])])
    assert cos == pytest.approx(0.0)


def test_only_and_all_but_views_match_hand_toggled_quantizers():
    net, batches = _net()
    layers = [net[0], net[2], net[4]]
    every = all_quantizers(net)
    with torch.no_grad(), disabled(every):
        ref = [net(b) for b in batches]
    # the two hand-toggled configurations of layer 2 (index 1)
    mine = [layers[1].weight_quantizer, layers[1].input_quantizer]
    with torch.no_grad(), disabled([q for q in every if all(q is not m for m in mine)]):
        only = [net(b) for b in batches]
    with torch.no_grad(), disabled(mine):
        all_but = [net(b) for b in batches]
    seen = []
    metric = lambda outs: float(sum(o.sum() for o in outs))        # noqa: E731
    float_metric, rows = layer_sensitivity(net, batches, metric_fn=metric,
                                           progress=lambda k, n: seen.append((k, n)))
    assert [r.name for r in rows] == ['0', '2', '4'] and seen[-1] == (3, 3)
    assert float_metric == pytest.approx(metric(ref))
    r = rows[1]
    assert (r.params, r.w_bits, r.a_bits) == (40, 3, 4)
    assert (r.only_sqnr, r.only_cosine) == pytest.approx(compare(ref, only))
    assert (r.all_but_sqnr, r.all_but_cosine) == pytest.approx(compare(ref, all_but))
    assert r.only_metric == pytest.approx(metric(only)) and r.all_but_metric == pytest.approx(metric(all_but))
    assert all(q.enabled for q in every)                             # nothing left disabled
    _, some = layer_sensitivity(net, batches, layers=['4'])
    assert [r.name for r in some] == ['4']
    with pytest.raises(ValueError, match="'nosuch' is not a quantized layer; quantized: 0, 2, 4"):
        layer_sensitivity(net, batches, layers=['nosuch'])


def test_weight_noise_is_the_relative_output_error_of_that_weight_alone():
    net, batches = _net('w4a8')
    _, rows = layer_sensitivity(net, batches)
    kept = net[4].weight_quantizer
    weight_noise(net, rows, [2, 4, 8], batches)
    assert net[4].weight_quantizer is kept and all(q.enabled for q in all_quantizers(net))
    # closed form for the last layer at 4 bits (its own width: its own quantizer): the error of
    # (Wq - W) x over the signal W x + b, x the float network's input to it
    with torch.no_grad():
        wq = kept(net[4].weight)
    with torch.no_grad(), disabled(all_quantizers(net)):
        x = [torch.relu(net[2](torch.relu(net[0](b)))) for b in batches]
        sig = sum(float((net[4](xi) ** 2).sum()) for xi in x)
        err = sum(float(((xi @ (wq - net[4].weight).T) ** 2).sum()) for xi in x)
    assert rows[2].noise[4] == pytest.approx(err / sig, rel=1e-4)
    for r in rows:
        assert r.noise[2] > r.noise[4] > r.noise[8] > 0


def _row(name, params, noise):
    return LayerSensitivity(name, params, 4, 4, 0, 1, None, 0, 1, None, noise=noise)


def test_suggest_bits_spends_the_budget_where_the_noise_falls_most():
    rows = [_row('stem', 10, {2: 9.0, 4: 1.0, 8: 0.0}),
            _row('a', 100, {2: 0.5, 4: 0.1, 8: 0.0}),
            _row('b', 100, {2: 0.02, 4: 0.01, 8: 0.0}),
            _row('fc', 10, {2: 5.0, 4: 1.0, 8: 0.0})]
    # 'stem' and 'fc' keep their bits; 'a' and 'b' share 3 bits per weight on average: a gets 4, b 2
    assert suggest_bits(rows, 3.0, fixed=['stem', 'fc']) == {'a': 4, 'b': 2}
    assert suggest_bits(rows, 8.0, fixed=['stem', 'fc']) == {'a': 8, 'b': 8}
    with pytest.raises(ValueError, match='below the smallest choice'):
        suggest_bits(rows, 1.0)
    with pytest.raises(ValueError, match='same measured widths'):
        suggest_bits([_row('a', 1, {2: 1.0}), _row('b', 1, {4: 1.0})], 4.0)
