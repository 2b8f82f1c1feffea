"""Mixed-precision bit choice: the knapsack against brute force, the bit switch, BRECQ's search."""
import itertools
import logging

import pytest
import torch
from torch import nn

from mmquant import QConfig, convert
from mmquant.ptq.mixed_precision import choose_bits, set_weight_bits, weight_bits

from test_reconstruct import Net


def test_choose_bits_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 5
        params = torch.randint(10, 1000, (n,), generator=gen).tolist()
        bits = [2, 4, 8]
        sizes = [[p * b for b in bits] for p in params]
        losses = [sorted(torch.rand(3, generator=gen).tolist(), reverse=True) for _ in range(n)]
        budget = sum(params) * (2 + 6 * float(torch.rand(1, generator=gen)))
        best = min((c for c in itertools.product(range(3), repeat=n)
                    if sum(sizes[u][k] for u, k in enumerate(c)) <= budget),
                   key=lambda c: sum(losses[u][k] for u, k in enumerate(c)))
        got = choose_bits(sizes, losses, budget)
        assert sum(losses[u][k] for u, k in enumerate(got)) == pytest.approx(sum(losses[u][k] for u, k in enumerate(best)))
        assert sum(sizes[u][k] for u, k in enumerate(got)) <= budget


def test_choose_bits_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match='the size budget 10 is below the smallest choice 20'):
        choose_bits([[20, 40]], [[1.0, 0.5]], 10)


def test_set_weight_bits_refits_the_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    convert(model, QConfig.build(dict(first_layer_bits=None, last_layer_bits=None,
                                      default=dict(w_per_channel=True)), bits='w4a8'))
    layer = model[0]
    layer.weight_quantizer.fit(layer.weight)
    set_weight_bits(layer, 2)
    wq = layer.weight_quantizer
    assert wq.bits == 2 and bool(wq.calibrated) and wq.scale.shape == (4,)
    codes = wq.int_repr(layer.weight)
    assert int(codes.min()) >= -2 and int(codes.max()) <= 1
    assert weight_bits(model) == {'0': 2, '2': 4}


def test_brecq_mixed_precision_meets_the_budget_and_logs_the_choice(caplog):
    from mmquant.ptq import BRECQPTQ
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    ptq = BRECQPTQ(dict(first_layer_bits=8, last_layer_bits=8), 'w4a8', iters=20, batch_size=8,
                   mixed_bits=[2, 4, 8], avg_bits=3.0)
    with caplog.at_level(logging.INFO, logger='mmquant'):
        ptq(model, batches)
    bits = weight_bits(model)
    assert bits['stem'] == 8 and bits['head'] == 8                    # first / last layers keep theirs
    assert bits['block.conv1'] == bits['block.conv2'] in (2, 4)        # one choice per unit, within 3 bits
    assert 'mmquant brecq: mixed precision over 1 units' in caplog.text
    assert 'mmquant brecq: sensitivity of block: w2 ' in caplog.text
    with pytest.raises(ValueError, match='needs both mixed_bits'):
        BRECQPTQ(bits='w4a8', mixed_bits=[2, 4])
    with pytest.raises(ValueError, match=r'avg_bits=1.0 is below the smallest of mixed_bits \[2, 4\]'):
        BRECQPTQ(bits='w4a8', mixed_bits=[2, 4], avg_bits=1.0)
