"""ACIQ clipping against its closed form on sampled Laplace / Gauss data, and bias correction."""
import pytest
import torch
from torch import nn

from mmquant.observers import build_observer
from mmquant.observers.aciq import grid_steps, optimal_clip
from mmquant.ptq import build_ptq
from mmquant.ptq.bias_correction import correct_bias
from mmquant.quantizers import QScheme, calc_qparams, fake_quantize


@pytest.mark.parametrize('dist, table', [('laplace', {2: 2.83, 3: 3.89, 4: 5.03}),
                                         ('gauss', {2: 1.71, 3: 2.15, 4: 2.55})])
def test_optimal_clip_matches_the_papers_table(dist, table):
    for bits, c in table.items():
        assert optimal_clip(2 ** bits, dist) == pytest.approx(c, abs=0.01)   # the paper prints 2 decimals, truncated


def _sample(dist, n, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dist == 'laplace':
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        return (-width * torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    return (width * torch.randn(n, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize('dist, width, bits', [('laplace', 0.7, 4), ('laplace', 2.0, 2), ('gauss', 1.3, 4),
                                               ('gauss', 0.5, 3)])
def test_clip_is_the_closed_form_optimum_of_the_sampled_density(dist, width, bits):
    x = _sample(dist, 400_000, width)
    obs = build_observer('aciq', dist=dist)
    for chunk in x.split(100_000):          # several calibration batches
        obs.update(chunk)
    scheme = QScheme(bits=bits, symmetric=True)
    lo, hi = obs.compute_range(scheme, signed=True)
    expected = optimal_clip(2 ** bits - 2, dist) * width      # -qmax..qmax: 2^M - 2 steps
    assert grid_steps(scheme, True) == 2 ** bits - 2
    assert float(hi) == pytest.approx(expected, rel=0.02)
    assert float(lo) == pytest.approx(-expected, rel=0.03)       # around the sample mean, ~0


@pytest.mark.parametrize('dist', ['laplace', 'gauss'])
def test_auto_picks_the_family_that_generated_the_data(dist):
    x = _sample(dist, 200_000, 1.0, seed=1)
    auto, fixed = build_observer('aciq', dist='auto'), build_observer('aciq', dist=dist)
    auto.update(x)
    fixed.update(x)
    scheme = QScheme(bits=3, symmetric=True)
    assert float(auto.compute_range(scheme, True)[1]) == float(fixed.compute_range(scheme, True)[1])


def test_per_channel_weights_get_one_clip_per_channel():
    widths = torch.tensor([0.1, 0.5, 2.0])
    w = torch.stack([_sample('laplace', 50_000, float(b), seed=k) for k, b in enumerate(widths)])
    obs = build_observer('aciq', per_channel=True, ch_axis=0)
    obs.update(w)
    lo, hi = obs.compute_range(QScheme(bits=3, symmetric=True, per_channel=True), True)
    assert hi.shape == (3, ) and torch.allclose(hi, optimal_clip(6) * widths, rtol=0.03)


def test_post_relu_data_is_fitted_one_sided_with_one_more_bit():
    x = _sample('laplace', 400_000, 0.8, seed=2).clamp_min(0)     # half the mass exactly at 0
    obs = build_observer('aciq')
    obs.update(x)
    lo, hi = obs.compute_range(QScheme(bits=3, symmetric=False), signed=False)
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(optimal_clip(2 * 7) * 0.8, rel=0.02)   # 7 steps on one side


def test_clip_error_is_near_the_brute_force_best_on_the_sample():
    x = _sample('laplace', 200_000, 1.0, seed=3)
    scheme = QScheme(bits=3, symmetric=True)
    qmin, qmax = scheme.qrange(True)

    def mse(alpha):
        scale, zp = calc_qparams(torch.tensor([-alpha]), torch.tensor([alpha]), scheme, True)
        return float((fake_quantize(x, scale, zp, qmin, qmax) - x).pow(2).mean())

    obs = build_observer('aciq')
    obs.update(x)
    aciq = mse(float(obs.compute_range(scheme, True)[1]))
    best = min(mse(0.05 * k) for k in range(20, 200))
    assert aciq <= 1.05 * best
    assert aciq < 0.5 * mse(float(x.abs().max()))                # far better than min-max


def test_clip_never_widens_the_observed_range():
    obs = build_observer('aciq')
    obs.update(torch.tensor([-0.1, 0.0, 0.05, 0.1]))
    lo, hi = obs.compute_range(QScheme(bits=8, symmetric=False), True)
    assert lo >= obs.min_val and hi <= obs.max_val


def test_unknown_distribution_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown ACIQ distribution 'cauchy'; accepted: laplace, gauss, auto"):
        build_observer('aciq', dist='cauchy')


def test_bias_correction_removes_the_mean_shift_of_weight_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(64, 16) + 0.5 for _ in range(4)]
    with torch.no_grad():
        float_out = [model[0](b) for b in batches]
    method = build_ptq('minmax', bits='w2', bias_correction=True)
    method(model, batches)
    layer = model[0]
    x_mean = torch.cat(batches).mean(0)
    wq = layer.weight_quantizer(layer.weight).detach()
    # the closed form for a Linear layer fed the float input: shift = (W_q - W) mean(x)
    assert torch.allclose(layer.bias, -(wq - layer.weight.detach()) @ x_mean, atol=1e-5)
    with torch.no_grad():
        quant_out = [layer(b) for b in batches]
    err = torch.cat(quant_out) - torch.cat(float_out)
    assert err.mean(0).abs().max() < 1e-5                     # mean error per channel gone
    assert isinstance(model[2].bias, nn.Parameter)


def test_bias_correction_creates_a_conv_bias_and_zero_shift_when_weights_are_exact():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False))       # first and last layer: 8-bit weights
    with torch.no_grad():
        conv[0].weight.copy_(torch.randint(-127, 128, conv[0].weight.shape).float())
        conv[0].weight[0, 0, 0, 0] = 127.0                      # so max|w| / 127 = 1: on the grid
    batches = [torch.randn(2, 3, 8, 8)]
    build_ptq('minmax', bits='w4', bias_correction=True)(conv, batches)
    assert conv[0].bias is not None and conv[0].bias.abs().max() < 1e-6


def test_aciq_method_defaults():
    m = build_ptq('aciq', bits='w4a4')
    assert m.bias_correction and m.qconfig.default.w_observer == 'aciq' and m.qconfig.default.a_observer == 'aciq'
    assert not build_ptq('aciq', bits='w4a4', bias_correction=False).bias_correction
