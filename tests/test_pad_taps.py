"""The cut of kernel taps that read only padding (mmquant.export.pad_taps): the taps and padding
against closed forms and against the full convolution, and the ONNX pass on float, QDQ (a weight
shared by two convolutions) and integer graphs, checked in onnxruntime."""
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from mmquant.export import prune_padding_taps, useful_taps


@pytest.mark.parametrize('args, expected', [
    ((1, 3, 1, 1, 1), (1, 1, 0, 0)),          # 3x3, pad 1 on a 1x1 map: the centre tap
    ((2, 3, 2, 1, 1), (1, 2, 0, 0)),          # stride 2 on a 2x2 map: one output, taps 1..2
    ((1, 7, 2, 3, 3), (3, 3, 0, 0)),          # a 7x7 stem on a 1-pixel axis
    ((1, 3, 1, 2, 2, 2), (1, 1, 0, 0)),       # dilation 2, pad 2
    ((4, 3, 1, 1, 1), None),                  # every tap meets data
    ((2, 3, 1, 1, 1), None),                  # a 2x2 map: the first output uses taps 1..2, the last 0..1
])
def test_useful_taps_closed_forms(args, expected):
    assert useful_taps(*args) == expected


def test_cut_convolution_equals_the_full_one_on_every_small_case():
    x_rng, checked = torch.Generator().manual_seed(0), 0
    for size, k, stride, pb, pe, dil in itertools.product((1, 2, 3), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 3),
                                                         (0, 1, 3), (1, 2)):
        if (size + pb + pe - dil * (k - 1) - 1) < 0:
            continue
        cut = useful_taps(size, k, stride, pb, pe, dil)
        if cut is None:
            continue
        first, last, b2, e2 = cut
        x = torch.randn(2, 3, size, generator=x_rng)
        w = torch.randn(4, 3, k, generator=x_rng)
        full = F.conv1d(F.pad(x, (pb, pe)), w, stride=stride, dilation=dil)
        small = F.conv1d(F.pad(x, (b2, e2)), w[:, :, first:last + 1], stride=stride, dilation=dil)
        assert small.shape == full.shape and torch.allclose(small, full, atol=1e-5), (size, k, stride, pb, pe, dil)
        assert last - first + 1 < k
        checked += 1
    assert checked > 50


def _graph():
    """input [N, 4, 4, 4] -> QDQ conv A (3x3, pad 1) -> MaxPool to 1x1 -> QDQ conv B with A's weight
    (3x3, pad 1, on the 1x1 map) -> float conv C (3x3, pad 1, 1x1 map); batch dynamic."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), 'w')
    wc = numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), 'wc')
    scale = numpy_helper.from_array(np.full(4, 0.02, np.float32), 'scale')
    zp = numpy_helper.from_array(np.zeros(4, np.int8), 'zp')
    nodes = [helper.make_node('QuantizeLinear', ['w', 'scale', 'zp'], ['wq'], axis=0),
             helper.make_node('DequantizeLinear', ['wq', 'scale', 'zp'], ['wdq'], axis=0),
             helper.make_node('Conv', ['input', 'wdq'], ['a'], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node('MaxPool', ['a'], ['p'], kernel_shape=[4, 4]),
             helper.make_node('Conv', ['p', 'wdq'], ['b'], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node('Conv', ['b', 'wc'], ['output'], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['N', 4, 4, 4])],
                              [helper.make_tensor_value_info('output', TensorProto.FLOAT, ['N', 2, 1, 1])],
                              [w, wc, scale, zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider']).run(
        None, {'input': x})[0]


def test_pass_cuts_the_convolutions_on_1x1_maps_and_keeps_the_shared_weight_whole():
    model = _graph()
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 4)).astype(np.float32)
    before = _run(model, x)
    cut, n = prune_padding_taps(onnx.load_from_string(model.SerializeToString()))
    onnx.checker.check_model(cut)
    assert n == 2
    convs = {nd.output[0]: nd for nd in cut.graph.node if nd.op_type == 'Conv'}
    attrs = {k: {a.name: list(a.ints) for a in nd.attribute} for k, nd in convs.items()}
    assert attrs['a'] == dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])         # the 4x4 map: every tap meets data
    assert attrs['b'] == attrs['output'] == dict(kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    assert convs['a'].input[1] == 'wdq' and convs['b'].input[1] != 'wdq'       # B reads its own cut chain
    shapes = {t.name: list(t.dims) for t in cut.graph.initializer}
    assert shapes['w'] == [4, 4, 3, 3] and 'wc' not in shapes                # wc has no reader left: dropped
    assert sorted(v for k, v in shapes.items() if k.endswith(('_taps_0', '_taps_1'))) == [[2, 4, 1, 1], [4, 4, 1, 1]]
    assert [nd.op_type for nd in cut.graph.node].count('QuantizeLinear') == 2
    np.testing.assert_allclose(_run(cut, x), before, rtol=0, atol=1e-5)


def test_pass_is_exact_on_integer_convolutions():
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.integers(-128, 128, (8, 4, 3, 3)).astype(np.int8), 'w')
    nodes = [helper.make_node('ConvInteger', ['input', 'w', 'xzp'], ['output'], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], strides=[2, 2])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('input', TensorProto.UINT8, ['N', 4, 2, 2])],
                              [helper.make_tensor_value_info('output', TensorProto.INT32, ['N', 8, 1, 1])],
                              [w, numpy_helper.from_array(np.uint8(7), 'xzp')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    x = rng.integers(0, 256, (5, 4, 2, 2)).astype(np.uint8)
    before = _run(model, x)
    cut, n = prune_padding_taps(model)
    assert n == 1 and list(cut.graph.initializer[-1].dims) == [8, 4, 2, 2]
    np.testing.assert_array_equal(_run(cut, x), before)      # padding is the zero point: it added nothing


def test_pass_leaves_graphs_without_fixed_spatial_sizes_alone():
    model = _graph()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = 'H'
    text = model.SerializeToString()
    cut, n = prune_padding_taps(model)
    assert n == 0 and cut.SerializeToString() == text
