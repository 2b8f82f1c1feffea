"""Quantized residual streams (``quant_residual``): the block rewrite keeps the float function,
calibrates with the layers, and makes every convolution and add of an exported ResNet integer."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from mmquant import quantize
from mmquant.calibrate import all_calibrated, disabled
from mmquant.convert import all_quantizers
from mmquant.export import IntegerSimulator, export_int, export_qdq
from mmquant.nn import QuantResidualBlock, quantize_residuals, stream_quantizers


def resnet(block=BasicBlock):
    torch.manual_seed(0)
    model = ResNet(block, [1, 1, 1, 1], num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize('block', [BasicBlock, Bottleneck])
def test_rewrite_keeps_the_float_function_and_names(block):
    model = resnet(block)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    keys = set(model.state_dict())
    names = quantize_residuals(model)
    assert names == ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    assert all(isinstance(model.get_submodule(n), QuantResidualBlock) for n in names)
    assert keys <= set(model.state_dict())               # a float checkpoint still loads
    # 4 inputs + 4 branch outputs + 3 downsample outputs (layer1.0 of the basic net has none)
    assert len(stream_quantizers(model)) == (11 if block is BasicBlock else 12)
    with disabled([q for _, q in stream_quantizers(model)]), torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_model_without_residual_blocks_is_refused():
    with pytest.raises(ValueError, match='no ResNet basic / bottleneck blocks'):
        quantize_residuals(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def optimized_ops(path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = path + '.opt.onnx'
    ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    ops = {}
    for n in onnx.load(path + '.opt.onnx').graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_quantized_streams_calibrate_and_export(tmp_path):
    model = resnet()
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    quantize(model, batches, 'minmax', 'w8a8', fold_bn=True, quant_residual=True)
    assert all_calibrated(model) and len(all_quantizers(model)) == 13 * 2 + 11     # 12 convs + fc, streams
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    # QDQ: onnxruntime fuses every convolution and every residual add that feeds another block
    # into integer kernels (the last block's sum goes through the global pool to the classifier)
    qdq = export_qdq(model, batches[0], str(tmp_path / 'qdq.onnx'))
    ops = optimized_ops(qdq)
    assert ops.get("QLinearConv") == 12 and ops.get('QLinearAdd') == 3 and 'Conv' not in ops and 'FusedConv' not in ops
    out = ort.InferenceSession(qdq, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    # integer-only: bit for bit with the simulator, on the fake-quant model's codes
    path = export_int(model, batches[0], str(tmp_path / 'int.onnx'))
    out = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
    np.testing.assert_array_equal(out, IntegerSimulator(onnx.load(path))(x).numpy())
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
