"""MobileNetV2 (depthwise convs, ReLU6, inverted residuals) and RegNetX (grouped convs) from their
Fashion-MNIST configs: converted whole, calibrated, and exported as integer-only ONNX whose
onnxruntime output equals the PyTorch integer simulator bit for bit and the fake-quant model
within a few output steps. Random initialisation: these check the plumbing, not accuracy."""
import os.path as osp

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import ROOT, randomise_bn

mmengine = pytest.importorskip('mmengine')
pytest.importorskip('mmpretrain')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402

import mmquant  # noqa: E402,F401
from mmquant.engine.ptq_loop import TensorMode  # noqa: E402
from mmquant.export import IntegerSimulator, export_int  # noqa: E402
from mmquant.ptq import build_ptq  # noqa: E402
from mmquant.ptq.blocks import find_units  # noqa: E402

CONFIGS = {'mobilenetv2': ('configs/mobilenetv2_fashionmnist.py', 3),
           'regnetx': ('configs/regnetx-400mf_fashionmnist.py', 1)}


def build(name):
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[name][0]))
    init_default_scope('mmpretrain')                   # earlier tests may have left mmdet's scope
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomise_bn(model)
    return model.eval()


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_quantized_and_exported_integer_only(tmp_path, name):
    model = build(name)
    channels = CONFIGS[name][1]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, channels, 28, 28, generator=g) for _ in range(2)]
    net = TensorMode(model)
    method = build_ptq('minmax', bits='w8a8', fold_bn=True)
    report = method(net, batches)
    convs = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert convs == [] and not report.kept_float
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped                                   # depthwise / grouped convs are quantized too
    path = export_int(net, batches[0], str(tmp_path / f'{name}.onnx'))
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert 'ConvInteger' in ops and not ops & {'Conv', 'BatchNormalization', 'Gemm'}
    x = torch.randn(4, channels, 28, 28, generator=g)
    out = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
    np.testing.assert_array_equal(out, IntegerSimulator(onnx.load(path))(x).numpy())
    with torch.no_grad():
        ref = net(x)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    assert out.shape == ref.shape == (4, 10)
    # last-layer output codes: a few 8-bit steps of the logits' range at most
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_brecq_units_of_mobilenetv2_are_its_inverted_residuals():
    model = build('mobilenetv2')
    build_ptq('minmax', bits='w4a4').convert(model, example_forward=lambda: model(torch.randn(2, 3, 28, 28)))
    units = find_units(model)
    blocks = [u.name for u in units if u.is_block]
    assert len(blocks) == 17 and all(type(model.get_submodule(b)).__name__ == 'InvertedResidual' for b in blocks)
    assert [u.name for u in units if not u.is_block] == ['backbone.conv1', 'backbone.conv2', 'head.fc']
