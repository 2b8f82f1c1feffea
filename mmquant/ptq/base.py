"""The contract of a post-training quantization method, and the registry of methods by name."""
import logging
from typing import Callable, Dict, Iterable, Optional

from torch import nn

from ..convert import ConversionReport, convert
from ..fold_bn import fold_bn
from ..nn import bake_weight_standardization, quantize_residuals
from ..qconfig import QConfig

PTQ_METHODS: Dict[str, type] = {}
logger = logging.getLogger('mmquant')


def register_ptq(name: str):
    def deco(cls):
        if name in PTQ_METHODS:
            raise KeyError(f'PTQ method {name!r} is registered twice')
        cls.name = name
        PTQ_METHODS[name] = cls
        return cls
    return deco


def check_method(name: str) -> str:
    if name not in PTQ_METHODS:
        raise ValueError(f'unknown quantization method {name!r}; accepted: {", ".join(sorted(PTQ_METHODS))}')
    return name


class PTQMethod:
    """A PTQ method: default layer settings, then ``convert`` + ``calibrate`` on a model.

    Subclasses set ``layer_defaults`` (fields of :class:`LayerQConfig` that the method implies,
    which a user's qconfig may still override), optionally ``io_defaults`` (the same for the
    first / last layers), and implement :meth:`calibrate`.
    """
    name = 'base'
    layer_defaults: dict = {}
    io_defaults: dict = {}   # the same for the first / last layers (QConfig.io_layer)
    fold_bn = False     # fold each BatchNorm into the conv before it, before converting
    quant_residual = False   # quantize ResNet blocks' residual streams (mmquant.nn.quantize_residuals)

    def __init__(self, qconfig=None, bits: Optional[str] = None):
        cfg = qconfig.to_dict() if isinstance(qconfig, QConfig) else dict(qconfig or {})
        cfg['default'] = {**self.layer_defaults, **dict(cfg.get('default') or {})}
        if self.io_defaults:
            cfg['io_layer'] = {**self.io_defaults, **dict(cfg.get('io_layer') or {})}
        self.qconfig = QConfig.build(cfg, bits=bits)
        standardized = [p for p, ov in [('default', vars(self.qconfig.default))] + list(self.qconfig.overrides.items())
                        if ov.get('w_standardize')]
        if standardized:
            raise ValueError(f'{self.name}: w_standardize (in {standardized[0]!r}) changes a trained network; it is a '
                             f'training option (QAT). A model trained with mmcv ConvWS keeps its standardisation '
                             f'without it')

    def convert(self, model: nn.Module, example_forward: Optional[Callable] = None,
                io_layers=None) -> ConversionReport:
        """Swap the model's layers for quantized twins (see :func:`mmquant.convert.convert`),
        after folding BatchNorm into the convs when ``fold_bn`` is set (then the quantized
        weights are the folded ones an integer kernel runs, and an exported graph has no
        BatchNormalization between a convolution and the next quantizer)."""
        bake_standardized_weights(model, self.name)
        if self.fold_bn:
            if example_forward is None:
                raise ValueError(f'{self.name}: folding BatchNorm needs an example forward pass (or fold_bn=False)')
            pairs = fold_bn(model, example_forward)
            logger.info('mmquant %s: folded %d BatchNorm layers into their convs', self.name, len(pairs))
        report = convert(model, self.qconfig, example_forward, io_layers=io_layers)
        if self.quant_residual:
            blocks = quantize_residuals(model, 8, self.qconfig.default.a_observer)
            logger.info('mmquant %s: quantized the residual streams of %d blocks at 8 bits', self.name, len(blocks))
        return report

    def calibrate(self, model: nn.Module, batches: Iterable, forward_fn: Optional[Callable] = None,
                  progress=None, loss_fn: Optional[Callable] = None):
        """Calibrate a converted model; ``progress(done, total)`` reports the method's own steps
        (batches for the observers, layers for layer-wise methods). ``loss_fn(model, batch)``
        returns the task loss of a batch, for methods that weigh their objective by it (brecq's
        Fisher loss); the others ignore it."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batches, forward_fn: Optional[Callable] = None,
                 progress=None, loss_fn: Optional[Callable] = None) -> ConversionReport:
        """Convert ``model`` in place and calibrate it on ``batches`` (a re-iterable sequence)."""
        batches = list(batches)
        if not batches:
            raise ValueError('calibration needs at least one batch')
        fwd = forward_fn or (lambda m, b: m(b))
        report = self.convert(model, example_forward=lambda: fwd(model, batches[0]))
        self.calibrate(model, batches, forward_fn=fwd, progress=progress, loss_fn=loss_fn)
        return report


def bake_standardized_weights(model: nn.Module, method: str):
    """Weight-standardised convs of a trained model become plain convs with the standardised
    weights (:func:`mmquant.nn.bake_weight_standardization`), before folding or converting."""
    baked = bake_weight_standardization(model)
    if baked:
        logger.info('mmquant %s: baked the weight standardisation of %d convs into their weights', method, len(baked))
