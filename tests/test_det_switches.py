"""Detection switches: multi-level BatchNorm in shared heads (LevelBN), BN / GN in FPN and heads,
and quantizing the backbone only (QConfig.only)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

import mmquant  # noqa: F401  (registers LevelBN)
from mmquant.convert import convert
from mmquant.det import LevelBN
from mmquant.engine.cli import apply_qat
from mmquant.fold_bn import find_conv_bn_pairs, fold_bn
from mmquant.qconfig import QConfig

from conftest import ROOT


def maps(sizes, c=4, n=2, shift=0.0):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, s, s, generator=g) + shift + i for i, s in enumerate(sizes)]


def test_level_bn_picks_one_bn_per_level_from_the_call_sequence():
    bn = LevelBN(4, num_levels=5).train()
    sizes = [16, 8, 4, 2, 1]
    for _ in range(2):                                   # two forward passes of a head
        for lvl, x in enumerate(maps(sizes)):
            assert bn.level_of(x) == lvl
            bn._last = (lvl - 1, bn._last[1]) if lvl else None   # undo the probe's bookkeeping
            bn(x)
    for lvl, x in enumerate(maps(sizes)):                # level i's BN saw level i's maps only
        assert int(bn.bns[lvl].num_batches_tracked) == 2
        ref = nn.BatchNorm2d(4).train()
        ref(x)
        ref(x)
        torch.testing.assert_close(bn.bns[lvl].running_mean, ref.running_mean)
        torch.testing.assert_close(bn.bns[lvl].running_var, ref.running_var)


def test_level_bn_equal_sizes_at_the_coarse_end_and_restart():
    bn = LevelBN(4, num_levels=5)
    levels = [bn.level_of(x) for x in maps([8, 4, 2, 1, 1]) + maps([8, 4])]
    assert levels == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(RuntimeError, match='num_levels=2'):
        two = LevelBN(4, num_levels=2)
        for x in maps([4, 2, 1]):
            two(x)
    with pytest.raises(ValueError, match='positive int'):
        LevelBN(4, num_levels=0)


def build(config):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model


def image(size=128):      # two images: BatchNorm in training needs > 1 value at the 1 x 1 level
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('config', ['retinanet_r18_fpn_bn_fashiondet.py', 'fcos_r18_fpn_bn_fashiondet.py'])
def test_bn_configs_give_each_level_its_statistics_and_fold_the_fpn(config):
    cfg, model = build(config)
    level_bns = [m for m in model.bbox_head.modules() if isinstance(m, LevelBN)]
    assert len(level_bns) == 8 and not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    model.train()
    model(image(), mode='tensor')
    for m in level_bns:                                   # one update per level, 5 levels
        assert [int(b.num_batches_tracked) for b in m.bns] == [1] * 5
    model.eval()
    for m in level_bns:                                   # distinct statistics per level
        stats = torch.stack([b.running_mean for b in m.bns])
        assert torch.unique(stats, dim=0).shape[0] == 5
    pairs = find_conv_bn_pairs(model, lambda: model(image(), mode='tensor'))
    names = {c for c, _ in pairs}
    assert not any(c.startswith('bbox_head.') for c in names)          # shared convs: no single fold
    assert {f'neck.fpn_convs.{i}.conv' for i in range(3)} <= names      # the FPN's BNs fold
    before = model(image(), mode='tensor')
    folded = fold_bn(model, lambda: model(image(), mode='tensor'))
    assert folded == pairs
    after = model(image(), mode='tensor')
    for a, b in zip(sum(map(list, before), []), sum(map(list, after), [])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gn_config_has_group_norm_in_fpn_and_head():
    _, model = build('retinanet_r18_fpn_gn_fashiondet.py')
    gn = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert any(n.startswith('neck.') for n in gn) and len([n for n in gn if n.startswith('bbox_head.')]) == 8
    model.eval()
    outs = model(image(), mode='tensor')
    assert len(outs[0]) == 5


def test_backbone_only_config_quantizes_the_backbone_alone():
    cfg = apply_qat(Config.fromfile(osp.join(ROOT, 'configs', 'retinanet_r18_lsq_w4a4_backbone.py')))
    assert cfg.quant.qconfig.only == ['backbone.*']
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    report = model.mmquant_report
    quantized = [r.name for r in report.quantized]
    assert len(quantized) == 20 and all(n.startswith('backbone.') for n in quantized)
    kept = {r.name: r.reason for r in report.kept_float}
    assert kept['neck.fpn_convs.0.conv'] == 'outside the only patterns'
    assert kept['bbox_head.retina_cls'] == 'outside the only patterns'
    roles = {r.name: (r.w_bits, r.a_bits) for r in report.quantized}
    assert roles['backbone.conv1'] == (8, 8) and roles['backbone.layer4.1.conv2'] == (4, 4)


def test_only_pattern_that_matches_nothing_is_an_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="only pattern 'backbone.\\*' matches no quantizable layer"):
        convert(net, QConfig(only=['backbone.*']))
    report = convert(net, QConfig(only=['1']))
    assert [r.name for r in report.quantized] == ['1']
