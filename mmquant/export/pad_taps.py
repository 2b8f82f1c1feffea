"""Drop the kernel taps of a convolution that read only padding, for every output position.

On small inputs (28x28 Fashion-MNIST, a detector's coarsest FPN levels) the last stage's maps are
1x1 or 2x2: a 3x3 convolution with padding 1 on a 1x1 map meets data with its centre tap only and
zeros with the other eight. Those taps add nothing (padding is the real value 0: the zero point in
QLinearConv / ConvInteger), yet the runtime multiplies them. This pass cuts each kernel to the
rows and columns that meet data and moves the padding with it, so every output reads the same
input values as before: the graph computes the same numbers (exactly, in integer graphs) with
fewer multiplications. It needs the input's spatial size fixed in the graph (the batch may vary).

The weight is cut where it is stored: a float initializer (``Conv``), an initializer behind
``QuantizeLinear`` / ``DequantizeLinear`` (QDQ graphs; a per-channel scale sits on the
output-channel axis and stays), or the integer weight of ``ConvInteger`` / ``QLinearConv``. The cut
node gets a copy of that chain, so a weight that other nodes read too (a detector head shared over
its FPN levels) stays whole for them.
"""
from typing import List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ['useful_taps', 'prune_padding_taps']

# op -> index of the weight input
_WEIGHT = dict(Conv=1, ConvInteger=1, QLinearConv=3)
_QDQ = ('QuantizeLinear', 'DequantizeLinear')


def useful_taps(size: int, k: int, stride: int, pad_begin: int, pad_end: int,
                dilation: int = 1) -> Optional[Tuple[int, int, int, int]]:
    """Along one spatial axis: ``(first, last, pad_begin', pad_end')``, the taps that meet data
    (first..last) and the padding of the cut kernel that keeps every output's window, or ``None``
    when nothing can be cut (every tap meets data, no tap does, or the cut needs negative padding)."""
    out = (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1
    if out < 1:
        return None
    hit = [r for r in range(k) if any(0 <= y * stride - pad_begin + r * dilation < size for y in range(out))]
    if not hit or (hit[0] == 0 and hit[-1] == k - 1):
        return None
    first, last = hit[0], hit[-1]
    begin = pad_begin - first * dilation
    if begin < 0:
        return None
    k2 = last - first + 1
    end = max(0, (out - 1) * stride + dilation * (k2 - 1) + 1 - size - begin)
    if (size + begin + end - dilation * (k2 - 1) - 1) // stride + 1 != out:
        return None
    return first, last, begin, end


def _spatial_shape(value_info: dict, name: str) -> Optional[List[int]]:
    vi = value_info.get(name)
    if vi is None or not vi.type.HasField('tensor_type'):
        return None
    dims = vi.type.tensor_type.shape.dim
    if len(dims) < 3 or any(not d.HasField('dim_value') for d in dims[2:]):
        return None
    return [d.dim_value for d in dims[2:]]


def prune_padding_taps(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """``(model, n)``: the model with the padding-only taps of its convolutions cut (in place) and
    the number of convolutions cut."""
    inferred = onnx.shape_inference.infer_shapes(model)
    value_info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    cut = 0
    for node in list(graph.node):
        if node.op_type not in _WEIGHT or len(node.input) <= _WEIGHT[node.op_type]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET'):
            continue
        size = _spatial_shape(value_info, node.input[0])
        w_name = node.input[_WEIGHT[node.op_type]]
        chain, store = [], w_name              # the Quantize/DequantizeLinear nodes between the store and node
        while store not in inits and store in producer and producer[store].op_type in _QDQ:
            chain.append(producer[store])
            store = producer[store].input[0]
        if store not in inits:
            continue
        w = numpy_helper.to_array(inits[store])
        nd = w.ndim - 2
        if size is None or len(size) != nd:
            continue
        k = list(attrs.get('kernel_shape', w.shape[2:]))
        strides = list(attrs.get('strides', [1] * nd))
        dil = list(attrs.get('dilations', [1] * nd))
        pads = list(attrs.get('pads', [0] * 2 * nd))
        axes = [useful_taps(size[i], k[i], strides[i], pads[i], pads[nd + i], dil[i]) for i in range(nd)]
        if all(a is None for a in axes):
            continue
        index = [slice(None), slice(None)]
        for i, a in enumerate(axes):
            if a is None:
                index.append(slice(None))
            else:
                first, last, pads[i], pads[nd + i] = a
                index.append(slice(first, last + 1))
                k[i] = last - first + 1
        small = numpy_helper.from_array(np.ascontiguousarray(w[tuple(index)]), f'{store}_taps_{cut}')
        graph.initializer.append(small)
        # copies of the chain for the cut weight (the old chain may feed other nodes)
        feed, at = small.name, list(graph.node).index(node)
        for p in reversed(chain):
            copy = helper.make_node(p.op_type, [feed] + list(p.input[1:]), [f'{p.output[0]}_taps_{cut}'],
                                    name=f'{p.name or p.output[0]}_taps_{cut}',
                                    **{a.name: helper.get_attribute_value(a) for a in p.attribute})
            graph.node.insert(at, copy)
            at += 1
            feed = copy.output[0]
        node.input[_WEIGHT[node.op_type]] = feed
        for name, value in (('kernel_shape', k), ('pads', pads)):
            for a in list(node.attribute):
                if a.name == name:
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute(name, value))
        cut += 1
    # drop the chains and weights no node reads any more
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in _QDQ and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return model, cut
