"""Reconstruction units found in stock mmpretrain / mmdet models."""
import re

import pytest
from torch import nn

from mmquant import QConfig, convert
from mmquant.ptq.blocks import find_units

from test_mm_models import CLASSIFIERS, DETECTORS, build


def converted(tmp_path, base, scope):
    model = build(tmp_path, base, scope)
    convert(model, QConfig.build(bits='w4a4'))
    return model


def test_resnet18_units_are_stem_eight_basic_blocks_and_fc(tmp_path):
    units = find_units(converted(tmp_path, CLASSIFIERS['resnet18'], 'mmpretrain'))
    assert [u.name for u in units] == ['backbone.conv1'] + [f'backbone.layer{i}.{j}' for i in range(1, 5)
                                                             for j in range(2)] + ['head.fc']
    assert units[1].layers == ['backbone.layer1.0.conv1', 'backbone.layer1.0.conv2']
    assert units[3].layers == ['backbone.layer2.0.conv1', 'backbone.layer2.0.conv2', 'backbone.layer2.0.downsample.0']
    assert units[1].is_block and not units[0].is_block


def test_resnet50_units_are_sixteen_bottlenecks(tmp_path):
    units = find_units(converted(tmp_path, CLASSIFIERS['resnet50'], 'mmpretrain'))
    blocks = [u for u in units if u.is_block]
    assert len(blocks) == 16 and all(re.fullmatch(r'backbone\.layer[1-4]\.\d+', u.name) for u in blocks)
    assert len(blocks[0].layers) == 4 and len(blocks[1].layers) == 3          # downsample in the first
    assert [u.name for u in units if not u.is_block] == ['backbone.conv1', 'head.fc']


def test_vgg11bn_units_are_its_layers_with_their_norm_and_relu(tmp_path):
    model = converted(tmp_path, CLASSIFIERS['vgg11bn'], 'mmpretrain')
    units = find_units(model)
    assert not any(u.is_block for u in units)
    assert len(units) == 8 + 3                                               # 8 convs, 3 FCs
    # each conv is reconstructed inside its ConvModule: the output matched is the ReLU's
    assert units[0].name == 'backbone.features.0' and units[0].layers == ['backbone.features.0.conv']
    assert type(units[0].module).__name__ == 'ConvModule'


def test_retinanet_units_cover_backbone_blocks_fpn_and_head_convs(tmp_path):
    model = converted(tmp_path, DETECTORS['retinanet_r18'], 'mmdet')
    units = find_units(model)
    names = [u.name for u in units]
    assert sum(u.is_block for u in units) == 8
    assert 'neck.lateral_convs.0' in names and 'neck.fpn_convs.0' in names   # ConvModules
    assert 'bbox_head.cls_convs.0' in names and 'bbox_head.retina_cls' in names
    covered = [layer for u in units for layer in u.layers]
    quant = [n for n, m in model.named_modules() if hasattr(m, 'weight_quantizer')]
    assert sorted(covered) == sorted(quant)                                  # every layer exactly once


def test_configured_blocks_replace_the_automatic_choice_and_bad_names_fail(tmp_path):
    model = converted(tmp_path, CLASSIFIERS['resnet18'], 'mmpretrain')
    units = find_units(model, blocks=['backbone.layer1', 'head'])
    names = [u.name for u in units]
    assert names[:2] == ['backbone.conv1', 'backbone.layer1'] and names[-1] == 'head'
    assert len(units[1].layers) == 4 and 'backbone.layer2.0' in names
    with pytest.raises(ValueError, match="block 'backbone.nosuch' is not a module of the model"):
        find_units(model, blocks=['backbone.nosuch'])
    with pytest.raises(ValueError, match="blocks 'backbone.layer1' and 'backbone.layer1.0' overlap"):
        find_units(model, blocks=['backbone.layer1', 'backbone.layer1.0'])
    with pytest.raises(ValueError, match="block 'backbone.maxpool' holds no quantized layer"):
        find_units(model, blocks=['backbone.maxpool'])
