"""SAT (Jin, Yang & Liao 2019) against closed forms: CG-PACT's calibrated clip-level gradient, the
scale-adjusted DoReFa weights (variance exactly 1 / n_out, a uniform grid), the method's
configuration, one training step, the ResNet-18 scheme config and the one-line errors.

Every expected value is written out by hand (the comments give the arithmetic) or computed from
the paper's formula independently of the code under test."""
import math
import os.path as osp

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mmquant.export.qdq import QDQExportError, affine_grid, qdq_mode
from mmquant.qat import QAT_METHODS, prepare_qat, qat_qconfig
from mmquant.qconfig import LayerQConfig
from mmquant.quantizers import (CGPACTQuantizer, PACTQuantizer, SATWeightQuantizer, build_quantizer,
                                cg_pact_quantize, lsq_fake_quantize, pact_quantize)

from conftest import ROOT


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# CG-PACT


def cg_pact_reference(x, alpha, bits, signed):
    """``(y, dy/dx, dy/dalpha)`` element by element from the paper's formulas."""
    levels = 2 ** bits - 1
    lo = -alpha if signed else 0.0
    d = (alpha - lo) / levels
    ys, gx, ga = [], [], []
    for v in x.flatten().tolist():
        if v >= alpha:
            ys.append(alpha), gx.append(0.0), ga.append(1.0)
        elif v <= lo:
            ys.append(lo), gx.append(0.0), ga.append(-1.0 if signed else 0.0)
        else:
            y = lo + round((v - lo) / d) * d
            ys.append(y), gx.append(1.0), ga.append((y - v) / alpha)
    shape = x.shape
    return (torch.tensor(ys).reshape(shape), torch.tensor(gx).reshape(shape), torch.tensor(ga).reshape(shape))


def test_cg_pact_unsigned_by_hand():
    # alpha = 3, 2 bits: d = 1, levels 0, 1, 2, 3
    q = CGPACTQuantizer(bits=2, alpha_init=3.0, signed=False)
    x = t(-1.0, 0.0, 0.4, 1.4, 2.6, 3.0, 5.0).requires_grad_(True)
    y = q(x)
    assert_close(y.detach(), t(0, 0, 0, 1, 3, 3, 3))
    y.backward(t(1, 2, 3, 4, 5, 6, 7))
    assert_close(x.grad, t(0, 0, 3, 4, 5, 0, 0))          # 1 on (0, alpha), 0 where clipped
    # inside (y - x) / alpha: 3 (0 - 0.4) / 3 + 4 (1 - 1.4) / 3 + 5 (3 - 2.6) / 3 = -0.8 / 3;
    # above (x >= alpha): 6 + 7; below (x <= 0): 0
    assert q.alpha.grad.item() == pytest.approx(13 - 0.8 / 3, abs=1e-5)
    pact = PACTQuantizer(bits=2, alpha_init=3.0, signed=False)
    pact(x.detach()).backward(t(1, 2, 3, 4, 5, 6, 7))
    assert pact.alpha.grad.item() == pytest.approx(13.0)   # PACT: the count above only


def test_cg_pact_signed_by_hand():
    # alpha = 1.5, 2 bits signed: lo = -1.5, d = 1, levels -1.5, -0.5, 0.5, 1.5
    a = torch.tensor(1.5, requires_grad=True)
    x = t(-2.0, -1.5, -0.9, 0.2, 1.1, 1.5, 4.0).requires_grad_(True)
    y = cg_pact_quantize(x, a, bits=2, signed=True)
    assert_close(y.detach(), t(-1.5, -1.5, -0.5, 0.5, 1.5, 1.5, 1.5))
    y.sum().backward()
    assert_close(x.grad, t(0, 0, 1, 1, 1, 0, 0))
    # -1 twice (x <= -alpha), +1 twice (x >= alpha), inside (0.4 + 0.3 + 0.4) / 1.5
    assert a.grad.item() == pytest.approx(1.1 / 1.5, abs=1e-6)


@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('bits', [1, 2, 3, 4])
def test_cg_pact_forward_is_pact_and_gradients_follow_the_formula(bits, signed):
    g = torch.Generator().manual_seed(bits + 10 * signed)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2
    up = torch.rand(x.shape, generator=g)
    alpha = 1.7
    assert torch.equal(cg_pact_quantize(x, torch.tensor(alpha), bits, signed),
                       pact_quantize(x, torch.tensor(alpha), bits, signed))
    xs, a = x.clone().requires_grad_(True), torch.tensor(alpha, requires_grad=True)
    cg_pact_quantize(xs, a, bits, signed).backward(up)
    y_ref, gx_ref, ga_ref = cg_pact_reference(x, alpha, bits, signed)
    assert_close(xs.grad, up * gx_ref)
    assert a.grad.item() == pytest.approx(float((up * ga_ref).sum()), rel=1e-5, abs=1e-5)
    # through the quantizer module too (alpha used as |alpha|), the forward identical to PACT's
    q, p = (cls(bits=bits, alpha_init=alpha, signed=signed) for cls in (CGPACTQuantizer, PACTQuantizer))
    assert torch.equal(q(x), p(x))
    q(x).backward(up)
    assert q.alpha.grad.item() == pytest.approx(float((up * ga_ref).sum()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize('bits', [2, 4])
def test_cg_pact_alpha_gradient_is_lsq_step_gradient_in_alpha(bits):
    # unsigned: y = s round(clip(x / s, 0, L)) with s = alpha / L, so dy/dalpha = (dy/ds) / L
    levels = 2 ** bits - 1
    x = torch.relu(torch.randn(200, generator=torch.Generator().manual_seed(bits))) * 3
    a = torch.tensor(2.5, requires_grad=True)
    s = torch.tensor(2.5 / levels, requires_grad=True)
    y_cg = cg_pact_quantize(x, a, bits)
    y_lsq = lsq_fake_quantize(x, s, 0, levels, g=1.0)
    assert_close(y_cg, y_lsq)
    y_cg.sum().backward(), y_lsq.sum().backward()
    assert a.grad.item() == pytest.approx(s.grad.item() / levels, rel=1e-5)


def test_cg_pact_exports_like_pact():
    q = CGPACTQuantizer(bits=4, alpha_init=3.0, signed=False)
    q(torch.rand(8))
    grid = affine_grid(q)
    assert grid.scale == pytest.approx([0.2]) and (grid.qmin, grid.qmax) == (0, 15)


# ----------------------------------------------------------------------------------------------
# scale-adjusted weights


def dorefa_reference(w, bits):
    """DoReFa's ``2 quantize_k(tanh(w) / 2max|tanh w| + 1/2) - 1``."""
    n = 2 ** bits - 1
    th = torch.tanh(w.double())
    return (2 * torch.round(n * (th / (2 * th.abs().max()) + 0.5)) / n - 1).float()


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('shape,ch_axis,n_out', [((16, 8, 3, 3), 0, 16 * 9),     # conv: out x kh x kw
                                                 ((10, 64), 0, 10),              # linear: out_features
                                                 ((6, 5, 1, 1), 0, 6),           # 1x1 conv
                                                 ((4, 6, 3, 3), 1, 6 * 9)])      # transposed conv
def test_sat_weight_variance_is_one_over_n_out_on_a_uniform_grid(bits, shape, ch_axis, n_out):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.1
    q = SATWeightQuantizer(bits=bits, ch_axis=ch_axis)
    assert q.fan_out(w) == n_out
    out = q(w)
    var = ((out - out.mean()) ** 2).mean()                  # population variance, all elements
    assert var.item() == pytest.approx(1 / n_out, rel=1e-5)
    ref = dorefa_reference(w, bits)
    ref_var = ((ref.double() - ref.double().mean()) ** 2).mean()
    assert_close(out, (ref / torch.sqrt(n_out * ref_var)).float(), rtol=1e-5, atol=1e-6)
    # divided by the rescale factor: DoReFa's 2^bits levels 2k / (2^bits - 1) - 1 (the extreme one
    # is +-1, so the factor is max|out|)
    grid = out / out.abs().max()
    codes = (grid + 1) / 2 * (2 ** bits - 1)
    assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= 2 ** bits - 1
    assert len(codes.round().unique()) <= 2 ** bits
    if bits <= 3 and w.numel() > 100:
        assert len(codes.round().unique()) == 2 ** bits


def test_sat_rescale_factor_gradient_detached_or_through_the_variance():
    g = torch.Generator().manual_seed(0)
    base = dorefa_reference(torch.randn(8, 4, 3, 3, generator=g), 2)
    up = torch.randn(base.shape, generator=g)
    n = 8 * 9
    detached = SATWeightQuantizer(bits=2)
    q = base.clone().requires_grad_(True)
    factor = detached.rescale_factor(q, n)
    (q * factor).backward(up)
    var = ((base - base.mean()) ** 2).mean()
    assert factor.item() == pytest.approx(1 / math.sqrt(n * var.item()), rel=1e-5)
    assert_close(q.grad, up * factor.detach())              # a constant to autograd
    through = SATWeightQuantizer(bits=2, detach_scale=False)
    q = base.clone().requires_grad_(True)
    (q * through.rescale_factor(q, n)).backward(up)
    # Q / sqrt(n Var Q) is invariant to Q -> c Q: its gradient is orthogonal to Q; by hand,
    # d/dQ = f (up - (Q - mean Q) <up, Q> / (N Var Q)), f the factor
    assert abs(float((q.grad * base).sum())) < 1e-4 * float(q.grad.norm() * base.norm())
    f = 1 / torch.sqrt(n * var)
    expected = f * (up - (base - base.mean()) * (up * base).sum() / (base.numel() * var))
    assert_close(q.grad, expected, rtol=1e-4, atol=1e-5)


def test_sat_weight_gradient_is_dorefa_straight_through_times_the_factor():
    from mmquant.quantizers import DoReFaWeightQuantizer
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.2
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    ws, wd = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = SATWeightQuantizer(bits=3)(ws)
    out.backward(up)
    DoReFaWeightQuantizer(bits=3, rescale=False)(wd).backward(up)
    factor = float(out.detach().abs().max())                 # 1 / sqrt(n_out Var Q)
    assert_close(ws.grad, wd.grad * factor, rtol=1e-5, atol=1e-7)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


def test_prepare_qat_sat_tiny_model_trains_a_step():
    model = _tiny()
    report = prepare_qat(model, 'sat', 'w2a2')
    rec = {r.name: r for r in report.quantized}
    assert (rec['0'].w_bits, rec['3'].w_bits, rec['3'].a_bits, rec['6'].w_bits) == (8, 2, 2, 8)
    for i in ('0', '3', '6'):
        assert isinstance(model[int(i)].weight_quantizer, SATWeightQuantizer)
        assert isinstance(model[int(i)].input_quantizer, CGPACTQuantizer)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.arange(8) % 3
    model.train()
    model(x)                                                 # first batch initialises the quantizers
    assert bool(model[0].input_quantizer.signed) and not bool(model[3].input_quantizer.signed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), target)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    alphas = [n for n in before if n.endswith('input_quantizer.alpha')]
    assert len(alphas) == 3
    for n, p in model.named_parameters():
        if n.endswith('weight') or n in alphas:
            assert not torch.equal(before[n], p.detach()), n
    with torch.no_grad():
        w = model[6].quantized_weight()
        assert ((w - w.mean()) ** 2).mean().item() == pytest.approx(1 / 3, rel=1e-5)   # fc: n_out = 3
    with pytest.raises(QDQExportError, match='SATWeightQuantizer'):
        with qdq_mode(model):
            pass


def test_sat_method_and_registry():
    m = QAT_METHODS['sat']
    assert m.paper == 'SAT (Jin, Yang & Liao 2019)' and m.layer == dict(w_quantizer='sat', a_quantizer='sat')
    qc = qat_qconfig('sat', 'w4a4')
    assert (qc.default.w_quantizer, qc.default.a_quantizer, qc.default.w_bits) == ('sat', 'sat', 4)
    assert isinstance(build_quantizer('sat', 'weight', 3), SATWeightQuantizer)
    assert isinstance(build_quantizer('sat', 'act', 3), CGPACTQuantizer)


@pytest.mark.parametrize('make, message', [
    (lambda: qat_qconfig('sat', 'w1a1'), 'w_bits=1 is out of range for the sat quantizer: accepted 2..16'),
    (lambda: qat_qconfig('sat', 'w17a4'), "weight bits in 'w17a4'=17 is out of range"),
    (lambda: LayerQConfig(w_quantizer='sat', w_bits=1), 'w_bits=1 is out of range for the sat quantizer'),
    (lambda: SATWeightQuantizer(bits=17), 'SATWeightQuantizer takes 2..16 bits, got 17'),
    (lambda: SATWeightQuantizer(bits=4, kind='act'), 'SATWeightQuantizer quantizes weights'),
    (lambda: CGPACTQuantizer(bits=4, kind='weight'), 'CG-PACT quantizes activations'),
])
def test_sat_errors_are_one_line(make, message):
    with pytest.raises(ValueError) as e:
        make()
    text = str(e.value)
    assert '\n' not in text and message in text, text


# ----------------------------------------------------------------------------------------------
# the ResNet-18 scheme config


def test_resnet18_sat_config_builds_and_computes_a_loss():
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import mmquant  # noqa: F401  (registers QuantizedModel)
    from mmquant.engine.cli import apply_qat
    cfg = apply_qat(Config.fromfile(osp.join(ROOT, 'configs', 'resnet18_fashionmnist_sat_w2a2.py')))
    assert cfg.quant.method == 'sat' and cfg.quant.bits == 'w2a2'
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['quantizer.alpha'] == dict(decay_mult=1.0)
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    roles = {r.name: (r.w_bits, r.a_bits, r.role) for r in model.mmquant_report.quantized}
    assert roles['backbone.conv1'] == (8, 8, 'first') and roles['head.fc'] == (8, 8, 'last')
    assert roles['backbone.layer3.0.conv2'][:2] == (2, 2) and len(roles) == 21
    layer = model.get_submodule('backbone.layer3.0.conv2')
    assert isinstance(layer.weight_quantizer, SATWeightQuantizer)
    assert isinstance(layer.input_quantizer, CGPACTQuantizer) and layer.input_quantizer.bits == 2
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    batch = dict(inputs=[torch.randint(0, 255, (1, 28, 28), generator=g, dtype=torch.uint8) for _ in range(2)],
                 data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    model.train()
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    loss = sum(v for v in losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert layer.input_quantizer.alpha.grad is not None and torch.isfinite(layer.input_quantizer.alpha.grad)
