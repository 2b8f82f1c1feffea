"""QuantizeLinear / DequantizeLinear ONNX for any model of this project whose quantizers are
affine integer grids of at most 8 bits.

Every quantizer becomes ``QuantizeLinear`` (int8, or uint8 for grids without negative codes) ->
``Clip`` to the grid's codes when the grid is narrower than the 8-bit type (lower bit widths,
narrow range) -> ``DequantizeLinear``, per tensor or per output channel (``axis``). Weights stay
float initialisers behind their Q/DQ pair, the standard QDQ form that onnxruntime and TensorRT
fold into integer kernels. ONNX rounds half to even like ``torch.round``, so the graph computes
what the fake-quant model computes.

Which quantizers have a QDQ form (:func:`affine_grid`): uniform grids (every PTQ method; per
channel or per tensor, symmetric or affine), LSQ, PACT and DoReFa activations on unsigned
inputs, F8Net's fixed-point grids. Binary and LQ-Net quantizers, DoReFa weights and signed PACT / DoReFa activations put
zero between two levels or use non-uniform levels: no integer zero point describes them, and the
export says which layer and why.

``weight_dtype='uint8'`` stores signed weight grids as uint8 with their zero point moved up by
128 (the same dequantized weights). onnxruntime then runs its u8 x u8 kernels instead of u8 x s8:
on x86 CPUs without AVX-512 VNNI the u8 x s8 kernels add pairs of 8-bit products in 16 bits with
saturation, which changed the outputs of an 8-bit MobileNetV2 here (README, "MobileNetV2").
"""
import contextlib
import os
import warnings
from typing import List, NamedTuple, Optional

import onnx
import torch
from torch import nn

from ..convert import quant_layers
from ..nn import stream_quantizers
from ..quantizers import DoReFaActQuantizer, FixedPointQuantizer, LSQQuantizer, PACTQuantizer, UniformQuantizer
from ..quantizers.functional import fake_quantize
from .pad_taps import prune_padding_taps


class QDQExportError(ValueError):
    """A model that has no QDQ form; the message names the layer and the reason."""


class Grid(NamedTuple):
    scale: List[float]
    zero_point: List[int]
    qmin: int
    qmax: int
    axis: Optional[int]      # None: per tensor


def affine_grid(q: nn.Module) -> Grid:
    """The integer grid a quantizer rounds to, or :class:`QDQExportError` if it has none."""
    if not bool(getattr(q, 'calibrated', True)):
        raise QDQExportError('the quantizer is not calibrated')
    if isinstance(q, UniformQuantizer):
        qmin, qmax = q.qrange()
        per_channel = q.scheme.per_channel and q.scale.numel() > 1
        return Grid(q.scale.tolist(), [int(round(z)) for z in q.zero_point.tolist()], qmin, qmax,
                    q.scheme.ch_axis if per_channel else None)
    if isinstance(q, LSQQuantizer):
        qmin, qmax = q.qrange()
        per_channel = q.per_channel and q.step.numel() > 1
        return Grid(q.scale.clamp_min(1e-8).tolist(), [0] * q.step.numel(), qmin, qmax,
                    q.ch_axis if per_channel else None)
    if isinstance(q, FixedPointQuantizer):          # F8Net: power-of-two steps 2^-FL
        qmin, qmax = q.qrange()
        per_channel = q.per_channel and q.frac_len.numel() > 1
        return Grid(q.scale.tolist(), [0] * q.frac_len.numel(), qmin, qmax, q.ch_axis if per_channel else None)
    if isinstance(q, PACTQuantizer) and not bool(q.signed):
        return Grid(q.scale.tolist(), [0], 0, 2 ** q.bits - 1, None)
    if isinstance(q, DoReFaActQuantizer) and not bool(q.signed):
        return Grid([1.0 / (2 ** q.bits - 1)], [0], 0, 2 ** q.bits - 1, None)
    raise QDQExportError(f'{type(q).__name__} (bits={q.bits}, signed={bool(getattr(q, "signed", True))}) '
                         'has no integer zero point / uniform levels; QDQ covers uniform, LSQ and '
                         'unsigned PACT / DoReFa activation grids')


class _QDQ(torch.autograd.Function):
    """Fake quantization that exports as QuantizeLinear -> [Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, grid: Grid):
        scale = torch.tensor(grid.scale, dtype=x.dtype, device=x.device)
        zp = torch.tensor(grid.zero_point, dtype=x.dtype, device=x.device)
        return fake_quantize(x, scale, zp, grid.qmin, grid.qmax, 0 if grid.axis is None else grid.axis)

    @staticmethod
    def symbolic(g, x, grid: Grid):
        dtype = torch.uint8 if grid.qmin >= 0 else torch.int8
        info = torch.iinfo(dtype)
        shape = () if grid.axis is None else (len(grid.scale), )
        scale = g.op('Constant', value_t=torch.tensor(grid.scale, dtype=torch.float32).reshape(shape))
        zp = g.op('Constant', value_t=torch.tensor(grid.zero_point, dtype=dtype).reshape(shape))
        kw = {} if grid.axis is None else {'axis_i': grid.axis}
        q = g.op('QuantizeLinear', x, scale, zp, **kw)
        if grid.qmin > info.min or grid.qmax < info.max:
            lo = g.op('Constant', value_t=torch.tensor(grid.qmin, dtype=dtype))
            hi = g.op('Constant', value_t=torch.tensor(grid.qmax, dtype=dtype))
            q = g.op('Clip', q, lo, hi)
        return g.op('DequantizeLinear', q, scale, zp, **kw)


WEIGHT_DTYPES = ('int8', 'uint8')


def as_uint8(grid: Grid) -> Grid:
    """A signed grid as uint8 codes: every code and zero point plus 128 (same real values)."""
    if grid.qmin >= 0:
        return grid
    return grid._replace(zero_point=[z + 128 for z in grid.zero_point], qmin=grid.qmin + 128, qmax=grid.qmax + 128)


@contextlib.contextmanager
def qdq_mode(model: nn.Module, weight_dtype: str = 'int8'):
    """Within the block every quantizer of ``model`` runs (and traces) as its QDQ pair; one
    :class:`QDQExportError` listing the layers that have no QDQ form, before anything changes.
    ``weight_dtype``: the storage type of signed weight grids (``'int8'`` or ``'uint8'``)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f'weight_dtype={weight_dtype!r}; accepted: {", ".join(WEIGHT_DTYPES)}')
    plan, problems = [], []
    for name, layer in quant_layers(model):
        for role in ('weight_quantizer', 'input_quantizer'):
            q = getattr(layer, role)
            if q is None:
                continue
            try:
                grid = affine_grid(q)
                if grid.qmax - grid.qmin > 255:
                    raise QDQExportError(f'{q.bits}-bit grid: QDQ export takes at most 8 bits')
                if role == 'weight_quantizer' and weight_dtype == 'uint8':
                    grid = as_uint8(grid)
                plan.append((q, grid))
            except QDQExportError as e:
                problems.append(f'{name}.{role}: {e}')
    for name, q in stream_quantizers(model):
        plan.append((q, affine_grid(q)))
    if problems:
        raise QDQExportError(f'{len(problems)} quantizers have no QDQ form, e.g. {problems[0]}')
    for q, grid in plan:
        q.forward = (lambda g: (lambda x: _QDQ.apply(x, g)))(grid)
    try:
        yield
    finally:
        for q, _ in plan:
            del q.forward


def export_qdq(model: nn.Module, example: torch.Tensor, path: str, opset: int = 17,
               input_name: str = 'input', output_names: Optional[List[str]] = None,
               weight_dtype: str = 'int8', prune_taps: bool = True) -> str:
    """Export ``model`` (a module mapping the example tensor to its output tensors) as QDQ ONNX
    to ``path`` (written to a temporary file, then renamed); batch size stays dynamic.
    ``weight_dtype='uint8'``: signed weights stored as uint8, zero point + 128 (module doc).
    ``prune_taps``: cut the kernel taps that read only padding (:mod:`.pad_taps`; exact)."""
    model.eval()
    tmp = path + '.tmp'
    with torch.no_grad():
        model(example)          # quantizers that settle on their first evaluation pass (F8Net weights)
    with qdq_mode(model, weight_dtype), torch.no_grad(), warnings.catch_warnings():
        # the grids are constants of the graph by design
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        outputs = model(example)
        n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        names = output_names or ([f'output{i}' for i in range(n_out)] if n_out > 1 else ['output'])
        axes = {input_name: {0: 'batch'}, **{n: {0: 'batch'} for n in names}}
        torch.onnx.export(model, (example, ), tmp, opset_version=opset, dynamo=False, input_names=[input_name],
                          output_names=names, dynamic_axes=axes, do_constant_folding=True)
    if prune_taps:
        onnx.save(prune_padding_taps(onnx.load(tmp))[0], tmp)
    os.replace(tmp, path)
    return path
