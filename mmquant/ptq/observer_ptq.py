"""The calibration baselines: one observer for weights and one for activations, nothing learned.

``minmax`` is the TF-Lite recipe: per-tensor symmetric weights at max|w|, affine activations at
the observed min / max. ``percentile``, ``mse`` and ``kl`` change the activation range estimate
(``mse`` also searches the weight range); weights keep max|w| otherwise, as TensorRT does.
"""
from ..calibrate import calibrate
from .base import PTQMethod, register_ptq


class ObserverPTQ(PTQMethod):
    """``fold_bn=True`` folds BatchNorm into the convs first (deployment toolchains do; the
    default keeps the float BatchNorm after each quantized conv, as the tables were measured).
    ``quant_residual=True`` also quantizes every ResNet block's input, branch output and shortcut
    output at 8 bits (:func:`mmquant.nn.quantize_residuals`), so an exported graph has no float
    between convolutions: with ``fold_bn`` it is the form onnxruntime runs fastest."""

    def __init__(self, qconfig=None, bits=None, fold_bn: bool = False, quant_residual: bool = False):
        super().__init__(qconfig, bits)
        self.fold_bn = bool(fold_bn)
        self.quant_residual = bool(quant_residual)

    def calibrate(self, model, batches, forward_fn=None, progress=None, loss_fn=None):
        return calibrate(model, batches, forward_fn, progress)


@register_ptq('minmax')
class MinMaxPTQ(ObserverPTQ):
    layer_defaults = dict(w_observer='minmax', a_observer='minmax')


@register_ptq('percentile')
class PercentilePTQ(ObserverPTQ):
    layer_defaults = dict(w_observer='minmax', a_observer='percentile')


@register_ptq('mse')
class MSEPTQ(ObserverPTQ):
    layer_defaults = dict(w_observer='mse', a_observer='mse')


@register_ptq('kl')
class KLPTQ(ObserverPTQ):
    layer_defaults = dict(w_observer='minmax', a_observer='kl', a_symmetric=True)
