"""From a QDQ ONNX graph (:mod:`.qdq`) to an integer-only one.

The QDQ graph already holds the whole dataflow (convolutions, BatchNorm, ReLU, residual adds,
pooling, reshapes) and every quantizer's grid; this pass rewrites it so that, from the
``QuantizeLinear`` of the graph input to the ``DequantizeLinear`` of each output, every tensor is
an integer:

* a quantized activation is a ``uint8`` code tensor with its scale and zero point (signed grids
  move their zero point up by 128, which is the same grid);
* a convolution / ``Gemm`` becomes ``ConvInteger`` / ``MatMulInteger`` (``uint8`` codes, the
  weights' int8 codes stored with zero point 128, ``int32`` accumulation); its result is an
  ``int32`` tensor with one real scale per output channel ``s_x * s_w[c]`` and a per-channel bias;
* BatchNorm on such a tensor is absorbed into its per-channel scale and bias;
* the bias is added as an integer inside the next requantisation, in its 64-bit domain (units of
  ``2^-n`` output steps, ``n`` raised to about 30 bits where a power-of-two ratio would need a
  short shift), not at the accumulator scale: at 4 bits the accumulator step
  ``s_x * s_w`` is coarse, and an ``int32`` bias rounded to it moved 0.4% of the codes after the
  first residual block of ResNet-18 (and 0.2 points of top-1) against the fake-quant model;
* ReLU is remembered and applied at the next requantisation (as the clamp's lower bound); so is
  ReLU6 / any ``Clip(0, c)`` (MobileNetV2), whose ``c`` becomes the clamp's upper bound;
* a residual add, max-pool, global average pool or reshape works on an ``int32`` tensor with one
  power-of-two scale ``t`` chosen from a worst-case bound of the values (so ``int32`` never
  overflows while keeping about 30 bits of precision);
* requantisation from one scale to another is ``y = ((x * m + B_lo + 2^(n-1)) >> n) + B_hi + zp``
  in ``int64``, then a clamp (:func:`requant_params` picks the integer multiplier ``m`` and
  shift ``n``; ``B_hi * 2^n + B_lo`` is the bias); where the ratio of the scales is a power of
  two (fixed-point models such as F8Net) ``m`` is a power of two and the requantisation is
  shifts only.

Nothing here runs the model: the grids, weights and BatchNorm statistics are the graph's
constants. :mod:`.int_sim` executes the resulting graph in PyTorch for bit-exact checks.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .qdq import QDQExportError

ACC_BITS = 30          # the wide int32 tensors use |x| < 2^30
MULT_BITS = 30         # requantisation multipliers are < 2^30, so |x * m| < 2^61 in int64
MAX_SHIFT = 60         # x * m + 2^62 + (bias and rounding < 2^61) stays below 2^63


class IntExportError(QDQExportError):
    """A graph the integer-only export cannot express; the message names the node and why."""


@dataclass
class Codes:
    """A uint8 activation tensor: real value = scale * (code - zp), codes in [lo, hi]."""
    name: str
    scale: float
    zp: int
    lo: int
    hi: int


@dataclass
class Acc:
    """An int32 tensor: real value = scale[c] * x + bias[c] along axis 1 (or one scale, no bias);
    ``bound``: the largest |real value| it can hold; ``relu``: a ReLU still to apply, ``cap``: with
    it, an upper clip in real units still to apply (ReLU6). The bias (real units), the ReLU and the
    cap are applied by the next requantisation."""
    name: str
    scale: np.ndarray
    bound: float
    relu: bool = False
    bias: Optional[np.ndarray] = None
    cap: Optional[float] = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1


@dataclass
class ConstCodes:
    """Constant integer codes (quantized weights) with their grid."""
    codes: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    axis: int


@dataclass
class FloatInput:
    """The float graph input times a constant (F8Net divides the first layer's input by its
    clipping level): the input QuantizeLinear absorbs the factor into its scale."""
    name: str
    factor: float


@dataclass
class Raw:
    """An integer tensor that is not a quantized value (shapes, indices): copied verbatim."""
    name: str


def pow2_at_least(v: float) -> int:
    return int(math.ceil(math.log2(max(v, 1e-30))))


def shared_unit(*scales) -> float:
    """The mantissa in [1, 2) that every one of ``scales`` has (so they differ by powers of two:
    F8Net's weights with the clipping level folded in), else 1.

    >>> shared_unit(np.array([0.75, 1.5]), 3.0), shared_unit(np.array([0.75, 0.5]))
    (1.5, 1.0)
    """
    mant = np.concatenate([np.frexp(np.abs(np.asarray(s, np.float64)).reshape(-1))[0] for s in scales])
    return float(2 * mant[0]) if np.all(mant == mant[0]) else 1.0


def requant_params(ratio: np.ndarray) -> Tuple[np.ndarray, int]:
    """Integer multipliers ``m`` (< 2^31) and one right shift ``n`` with ``m / 2^n ~ ratio``
    (elementwise); exact where every ratio is a power of two.

    >>> m, n = requant_params(np.array([0.25, 0.5])); m.tolist(), n
    ([1, 2], 2)
    >>> m, n = requant_params(np.array([0.3])); int(m[0]), n, abs(int(m[0]) / 2 ** n - 0.3) < 1e-9
    (644245094, 31, True)
    """
    ratio = np.asarray(ratio, dtype=np.float64)
    if np.any(ratio == 0) or not np.all(np.isfinite(ratio)):
        raise IntExportError(f'a requantisation ratio is zero or not finite ({ratio.min():.3g}..{ratio.max():.3g})')
    mant, exp = np.frexp(np.abs(ratio))          # ratio = mant * 2^exp, mant in [0.5, 1)
    if np.all(mant == 0.5):                      # powers of two: shifts only
        e = exp.astype(np.int64) - 1
        n = max(0, -int(e.min()))
        return (np.sign(ratio) * np.exp2(e + n)).astype(np.int64), n
    n = MULT_BITS - int(exp.max())
    m = np.round(ratio * 2.0 ** n).astype(np.int64)
    if n < 0 or n > MAX_SHIFT:
        raise IntExportError(f'requantisation ratio {np.abs(ratio).max():.3g} needs a shift of {n} bits (0..{MAX_SHIFT})')
    return m, n


class _Graph:
    """The integer graph under construction."""

    def __init__(self):
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, onnx.TensorProto] = {}
        self.count = 0
        self.scope = ''     # the QDQ node being lowered: the prefix of the node names (profiles by layer)

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f'{hint}_{self.count}'

    def const(self, value: np.ndarray, hint: str = 'c', name: Optional[str] = None) -> str:
        name = name or self.fresh(hint)
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def op(self, op_type: str, inputs: List[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        name = f'{self.scope}/{out}' if self.scope else out
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def _channel_shape(v: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    return v.reshape((1, -1) + (1, ) * (rank - 2)) if v.size > 1 else v.reshape(())


class IntegerLowering:
    """Rewrites one QDQ model; see the module docstring. Use :func:`to_integer`."""

    def __init__(self, model: onnx.ModelProto):
        self.src = onnx.shape_inference.infer_shapes(model)
        self.g = _Graph()
        self.vals: Dict[str, object] = {}
        self.ranks: Dict[str, int] = {}
        self.shapes: Dict[str, list] = {}
        for vi in list(self.src.graph.value_info) + list(self.src.graph.input) + list(self.src.graph.output):
            dims = [d.dim_value if d.HasField('dim_value') else None for d in vi.type.tensor_type.shape.dim]
            self.shapes[vi.name], self.ranks[vi.name] = dims, len(dims)
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in self.src.graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        for t in self.src.graph.initializer:
            self.vals[t.name] = numpy_helper.to_array(t)
        for node in self.src.graph.node:       # constants first: a Clip's bounds may come later
            if node.op_type == 'Constant':
                self.vals[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.inputs = {i.name for i in self.src.graph.input} - set(self.vals)
        self.skip = set()

    # ---- helpers -------------------------------------------------------------------------------
    def fail(self, node, why):
        raise IntExportError(f'node {node.name or node.op_type} ({node.op_type}): {why}')

    def const_of(self, name):
        v = self.vals.get(name)
        return v if isinstance(v, np.ndarray) else None

    def rank(self, name, default=4):
        return self.ranks.get(name) or default

    def to_acc(self, v, node) -> Acc:
        if isinstance(v, Acc):
            return v
        if isinstance(v, Codes):
            x = self.g.op('Cast', [v.name], 'i32', to=TensorProto.INT32)
            if v.zp:
                x = self.g.op('Sub', [x, self.g.const(np.int32(v.zp), 'zp')], 'sub_zp')
            return Acc(x, np.array(v.scale), v.scale * max(abs(v.lo - v.zp), abs(v.hi - v.zp)))
        self.fail(node, f'input is {type(v).__name__}, expected a quantized tensor (is an input of '
                        'this layer left unquantized? integer export needs every conv / linear input quantized)')

    def requant(self, a: Acc, scale: float, zp: int, lo: int, hi: int, rank: int, out_type: int) -> str:
        """``clip(round((a.scale * a + a.bias) / scale) + zp, lo, hi)`` as integer ops, cast to
        ``out_type``; a pending ReLU raises ``lo`` to ``zp``, a pending cap ``c`` lowers ``hi`` to
        ``zp + round(c / scale)`` (rounding is monotone, so clipping the codes there equals
        clipping the real values at ``c`` before rounding)."""
        g = self.g
        if a.relu:
            lo = max(lo, zp)
        if a.cap is not None:
            hi = min(hi, zp + int(math.floor(a.cap / scale + 0.5)))
        m, n = requant_params(a.scale / scale)
        if a.bias is not None:
            # power-of-two ratios give small shifts, and the bias would be rounded to 2^-n of a step
            # (F8Net's folded layers: n = 1..9); scale m up as the other ratios are (m < 2^MULT_BITS)
            k = min(MULT_BITS - 1 - int(np.log2(np.abs(m).max())), MAX_SHIFT - n)
            if k > 0:
                m, n = m * (1 << k), n + k
        bias = np.zeros(1) if a.bias is None else a.bias.astype(np.float64) / scale   # output steps
        b_hi = np.floor(bias)
        b_lo = np.round((bias - b_hi) * 2.0 ** n)             # in [0, 2^n]: the bias below one step
        x = g.op('Cast', [a.name], 'i64', to=TensorProto.INT64)
        if not (m.size == 1 and int(m.reshape(-1)[0]) == 1):
            x = g.op('Mul', [x, g.const(_channel_shape(m, rank), 'mult')], 'mul')
        post = b_hi.astype(np.int64) + zp
        if n > 0:
            # floor((v + 2^(n-1)) / 2^n) as a logical shift of v + 2^62 (non-negative), minus 2^(62-n)
            pre = b_lo.astype(np.int64) + (1 << (n - 1)) + (1 << 62)
            x = g.op('Add', [x, g.const(_channel_shape(pre, rank), 'round')], 'add_round')
            x = g.op('Cast', [x], 'u64', to=TensorProto.UINT64)
            x = g.op('BitShift', [x, g.const(np.uint64(n), 'shift')], 'shr', direction='RIGHT')
            x = g.op('Cast', [x], 'i64', to=TensorProto.INT64)
            post = post - (1 << (62 - n))
        else:
            post = post + b_lo.astype(np.int64)
        if np.any(post != 0):
            x = g.op('Add', [x, g.const(_channel_shape(post, rank), 'offset')], 'add_offset')
        x = g.op('Clip', [x, g.const(np.int64(lo), 'lo'), g.const(np.int64(hi), 'hi')], 'clip')
        return g.op('Cast', [x], 'cast', to=out_type)

    def widen(self, a: Acc, rank: int, bound: Optional[float] = None, unit: Optional[float] = None) -> Acc:
        """``a`` as an int32 tensor with one scale ``unit 2^k`` fitting ``bound`` (default its
        own) in ``2^ACC_BITS``, ReLU applied; ``unit`` (default :func:`shared_unit` of its scale,
        1 unless F8Net's folded clipping levels) keeps the rescale a shift where it can be one."""
        bound = a.bound if bound is None else bound
        unit = shared_unit(a.scale) if unit is None else unit
        t = unit * 2.0 ** (pow2_at_least(bound / unit) - ACC_BITS)
        if a.per_tensor and float(a.scale) == t and not a.relu and a.cap is None and a.bias is None:
            return a
        name = self.requant(a, t, 0, -(1 << 31), (1 << 31) - 1, rank, TensorProto.INT32)
        return Acc(name, np.array(t), a.bound)

    # ---- node rules ----------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        for node in self.src.graph.node:
            if node.name in self.skip:
                continue
            self.g.scope = node.name
            rule = getattr(self, f'op_{node.op_type}', None)
            ins = [self.vals.get(i) if i else None for i in node.input]
            if node.op_type in _NUMPY_OPS and all(isinstance(v, np.ndarray) for i, v in zip(node.input, ins) if i):
                for o, v in zip(node.output, _NUMPY_OPS[node.op_type](node, ins)):
                    self.vals[o] = np.asarray(v)
                continue
            if not any(isinstance(v, (Acc, Codes, ConstCodes)) for v in ins) and any(isinstance(v, Raw) for v in ins) \
                    and node.op_type in _SHAPE_OPS:           # shape arithmetic: integers already
                self.copy(node, ins)
                continue
            if rule is None:
                self.fail(node, f'no integer form for {node.op_type}; supported: {", ".join(sorted(set(_RULES)))} '
                                f'(and {", ".join(_SHAPE_OPS)} on shapes)')
            rule(node, ins)
        return self.finish()

    def copy(self, node, ins):
        names = []
        for name, v in zip(node.input, ins):
            if isinstance(v, np.ndarray):
                names.append(self.g.const(v, name=name))
            elif isinstance(v, ConstCodes):
                self.fail(node, 'takes a quantized constant')
            else:
                names.append(v.name if v is not None else '')
        self.g.nodes.append(helper.make_node(node.op_type, names, list(node.output), name=node.name,
                                             **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        for o in node.output:
            self.vals[o] = Raw(o)

    def op_Constant(self, node, ins):
        """Read before the walk (a Clip's bounds may come after it): nothing left to do."""

    def op_Identity(self, node, ins):
        self.vals[node.output[0]] = ins[0]

    def op_QuantizeLinear(self, node, ins):
        x, scale, zp = ins[0], ins[1], ins[2]
        if isinstance(x, np.ndarray):                            # a weight: constant codes
            self.vals[node.output[0]] = _quantize_const(node, x, scale, zp)
            return
        if scale is None or zp is None or scale.size != 1:
            self.fail(node, 'activation grids must be per tensor with a constant scale and zero point')
        off = 128 if zp.dtype == np.int8 else 0
        lo, hi, out = 0, 255, node.output[0]
        nxt = self.consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == 'Clip':          # a narrower grid: merge its Clip
            c_lo, c_hi = (self.const_of(i) for i in nxt[0].input[1:3])
            lo, hi, out = int(c_lo) + off, int(c_hi) + off, nxt[0].output[0]
            self.skip.add(nxt[0].name)
        s, z = float(scale), int(zp) + off
        if node.input[0] in self.inputs or isinstance(x, FloatInput):   # the graph input: the one float Q
            f = x.factor if isinstance(x, FloatInput) else 1.0
            source = x.name if isinstance(x, FloatInput) else node.input[0]
            name = self.g.op('QuantizeLinear', [source, self.g.const(np.float32(s / f), 'scale'),
                                                self.g.const(np.uint8(z), 'zp')], 'q_input')
            if (lo, hi) != (0, 255):
                name = self.g.op('Clip', [name, self.g.const(np.uint8(lo), 'lo'), self.g.const(np.uint8(hi), 'hi')], 'clip')
        else:
            name = self.requant(self.to_acc(x, node), s, z, lo, hi, self.rank(node.input[0]), TensorProto.UINT8)
        self.vals[out] = Codes(name, s, z, lo, hi)

    def op_Clip(self, node, ins):
        if isinstance(ins[0], ConstCodes):
            c = ins[0]
            self.vals[node.output[0]] = ConstCodes(np.clip(c.codes, int(ins[1]), int(ins[2])), c.scale, c.zp, c.axis)
            return
        if isinstance(ins[0], (Acc, Codes)):
            lo, hi = (None if i >= len(node.input) or not node.input[i] else self.const_of(node.input[i])
                      for i in (1, 2))
            if lo is None or float(lo) != 0.0:
                self.fail(node, 'a Clip with a lower bound other than 0 (only ReLU / ReLU6-like clips '
                                'have an integer form here)')
            a = self.to_acc(ins[0], node)
            cap = None if hi is None else float(hi) if a.cap is None else min(a.cap, float(hi))
            self.vals[node.output[0]] = Acc(a.name, a.scale, a.bound, True, a.bias, cap)
            return
        self.fail(node, 'a Clip that does not follow a QuantizeLinear')

    def op_DequantizeLinear(self, node, ins):
        x = ins[0]
        if isinstance(x, (Codes, ConstCodes)):
            self.vals[node.output[0]] = x                        # consumers read the codes
            return
        self.fail(node, f'dequantizes a {type(x).__name__}')

    def _weight(self, node, w, what):
        if not isinstance(w, ConstCodes):
            self.fail(node, f'the {what} weight is not quantized (integer export needs every weight quantized)')
        if np.any(w.zp != 0):
            self.fail(node, 'weights need a symmetric grid (zero point 0) for ConvInteger / MatMulInteger')
        if w.codes.min() < -128 or w.codes.max() > 127:
            self.fail(node, 'weight codes outside int8')
        return w

    def op_Conv(self, node, ins):
        x = ins[0]
        if not isinstance(x, Codes):
            self.fail(node, 'the convolution input is not quantized')
        w = self._weight(node, ins[1], 'convolution')
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tap = _single_tap(attrs, self.shapes.get(node.input[0]), self.shapes.get(node.output[0]))
        if tap is not None:
            # a 1x1 input and output (ResNet-18's last stage at 28x28): one kernel tap meets data,
            # the rest meet padding (= the zero point); onnxruntime's ConvInteger runs one GEMV
            # per image, re-reading the weights each time, so this is one MatMulInteger over the batch
            n_in = w.codes.shape[1]
            flat = self.g.op('Reshape', [x.name, self.g.const(np.array([-1, n_in], np.int64), 'shape')], 'flat')
            mm = self.g.op('MatMulInteger', [flat, self.g.const(_u8_codes(np.ascontiguousarray(w.codes[:, :, tap[0], tap[1]].T)), 'w'),
                                             self.g.const(np.uint8(x.zp), 'x_zp'), self.g.const(np.uint8(128), 'w_zp')], 'matmul')
            name = self.g.op('Reshape', [mm, self.g.const(np.array([-1, w.codes.shape[0], 1, 1], np.int64), 'shape')], 'unflat')
        else:
            name = self.g.op('ConvInteger', [x.name, self.g.const(_u8_codes(w.codes), 'w'),
                                             self.g.const(np.uint8(x.zp), 'x_zp'), self.g.const(np.uint8(128), 'w_zp')],
                             'conv', **attrs)
        s_w = np.broadcast_to(w.scale.reshape(-1), (w.codes.shape[0], )) if w.scale.size > 1 else \
            np.full(w.codes.shape[0], float(w.scale))
        scale = x.scale * s_w
        amax = max(abs(x.lo - x.zp), abs(x.hi - x.zp))
        bound = scale * np.abs(w.codes.reshape(w.codes.shape[0], -1)).sum(1) * amax
        b = ins[2].astype(np.float64) if len(ins) > 2 and ins[2] is not None else None
        self.vals[node.output[0]] = Acc(name, scale, float((bound + (0 if b is None else np.abs(b))).max()), bias=b)

    def op_Gemm(self, node, ins):
        x = ins[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get('alpha', 1.0) != 1.0 or attrs.get('beta', 1.0) != 1.0 or attrs.get('transA', 0):
            self.fail(node, 'only Gemm with alpha = beta = 1 and no transA')
        if not isinstance(x, Codes):
            self.fail(node, 'the linear layer input is not quantized')
        w = self._weight(node, ins[1], 'linear')
        codes = w.codes.T if attrs.get('transB', 0) else w.codes          # [in, out]
        name = self.g.op('MatMulInteger', [x.name, self.g.const(_u8_codes(np.ascontiguousarray(codes)), 'w'),
                                           self.g.const(np.uint8(x.zp), 'x_zp'), self.g.const(np.uint8(128), 'w_zp')],
                         'matmul')
        n_out = codes.shape[1]
        s_w = w.scale.reshape(-1) if w.scale.size > 1 else np.full(n_out, float(w.scale))
        scale = x.scale * s_w
        bound = scale * np.abs(codes).sum(0) * max(abs(x.lo - x.zp), abs(x.hi - x.zp))
        b = ins[2].astype(np.float64) if len(ins) > 2 and ins[2] is not None else None
        self.vals[node.output[0]] = Acc(name, scale, float((bound + (0 if b is None else np.abs(b))).max()), bias=b)

    def op_BatchNormalization(self, node, ins):
        a = ins[0]
        if not isinstance(a, Acc):
            self.fail(node, 'BatchNorm must follow a convolution')
        gamma, beta, mean, var = (v.astype(np.float64) for v in ins[1:5])
        eps = next((helper.get_attribute_value(t) for t in node.attribute if t.name == 'epsilon'), 1e-5)
        mul = gamma / np.sqrt(var + eps)
        add = beta - mean * mul
        if np.any(np.abs(mul) < 1e-12):
            self.fail(node, 'a BatchNorm channel with gamma = 0 has no integer scale; fold BatchNorm '
                            'into the weights before quantizing')
        if a.relu:          # ReLU before BatchNorm: apply it first
            a = self.widen(a, self.rank(node.input[0]))
        scale = np.broadcast_to(a.scale, mul.shape) * mul
        bias = add if a.bias is None else a.bias * mul + add
        self.vals[node.output[0]] = Acc(a.name, scale, float((a.bound * np.abs(mul) + np.abs(add)).max()), bias=bias)

    def _rescale(self, node, ins, divide):
        x, c = ins
        if x is None and node.input[0] in self.inputs:
            x = FloatInput(node.input[0], 1.0)
        if isinstance(x, FloatInput) and isinstance(c, np.ndarray) and c.size == 1 and float(c) != 0:
            self.vals[node.output[0]] = FloatInput(x.name, x.factor / float(c) if divide else x.factor * float(c))
            return
        if not isinstance(c, np.ndarray) or c.size != 1 or not isinstance(x, (Acc, Codes)):
            self.fail(node, f'{node.op_type} of a quantized tensor by anything but one constant')
        c = float(c)
        if c == 0:
            self.fail(node, f'{node.op_type} by zero')
        a = self.to_acc(x, node)
        if a.relu and c < 0:
            a = self.widen(a, self.rank(node.input[0]))

        def f(v):       # dividing, not multiplying by 1 / c: exact where the quotient is a power of two
            return None if v is None else v / c if divide else v * c
        self.vals[node.output[0]] = Acc(a.name, f(a.scale), abs(f(a.bound)), a.relu, f(a.bias), f(a.cap))

    def op_Div(self, node, ins):
        """A constant factor (F8Net's PACT divides a layer input by its clipping ``eta``) only
        changes the real scale of the integers: no op."""
        self._rescale(node, ins, True)

    def op_Mul(self, node, ins):
        self._rescale(node, ins, False)

    def op_Relu(self, node, ins):
        a = self.to_acc(ins[0], node)
        self.vals[node.output[0]] = Acc(a.name, a.scale, a.bound, True, a.bias, a.cap)

    def op_Add(self, node, ins):
        if any(isinstance(v, np.ndarray) for v in ins):
            self.fail(node, 'adds a constant')
        a, b = (self.to_acc(v, node) for v in ins)
        rank = max(self.rank(i) for i in node.input)
        bound = a.bound + b.bound
        unit = shared_unit(a.scale, b.scale)
        a, b = self.widen(a, rank, bound, unit), self.widen(b, rank, bound, unit)
        self.vals[node.output[0]] = Acc(self.g.op('Add', [a.name, b.name], 'add'), a.scale, bound)

    def op_MaxPool(self, node, ins):
        attrs = {t.name: helper.get_attribute_value(t) for t in node.attribute}
        if attrs.get('ceil_mode', 0) or any(d != 1 for d in attrs.get('dilations', [1])) or len(node.output) > 1:
            self.fail(node, 'MaxPool with ceil_mode, dilation or indices')
        a = self.widen(self.to_acc(ins[0], node), 4)
        k, s = attrs['kernel_shape'], attrs.get('strides', [1, 1])
        p = attrs.get('pads', [0, 0, 0, 0])
        h, w = self.shapes[node.input[0]][2:]
        oh, ow = (h + p[0] + p[2] - k[0]) // s[0] + 1, (w + p[1] + p[3] - k[1]) // s[1] + 1
        x = a.name
        if any(p):      # pad with the smallest int32, which never wins a max
            x = self.g.op('Pad', [x, self.g.const(np.array([0, 0, p[0], p[1], 0, 0, p[2], p[3]], np.int64), 'pads'),
                                  self.g.const(np.int32(-(1 << 31)), 'pad_value')], 'pad')
        windows = []
        for i in range(k[0]):
            for j in range(k[1]):
                windows.append(self.g.op('Slice', [
                    x, self.g.const(np.array([i, j], np.int64), 'start'),
                    self.g.const(np.array([i + s[0] * (oh - 1) + 1, j + s[1] * (ow - 1) + 1], np.int64), 'end'),
                    self.g.const(np.array([2, 3], np.int64), 'axes'), self.g.const(np.array(s, np.int64), 'steps')], 'window'))
        out = self.g.op('Max', windows, 'maxpool') if len(windows) > 1 else windows[0]
        self.vals[node.output[0]] = Acc(out, a.scale, a.bound)

    def op_GlobalAveragePool(self, node, ins):
        a = self.to_acc(ins[0], node)
        h, w = self.shapes[node.input[0]][2:]
        if h is None or w is None:
            self.fail(node, 'needs a static spatial size')
        a = self.widen(a, 4, a.bound * h * w)
        if h * w > 1:
            name = self.g.op('ReduceSum', [a.name, self.g.const(np.array([2, 3], np.int64), 'axes')], 'sum', keepdims=1)
            a = Acc(name, a.scale / (h * w), a.bound)
        self.vals[node.output[0]] = a

    def _reshape_like(self, node, ins):
        a = self.widen(self.to_acc(ins[0], node), self.rank(node.input[0]))
        rest = [self.g.const(v, name=n) if isinstance(v, np.ndarray) else '' if v is None else v.name
                for n, v in zip(node.input[1:], ins[1:])]
        attrs = {t.name: helper.get_attribute_value(t) for t in node.attribute}
        self.vals[node.output[0]] = Acc(self.g.op(node.op_type, [a.name] + rest, node.op_type.lower(), **attrs), a.scale, a.bound)

    op_Reshape = op_Flatten = op_Resize = _reshape_like

    def op_Shape(self, node, ins):
        v = ins[0]
        name = v.name if isinstance(v, (Acc, Codes, Raw)) else node.input[0]
        self.vals[node.output[0]] = Raw(self.g.op('Shape', [name], 'shape'))

    # ---- outputs -------------------------------------------------------------------------------
    def finish(self) -> onnx.ModelProto:
        outputs = []
        for o in self.src.graph.output:
            v = self.vals.get(o.name)
            rank = self.rank(o.name, 2)
            if isinstance(v, Codes):
                x = self.g.op('DequantizeLinear', [v.name, self.g.const(np.float32(v.scale), 'scale'),
                                                   self.g.const(np.uint8(v.zp), 'zp')], 'dq')
            elif isinstance(v, Acc):
                if v.relu or v.bias is not None:
                    v = self.widen(v, rank)
                kw = {} if v.per_tensor else {'axis': 1}
                x = self.g.op('DequantizeLinear', [v.name, self.g.const(v.scale.astype(np.float32).reshape(-1 if v.scale.size > 1 else ()), 'scale')],
                              'dq', **kw)
            else:
                raise IntExportError(f'output {o.name} is {type(v).__name__}, not a quantized tensor')
            self.g.nodes.append(helper.make_node('Identity', [x], [o.name], name=f'{o.name}_out'))
            outputs.append(o)
        graph = helper.make_graph(self.g.nodes, 'mmquant_integer', [i for i in self.src.graph.input if i.name in self.inputs],
                                  [helper.make_tensor_value_info(o.name, TensorProto.FLOAT,
                                                                 [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                                   for o in outputs], list(self.g.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)],
                                  producer_name='mmquant', doc_string='integer-only graph (mmquant.export.int_graph)')
        model.ir_version = self.src.ir_version
        onnx.checker.check_model(model)
        return model


def _single_tap(attrs: dict, in_shape, out_shape):
    """``(i, j)``, the one kernel tap of a convolution whose input and output are 1x1 (every other
    tap reads padding), or ``None``."""
    if not in_shape or not out_shape or len(in_shape) != 4 or len(out_shape) != 4:
        return None
    if in_shape[2:] != [1, 1] or out_shape[2:] != [1, 1] or attrs.get('group', 1) != 1:
        return None
    if any(d != 1 for d in attrs.get('dilations', [1, 1])):
        return None
    pads = attrs.get('pads', [0, 0, 0, 0])
    k = attrs.get('kernel_shape')
    if k is None or pads[0] >= k[0] or pads[1] >= k[1]:
        return None
    return pads[0], pads[1]


def _u8_codes(codes: np.ndarray) -> np.ndarray:
    """int8 weight codes stored as uint8 with zero point 128. onnxruntime's u8 x s8 kernels on
    CPUs without VNNI add pairs of products in saturating int16 (vpmaddubsw), which loses
    exactness for large codes; its u8 x u8 path does not."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def _quantize_const(node, x, scale, zp):
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == 'axis'), 1)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis] = -1
    s, z = scale.reshape(shape).astype(np.float32), zp.reshape(shape).astype(np.int64)
    info = np.iinfo(zp.dtype)
    codes = np.clip(np.rint(x.astype(np.float32) / s) + z, info.min, info.max).astype(np.int64)
    return ConstCodes(codes, scale.astype(np.float64), zp.astype(np.int64), axis)


_NUMPY_OPS = {
    'Identity': lambda node, ins: [ins[0]],
    'Mul': lambda node, ins: [ins[0] * ins[1]],
    'Div': lambda node, ins: [ins[0] / ins[1]],
    'Add': lambda node, ins: [ins[0] + ins[1]],
    'Sub': lambda node, ins: [ins[0] - ins[1]],
    'Abs': lambda node, ins: [np.abs(ins[0])],
    'Neg': lambda node, ins: [-ins[0]],
    'Sqrt': lambda node, ins: [np.sqrt(ins[0])],
    'Reciprocal': lambda node, ins: [(1 / ins[0]).astype(ins[0].dtype)],
    'Pow': lambda node, ins: [np.power(ins[0], ins[1]).astype(ins[0].dtype)],
    'Max': lambda node, ins: [np.maximum.reduce(ins)],
    'Min': lambda node, ins: [np.minimum.reduce(ins)],
    'Clip': lambda node, ins: [np.clip(ins[0], -np.inf if len(ins) < 2 or ins[1] is None else ins[1],
                                       np.inf if len(ins) < 3 or ins[2] is None else ins[2]).astype(ins[0].dtype)],
    'Unsqueeze': lambda node, ins: [np.expand_dims(ins[0], tuple(int(a) for a in ins[1]))],
    'Concat': lambda node, ins: [np.concatenate(ins, axis=helper.get_attribute_value(node.attribute[0]))],
}
_SHAPE_OPS = ('Gather', 'Unsqueeze', 'Concat', 'Squeeze', 'Slice', 'Cast', 'Mul', 'Div', 'Add', 'Sub', 'Equal',
              'Where', 'ConstantOfShape', 'Shape')
_RULES = ('QuantizeLinear', 'DequantizeLinear', 'Clip', 'Conv', 'Gemm', 'BatchNormalization', 'Relu', 'Add', 'Mul', 'Div',
          'MaxPool', 'GlobalAveragePool', 'Reshape', 'Flatten', 'Resize', 'Shape', 'Identity', 'Constant')


def to_integer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The integer-only form of a QDQ model written by :func:`mmquant.export.export_qdq`."""
    return IntegerLowering(model).run()


def op_census(model: onnx.ModelProto) -> Dict[str, List[str]]:
    """Every node of ``model`` whose inputs or outputs are floating point, by op type (an
    integer-only graph has only the input ``QuantizeLinear`` and the output ``DequantizeLinear``
    and ``Identity`` there)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    out: Dict[str, List[str]] = {}
    for node in inferred.graph.node:
        if any(types.get(n) in floats for n in list(node.input) + list(node.output) if n):
            out.setdefault(node.op_type, []).append(node.name)
    return out


def multiplier_census(model: onnx.ModelProto) -> Tuple[int, int]:
    """``(n, k)``: the requantisation multipliers of an integer graph written here, and how many of
    them are powers of two in every channel (the requantisation is then shifts only)."""
    n = k = 0
    for t in model.graph.initializer:
        if t.name.startswith('mult'):
            m = np.abs(numpy_helper.to_array(t).astype(np.float64))
            n += 1
            k += bool(np.all(np.frexp(m)[0] == 0.5))
    return n, k


def export_int(model, example, path: str, opset: int = 17) -> str:
    """Export ``model`` (as :func:`mmquant.export.export_qdq` takes it) as an integer-only ONNX
    graph to ``path`` (a temporary file, then renamed)."""
    import os
    import tempfile

    from .qdq import export_qdq
    with tempfile.TemporaryDirectory() as tmp:
        qdq = export_qdq(model, example, os.path.join(tmp, 'qdq.onnx'), opset=opset)
        integer = to_integer(onnx.load(qdq))
    onnx.save(integer, path + '.tmp')
    os.replace(path + '.tmp', path)
    return path
