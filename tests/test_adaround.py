"""AdaRound's rounding math against closed forms, and a small learned rounding."""
import pytest
import torch

from mmquant.ptq.adaround import (AdaRoundWeight, BetaSchedule, init_v, rectified_sigmoid,
                                  rounding_regularizer)


def test_init_v_reproduces_the_fractional_part():
    frac = torch.linspace(0, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(init_v(frac)), frac)


def test_soft_weight_starts_at_the_float_weight_inside_the_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    scale = w.abs().amax(dim=(1, 2, 3)) / 7
    ada = AdaRoundWeight(w, scale, torch.zeros(6, dtype=torch.float64), -7, 7)
    torch.testing.assert_close(ada(), w)
    ints = ada.integers()
    assert torch.all((ints == ada.floor) | (ints == ada.floor + 1))


def test_soft_weight_is_clipped_to_the_grid():
    w = torch.tensor([0.26, -3.0, 9.0])
    ada = AdaRoundWeight(w, torch.tensor([0.5]), torch.tensor([0.0]), -4, 3)
    torch.testing.assert_close(ada(), torch.tensor([0.26, -2.0, 1.5]))


def test_rounding_regularizer_closed_forms():
    assert float(rounding_regularizer(torch.tensor([-30.0, 30.0]), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(rounding_regularizer(torch.zeros(4), 20.0)) == pytest.approx(4.0)   # h = 1/2: 1 each
    v = init_v(torch.tensor([0.25]))
    assert float(rounding_regularizer(v, 2.0)) == pytest.approx(1 - 0.5 ** 2)


def test_beta_schedule_warmup_then_linear_from_start_to_end():
    sched = BetaSchedule(100, warmup=0.2, start=20, end=2)
    assert sched(0) is None and sched(19) is None
    assert sched(20) == pytest.approx(20.0) and sched(100) == pytest.approx(2.0)
    assert sched(60) == pytest.approx(11.0)
    with pytest.raises(ValueError, match='BetaSchedule: need iters >= 1'):
        BetaSchedule(0)


def _learn(iters=2000, lam=0.01):
    """AdaRound on one linear layer (3-bit, per row), reconstructing its output on correlated inputs."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen)
    x = torch.randn(512, 16, generator=gen) @ (torch.eye(16) + 0.5 * torch.randn(16, 16, generator=gen))
    scale = w.abs().amax(1) / 3
    ada = AdaRoundWeight(w, scale, torch.zeros(8), -3, 3)
    opt = torch.optim.Adam(ada.parameters(), lr=1e-2)
    sched = BetaSchedule(iters)
    y = x @ w.T
    for t in range(iters):
        rec = ((x @ ada().T - y) ** 2).mean() / (y ** 2).mean()
        beta = sched(t)
        loss = rec if beta is None else rec + lam * ada.regularizer(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w, x, y, scale, ada


def test_after_the_anneal_every_rounding_is_0_or_1_and_beats_nearest():
    w, x, y, scale, ada = _learn()
    h = rectified_sigmoid(ada.v.detach())
    assert torch.all((h < 1e-3) | (h > 1 - 1e-3))             # the regulariser has decided every weight
    soft = ada().detach()
    ada.harden()
    torch.testing.assert_close(ada(), soft, atol=1e-3 * float(scale.max()), rtol=0)
    ints = ada.integers()
    assert torch.all((ints == ada.floor) | (ints == ada.floor + 1)) and ints.abs().max() <= 3
    rtn = torch.clamp(torch.round(w / scale[:, None]), -3, 3) * scale[:, None]
    err = lambda wq: float(((x @ wq.T - y) ** 2).sum())          # noqa: E731
    assert err(ada().detach()) < 0.8 * err(rtn)


@pytest.mark.parametrize('shape,ch_axis,per_channel,zero', [
    ((16, 8, 3, 3), 0, True, 0.0),      # conv weight, per output channel
    ((8, 16, 3, 3), 1, True, 0.0),      # transposed conv weight: channels on axis 1
    ((12, 40), 0, False, 3.0),          # linear, one grid for the tensor, affine zero point
])
@pytest.mark.parametrize('beta', [None, 20.0, 2.5])
def test_fused_kernel_matches_the_composed_ops(shape, ch_axis, per_channel, zero, beta):
    """The C++ soft weight and regulariser give the composed ops' values and gradients, including
    weights clipped at the grid's ends and rounding variables saturated at h = 0 or 1."""
    from mmquant.ptq import adaround
    if adaround._soft_ext is None:
        pytest.skip('the fused kernel is not built')
    torch.manual_seed(0)
    w = torch.randn(shape) * 2
    n_ch = shape[ch_axis] if per_channel else 1
    scale = torch.rand(n_ch) * 0.3 + 0.2
    zp = torch.full((n_ch, ), zero)
    noise, g = torch.randn(shape) * 3, torch.randn(shape)
    pair = []
    for fused in (True, False):
        ada = AdaRoundWeight(w, scale, zp, -4, 3, ch_axis)
        with torch.no_grad():                                   # some saturated, some mid-way
            ada.v.add_(noise)
        ada.fused, ada.beta = fused, beta
        out = ada()
        loss = (out * g).sum() + (0.37 * ada.reg if beta is not None else 0)
        loss.backward()
        pair.append((out.detach(), None if ada.reg is None else ada.reg.detach(), ada.v.grad.clone()))
    (w1, r1, g1), (w2, r2, g2) = pair
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    if beta is None:
        assert r1 is None and r2 is None
    else:
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-3)
