"""A PyTorch integer simulator of the graphs :mod:`.int_graph` writes.

It executes the integer ONNX graph node by node with torch tensors: ``int64`` for every integer
op (shifts, multipliers, clamps, adds, max, sums) and exact ``float64`` convolutions and matrix
products for ``ConvInteger`` / ``MatMulInteger`` (their operands are below 2^8 and their sums
below 2^31, so every product and partial sum is an integer that float64 holds exactly). The
input ``QuantizeLinear`` and the output ``DequantizeLinear`` compute in float32 as ONNX defines
them. So it is an independent implementation of the same arithmetic: onnxruntime's output must
equal it bit for bit.

>>> # sim = IntegerSimulator(onnx.load('model_int.onnx')); logits = sim(images)
"""
from typing import Dict, List

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

_DTYPES = {TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8,
           TensorProto.INT8: torch.int8, TensorProto.UINT64: torch.int64, TensorProto.FLOAT: torch.float32}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class IntegerSimulator:
    """Runs an integer-only ONNX model (one input, float outputs) on torch tensors."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.consts: Dict[str, torch.Tensor] = {}
        for t in model.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype == np.uint64:             # shift amounts
                a = a.astype(np.int64)
            self.consts[t.name] = torch.from_numpy(a.copy())
        self.input = model.graph.input[0].name
        self.outputs = [o.name for o in model.graph.output]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        env = dict(self.consts)
        env[self.input] = x.float()
        for node in self.model.graph.node:
            ins = [env[i] if i else None for i in node.input]
            env[node.output[0]] = getattr(self, f'_{node.op_type}')(node, ins)
        outs = [env[o] for o in self.outputs]
        return outs[0] if len(outs) == 1 else outs

    # the ops an integer graph uses ------------------------------------------------------------
    def _QuantizeLinear(self, node, ins):
        x, s, z = ins
        return torch.clamp(torch.round(x / s) + z.long(), 0, 255).to(torch.uint8)

    def _DequantizeLinear(self, node, ins):
        x, s = ins[0], ins[1]
        z = ins[2].long() if len(ins) > 2 and ins[2] is not None else 0
        if s.numel() > 1:
            shape = [1] * x.dim()
            shape[_attrs(node).get('axis', 1)] = -1
            s = s.reshape(shape)
            z = z.reshape(shape) if torch.is_tensor(z) else z
        return (x.long() - z).float() * s

    def _Cast(self, node, ins):
        to = _attrs(node)['to']
        x = ins[0]
        if to == TensorProto.UINT64:           # values are non-negative here by construction
            if bool((x < 0).any()):
                raise ValueError(f'{node.name}: negative value cast to uint64')
            return x.long()
        return x.to(_DTYPES[to]) if x.dtype != _DTYPES[to] else x

    def _BitShift(self, node, ins):
        if _attrs(node)['direction'] not in (b'RIGHT', 'RIGHT'):
            return ins[0] << ins[1]
        return ins[0] >> ins[1]

    def _Add(self, node, ins):
        return ins[0] + ins[1].to(ins[0].dtype)

    def _Sub(self, node, ins):
        return ins[0] - ins[1].to(ins[0].dtype)

    def _Mul(self, node, ins):
        return ins[0] * ins[1].to(ins[0].dtype)

    def _Clip(self, node, ins):
        x, lo, hi = ins
        return torch.clamp(x, int(lo), int(hi))

    def _Max(self, node, ins):
        out = ins[0]
        for t in ins[1:]:
            out = torch.maximum(out, t)
        return out

    def _Relu(self, node, ins):
        return ins[0].clamp_min(0)

    def _Identity(self, node, ins):
        return ins[0]

    @staticmethod
    def _weight(ins):
        w = ins[1].double()
        return w - float(ins[3]) if len(ins) > 3 and ins[3] is not None else w

    def _ConvInteger(self, node, ins):
        x, w, xz = ins[0], self._weight(ins), ins[2]
        a = _attrs(node)
        p = a.get('pads', [0, 0, 0, 0])
        xd = x.double() - float(xz)
        if any(p):       # ONNX pads ConvInteger with the zero point, i.e. a real 0
            xd = F.pad(xd, (p[1], p[3], p[0], p[2]))
        y = F.conv2d(xd, w, None, a.get('strides', [1, 1]), 0, a.get('dilations', [1, 1]), a.get('group', 1))
        return y.to(torch.int32)

    def _MatMulInteger(self, node, ins):
        x, w, xz = ins[0], self._weight(ins), ins[2]
        return ((x.double() - float(xz)) @ w).to(torch.int32)

    def _Pad(self, node, ins):
        x, pads, value = ins[0], ins[1].tolist(), ins[2]
        r = x.dim()
        torch_pads = []
        for d in reversed(range(r)):
            torch_pads += [pads[d], pads[d + r]]
        return F.pad(x, torch_pads, value=int(value))

    def _Slice(self, node, ins):
        x, starts, ends = ins[:3]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else torch.arange(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else torch.ones(len(starts), dtype=torch.int64)
        idx = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
            idx[ax % x.dim()] = slice(s, e, st)
        return x[tuple(idx)]

    def _ReduceSum(self, node, ins):
        keep = bool(_attrs(node).get('keepdims', 1))
        return ins[0].long().sum(dim=[int(a) for a in ins[1]], keepdim=keep).to(ins[0].dtype)

    def _Shape(self, node, ins):
        return torch.tensor(list(ins[0].shape), dtype=torch.int64)

    def _Gather(self, node, ins):
        return torch.index_select(ins[0], _attrs(node).get('axis', 0), ins[1].reshape(-1)).reshape(ins[1].shape)

    def _Unsqueeze(self, node, ins):
        x = ins[0]
        for a in sorted(int(v) for v in ins[1]):
            x = x.unsqueeze(a)
        return x

    def _Concat(self, node, ins):
        return torch.cat(ins, _attrs(node)['axis'])

    def _Reshape(self, node, ins):
        shape = [int(d) for d in ins[1]]
        shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return ins[0].reshape(shape)

    def _Flatten(self, node, ins):
        return ins[0].flatten(_attrs(node).get('axis', 1))

    def _Resize(self, node, ins):
        a = _attrs(node)
        if a.get('mode', b'nearest') not in (b'nearest', 'nearest'):
            raise ValueError(f'{node.name}: only nearest Resize is simulated')
        x = ins[0]
        scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        size = [int(v) for v in ins[3]][2:] if scales is None else [int(x.shape[i] * float(scales[i])) for i in (2, 3)]
        return F.interpolate(x.double(), size=size, mode='nearest').to(x.dtype)
