"""BitSplit: the solver against closed forms and brute force on small problems, then the PTQ method."""
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmquant import quantize
from mmquant.convert import quant_layers
from mmquant.ptq import BitSplitPTQ, build_ptq
from mmquant.ptq.bitsplit import BitSplitRecord, gather_patches, inputs_per_output, num_positions, recalibrate_bn, weight_groups
from mmquant.ptq import bitsplit_solver
from mmquant.ptq.bitsplit_solver import (als_activation_scale, closed_form_alpha, fit_layer, fit_weight_only,
                                         objective, qmax_of, response_problem, rtn_init, split_planes,
                                         stitch_planes, update_plane_response, round_to_grid,
                                         weight_error)

from test_convert import TwoHeads, _calib

D64 = torch.float64


def _problem(g=1, c=6, d=10, n=80, seed=0, correlated=True, target=False):
    """Weights ``[g, c, d]`` and inputs ``[g, d, n]`` (float64), inputs correlated across rows."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, c, d, generator=gen, dtype=D64)
    x = torch.randn(g, d, n, generator=gen, dtype=D64)
    if correlated:
        mix = torch.eye(d, dtype=D64) + 0.6 * torch.randn(g, d, d, generator=gen, dtype=D64)
        x = torch.bmm(mix, x)
    y = None
    if target:   # a target that is not w x (error compensation: x from the quantized network)
        y = torch.bmm(w, x + 0.3 * torch.randn(g, d, n, generator=gen, dtype=D64))
    return w, x, y


def _direct(w, x, y, alpha, v):
    """||y - alpha v x||^2 per channel, computed on the data itself."""
    y = torch.bmm(w, x) if y is None else y
    return ((y - torch.bmm(alpha * v, x)) ** 2).sum(-1)


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 8])
def test_split_then_stitch_reproduces_every_integer(bits):
    q = qmax_of(bits)
    v = torch.arange(-q, q + 1, dtype=D64)
    planes = split_planes(v, bits)
    assert planes.shape == (bits - 1, 2 * q + 1)
    assert set(planes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(stitch_planes(planes), v)
    with pytest.raises(ValueError, match='outside'):
        split_planes(torch.tensor([q + 1.0]), bits)


@pytest.mark.parametrize('per_channel', [True, False])
@pytest.mark.parametrize('target', [False, True])
def test_objective_matches_data_and_closed_form_alpha_is_the_minimum(per_channel, target):
    w, x, y = _problem(g=2, target=target)
    prob = response_problem(w, x, y)
    alpha0, v = rtn_init(w, 3, per_channel)
    assert torch.allclose(objective(prob, alpha0, v), _direct(w, x, y, alpha0, v))
    vg = torch.bmm(v, prob.gram)
    alpha = closed_form_alpha(v, prob.b, vg, per_channel, fallback=alpha0)
    if not per_channel:
        assert torch.all(alpha == alpha.flatten()[0])
    best = float(objective(prob, alpha, v).sum())
    assert best <= float(objective(prob, alpha0, v).sum()) + 1e-9      # never increases
    for f in torch.linspace(0.8, 1.2, 81, dtype=D64):                    # a fine scan around it
        assert best <= float(objective(prob, alpha * f, v).sum()) + 1e-9
    # per channel, each channel's alpha is its own minimum (perturb one channel at a time)
    if per_channel:
        per = objective(prob, alpha, v)
        for i in range(alpha.shape[1]):
            a2 = alpha.clone()
            a2[:, i] *= 1.01
            assert torch.all(objective(prob, a2, v)[:, i] >= per[:, i])


def test_weight_only_integers_are_the_joint_optimum_over_the_planes():
    w, _, _ = _problem(c=8, d=30, seed=3)
    alpha, _ = rtn_init(w, 4, True)
    alpha = alpha * 0.8          # a scale at which some weights clip
    planes = split_planes(round_to_grid(w, alpha, 4), 4)
    base = (w - alpha * stitch_planes(planes)) ** 2
    # no ternary change of one plane, nor of two planes at once, lowers any element's error
    for m in range(3):
        for k in range(3):
            for q in (-1.0, 0.0, 1.0):
                for r in (-1.0, 0.0, 1.0):
                    moved = planes.clone()
                    moved[m] = q
                    if k != m:
                        moved[k] = r
                    assert torch.all((w - alpha * stitch_planes(moved)) ** 2 >= base - 1e-12)


@pytest.mark.parametrize('per_channel', [True, False])
@pytest.mark.parametrize('target', [False, True])
def test_every_response_plane_sweep_never_increases_the_objective(per_channel, target):
    w, x, y = _problem(g=2, c=5, d=12, seed=1, target=target)
    prob = response_problem(w, x, y)
    alpha, v = rtn_init(w, 4, per_channel)
    planes = split_planes(v, 4)
    f = objective(prob, alpha, v)
    for _ in range(2):
        for m in reversed(range(3)):
            update_plane_response(prob, alpha, planes, m, block_size=5)
            f_new = objective(prob, alpha, stitch_planes(planes))
            if per_channel:
                assert torch.all(f_new <= f + 1e-9)
            else:
                assert float(f_new.sum()) <= float(f.sum()) + 1e-9
            f = f_new


def _naive_sweep(w, x, y, alpha, planes, m):
    """Reference: channel by channel, column by column, try the three values and keep the best."""
    planes = planes.clone()
    g, c, d = w.shape
    for gi in range(g):
        for ci in range(c):
            for i in range(d):
                costs = []
                for q in (-1.0, 0.0, 1.0):
                    planes[m, gi, ci, i] = q
                    v = stitch_planes(planes[:, gi, ci])
                    yy = (torch.bmm(w, x) if y is None else y)[gi, ci]
                    costs.append(float(((yy - alpha[gi, ci] * (v @ x[gi])) ** 2).sum()))
                planes[m, gi, ci, i] = (-1.0, 0.0, 1.0)[min(range(3), key=costs.__getitem__)]
    return planes


@pytest.mark.parametrize('compiled', [False, True])
@pytest.mark.parametrize('target', [False, True])
def test_vectorised_sweep_equals_naive_per_channel_loop(target, compiled, monkeypatch):
    if not compiled:                      # the Python reference loop instead of the C++ one
        monkeypatch.setattr(bitsplit_solver, '_sweep_ext', None)
    w, x, y = _problem(g=2, c=3, d=5, n=20, seed=4, target=target)
    prob = response_problem(w, x, y)
    alpha, v = rtn_init(w, 3, True)
    alpha = alpha * torch.linspace(0.7, 1.1, 6, dtype=D64).reshape(2, 3, 1)
    planes = split_planes(v, 3)
    for m in (1, 0):
        ref = _naive_sweep(w, x, y, alpha, planes, m)
        update_plane_response(prob, alpha, planes, m, block_size=2)
        assert torch.equal(planes, ref)


def test_compiled_sweep_is_built():
    # scripts/install.sh builds it (pip install -e .); without it the solver falls back to the
    # Python loop, same results, several times slower on small layers
    assert bitsplit_solver._sweep_ext is not None, 'mmquant/ptq/_bitsplit_sweep is not built'


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_compiled_block_sweep_equals_python_loop(dtype):
    gen = torch.Generator().manual_seed(7)
    g, B, C = 3, 17, 9
    x = torch.randn(g, B, 40, generator=gen, dtype=D64)
    gb = torch.bmm(x, x.transpose(1, 2)).to(dtype)
    step_t = (0.05 + torch.rand(g, 1, C, generator=gen, dtype=D64)).to(dtype)
    ib = (1.0 / (step_t.transpose(1, 2) * torch.diagonal(gb, dim1=1, dim2=2).unsqueeze(1))).transpose(1, 2)
    ib = ib.contiguous()
    ib[:, 3] = 0                                                   # a dead column
    hb = (3 * torch.randn(g, B, C, generator=gen, dtype=D64)).to(dtype)
    pb = torch.randint(-1, 2, (g, B, C), generator=gen).to(dtype)
    out = {}
    for compiled in (False, True):
        h, p = hb.clone(), pb.clone()
        bitsplit_solver.sweep_block(h, p, ib, gb, step_t, compiled=compiled)
        out[compiled] = (h, p)
    assert torch.equal(out[True][1], out[False][1])
    assert not torch.equal(out[True][1], pb)                       # the sweep changed something
    torch.testing.assert_close(out[True][0], out[False][0])


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('per_channel', [True, False])
def test_fit_is_never_worse_than_round_to_nearest(bits, per_channel):
    for seed in range(3):
        w, x, y = _problem(g=1, c=8, d=16, n=64, seed=seed, correlated=seed != 1, target=seed == 2)
        res = fit_layer(w, x, bits, per_channel, iters=3, y=y)
        assert res.err_bitsplit <= res.err_rtn + 1e-12
        assert all(b <= a * (1 + 1e-9) for a, b in zip(res.history, res.history[1:]))
        # the reported errors are the output errors on the data
        yy = torch.bmm(w, x) if y is None else y
        a0, v0 = rtn_init(w, bits, per_channel)
        assert res.err_rtn == pytest.approx(float(_direct(w, x, y, a0, v0).sum().sqrt() / yy.norm()), rel=1e-6)
        assert res.err_bitsplit == pytest.approx(
            float(_direct(w, x, y, res.alpha, res.ints).sum().sqrt() / yy.norm()), rel=1e-6)
        q = qmax_of(bits)
        assert torch.equal(res.ints, res.ints.round()) and res.ints.abs().max() <= q
        assert torch.all(res.alpha > 0)


def test_holdout_chooses_on_unseen_samples_and_catches_overfitting():
    # fewer samples than inputs (N < D): the fit drives its own error down and generalises worse
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(1, 6, 64, generator=gen)
    x_fit = torch.randn(1, 64, 40, generator=gen)
    x_new = torch.randn(1, 64, 4000, generator=gen)
    plain = fit_layer(w, x_fit, 6, iters=8)
    # 200 samples, 160 of them held out: the fit sees 40
    guarded = fit_layer(w, torch.cat([x_fit, torch.randn(1, 64, 160, generator=gen)], -1), 6, iters=8, holdout=0.8)
    prob_new = response_problem(w, x_new)
    a0, v0 = rtn_init(w, 6, True)
    new_err = lambda res: float(objective(prob_new, res.alpha, res.ints).sum())   # noqa: E731
    rtn_err = float(objective(prob_new, a0, v0).sum())
    assert plain.err_bitsplit < plain.err_rtn and new_err(plain) > 1.5 * rtn_err   # overfits
    assert new_err(guarded) < rtn_err                                           # caught
    assert guarded.err_bitsplit <= guarded.err_rtn                              # on the held-out samples


def test_fit_is_strictly_better_at_3_bits_on_correlated_inputs():
    w, x, _ = _problem(g=1, c=16, d=24, n=200, seed=7)
    for per_channel in (True, False):
        res = fit_layer(w.float(), x.float(), 3, per_channel, iters=4)
        assert res.err_bitsplit < 0.9 * res.err_rtn


def test_weight_only_fit_never_worse_than_rtn():
    w, _, _ = _problem(c=8, d=40, seed=5)
    for pc in (True, False):
        a0, v0 = rtn_init(w, 3, pc)
        a, v = fit_weight_only(w, 3, pc)
        assert weight_error(w, a, v).sum() < weight_error(w, a0, v0).sum()


def test_als_activation_scale_beats_max_on_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) * torch.rand(20000, generator=gen).pow(-0.6)   # heavy tails
    for bits in (4, 8):
        scale, signed = als_activation_scale(x, bits)
        assert signed
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        mse = lambda s: float(((x - torch.clamp(torch.round(x / s), qmin, qmax) * s) ** 2).mean())  # noqa: E731
        assert mse(scale) < mse(float(x.abs().max()) / qmax)
    relu = x.clamp(min=0)
    scale, signed = als_activation_scale(relu, 4)
    assert not signed and scale < float(relu.max()) / 15


def test_gather_patches_equals_unfold():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7)
    for conv in (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2), nn.Conv2d(4, 4, (3, 1), padding='same'),
                 nn.Conv2d(4, 8, 1, groups=4)):
        ref = F.unfold(F.pad(x, conv._reversed_padding_repeated_twice), conv.kernel_size,
                       dilation=conv.dilation, stride=conv.stride)            # [N, CKK, L]
        ref = ref.permute(0, 2, 1).reshape(-1, ref.shape[1])
        idx = torch.randperm(ref.shape[0])[:20]
        assert torch.equal(gather_patches(conv, x, idx), ref[idx])


@pytest.mark.parametrize('kw', [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                                dict(kernel_size=3, stride=1, padding=2, dilation=2), dict(kernel_size=(3, 2), stride=(2, 3))])
def test_transposed_conv_patches_give_its_output(kw):
    # a transposed conv as a conv over the zero-stuffed input: weight rows @ patch = output pixel
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 5, bias=False, **kw)
    x = torch.randn(2, 4, 6, 5)
    y = layer(x)                                                  # [N, C_out, Ho, Wo]
    n_pos = num_positions(layer, x)
    assert n_pos == y.shape[0] * y.shape[2] * y.shape[3]
    idx = torch.arange(n_pos)
    out = gather_patches(layer, x, idx) @ weight_groups(layer)[0].T   # [positions, C_out]
    torch.testing.assert_close(out, y.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-5, rtol=1e-5)


class _Mixed(nn.Module):
    """A grouped conv, a depthwise conv (strided), a transposed conv and a linear layer."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.grouped(x))
        x = self.up(torch.relu(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize('per_channel', [True, False])
def test_grouped_depthwise_transposed_and_linear_are_written_back_exactly(per_channel):
    torch.manual_seed(0)
    model = _Mixed().eval()
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, 'weight')}
    qc = dict(first_layer_bits=None, last_layer_bits=None, default=dict(w_per_channel=per_channel))
    ptq = BitSplitPTQ(qc, 'w3', num_samples=256, iters=2)
    batches = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    seen = []
    ptq(model, batches, progress=lambda done, total: seen.append(done))
    layers = dict(quant_layers(model))
    assert set(layers) == {'grouped', 'dw', 'up', 'fc'} and seen[-1] == 4
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        assert layer.weight.shape == ref[name].shape
        assert torch.equal(layer.quantized_weight(), layer.weight)      # fake quant reproduces alpha * int
        assert bool(wq.calibrated) and bool(wq.signed) and torch.all(wq.zero_point == 0)
        axis = 1 if name == 'up' else 0
        n_scales = layer.weight.shape[axis] if per_channel else 1
        assert wq.scale.shape == (n_scales,)
        shape = [1] * layer.weight.dim()
        shape[axis] = -1
        ints = layer.weight / (wq.scale.reshape(shape) if per_channel else wq.scale)
        assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.round().abs().max() <= 3
        assert wq.qrange() == (-3, 3)
    assert weight_groups(layers['dw']).shape == (8, 1, 9)
    assert weight_groups(layers['grouped']).shape == (2, 4, 18)
    assert weight_groups(layers['up']).shape == (1, 6, 32)


def test_calibrate_returns_records_and_logs(caplog):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    ptq = BitSplitPTQ(bits='w3a8', num_samples=512, iters=3)
    ptq.convert(model, lambda: model(_calib(1)[0]))
    done = []
    with caplog.at_level(logging.INFO, logger='mmquant'):
        records = ptq.calibrate(model, _calib(4), progress=lambda k, total: done.append((k, total)))
    assert all(isinstance(r, BitSplitRecord) for r in records)
    by_name = {r.name: r for r in records}
    assert [r.name for r in records][:3] == ['stem', 'block.0', 'block.2']   # execution order
    assert done == [(k, len(records)) for k in range(1, len(records) + 1)]
    assert by_name['block.0'].w_bits == 3 and by_name['block.0'].a_bits == 8
    assert by_name['block.0'].err_bitsplit < by_name['block.0'].err_rtn
    assert by_name['up'].fit == 'weight'        # never runs in TwoHeads.forward
    assert all(r.err_bitsplit <= r.err_rtn + 1e-9 and r.seconds >= 0 for r in records)
    assert 'block.0 w3 a8' in caplog.text
    aq = model.block[2].input_quantizer
    assert bool(aq.calibrated) and not bool(aq.signed) and aq.zero_point.item() == 0


def test_layers_wider_than_max_inputs_get_the_weight_fit(caplog):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    widths = {n: inputs_per_output(m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))}
    limit = sorted(widths.values())[len(widths) // 2]
    ptq = BitSplitPTQ(bits='w3a8', num_samples=256, iters=1, max_inputs=limit)
    ptq.convert(model, lambda: model(_calib(1)[0]))
    with caplog.at_level(logging.INFO, logger='mmquant'):
        records = ptq.calibrate(model, _calib(2))
    fits = {r.name: r.fit for r in records}
    wide = sorted(n for n in fits if widths[n] > limit and n != 'up')
    assert wide and all(fits[n] == 'weight' for n in wide)
    assert all(fits[n] == 'output' for n in fits if widths[n] <= limit and n != 'up')
    assert f'fitted on their weights only (grouped transposed conv, or more than max_inputs={limit}' in caplog.text
    for n in wide:      # their input quantizers are still calibrated on the activations
        aq = dict(model.named_modules())[n].input_quantizer
        assert aq is None or bool(aq.calibrated)


def _out_error(model, x, ref):
    with torch.no_grad():
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(model(x), ref))


def test_end_to_end_closer_to_float_than_minmax():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = {}
    for method in ('minmax', 'bitsplit'):
        torch.manual_seed(0)
        model = TwoHeads().eval()
        with torch.no_grad():
            ref = model(x)
        quantize(model, _calib(8), method, 'w3a8')
        errors[method] = _out_error(model, x, ref)
    assert errors['bitsplit'] < errors['minmax']


def test_error_compensation_runs_and_helps_on_twoheads():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = {}
    for ec in (False, True):
        torch.manual_seed(0)
        model = TwoHeads().eval()
        with torch.no_grad():
            ref = model(x)
        BitSplitPTQ(bits='w3a8', error_compensation=ec, num_samples=512)(model, _calib(8))
        errors[ec] = _out_error(model, x, ref)
        for _, layer in quant_layers(model):
            assert torch.equal(layer.quantized_weight(), layer.weight)
    assert errors[True] < errors[False]


def test_bn_recalibration_cumulative_average_on_the_quantized_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
    model[1].running_mean.fill_(5.0)
    model.eval()
    batches = [torch.randn(3, 3, 8, 8) for _ in range(3)]
    BitSplitPTQ(bits='w4a8', bn_recalibration=True, num_samples=128)(model, batches)
    assert not model.training and not model[1].training and model[1].momentum == 0.1
    with torch.no_grad():
        feats = [model[0](b) for b in batches]              # the quantized first conv
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-5)
    assert recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)], lambda m, b: m(b)) == 0


def test_asymmetric_weights_are_refused_and_registry_lists_bitsplit():
    with pytest.raises(ValueError, match='bitsplit quantizes weights to symmetric'):
        BitSplitPTQ(dict(default=dict(w_symmetric=False)), 'w4a8')
    with pytest.raises(ValueError, match="override 'block.*' sets w_symmetric=False"):
        build_ptq('bitsplit', dict(overrides={'block.*': dict(w_symmetric=False)}), 'w4a8')
    ptq = build_ptq('bitsplit', None, 'w4a8')
    assert isinstance(ptq, BitSplitPTQ) and ptq.qconfig.default.w_per_channel
    assert ptq.qconfig.default.w_narrow_range and ptq.qconfig.default.a_symmetric
    # a converted model made asymmetric behind the method's back is refused at calibration
    model = TwoHeads()
    ptq.convert(model)
    wq = model.block[0].weight_quantizer
    wq.scheme = replace(wq.scheme, symmetric=False)
    with pytest.raises(ValueError, match="layer 'block.0' sets w_symmetric=False"):
        ptq.calibrate(model, _calib(1))
