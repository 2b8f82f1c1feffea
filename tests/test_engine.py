"""The OpenMMLab glue on its own: registries, the QuantizedModel builder, calibration batching."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.registry import HOOKS, LOOPS, MODELS, init_default_scope

import mmquant  # noqa: F401
from mmquant.convert import quant_layers
from mmquant.engine.ptq_loop import _take_images

from conftest import ROOT

ARCH = dict(type='ImageClassifier',
            backbone=dict(type='ResNet', depth=18, in_channels=1),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=512))


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet'])
def test_entry_points_are_found_from_any_scope(scope):
    init_default_scope(scope)
    assert MODELS.get('QuantizedModel') is not None
    assert LOOPS.get('PTQLoop') is not None and HOOKS.get('QuantCalibrationHook') is not None


def test_quantized_model_builder_returns_the_architecture_itself():
    init_default_scope('mmpretrain')
    model = MODELS.build(dict(type='QuantizedModel', architecture=ARCH, bits='w4a4',
                              data_preprocessor=dict(type='ClsDataPreprocessor', mean=[0.0], std=[1.0]),
                              qconfig=dict(overrides={'backbone.layer4.*': dict(w_bits=6)})))
    assert type(model).__name__ == 'ImageClassifier'
    bits = {r.name: r.w_bits for r in model.mmquant_report.quantized}
    assert bits['backbone.conv1'] == 8 and bits['head.fc'] == 8
    assert bits['backbone.layer1.0.conv1'] == 4 and bits['backbone.layer4.0.conv1'] == 6
    assert len(quant_layers(model)) == len(bits) == 21
    assert model.data_preprocessor.mean.flatten().tolist() == [0.0]
    with pytest.raises(TypeError, match="unexpected arguments \\['bitz'\\]"):
        MODELS.build(dict(type='QuantizedModel', architecture=ARCH, bitz='w4'))


def test_take_images_cuts_the_last_batch_to_the_exact_count():
    batches = [dict(inputs=[torch.zeros(1)] * 4, data_samples=list(range(4))) for _ in range(5)]
    out, n = _take_images(batches, 10)
    assert n == 10 and [len(b['inputs']) for b in out] == [4, 4, 2] and out[-1]['data_samples'] == [0, 1]
    out, n = _take_images(batches, 100)
    assert n == 20 and len(out) == 5


@pytest.mark.parametrize('scheme', sorted(glob.glob(osp.join(ROOT, 'configs', '_base_', 'quant', '*.py'))),
                         ids=osp.basename)
def test_every_quant_scheme_builds_its_method(scheme):
    from mmengine.config import Config
    from mmquant.engine.cli import _QAT_KEYS
    from mmquant.ptq import build_ptq
    from mmquant.qat import QAT_METHODS, qat_qconfig
    quant = Config.fromfile(scheme).quant
    if quant['method'] in QAT_METHODS:
        assert set(quant) <= _QAT_KEYS
        assert qat_qconfig(quant['method'], quant['bits'], quant.get('qconfig')).bits_tag() == quant['bits']
        return
    assert set(quant) <= {'method', 'bits', 'qconfig', 'calib_images', 'options'}
    method = build_ptq(quant['method'], quant.get('qconfig'), quant['bits'], **quant.get('options', {}))
    assert method.qconfig.bits_tag() == quant['bits']
