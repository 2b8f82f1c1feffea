"""F8Net's clipping level folded into the producing layer: the folded weight grid against its closed
form, the producer -> reader map of ResNet-18 found on the autograd graph, the tied clipping
levels, the option's plumbing and its one-line error. (The integer export of a folded model,
shifts only, is in tests/test_export_int.py.)"""
import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close

from mmquant.calibrate import calibrate
from mmquant.qat import prepare_qat
from mmquant.qat.clip_fold import first_readers
from mmquant.quantizers import FixedPointQuantizer, fixed_point_quantize


def resnet18(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


def test_folded_weight_quantizer_rounds_in_the_readers_unit_and_passes_gradients_to_its_clip():
    reader = FixedPointQuantizer(bits=8, kind='act', signed=False, clip='pact', alpha_init=3.0)
    q = FixedPointQuantizer(bits=8, kind='weight', num_channels=2, per_channel=True)
    q.fold_unit(reader)
    w = torch.tensor([[0.02, -0.013, 0.0071], [0.4, 0.25, -0.3]])
    u = 3.0 / 255
    out = q(w)
    # the FL of each row of w / u (std formula, C = 40 signed: floor(log2(40 / std))), the grid u 2^-FL
    fl = torch.floor(torch.log2(40 / (w / u).double().std(1, correction=0))).long()
    assert q.frac_len.tolist() == fl.tolist()
    assert_close(out, fixed_point_quantize(w / u, fl, -128, 127) * u)
    assert_close(q.scale, u * 2.0 ** -fl.float())
    assert q.scale.tolist() == (torch.tensor(u, dtype=torch.float32) * 2.0 ** -fl.float()).tolist()
    # unit = alpha / qmax is the float eta / 2^FL the reader divides by
    reader.calibrated.fill_(True)
    reader.frac_len.fill_(5)
    assert float(reader.input_scaling().detach()) / 2 ** 5 == float(q.unit().detach())
    # the clip level learns through the folded weights too (Q(w / u) u, rounding straight through)
    w2 = w.clone().requires_grad_(True)
    q(w2).sum().backward()
    assert reader.alpha.grad is not None and reader.alpha.grad.abs() > 0
    with pytest.raises(ValueError, match='fold_unit folds the clipping level of a reader with PACT'):
        q.fold_unit(FixedPointQuantizer(bits=8, kind='act'))


def test_first_readers_of_resnet18_follow_the_dataflow_through_pools_adds_and_shortcuts():
    model = resnet18()
    x = torch.randn(2, 1, 32, 32)
    prepare_qat(model, 'f8net', 'w8a8', example_forward=lambda: model(x))
    readers = first_readers(model, lambda: model(x))
    # the stem feeds layer1's convs directly and, through two identity shortcuts, layer2's
    assert readers['conv1'] == ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0']
    assert readers['layer1.0.conv1'] == ['layer1.0.conv2']
    assert readers['layer2.0.downsample.0'] == ['layer2.1.conv1', 'layer3.0.conv1', 'layer3.0.downsample.0']
    assert readers['layer4.0.conv2'] == ['layer4.1.conv1', 'fc'] and readers['layer4.1.conv2'] == ['fc']
    assert readers['fc'] == []


def test_fold_ties_the_readers_of_each_producer_and_folds_every_layer_of_resnet18():
    model = resnet18()
    x = torch.randn(2, 1, 32, 32)
    report = prepare_qat(model, 'f8net', 'w8a8', example_forward=lambda: model(x), fold_clip=True)
    assert len(report.folded_clip) == 20 and report.unfolded_clip == []
    assert ('layer4.1.conv2', 'fc') in report.folded_clip
    # one clipping level per residual stream (14, as without the fold) less the classifier's own,
    # now the one of the last stream it reads with layer4.1.conv1
    alphas = [n for n, _ in model.named_parameters() if n.endswith('alpha')]
    assert len(alphas) == 13 and 'fc.input_quantizer.alpha' not in alphas
    calibrate(model, [x])
    model.layer4[1].conv1.input_quantizer.alpha.data.fill_(2.5)
    assert float(model.fc.input_quantizer.clip_level().detach()) == 2.5
    assert float(model.layer4[1].conv2.weight_quantizer.unit().detach()) == float(torch.tensor(2.5) / 255)
    # every weight grid carries its reader's unit
    for producer, reader in report.folded_clip:
        wq = model.get_submodule(producer).weight_quantizer
        rq = model.get_submodule(reader).input_quantizer
        assert_close(wq.scale, rq.clip_level().detach() / 255 * 2.0 ** -wq.frac_len.float())


def test_fold_clip_is_for_f8net_only():
    with pytest.raises(ValueError, match="fold_clip folds the PACT clipping levels of F8Net; method 'lsq' has none"):
        prepare_qat(resnet18(), 'lsq', 'w4a4', fold_clip=True)


def test_quantized_model_records_the_fold_and_a_rebuild_from_its_meta_loads_its_state():
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmquant.engine.cli import apply_qat, quant_from_qat_meta
    init_default_scope('mmpretrain')
    arch = dict(type='ImageClassifier', backbone=dict(type='ResNet', depth=18, in_channels=1),
                neck=dict(type='GlobalAveragePooling'), head=dict(type='LinearClsHead', num_classes=10, in_channels=512))
    cfg = Config(dict(model=arch, quant=dict(method='f8net', bits='w8a8', fold_clip=True)))
    apply_qat(cfg)
    assert cfg.model['fold_clip'] is True
    torch.manual_seed(0)
    model = MODELS.build(cfg.model.to_dict())
    assert model.mmquant_qat['fold_clip'] is True and len(model.mmquant_report.folded_clip) == 20
    quant = quant_from_qat_meta(model.mmquant_qat)
    assert quant['fold_clip'] is True
    rebuilt = MODELS.build(dict(type='QuantizedModel', architecture=arch, **quant))
    rebuilt.load_state_dict(model.state_dict())                 # strict: the same tied clipping levels


def test_tying_two_shared_levels_moves_the_followers_of_the_second_to_the_first():
    from mmquant.qat.clip_fold import _tie
    a, b, c, d = (FixedPointQuantizer(bits=8, kind='act', clip='pact', alpha_init=v) for v in (1.0, 2.0, 3.0, 4.0))
    b.share_clip(a)
    d.share_clip(c)
    _tie([b, d], [a, b, c, d])
    assert all(q.clip_owner() is a for q in (a, b, c, d))
    assert [n for q in (a, b, c, d) for n, _ in q.named_parameters()] == ['alpha']    # a's alone
    assert float(d.clip_level().detach()) == 1.0
