"""The QAT methods: which quantizers each uses, which layers stay 8-bit, which block rewrite.

``prepare_qat(model, 'lsq', 'w4a4')`` rewrites the blocks a method needs and swaps the layers;
the model then trains with any optimizer (the quantizers' parameters are ordinary Parameters).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from torch import nn

from ..convert import ConversionReport, convert
from ..nn.binary_blocks import rewrite_binary_blocks
from ..qconfig import QConfig, parse_bits
from .f8net import prepare_f8net

_REAL_8BIT = dict(w_bits=8, a_bits=8, w_quantizer='uniform', a_quantizer='uniform')


@dataclass(frozen=True)
class QATMethod:
    """``layer``: LayerQConfig fields of every quantized layer; ``io_layer``: extra fields of the
    first / last layers; ``overrides``: per-pattern fields; ``rewrite``: binary block style;
    ``fuse_bn``: convs fold their BatchNorm while training (F8Net, needs one example forward);
    ``share_clip``: the readers of a residual stream share their clipping level (F8Net)."""
    name: str
    paper: str
    layer: dict
    io_layer: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    rewrite: Optional[str] = None
    fuse_bn: bool = False
    share_clip: bool = False

    @property
    def binary(self) -> bool:
        return self.rewrite is not None


def _binary(name, paper, w, a_kwargs, rewrite):
    return QATMethod(name, paper, dict(w_quantizer=w, a_quantizer='sign', a_quantizer_kwargs=a_kwargs),
                     io_layer=dict(w_quantizer='uniform', a_quantizer='uniform'),
                     overrides={'*downsample*': dict(_REAL_8BIT)}, rewrite=rewrite)


QAT_METHODS: Dict[str, QATMethod] = {m.name: m for m in (
    QATMethod('dorefa', 'DoReFa-Net (Zhou et al. 2016)', dict(w_quantizer='dorefa', a_quantizer='dorefa')),
    QATMethod('pact', 'PACT (Choi et al. 2018)', dict(w_quantizer='dorefa', a_quantizer='pact')),
    # DoReFa weights rescaled to variance 1 / n_out, PACT with the calibrated clip-level gradient
    QATMethod('sat', 'SAT (Jin, Yang & Liao 2019)', dict(w_quantizer='sat', a_quantizer='sat')),
    QATMethod('lsq', 'LSQ (Esser et al. ICLR 2020)', dict(w_quantizer='lsq', a_quantizer='lsq')),
    QATMethod('lqnet', 'LQ-Net (Zhang et al. ECCV 2018)',
              dict(w_quantizer='lqnet', a_quantizer='lqnet', w_per_channel=True)),
    _binary('xnor', 'XNOR-Net (Rastegari et al. ECCV 2016)', 'xnor', dict(scaling=True), 'plain'),
    _binary('xnorpp', 'XNOR-Net++ (Bulat & Tzimiropoulos BMVC 2019)', 'xnorpp', {}, 'plain'),
    _binary('bireal', 'Bi-Real Net (Liu et al. ECCV 2018)', 'bireal', dict(grad='approx'), 'bireal'),
    _binary('groupnet', 'Group-Net (Zhuang et al. CVPR 2019)', 'xnor', {}, 'groupnet'),
    # fixed-point weights (FL per output channel: BN-folded channels differ in scale by 100x)
    # and fixed-point PACT activations (FL by the paper's std formula)
    QATMethod('f8net', 'F8Net (Jin et al. ICLR 2022)',
              dict(w_quantizer='fixed', a_quantizer='fixed', w_per_channel=True,
                   a_quantizer_kwargs=dict(clip='pact')), fuse_bn=True, share_clip=True),
)}


def check_qat_method(name: str) -> QATMethod:
    if name not in QAT_METHODS:
        raise ValueError(f'unknown QAT method {name!r}; accepted: {", ".join(sorted(QAT_METHODS))}')
    return QAT_METHODS[name]


def qat_qconfig(method: str, bits: str, qconfig=None) -> QConfig:
    """The method's settings at ``bits`` (e.g. 'w2a2', 'w1a1'), under the user's ``qconfig``
    (a dict of QConfig fields: its ``default`` fields, overrides, skips and io_layer fields take
    precedence over the method's)."""
    m = check_qat_method(method)
    if qconfig is not None and not isinstance(qconfig, dict):
        raise TypeError(f'qconfig for a QAT method must be a dict of QConfig fields, got {type(qconfig).__name__}')
    qconfig = dict(qconfig or {})
    user_default = dict(qconfig.pop('default', None) or {})
    user = QConfig.build(qconfig)
    w_bits, a_bits = parse_bits(bits, binary=True)
    layer = {**m.layer, 'w_bits': w_bits, 'a_bits': a_bits, **user_default}
    qc = QConfig.build(dict(default=layer, first_layer_bits=user.first_layer_bits,
                            last_layer_bits=user.last_layer_bits,
                            overrides={**m.overrides, **user.overrides}, skip=list(user.skip), only=list(user.only),
                            io_layer={**m.io_layer, **user.io_layer}))
    if m.binary and (qc.default.w_bits != 1 or qc.default.a_bits not in (1, None)):
        raise ValueError(f'{method} is a binary method: bits must be w1a1 (or w1), got {bits!r}')
    if not m.binary and qc.default.w_bits == 1 and qc.default.w_quantizer not in ('dorefa', 'lqnet'):
        raise ValueError(f'{method} has no 1-bit weights; use a binary method (xnor, xnorpp, bireal, '
                         f'groupnet) or dorefa / lqnet')
    return qc


def prepare_qat(model: nn.Module, method: str, bits: str, qconfig=None, branches: int = 5,
                io_layers=None, example_forward: Optional[Callable] = None,
                fold_clip: bool = False) -> ConversionReport:
    """Rewrite the blocks ``method`` needs, then swap the layers; return the conversion report
    (with ``rewritten`` block names). ``branches``: Group-Net's K. ``example_forward`` (a
    no-argument callable running one batch) finds the input / output layers when ``io_layers``
    is not given, and F8Net's conv -> BatchNorm pairs (required there). ``fold_clip`` (F8Net):
    quantize each layer's weights in units of its readers' clipping level
    (:func:`~mmquant.qat.clip_fold.fold_clip_units`)."""
    m = check_qat_method(method)
    if fold_clip and not m.share_clip:
        raise ValueError(f'fold_clip folds the PACT clipping levels of F8Net; method {method!r} has none '
                         '(accepted with: f8net)')
    qc = qat_qconfig(method, bits, qconfig)
    if m.fuse_bn:
        report = prepare_f8net(model, qc, example_forward, io_layers=io_layers, share_clip=m.share_clip,
                               fold_clip=fold_clip)
        report.rewritten = []
        return report
    rewritten = rewrite_binary_blocks(model, m.rewrite, branches) if m.rewrite else []
    report = convert(model, qc, example_forward=example_forward, io_layers=io_layers)
    report.rewritten = rewritten
    return report


__all__ = ['QATMethod', 'QAT_METHODS', 'check_qat_method', 'qat_qconfig', 'prepare_qat']
