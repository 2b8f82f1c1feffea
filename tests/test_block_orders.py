"""OrderedResNet: the basic-block layer orders of low-bit papers (cbsa, bacs, cabs) and the two
shortcut styles, checked against plain-torch references, mmpretrain's ResNet-18 and the converter."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmquant
from mmquant.fold_bn import find_conv_bn_pairs
from mmquant.models import BLOCK_ORDERS, OrderedBasicBlock, OrderedResNet
from mmquant.nn import quantize_residuals
from mmquant.nn.binary_blocks import is_basic_block, rewrite_binary_blocks

from conftest import ROOT, randomise_bn

ORDERS = list(BLOCK_ORDERS)
STYLES = ['conv', 'avgpool_conv']


def net(order, downsample='conv', **kw):
    torch.manual_seed(0)
    model = OrderedResNet(depth=18, in_channels=1, order=order, downsample=downsample, **kw)
    randomise_bn(model)             # a fresh BN is the identity in eval mode
    return model.eval()


# ---- plain-torch references, written from the definitions in the module doc ----
def bn(m, x):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def conv(m, x):
    return F.conv2d(x, m.weight, None, m.stride, m.padding, m.dilation)


def reference_block(blk, x, style):
    relu = F.relu
    if blk.order == 'bacs':
        pre = relu(bn(blk.bn1, x))
        out = conv(blk.conv2, relu(bn(blk.bn2, conv(blk.conv1, pre))))
        src = pre
    elif blk.order == 'cabs':
        out = bn(blk.bn2, relu(conv(blk.conv2, bn(blk.bn1, relu(conv(blk.conv1, x))))))
        src = x
    else:
        out = bn(blk.bn2, conv(blk.conv2, relu(bn(blk.bn1, conv(blk.conv1, x)))))
        src = x
    if blk.downsample is None:
        sc = x
    else:
        ds = list(blk.downsample)
        if style == 'avgpool_conv':
            src = F.avg_pool2d(src, 2, 2, ceil_mode=True, count_include_pad=False)
            ds = ds[1:]
        sc = conv(ds[0], src)
        if blk.order != 'bacs':
            sc = bn(ds[1], sc)
    s = out + sc
    return relu(s) if blk.order == 'cbsa' else s


@pytest.mark.parametrize('style', STYLES)
@pytest.mark.parametrize('order', ORDERS)
def test_block_forward_matches_the_stated_order(order, style):
    model = net(order, style)
    g = torch.Generator().manual_seed(1)
    for name, c_in, hw, stride in (('layer1.1', 64, 7, 1), ('layer2.0', 64, 7, 2)):
        blk = model.get_submodule(name)
        assert isinstance(blk, OrderedBasicBlock) and blk.order == order and blk.stride == stride
        x = torch.randn(2, c_in, hw, hw, generator=g)
        with torch.no_grad():
            got = blk(x.clone())
            want = reference_block(blk, x, style)
        side = -(-hw // stride)        # 7 -> 4 at stride 2: the pooled shortcut needs ceil_mode
        assert got.shape == want.shape == (2, blk.out_channels, side, side)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ds = model.layer2[0].downsample
    kinds = [type(m).__name__ for m in ds]
    assert kinds == (['AvgPool2d'] if style == 'avgpool_conv' else []) + ['Conv2d'] + \
        ([] if order == 'bacs' else ['BatchNorm2d'])
    assert ds[-1 if order == 'bacs' else -2].stride == ((1, 1) if style == 'avgpool_conv' else (2, 2))
    assert model.layer1[1].downsample is None
    # pre-activation normalises the block input: bn1 has the input width
    assert model.layer2[0].bn1.num_features == (64 if order == 'bacs' else 128)


def test_cbsa_is_mmpretrain_resnet18_with_its_checkpoint():
    from mmpretrain.models.backbones import ResNet
    for style, avg_down in (('conv', False), ('avgpool_conv', True)):
        torch.manual_seed(0)
        ref = ResNet(depth=18, in_channels=1, avg_down=avg_down, out_indices=(0, 1, 2, 3))
        randomise_bn(ref)
        ours = net('cbsa', style, out_indices=(0, 1, 2, 3))
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            ref.eval()              # mmpretrain's ResNet.train() returns None
            for a, b in zip(ours(x), ref(x)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize('order', ORDERS)
def test_backbone_shapes_match_mmpretrain_resnet18(order):
    from mmpretrain.models.backbones import ResNet
    ref = ResNet(depth=18, in_channels=1, out_indices=(0, 1, 2, 3))
    ref.eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        want = [o.shape for o in ref(x)]
        for style in STYLES:
            got = [o.shape for o in net(order, style, out_indices=(0, 1, 2, 3))(x)]
            assert got == want == [(1, 64, 7, 7), (1, 128, 4, 4), (1, 256, 2, 2), (1, 512, 1, 1)]


def test_preact_network_ends_with_bn_and_act_before_pooling():
    model = net('bacs', out_indices=(2, 3))
    assert isinstance(model.final_norm, nn.BatchNorm2d) and model.final_norm.num_features == 512
    assert isinstance(model.final_act, nn.ReLU)
    assert net('cbsa').final_norm is None and not hasattr(net('cabs'), 'final_act')
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out3, out4 = model(x)
        y = model.maxpool(model.relu(model.norm1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3):
            y = layer(y)
        torch.testing.assert_close(out3, y)                     # earlier stages: the raw sum
        torch.testing.assert_close(out4, F.relu(bn(model.final_norm, model.layer4(y))))
    frozen = OrderedResNet(depth=18, order='bacs', frozen_stages=4)
    assert not any(p.requires_grad for p in frozen.final_norm.parameters())


def test_zero_init_residual_zeroes_the_branch_end_bn_except_preact():
    for order in ORDERS:
        model = OrderedResNet(depth=18, order=order)
        model.init_weights()
        w = model.layer1[0].bn2.weight
        assert (w == 0).all() if order != 'bacs' else (w == 1).all(), order


@pytest.mark.parametrize('order', ORDERS)
def test_quantize_converts_every_conv_and_skip_keeps_downsample_float(order):
    batches = [torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = net(order, 'avgpool_conv')
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = mmquant.quantize(model, batches, 'minmax', 'w4a4')
    assert {r.name for r in report.quantized} == convs and len(convs) == 1 + 16 + 3
    model = net(order, 'conv')
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = mmquant.quantize(model, batches, 'minmax', 'w4a4', qconfig=dict(skip=list(OrderedResNet.DOWNSAMPLE_SKIP)))
    ds = {f'layer{i}.0.downsample.0' for i in (2, 3, 4)}
    assert {r.name for r in report.kept_float} == ds
    assert {r.name for r in report.quantized} == convs - ds
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in ds)
    with torch.no_grad():
        assert torch.isfinite(model(batches[0])[0]).all()


def test_conv_act_bn_is_not_folded_and_reordered_blocks_refuse_cbsa_rewrites():
    x = torch.randn(2, 1, 28, 28)
    for order, pairs in (('cabs', set()), ('bacs', {(f'layer{i}.{j}.conv1', f'layer{i}.{j}.bn2')
                                                     for i in range(1, 5) for j in range(2)})):
        model = net(order)
        found = {p for p in find_conv_bn_pairs(model, lambda: model(x)) if 'downsample' not in p[0]}
        assert found - {('conv1', 'bn1')} == pairs, order
        assert not is_basic_block(model.layer1[0])
        with pytest.raises(ValueError, match='no ResNet basic'):
            quantize_residuals(model)
        with pytest.raises(ValueError, match=f"layer order '{order}'"):
            rewrite_binary_blocks(model, 'bireal')
    assert is_basic_block(net('cbsa').layer1[0])


@pytest.mark.parametrize('kwargs, msg', [
    (dict(order='cbas'), "unknown block order 'cbas'; accepted: 'cbsa', 'bacs', 'cabs'"),
    (dict(downsample='pool'), "unknown downsample 'pool'; accepted: 'conv', 'avgpool_conv'"),
    (dict(depth=50), 'OrderedResNet depth=50; accepted: 18, 34 (basic blocks only)'),
])
def test_bad_arguments_give_one_line_errors(kwargs, msg):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')                   # earlier tests may have left mmdet's scope
    with pytest.raises(ValueError) as e:
        OrderedResNet(**dict(dict(depth=18), **kwargs))
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:                 # mmengine prefixes the class and file
        MODELS.build(dict(dict(type='OrderedResNet', depth=18), **kwargs))
    assert str(e.value).endswith(msg) and '\n' not in str(e.value)


def test_bacs_config_builds_through_the_registry():
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'resnet18_fashionmnist_bacs.py'))
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model).eval()
    bb = model.backbone
    assert isinstance(bb, OrderedResNet) and bb.order == 'bacs' and bb.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28), mode='tensor').shape == (2, 10)


def test_brecq_reconstructs_each_ordered_block_as_one_unit():
    from mmquant.ptq.blocks import find_units
    model = net('bacs')
    mmquant.quantize(model, [torch.randn(2, 1, 28, 28)], 'minmax', 'w4a4')
    units = find_units(model)
    blocks = [u.name for u in units if u.is_block]
    assert blocks == [f'layer{s}.{b}' for s in (1, 2, 3, 4) for b in (0, 1)]
    assert [u.name for u in units if not u.is_block] == ['conv1']
