"""``QuantCalibrationHook``: calibrate a ``QuantizedModel`` on training batches before training.

With ``model = dict(type='QuantizedModel', ...)`` and this hook, the unchanged Runner does
fake-quant training (straight-through estimator) from a float ``load_from`` checkpoint:

    custom_hooks = [dict(type='QuantCalibrationHook', num_batches=8)]

Activation ranges come from that calibration (or the resumed checkpoint) and stay fixed; weight
ranges follow the weights: each forward re-derives the weight scale from the current weights,
and the scales written into every checkpoint are those of the weights saved with it.
"""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..calibrate import all_calibrated, calibrate, calibrate_weights
from ..convert import quant_layers
from .ptq_loop import tensor_forward, unwrap


@HOOKS.register_module()
class QuantCalibrationHook(Hook):
    priority = 'VERY_HIGH'

    def __init__(self, num_batches: int = 8):
        if num_batches < 1:
            raise ValueError(f'num_batches={num_batches} must be >= 1')
        self.num_batches = num_batches

    def before_train(self, runner):
        model = unwrap(runner.model)
        layers = quant_layers(model)
        if not layers:
            raise ValueError('QuantCalibrationHook needs a quantized model: use '
                             "model = dict(type='QuantizedModel', architecture=..., qconfig=...)")
        for _, layer in layers:
            layer.weight_quantizer.dynamic = True
        if all_calibrated(model):
            return
        batches = []
        for i, data in enumerate(runner.train_dataloader):
            if i >= self.num_batches:
                break
            batches.append(data)
        calibrate(model, batches, forward_fn=tensor_forward)
        runner.logger.info(f'mmquant: calibrated {len(quant_layers(model))} layers on '
                           f'{len(batches)} training batches before training')

    def before_save_checkpoint(self, runner, checkpoint):
        """The optimizer stepped after the last forward: refresh the weight scales to match the
        weights being saved."""
        model = unwrap(runner.model)
        calibrate_weights(model)
        state = checkpoint['state_dict']
        for name, layer in quant_layers(model):
            for key, value in layer.weight_quantizer.state_dict().items():
                state[f'{name}.weight_quantizer.{key}'] = value.detach().cpu()
