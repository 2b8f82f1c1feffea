"""QDQ ONNX export: every quantizer's grid, the graph's op census, and onnxruntime against the
PyTorch fake-quant model."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mmquant import quantize
from mmquant.export import QDQExportError, affine_grid, export_qdq
from mmquant.quantizers import (DoReFaActQuantizer, DoReFaWeightQuantizer, LQNetQuantizer, LSQQuantizer,
                                PACTQuantizer, QScheme, SignActQuantizer, UniformQuantizer, XNORWeightQuantizer)
from mmquant.observers import MinMaxObserver
from mmquant.qat import prepare_qat


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def census(path):
    ops = {}
    for node in onnx.load(path).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def run_ort(path, x):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {'input': x.numpy()})[0]


@pytest.mark.parametrize('bits, per_channel', [('w8a8', True), ('w8a8', False), ('w4a4', True), ('w3a8', True)])
def test_ptq_model_in_onnxruntime_equals_fake_quant(tmp_path, bits, per_channel):
    model = net()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    quantize(model, batches, 'minmax', bits, qconfig=dict(default=dict(w_per_channel=per_channel),
                                                          first_layer_bits=None, last_layer_bits=None))
    path = export_qdq(model, batches[0], str(tmp_path / 'm.onnx'))
    ops = census(path)
    assert ops['QuantizeLinear'] == ops['DequantizeLinear'] == 6          # 3 layers x (weight, input)
    assert ('Clip' in ops) == (bits != 'w8a8')                            # narrower grids are clipped
    x = torch.randn(7, 3, 12, 12)                                          # batch size is dynamic
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob('*.tmp'))


def test_lsq_qat_model_exports_and_matches(tmp_path):
    model = net()
    prepare_qat(model, 'lsq', 'w4a4')
    x = torch.randn(4, 3, 12, 12)
    model.train()
    model(x)                       # initialises the steps
    model.eval()
    path = export_qdq(model, x, str(tmp_path / 'lsq.onnx'))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_ort(path, x), ref, atol=1e-5, rtol=1e-5)


def test_grids_of_each_quantizer():
    u = UniformQuantizer(QScheme(bits=4, signed=None, symmetric=False), observer=MinMaxObserver())
    u.fit(torch.tensor([-1.0, 3.0]))
    g = affine_grid(u)
    assert (g.qmin, g.qmax, g.axis) == (-8, 7, None) and g.scale == pytest.approx([4.0 / 15])
    lsq = LSQQuantizer(bits=3, kind='weight', num_channels=2, per_channel=True)
    lsq.fit(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))
    g = affine_grid(lsq)
    assert (g.qmin, g.qmax, g.axis, g.zero_point) == (-4, 3, 0, [0, 0])
    pact = PACTQuantizer(bits=2, signed=False, alpha_init=3.0)
    pact.fit(torch.tensor([0.0, 1.0]))
    assert affine_grid(pact) == ([1.0], [0], 0, 3, None)
    dorefa = DoReFaActQuantizer(bits=2, signed=False)
    dorefa.fit(torch.tensor([0.0, 1.0]))
    assert affine_grid(dorefa).scale == pytest.approx([1 / 3])


@pytest.mark.parametrize('make', [
    lambda: XNORWeightQuantizer(num_channels=2),
    lambda: SignActQuantizer(),
    lambda: LQNetQuantizer(bits=2),
    lambda: DoReFaWeightQuantizer(bits=2),
    lambda: PACTQuantizer(bits=2, signed=True, alpha_init=1.0),
])
def test_grids_without_an_integer_zero_point_are_refused(make):
    q = make()
    q.fit(torch.tensor([[-1.0, 0.5], [0.25, 1.0]]))
    with pytest.raises(QDQExportError, match='no integer zero point'):
        affine_grid(q)


def test_refusals_name_the_layer_and_leave_the_model_unchanged(tmp_path):
    model = net()
    prepare_qat(model, 'dorefa', 'w2a2')
    model.train()
    model(torch.rand(2, 3, 12, 12))
    model.eval()
    with pytest.raises(QDQExportError, match=r'quantizers have no QDQ form, e\.g\. 0\.weight_quantizer: DoReFaWeightQuantizer'):
        export_qdq(model, torch.rand(1, 3, 12, 12), str(tmp_path / 'x.onnx'))
    assert 'forward' not in model[3].weight_quantizer.__dict__ and not list(tmp_path.iterdir())


def test_more_than_8_bits_is_refused(tmp_path):
    model = net()
    quantize(model, [torch.randn(2, 3, 12, 12)], 'minmax', 'w16a16', qconfig=dict(first_layer_bits=None,
                                                                                 last_layer_bits=None))
    with pytest.raises(QDQExportError, match='at most 8 bits'):
        export_qdq(model, torch.randn(1, 3, 12, 12), str(tmp_path / 'x.onnx'))


@pytest.mark.parametrize('bits', ['w8a8', 'w4a4'])
def test_uint8_weights_store_the_same_weights(tmp_path, bits):
    """weight_dtype='uint8': weight Q/DQ pairs in uint8 with zero point 128 (plus the grid's own),
    activations untouched, and the graph computes what the int8 one does."""
    import onnx
    from onnx import numpy_helper
    model = net()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    quantize(model, batches, 'minmax', bits, qconfig=dict(default=dict(w_per_channel=True),
                                                          first_layer_bits=None, last_layer_bits=None))
    p8 = export_qdq(model, batches[0], str(tmp_path / 's8.onnx'))
    pu = export_qdq(model, batches[0], str(tmp_path / 'u8.onnx'), weight_dtype='uint8')
    g = onnx.load(pu).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == 'Constant'}
    inits = {i.name for i in g.initializer}
    weight_zps = [consts[n.input[2]] for n in g.node if n.op_type == 'QuantizeLinear' and n.input[0] in inits]
    assert len(weight_zps) == 3 and all(z.dtype == np.uint8 and (z == 128).all() for z in weight_zps)
    x = torch.randn(5, 3, 12, 12)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the graph's own arithmetic
    outs = [ort.InferenceSession(p, so, providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})[0]
            for p in (p8, pu)]
    np.testing.assert_array_equal(outs[0], outs[1])
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(pu, x), model(x).numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="weight_dtype='int16'; accepted: int8, uint8"):
        export_qdq(model, batches[0], str(tmp_path / 'bad.onnx'), weight_dtype='int16')
