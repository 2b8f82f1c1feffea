"""OrderedResNet's Fixup (no normalisation) and TResNet-stem (SpaceToDepth) variants, checked
against plain-torch references written from the module doc's definitions, the Fixup
initialisation rule, a few training steps, the converter and the two configs."""
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmquant.api import quantize
from mmquant.models import OrderedBasicBlock, OrderedResNet, ScalarBias, SpaceToDepth
from mmquant.nn.binary_blocks import is_basic_block, rewrite_binary_blocks

from conftest import ROOT, randomise_bn

BLOCKS = ('layer1.1', 'layer2.0')          # an identity and a projection shortcut


def fixup_net(downsample='conv', **kw):
    torch.manual_seed(0)
    model = OrderedResNet(depth=18, in_channels=1, fixup=True, downsample=downsample, **kw)
    model.init_weights()
    return model.eval()


def randomise_fixup(model, seed=0):
    """Non-zero scalar biases, scales away from 1 and non-zero conv2 weights (a fresh Fixup
    block's branch adds nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, OrderedBasicBlock):
                for p in (m.bias1a, m.bias1b, m.bias2a, m.bias2b):
                    p.copy_(torch.randn(1, generator=g) * 0.3)
                m.scale.copy_(torch.rand(1, generator=g) + 0.5)
                m.conv2.weight.copy_(torch.randn(m.conv2.weight.shape, generator=g) * 0.05)
            elif isinstance(m, ScalarBias):
                m.bias.copy_(torch.randn(1, generator=g) * 0.3)


# ---- plain-torch references, written from the definitions in the module doc ----
def conv(m, x):
    return F.conv2d(x, m.weight, None, m.stride, m.padding, m.dilation)


def reference_fixup_block(blk, x, style):
    xb = x + blk.bias1a
    h = F.relu(conv(blk.conv1, xb) + blk.bias1b)
    out = conv(blk.conv2, h + blk.bias2a) * blk.scale + blk.bias2b
    if blk.downsample is None:
        sc = x
    else:
        src = F.avg_pool2d(xb, 2, 2, ceil_mode=True, count_include_pad=False) if style == 'avgpool_conv' else xb
        sc = conv(blk.downsample[-1], src)
    return F.relu(out + sc)


def reference_space_to_depth(x, b):
    """out[n, c*b*b + i*b + j, h, w] = x[n, c, b*h + i, b*w + j], one element at a time."""
    n, c, hh, ww = x.shape
    out = torch.empty(n, c * b * b, hh // b, ww // b, dtype=x.dtype)
    for ch in range(c):
        for i in range(b):
            for j in range(b):
                for h in range(hh // b):
                    for w in range(ww // b):
                        out[:, ch * b * b + i * b + j, h, w] = x[:, ch, b * h + i, b * w + j]
    return out


def convs_of(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---- Fixup ----
@pytest.mark.parametrize('style', ['conv', 'avgpool_conv'])
def test_fixup_block_forward_matches_the_definition(style):
    model = fixup_net(style)
    randomise_fixup(model)
    g = torch.Generator().manual_seed(1)
    for name, c_in, hw in (('layer1.1', 64, 7), ('layer2.0', 64, 7)):
        blk = model.get_submodule(name)
        assert blk.fixup and blk.order == 'fixup' and blk.norm1 is None and blk.norm2 is None
        x = torch.randn(2, c_in, hw, hw, generator=g)
        with torch.no_grad():
            got = blk(x.clone())
            want = reference_fixup_block(blk, x, style)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kinds = [type(m).__name__ for m in model.layer2[0].downsample]       # no BN after the shortcut conv
    assert kinds == (['AvgPool2d'] if style == 'avgpool_conv' else []) + ['Conv2d']
    # the stem: act(conv(x) + bias), then the max-pool
    x = torch.randn(2, 1, 28, 28, generator=g)
    with torch.no_grad():
        stem = F.max_pool2d(F.relu(conv(model.conv1, x) + model.stem_bias.bias), 3, 2, 1)
        want = model.layer4(model.layer3(model.layer2(model.layer1(stem))))
        torch.testing.assert_close(model(x)[-1], want)


def test_fixup_init_zero_branch_ends_scaled_conv1_and_identity_blocks():
    model = fixup_net()
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, OrderedBasicBlock)]
    L = len(blocks)
    assert L == 8
    for blk in blocks:
        assert (blk.conv2.weight == 0).all()            # survived mmpretrain's Kaiming init_cfg
        w = blk.conv1.weight
        want = math.sqrt(2.0 / w[0].numel()) * L ** -0.5
        assert abs(w.std().item() / want - 1) < 0.05, (w.shape, w.std().item(), want)
        assert abs(w.mean().item()) < 0.05 * want
        assert all(p.item() == 0 for p in (blk.bias1a, blk.bias1b, blk.bias2a, blk.bias2b))
        assert blk.scale.item() == 1
        if blk.downsample is not None:
            d = blk.downsample[-1].weight
            assert abs(d.std().item() / math.sqrt(2.0 / d[0].numel()) - 1) < 0.1
    assert abs(model.conv1.weight.std().item() / math.sqrt(2.0 / 49) - 1) < 0.15    # stem: He, 64 * 49 samples
    assert model.stem_bias.bias.item() == 0
    # the branch adds nothing at init, whatever the biases before conv2's zero weights:
    # block(x) == act(x) for an identity shortcut, act(downsample(x + bias1a)) for a projection
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for blk in blocks:
            for p in (blk.bias1a, blk.bias1b, blk.bias2a):
                p.fill_(0.25)
        for name in BLOCKS:
            blk = model.get_submodule(name)
            x = torch.randn(2, blk.in_channels, 7, 7, generator=g)
            want = F.relu(x if blk.downsample is None else blk.downsample(x + blk.bias1a))
            torch.testing.assert_close(blk(x.clone()), want, rtol=0, atol=0)


def test_fixup_freeze_norm_eval_and_pretrained_init():
    model = OrderedResNet(depth=18, in_channels=1, fixup=True, frozen_stages=1, norm_eval=True)
    assert model.train() is model and model.training
    frozen = [model.conv1, model.stem_bias, model.layer1]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    # a second init_weights keeps the weights (mmengine applies init_cfg once); Pretrained skips Fixup's init
    model.init_weights()
    with torch.no_grad():
        model.layer1[0].conv2.weight.fill_(0.5)
    model.init_weights()
    assert (model.layer1[0].conv2.weight == 0.5).all()
    assert not is_basic_block(model.layer1[0])          # the conv-BN-ReLU rewrites refuse Fixup blocks
    with pytest.raises(ValueError, match="layer order 'fixup'"):
        rewrite_binary_blocks(model, 'bireal')


class Classifier(nn.Module):
    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(backbone.feat_dim, num_classes)
        nn.init.zeros_(self.fc.weight)                  # the paper zeroes the classifier too
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def test_fixup_network_trains():
    torch.manual_seed(0)
    backbone = OrderedResNet(depth=18, in_channels=1, fixup=True, stem_channels=16, base_channels=16)
    backbone.init_weights()
    model = Classifier(backbone, 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 4, (16, ), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(4), abs=1e-6)       # zero classifier: uniform at init
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert backbone.layer1[0].conv2.weight.abs().sum() > 0         # the zero branch ends moved


# ---- TResNet stem ----
@pytest.mark.parametrize('b', [1, 2, 3, 4])
def test_space_to_depth_matches_the_loop_reference_and_pixel_shuffle_inverts_it(b):
    x = torch.randn(2, 3, 12, 24, generator=torch.Generator().manual_seed(b))
    out = SpaceToDepth(b)(x)
    assert out.shape == (2, 3 * b * b, 12 // b, 24 // b)
    assert torch.equal(out, reference_space_to_depth(x, b))
    assert torch.equal(F.pixel_shuffle(out, b), x)
    assert torch.equal(out, F.pixel_unshuffle(x, b))


def test_space_to_depth_rejects_sizes_not_divisible():
    with pytest.raises(ValueError, match='SpaceToDepth\\(3\\): input height and width must be multiples of 3, '
                                         'got 28x28'):
        SpaceToDepth(3)(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match='accepted: a positive integer'):
        SpaceToDepth(0)


@pytest.mark.parametrize('b', [2, 4])
def test_tresnet_stem_definition_and_shapes(b):
    torch.manual_seed(0)
    model = OrderedResNet(depth=18, in_channels=1, stem='tresnet', space_to_depth=b, out_indices=(0, 1, 2, 3))
    randomise_bn(model)
    model.eval()
    c1 = model.conv1
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.stride, c1.padding) == \
        (b * b, 64, (3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity) and model.space_to_depth.block_size == b
    x = torch.randn(2, 1, 28, 28)
    bn = model.norm1
    with torch.no_grad():
        stem = F.relu(F.batch_norm(conv(c1, reference_space_to_depth(x, b)), bn.running_mean, bn.running_var,
                                   bn.weight, bn.bias, False, 0.0, bn.eps))
        assert stem.shape == (2, 64, 28 // b, 28 // b)
        outs = model(x)
        torch.testing.assert_close(outs[0], model.layer1(stem))
    side = 28 // b
    want = []
    for c in (64, 128, 256, 512):
        want.append((2, c, side, side))
        side = -(-side // 2)
    assert [tuple(o.shape) for o in outs] == want


def test_tresnet_stem_full_network_all_orders_and_fixup():
    x = torch.randn(2, 1, 28, 28)
    for kw in (dict(order='cbsa'), dict(order='bacs'), dict(order='cabs'), dict(fixup=True)):
        torch.manual_seed(0)
        model = OrderedResNet(depth=18, in_channels=1, stem='tresnet', space_to_depth=4, **kw)
        model.init_weights()
        with torch.no_grad():
            out = model.eval()(x)
        assert len(out) == 1 and out[0].shape == (2, 512, 1, 1), kw
    # fixup: the stem conv is followed by the scalar bias, not a BN
    assert isinstance(model.stem_bias, ScalarBias) and model.norm1 is model.stem_bias
    randomise_fixup(model)
    with torch.no_grad():
        stem = F.relu(conv(model.conv1, F.pixel_unshuffle(x, 4)) + model.stem_bias.bias)
        torch.testing.assert_close(model(x)[0], model.layer4(model.layer3(model.layer2(model.layer1(stem)))))
    frozen = OrderedResNet(depth=18, in_channels=1, stem='tresnet', frozen_stages=0, norm_eval=True).train()
    assert not frozen.norm1.training and not any(p.requires_grad for p in frozen.conv1.parameters())


# ---- the converter ----
@pytest.mark.parametrize('kw', [dict(fixup=True), dict(stem='tresnet', space_to_depth=4),
                                dict(fixup=True, stem='tresnet', space_to_depth=2, downsample='avgpool_conv')])
def test_variants_convert_every_conv_and_run_fake_quant(kw):
    torch.manual_seed(0)
    model = OrderedResNet(depth=18, in_channels=1, **kw)
    model.init_weights()
    if kw.get('fixup'):
        randomise_fixup(model)
    else:
        randomise_bn(model)
    model.eval()
    batches = [torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        ref = model(batches[0])[0]
    convs = convs_of(model)
    report = quantize(model, batches, 'minmax', 'w8a8')
    assert {r.name for r in report.quantized} == convs and len(convs) == 1 + 16 + 3
    assert all(type(model.get_submodule(n)) is not nn.Conv2d for n in convs)      # quantized twins
    if kw.get('fixup'):                                 # the scalars stay float parameters of the blocks
        blk = model.layer2[0]
        assert isinstance(blk.bias1a, nn.Parameter) and blk.bias1a.dtype == torch.float32
    with torch.no_grad():
        out = model(batches[0])[0]
    assert torch.isfinite(out).all()
    assert (out - ref).norm() < 0.1 * ref.norm()        # 8 bits: close to the float network


# ---- options ----
@pytest.mark.parametrize('kwargs, msg', [
    (dict(fixup=True, order='bacs'), "fixup=True with order='bacs'; accepted: fixup=True with order 'cbsa' only "
                                     "(fixup=False takes 'cbsa', 'bacs', 'cabs')"),
    (dict(fixup='yes'), "fixup='yes'; accepted: True or False"),
    (dict(stem='vgg'), "unknown stem 'vgg'; accepted: 'resnet', 'tresnet'"),
    (dict(stem='tresnet', space_to_depth=0),
     'space_to_depth=0; accepted: a positive integer block size (2 or 4 for 28x28 inputs)'),
    (dict(space_to_depth=2), "space_to_depth=2 with stem='resnet'; accepted: space_to_depth only with "
                             "stem='tresnet' (None otherwise)"),
    (dict(fixup=True, deep_stem=True), "deep_stem=True with fixup=True, stem='resnet'; accepted: deep_stem=True "
                                       "only with fixup=False and stem='resnet' (its stem convs have BNs)"),
])
def test_bad_options_give_one_line_errors_naming_the_accepted_values(kwargs, msg):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    with pytest.raises(ValueError) as e:
        OrderedResNet(**dict(dict(depth=18), **kwargs))
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e:
        MODELS.build(dict(dict(type='OrderedResNet', depth=18), **kwargs))
    assert str(e.value).endswith(msg) and '\n' not in str(e.value)
    if 'fixup' in kwargs and 'deep_stem' not in kwargs:
        with pytest.raises(ValueError) as e:
            OrderedBasicBlock(64, 64, **{k: v for k, v in kwargs.items() if k in ('fixup', 'order')})
        assert str(e.value) == msg


# ---- configs ----
def build_config(name):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')                   # earlier tests may have left mmdet's scope
    cfg = Config.fromfile(osp.join(ROOT, 'configs', name))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model.eval()


def test_fixup_config_builds_zero_classifier_and_identity_blocks():
    cfg, model = build_config('resnet18_fashionmnist_fixup.py')
    bb = model.backbone
    assert isinstance(bb, OrderedResNet) and bb.fixup and bb.conv1.in_channels == 1
    assert all((m.conv2.weight == 0).all() for m in bb.modules() if isinstance(m, OrderedBasicBlock))
    assert (model.head.fc.weight == 0).all() and (model.head.fc.bias == 0).all()
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert {k for k in keys} >= {'bias1a', 'bias1b', 'bias2a', 'bias2b', 'stem_bias', '.scale'}
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28), mode='tensor')
    assert out.shape == (2, 10) and (out == 0).all()


def test_tresnet_stem_config_builds():
    _, model = build_config('resnet18_fashionmnist_tresnet_stem.py')
    bb = model.backbone
    assert isinstance(bb, OrderedResNet) and bb.stem_type == 'tresnet' and bb.space_to_depth.block_size == 2
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert model(x, mode='tensor').shape == (2, 10)
        assert bb.relu(bb.norm1(bb.conv1(bb.space_to_depth(x)))).shape == (2, 64, 14, 14)
