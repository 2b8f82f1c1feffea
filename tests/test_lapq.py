"""LAPQ: the Lp initialisation's parabola, and the joint search lowering the task loss."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmquant.ptq import build_ptq
from mmquant.ptq.lapq import parabola_min


def test_parabola_min_closed_forms():
    assert parabola_min([2, 3, 4], [1.0, 0.5, 1.0]) == 3.0
    # y = (p - 2.8)^2 sampled at 2, 2.5, 3, 3.5: the parabola through the best three is exact
    ps = [2.0, 2.5, 3.0, 3.5]
    assert parabola_min(ps, [(p - 2.8) ** 2 for p in ps]) == pytest.approx(2.8)
    assert parabola_min(ps, [4.0, 3.0, 2.0, 1.0]) == 3.5          # best at an end: kept
    assert parabola_min([1.0], [0.3]) == 1.0


def _net_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    xs = [torch.randn(128, 20) for _ in range(2)]
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in xs]      # the float model's own answers
    return model, list(zip(xs, labels))


def _forward(m, batch):
    return m(batch[0])


def _loss(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def test_lapq_picks_p_by_task_loss_and_the_joint_search_lowers_it():
    model, batches = _net_and_data()
    qconfig = dict(io_layer=dict(w_bits=3, a_bits=3))          # every layer at 3 bits
    method = build_ptq('lapq', qconfig=qconfig, bits='w3a3', max_evals=150)
    method(model, batches, forward_fn=_forward, loss_fn=_loss)
    rec = method.record
    assert len(rec['p_losses']) == 5 and 2.0 <= rec['p_star'] <= 4.0
    assert rec['init_loss'] <= min(rec['p_losses']) + 1e-9
    assert rec['final_loss'] < rec['init_loss']                  # the search found better steps
    assert 0 < rec['evals'] <= 150 + len(list(model.modules()))  # Powell may finish a line search
    with torch.no_grad():
        now = sum(float(_loss(model, b)) for b in batches) / len(batches)
    assert now == pytest.approx(rec['final_loss'], rel=1e-5)     # the model keeps the best steps


def test_lapq_without_labels_matches_the_float_outputs():
    model, batches = _net_and_data()
    xs = [x for x, _ in batches]
    method = build_ptq('lapq', bits='w3a3', qconfig=dict(io_layer=dict(w_bits=3, a_bits=3)), max_evals=60)
    method(model, xs)
    assert method.record['final_loss'] <= method.record['init_loss']


def test_lapq_with_no_search_is_the_lp_initialisation():
    model, batches = _net_and_data()
    method = build_ptq('lapq', bits='w4a4', max_evals=0, ps=(2.0, 3.0))
    method(model, batches, forward_fn=_forward, loss_fn=_loss)
    assert 'evals' not in method.record and method.record['final_loss'] == method.record['init_loss']


@pytest.mark.parametrize('options, message', [
    (dict(ps=(3.0, 2.0)), 'lapq: ps=(3.0, 2.0) must be increasing exponents > 0'),
    (dict(max_evals=-1), 'lapq: max_evals=-1 must be >= 0'),
    (dict(bounds=(1.5, 2.0)), 'lapq: bounds=(1.5, 2.0) must satisfy 0 < low <= 1 <= high'),
    (dict(steps=3), "unknown options ['steps'] for method 'lapq'"),
])
def test_lapq_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
        build_ptq('lapq', bits='w4a4', **options)
