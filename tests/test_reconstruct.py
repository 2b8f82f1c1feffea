"""Unit capture and reconstruction (AdaRound + learned activation steps + QDrop) on small models."""
import pytest
import torch
from torch import nn

from mmquant import QConfig, convert
from mmquant.calibrate import calibrate
from mmquant.convert import quant_layers
from mmquant.ptq.reconstruct import ReconConfig, reconstruct
from mmquant.ptq.unit_cache import capture, count_calls


class BasicBlock(nn.Module):   # the class name marks a residual unit for find_units
    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = BasicBlock()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.block(torch.relu_(self.stem(x)))                    # in place, as mm models do
        return self.head(y) + self.head(y[..., ::2, ::2]).mean()     # head called twice, two shapes


def _model(bits, size=8):
    torch.manual_seed(0)
    model = Net().eval()
    for bn in (model.block.bn1, model.block.bn2):
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-0.2, 0.2)
    qc = QConfig.build(dict(first_layer_bits=None, last_layer_bits=None,
                            default=dict(w_observer='mse', a_observer='mse')), bits=bits)
    convert(model, qc)
    batches = [torch.randn(16, 3, size, size) for _ in range(4)]
    calibrate(model, batches)
    return model, batches


def test_capture_keeps_each_call_and_shape_and_stops_early():
    model, batches = _model('w4a8')
    fwd = lambda m, b: m(b)   # noqa: E731
    calls, order = count_calls(model, {'head': model.head, 'block': model.block}, batches[:2], fwd)
    assert calls == {'head': [2, 2], 'block': [1, 1]} and order == ['block', 'head']
    streams = capture(model, model.head, batches, fwd, calls=2)
    assert [(s.call, tuple(s.inputs.shape), tuple(s.outputs.shape)) for s in streams] == \
        [(0, (64, 8, 8, 8), (64, 4, 8, 8)), (1, (64, 8, 4, 4), (64, 4, 4, 4))]
    with torch.no_grad():
        torch.testing.assert_close(streams[0].outputs, model.head(streams[0].inputs))
    seen = []
    h = model.head.register_forward_pre_hook(lambda m, a: seen.append(1))
    capture(model, model.block, batches, fwd, calls=1, outputs=False)   # stops before the head
    h.remove()
    assert seen == []


@pytest.mark.parametrize('drop_prob', [0.0, 0.5])
def test_reconstruction_beats_nearest_and_leaves_weights_on_the_grid(drop_prob):
    model, batches = _model('w2a4')
    fwd = lambda m, b: m(b)   # noqa: E731
    from mmquant.calibrate import disabled
    quantizers = [q for _, layer in quant_layers(model) for q in (layer.weight_quantizer, layer.input_quantizer) if q]
    with disabled(quantizers):
        target = capture(model, model.block, batches, fwd, calls=1)
    inputs = capture(model, model.block, batches, fwd, calls=1, outputs=False)
    target[0].inputs = inputs[0].inputs
    layers = [(n, m) for n, m in quant_layers(model) if n.startswith('block.')]
    steps_before = [float(m.input_quantizer.scale) for _, m in layers]
    logged = []
    res = reconstruct(model.block, layers, target, ReconConfig(iters=400, batch_size=16, drop_prob=drop_prob),
                      progress=lambda t, n, loss: logged.append(t))
    assert res.loss < 0.8 * res.loss_rtn and logged == [100, 200, 300, 400]
    params = list(model.block.parameters())
    assert all(p.grad is None and p.requires_grad for p in params)      # untouched, flags restored
    for (name, layer), before in zip(layers, steps_before):
        wq = layer.weight_quantizer
        assert type(wq).__name__ == 'UniformQuantizer'                  # the stand-ins are gone
        s = wq.scale.reshape(-1, 1, 1, 1)
        ints = layer.weight / s
        assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.round().abs().max() <= 2
        torch.testing.assert_close(layer.quantized_weight(), layer.weight)
        assert float(layer.input_quantizer.scale) != before                # the step was learned
    with torch.no_grad():                                                # the model reproduces res.loss
        out = model.block(target[0].inputs)
    assert float(((out - target[0].outputs) ** 2).sum(1).mean()) == pytest.approx(res.loss, rel=1e-4)


def test_small_maps_reconstruct_through_the_matrix_product_and_the_switch_is_removed(monkeypatch):
    model, batches = _model('w2a4', size=2)                 # the block's convs see 2x2 maps: 4 output positions
    fwd = lambda m, b: m(b)   # noqa: E731
    from mmquant.calibrate import disabled
    import mmquant.nn.qlayers as ql
    quantizers = [q for _, layer in quant_layers(model) for q in (layer.weight_quantizer, layer.input_quantizer) if q]
    with disabled(quantizers):
        target = capture(model, model.block, batches, fwd, calls=1)
    target[0].inputs = capture(model, model.block, batches, fwd, calls=1, outputs=False)[0].inputs
    layers = [(n, m) for n, m in quant_layers(model) if n.startswith('block.')]
    calls = []
    real = ql.gemm_conv2d
    monkeypatch.setattr(ql, 'gemm_conv2d', lambda *a: calls.append(1) or real(*a))
    res = reconstruct(model.block, layers, target, ReconConfig(iters=200, batch_size=16))
    assert res.loss < 0.8 * res.loss_rtn
    assert len(calls) >= 2 * 200                            # both convs, every iteration
    assert all('gemm_small_maps' not in vars(m) and not m.gemm_small_maps for _, m in layers)
    n = len(calls)
    with torch.no_grad():
        model(batches[0])
    assert len(calls) == n                                  # outside the loop: the ordinary convolution


def test_qdrop_mixes_float_inputs_into_the_unit_input(monkeypatch):
    import mmquant.ptq.brecq as brecq_mod
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    seen = {}

    def spy(unit, layers, streams, cfg, progress=None):
        seen[layers[0][0]] = [set(s.extra) for s in streams]
        return reconstruct(unit, layers, streams, cfg, progress)

    monkeypatch.setattr(brecq_mod, 'reconstruct', spy)
    ptq = brecq_mod.BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w3a8', iters=20,
                             batch_size=8, drop_prob=0.5)
    ptq(model, batches)
    assert seen['block.conv1'] == [{'float_inputs'}] and seen['head'] == [{'float_inputs'}] * 2


def test_brecq_targets_come_from_the_float_network_after_earlier_units_are_rounded(monkeypatch):
    """Each unit's targets are the float network's outputs of that unit, although the units before
    it already hold their rounded weights (regression: the targets once came from a network whose
    earlier weights were the rounded ones, which hides the error BRECQ is meant to correct)."""
    import copy
    import mmquant.ptq.brecq as brecq_mod
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    reference = copy.deepcopy(model)            # brecq folds BatchNorm first: same function to 1e-5
    want = {}
    hooks = [getattr(reference, n).register_forward_hook(lambda m, a, o, n=n: want.setdefault(n, []).append(o))
             for n in ('block', 'head')]
    with torch.no_grad():
        for b in batches:
            reference(b)
    for h in hooks:
        h.remove()
    seen = {}

    def spy(unit, layers, streams, cfg, progress=None):
        seen[layers[0][0]] = [s.outputs.clone() for s in streams]
        return reconstruct(unit, layers, streams, cfg, progress)

    monkeypatch.setattr(brecq_mod, 'reconstruct', spy)
    ptq = brecq_mod.BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w2a8', iters=20, batch_size=8)
    ptq(model, batches)
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen['block.conv1'][0], torch.cat(want['block']), **close)
    torch.testing.assert_close(seen['head'][0], torch.cat(want['head'][0::2]), **close)   # first call per batch
    torch.testing.assert_close(seen['head'][1], torch.cat(want['head'][1::2]), **close)
    assert not torch.equal(model.block.conv1.weight, reference.block.conv1.weight)   # rounded in place


def test_capture_grads_equal_autograd_and_fisher_weights_the_loss():
    from mmquant.ptq.brecq import BRECQPTQ
    from mmquant.ptq.unit_cache import capture_grads
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    target = torch.randn(4, 4, 8, 8)
    loss_fn = lambda m, b: ((m(b) - target) ** 2).sum()          # noqa: E731
    grads = capture_grads(model, model.block, batches, loss_fn)
    assert list(grads) == [(0, (8, 8, 8))] and all(p.grad is None for p in model.parameters())
    y = torch.relu(model.stem(batches[1])).detach()
    out = model.block(y).detach().requires_grad_(True)
    ((model.head(out) + model.head(out[..., ::2, ::2]).mean() - target) ** 2).sum().backward()
    torch.testing.assert_close(grads[(0, (8, 8, 8))][4:], out.grad)
    ptq = BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w3a8', iters=30, batch_size=4, loss='fisher')
    with pytest.raises(ValueError, match="brecq: loss='fisher' needs the task loss"):
        ptq(Net().eval(), batches)
    ptq.convert(model, lambda: model(batches[0]))
    records = ptq.calibrate(model, batches, loss_fn=loss_fn)
    assert [r.name for r in records] == ['stem', 'block', 'head'] and all(r.loss is not None for r in records)


def test_early_stop_once_roundings_are_decided_and_the_loss_is_flat():
    from mmquant.calibrate import disabled
    out = {}
    for early in (True, False):
        model, batches = _model('w3a8')
        fwd = lambda m, b: m(b)   # noqa: E731
        quantizers = [q for _, l in quant_layers(model) for q in (l.weight_quantizer, l.input_quantizer) if q]
        with disabled(quantizers):
            streams = capture(model, model.block, batches, fwd, calls=1)
        layers = [(n, m) for n, m in quant_layers(model) if n.startswith('block.')]
        # a constant beta = 2 decides the roundings early (the paper's 20 -> 2 anneal decides
        # them near its end, where stopping saves little)
        cfg = ReconConfig(iters=4000, batch_size=16, lam=0.1, beta_start=2.0, beta_end=2.0, early_stop=early)
        out[early] = reconstruct(model.block, layers, streams, cfg)
    assert out[False].iters == 4000 and 1000 < out[True].iters < 4000
    # this regulariser is too strong for the block: the unit falls back to round-to-nearest
    assert out[True].loss == out[True].loss_rtn


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match=r'drop_prob must be in \[0, 1\), got 1.5'):
        ReconConfig(drop_prob=1.5)
    with pytest.raises(ValueError, match='iters >= 1'):
        ReconConfig(iters=0)


def test_brecq_end_to_end_closer_to_float_than_minmax_and_mse():
    from mmquant.ptq import BRECQPTQ, build_ptq
    torch.manual_seed(1)
    ref_model = Net().eval()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        ref = ref_model(x)
    errs = {}
    for method, opts in (('minmax', {}), ('mse', {}), ('brecq', dict(iters=1000, batch_size=16))):
        model = Net().eval()
        model.load_state_dict(ref_model.state_dict())
        ptq = build_ptq(method, dict(first_layer_bits=None, last_layer_bits=None), 'w3a8', **opts)
        ptq(model, batches)
        with torch.no_grad():
            errs[method] = float(((model(x) - ref) ** 2).mean())
    assert errs['brecq'] < 0.75 * min(errs['minmax'], errs['mse']), errs


def test_brecq_records_units_in_execution_order(caplog):
    import logging
    from mmquant.ptq import BRECQPTQ
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    ptq = BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w3a8', iters=50, batch_size=8)
    done = []
    with caplog.at_level(logging.INFO, logger='mmquant'):
        ptq.convert(model, lambda: model(batches[0]))
        records = ptq.calibrate(model, batches, progress=lambda k, n: done.append((k, n)))
    assert [r.name for r in records] == ['stem', 'block', 'head']
    assert records[1].layers == ['block.conv1', 'block.conv2'] and records[1].samples == 16
    assert records[2].samples == 32                                   # two calls per batch
    assert all(r.loss <= r.loss_rtn * 1.05 for r in records) and done[-1] == (3, 3)
    assert 'mmquant brecq: block (2 layers) output loss: rtn' in caplog.text
    # BatchNorm was folded into the convs before quantization (the default)
    assert isinstance(model.block.bn1, nn.Identity) and model.block.conv2.bias is not None
    assert 'mmquant brecq: folded 2 BatchNorm layers into their convs' in caplog.text


class Selecting(nn.Module):
    """A 'proposal' step: the head runs on the rows whose stem output is large, so how many rows it
    sees depends on how the stem is quantized (as a two-stage detector's RoI head)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.stem(x)
        return self.head(y[y.sum(1) > 0.05])


def test_brecq_unit_after_a_data_dependent_selection_uses_its_own_float_targets(caplog):
    import logging
    from mmquant.ptq import BRECQPTQ
    torch.manual_seed(0)
    model = Selecting().eval()
    batches = [torch.randn(64, 6) for _ in range(2)]
    ptq = BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w2a2', iters=20, batch_size=8)
    with caplog.at_level(logging.INFO, logger='mmquant'):
        ptq.convert(model, lambda: model(batches[0]))
        records = ptq.calibrate(model, batches)
    assert [r.name for r in records] == ['stem', 'head']
    assert 'mmquant brecq: head sees other inputs in number' in caplog.text
    # named explicitly, the unit never pairs with the float network's outputs (no message needed)
    caplog.clear()
    model = Selecting().eval()
    ptq = BRECQPTQ(dict(first_layer_bits=None, last_layer_bits=None), 'w2a2', iters=20, batch_size=8,
                   local_targets=['head'])
    with caplog.at_level(logging.INFO, logger='mmquant'):
        ptq.convert(model, lambda: model(batches[0]))
        assert [r.name for r in ptq.calibrate(model, batches)] == ['stem', 'head']
    assert 'sees other inputs' not in caplog.text


def test_two_stage_detectors_get_local_roi_head_targets():
    from mmquant.engine.ptq_loop import mm_method_options

    class TwoStage(nn.Module):
        with_roi_head = True
    assert mm_method_options('brecq', TwoStage(), {}) == {'local_targets': ['roi_head']}
    assert mm_method_options('brecq', TwoStage(), {'local_targets': []}) == {'local_targets': []}
    assert mm_method_options('brecq', nn.Linear(2, 2), {'iters': 5}) == {'iters': 5}
    assert mm_method_options('bitsplit', TwoStage(), {}) == {}
