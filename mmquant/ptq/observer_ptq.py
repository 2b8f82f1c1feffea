"""The calibration baselines: one observer for weights and one for activations, nothing learned.

``minmax`` is the TF-Lite recipe: per-tensor symmetric weights at max|w|, affine activations at
the observed min / max. ``percentile``, ``mse`` and ``kl`` change the activation range estimate
(``mse`` also searches the weight range); weights keep max|w| otherwise, as TensorRT does.
``aciq`` clips weights and activations analytically (Laplace fit) and corrects the biases.
"""
from ..calibrate import calibrate
from .base import PTQMethod, register_ptq
from .bias_correction import correct_bias


class ObserverPTQ(PTQMethod):
    """``fold_bn=True`` folds BatchNorm into the convs first (deployment toolchains do; the
    default keeps the float BatchNorm after each quantized conv, as the tables were measured).
    ``quant_residual=True`` also quantizes every ResNet block's input, branch output and shortcut
    output at 8 bits (:func:`mmquant.nn.quantize_residuals`), so an exported graph has no float
    between convolutions: with ``fold_bn`` it is the form onnxruntime runs fastest.
    ``bias_correction=True`` then removes each layer's mean output shift caused by weight rounding
    (:func:`mmquant.ptq.bias_correction.correct_bias`; one pass over the batches per layer)."""
    bias_correction_default = False

    def __init__(self, qconfig=None, bits=None, fold_bn: bool = False, quant_residual: bool = False,
                 bias_correction: bool = None):
        super().__init__(qconfig, bits)
        self.fold_bn = bool(fold_bn)
        self.quant_residual = bool(quant_residual)
        self.bias_correction = self.bias_correction_default if bias_correction is None else bool(bias_correction)

    def calibrate(self, model, batches, forward_fn=None, progress=None, loss_fn=None):
        batches = list(batches)
        unseen = calibrate(model, batches, forward_fn, progress)
        if self.bias_correction:
            correct_bias(model, batches, forward_fn)
        return unseen


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
    # the network's input (a normalised image: a spike at the background value and a spread of
    # brighter pixels) is where entropy calibration fails outright: on Fashion-MNIST it clips at
    # the background's |value| and saturates every brighter pixel; its range is known, so min-max
    io_defaults = dict(a_observer='minmax')


@register_ptq('aciq')
class ACIQPTQ(ObserverPTQ):
    """ACIQ (Banner, Nahshan & Soudry, NeurIPS 2019): analytical Laplace clipping of weights (per
    channel where the grid is) and activations, then bias correction."""
    layer_defaults = dict(w_observer='aciq', a_observer='aciq')
    bias_correction_default = True
