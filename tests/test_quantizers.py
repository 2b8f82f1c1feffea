"""Fake-quant math against closed forms."""
import pytest
import torch

from mmquant.quantizers import QScheme, UniformQuantizer, calc_qparams, check_bits, fake_quantize, quantize
from mmquant.observers import MinMaxObserver


@pytest.mark.parametrize('bits', [2, 3, 4, 8, 16])
def test_signed_symmetric_grid_is_exact(bits):
    scheme = QScheme(bits=bits)
    qmin, qmax = scheme.qrange()
    assert (qmin, qmax) == (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    scale, zp = calc_qparams(torch.tensor(-3.0), torch.tensor(2.0), scheme, signed=True)
    assert torch.isclose(scale, torch.tensor(3.0 / qmax)) and zp == 0
    grid = torch.arange(qmin, qmax + 1, dtype=torch.float32) * scale
    assert torch.allclose(fake_quantize(grid, scale, zp, qmin, qmax), grid)   # grid points are fixed


def test_affine_grid_represents_zero_and_extremes():
    scheme = QScheme(bits=8, symmetric=False, signed=False)
    lo, hi = torch.tensor(-0.3), torch.tensor(5.1)
    scale, zp = calc_qparams(lo, hi, scheme, signed=False)
    assert torch.isclose(scale, (hi - lo) / 255)
    q = fake_quantize(torch.tensor([0.0, -0.3, 5.1]), scale, zp, 0, 255)
    assert q[0] == 0.0                                   # zero is exact
    assert torch.allclose(q[1:], torch.tensor([-0.3, 5.1]), atol=float(scale) / 2)


def test_rounding_error_is_at_most_half_a_step_inside_the_range():
    torch.manual_seed(0)
    x = torch.rand(10000) * 4 - 2
    scale, zp = calc_qparams(x.min(), x.max(), QScheme(bits=4), signed=True)
    err = (fake_quantize(x, scale, zp, -8, 7) - x).abs()
    inside = x.abs() <= 7 * scale
    assert err[inside].max() <= scale / 2 + 1e-6


def test_straight_through_gradient_is_one_inside_zero_outside():
    x = torch.tensor([-10.0, -0.4, 0.3, 0.9, 10.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.25), torch.tensor(0.0), -4, 3)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]   # 0.9 / 0.25 = 3.6 -> clamped at 3


def test_per_channel_scales_broadcast_along_channel_axis():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-4, 4, 9)]).reshape(2, 1, 3, 3)
    scheme = QScheme(bits=3, per_channel=True, ch_axis=0)
    obs = MinMaxObserver(per_channel=True)
    q = UniformQuantizer(scheme, num_channels=2, observer=obs)
    q.observe(w)
    q.compute_qparams()
    assert torch.allclose(q.scale, torch.tensor([1 / 3, 4 / 3]))
    codes = q.int_repr(w)
    assert codes.dtype == torch.int32 and codes.min() >= -4 and codes.max() <= 3
    assert torch.allclose(q.dequantize(codes), q(w))


def test_unsigned_grid_chosen_for_nonnegative_data():
    q = UniformQuantizer(QScheme(bits=4, signed=None), observer=MinMaxObserver())
    q.observe(torch.rand(100) * 3)
    q.compute_qparams()
    assert not bool(q.signed) and q.qrange() == (0, 15)


def test_narrow_range_drops_most_negative_code():
    assert QScheme(bits=8, narrow_range=True).qrange() == (-127, 127)
    codes = quantize(torch.tensor([-100.0]), torch.tensor(0.5), torch.tensor(0.0), -127, 127)
    assert codes.item() == -127


@pytest.mark.parametrize('bad', [0, 1, 17, 2.5, True])
def test_bits_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match='out of range'):
        check_bits(bad)


def test_uncalibrated_quantizer_passes_through_and_checkpoint_restores_it():
    q = UniformQuantizer(QScheme(bits=4), observer=MinMaxObserver())
    x = torch.randn(50)
    assert torch.equal(q(x), x)
    q.observe(x)
    q.compute_qparams()
    fresh = UniformQuantizer(QScheme(bits=4))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match='4-bit quantizer'):
        UniformQuantizer(QScheme(bits=8)).load_state_dict(q.state_dict())


def test_dynamic_quantizer_follows_the_tensor():
    q = UniformQuantizer(QScheme(bits=4), observer=MinMaxObserver())
    q.dynamic = True
    q(torch.tensor([-1.0, 7.0]))
    assert torch.isclose(q.scale, torch.tensor(1.0)).all()
    q(torch.tensor([14.0]))
    assert torch.isclose(q.scale, torch.tensor(2.0)).all() and bool(q.calibrated)
