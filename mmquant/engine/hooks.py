"""``QuantCalibrationHook``: calibrate a ``QuantizedModel`` on training batches before training.

With ``model = dict(type='QuantizedModel', ...)`` and this hook, the unchanged Runner does
fake-quant training (straight-through estimator) from a float ``load_from`` checkpoint:

    custom_hooks = [dict(type='QuantCalibrationHook', num_batches=8)]

It does nothing when every quantizer is already calibrated (resumed or quantized checkpoints).
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..calibrate import calibrate
from ..convert import quant_layers
from .ptq_loop import PTQLoop, tensor_forward


@HOOKS.register_module()
class QuantCalibrationHook(Hook):
    priority = 'VERY_HIGH'

    def __init__(self, num_batches: int = 8):
        if num_batches < 1:
            raise ValueError(f'num_batches={num_batches} must be >= 1')
        self.num_batches = num_batches

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not quant_layers(model):
            raise ValueError('QuantCalibrationHook needs a quantized model: use '
                             "model = dict(type='QuantizedModel', architecture=..., qconfig=...)")
        if PTQLoop._all_calibrated(model):
            return
        batches = []
        for i, data in enumerate(runner.train_dataloader):
            if i >= self.num_batches:
                break
            batches.append(data)
        calibrate(model, batches, forward_fn=tensor_forward)
        runner.logger.info(f'mmquant: calibrated {len(quant_layers(model))} layers on '
                           f'{len(batches)} training batches before training')
