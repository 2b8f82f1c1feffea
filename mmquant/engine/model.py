"""``QuantizedModel``: the config entry point that builds any registered model and swaps its layers.

    model = dict(type='QuantizedModel', architecture=_base_.model, qconfig=dict(...), bits='w4a8')

It is registered as a builder *function*: what it returns is the architecture itself (an
``ImageClassifier``, a ``FCOS``...), converted in place, so every mode, the data preprocessor,
hooks, evaluators and checkpoints work unchanged and checkpoint keys stay those of the
architecture plus the quantizer buffers.
"""
from typing import Optional, Sequence

import torch
from mmengine.registry import MODELS
from torch import nn

from ..convert import convert
from ..qat import QAT_METHODS, prepare_qat
from ..qconfig import QConfig
from .distill import attach_distillation, build_teacher, check_classifier, check_distill


def probe_forward(model, size: int = 64):
    """A no-argument forward of ``model`` (``tensor`` mode) on a fixed random batch of one
    ``size`` x ``size`` image with the first conv's input channels: what a build-time rewrite
    (F8Net's conv -> BatchNorm pairs) traces, before any data is at hand."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))

    def forward():
        p = next(model.parameters(), None)
        try:
            return model(x if p is None else x.to(p.device), mode='tensor')
        except Exception as e:       # e.g. a two-stage detector's tensor mode needs data samples
            raise ValueError(f'the tensor-mode forward of {type(model).__name__} on a random {size}x{size} '
                             f'image (to trace it at build time) failed: {type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else ""}') from None
    return forward


@MODELS.register_module(name='QuantizedModel')
def build_quantized_model(architecture: dict, qconfig: Optional[dict] = None, bits: Optional[str] = None,
                          first_layers: Optional[Sequence[str]] = None,
                          last_layers: Optional[Sequence[str]] = None, data_preprocessor=None,
                          method: Optional[str] = None, branches: int = 5, distill: Optional[dict] = None,
                          fold_clip: bool = False, **kwargs):
    """Build ``architecture`` and convert it by ``qconfig`` (``bits`` such as ``'w4a8'`` sets the
    default bits). ``first_layers`` / ``last_layers`` name the input / output layers; a quantized
    checkpoint records them, and without them the first / last layers in registration order
    are taken. ``data_preprocessor`` (which the Runner passes from the config's top level) goes to
    the architecture unless it has its own.

    ``method``: a QAT method (``dorefa``, ``pact``, ``sat``, ``lsq``, ``lqnet``, ``xnor``, ``xnorpp``,
    ``bireal``, ``groupnet``, ``f8net``): its quantizers and block rewrite, under ``qconfig``;
    ``branches`` is Group-Net's K. F8Net's conv -> BatchNorm fusion traces the model once on a
    random 64 x 64 image (:func:`probe_forward`); ``fold_clip`` (F8Net) folds each PACT clipping
    level into the weights of the layers that produce the clipped input.

    ``distill``: ``dict(checkpoint=PATH, weight=1.0, temperature=1.0)``, knowledge distillation
    from the float model (classifiers only): the same architecture, float, loaded from
    ``checkpoint``, is the teacher of a ``loss_kd`` term added to the training loss
    (:mod:`mmquant.engine.distill`); it stays out of the model's state_dict and parameters."""
    if kwargs:
        raise TypeError(f'QuantizedModel got unexpected arguments {sorted(kwargs)}; accepted: '
                        'architecture, qconfig, bits, first_layers, last_layers, data_preprocessor, '
                        'method, branches, distill, fold_clip')
    if distill is not None:
        distill = check_distill(distill)          # one-line errors before anything is built
    architecture = dict(architecture)
    if data_preprocessor is not None:
        architecture.setdefault('data_preprocessor', data_preprocessor)
    model = MODELS.build(architecture)
    if distill is not None:
        check_classifier(model)
    io = None if first_layers is None and last_layers is None else (set(first_layers or ()), set(last_layers or ()))
    if method is not None:
        if method not in QAT_METHODS:
            raise ValueError(f'QuantizedModel method {method!r} is not a QAT method; accepted: '
                             f'{", ".join(sorted(QAT_METHODS))} (PTQ methods run through PTQLoop)')
        probe = probe_forward(model) if QAT_METHODS[method].fuse_bn else None
        report = prepare_qat(model, method, bits or 'w8a8', qconfig, branches=branches, io_layers=io,
                             example_forward=probe, fold_clip=fold_clip)
        model.mmquant_qat = dict(method=method, bits=bits or 'w8a8', qconfig=dict(qconfig or {}),
                                 branches=branches, first_layers=report.first_layers,
                                 last_layers=report.last_layers)
        if fold_clip:
            model.mmquant_qat['fold_clip'] = True
    else:
        report = convert(model, QConfig.build(qconfig, bits=bits), io_layers=io)
    model.mmquant_report = report
    if distill is not None:
        attach_distillation(model, build_teacher(architecture, distill['checkpoint']),
                            distill['weight'], distill['temperature'], distill['checkpoint'])
        if method is not None:    # for reference: rebuilding from the meta ignores it (no teacher needed)
            model.mmquant_qat['distill'] = dict(distill)
    return model
