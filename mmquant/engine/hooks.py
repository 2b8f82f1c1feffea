"""``QuantCalibrationHook``: calibrate a ``QuantizedModel`` on training batches before training.

With ``model = dict(type='QuantizedModel', ...)`` and this hook, the unchanged Runner does
quantization-aware training from a float ``load_from`` checkpoint:

    custom_hooks = [dict(type='QuantCalibrationHook', num_batches=8)]

Every quantizer is initialised from those batches (uniform grids: their ranges; LSQ: its step;
PACT: its clip level; LQ-Net: its basis), unless the loaded or resumed checkpoint already holds
them. Under DDP, rank 0's initialisation is broadcast so all ranks start identical. Uniform
weight grids then follow the weights (re-derived every forward; the scales written into a
checkpoint are those of the weights saved with it); trained quantizers keep what they learn.
A QAT model's checkpoints record its method in ``meta['mmquant_qat']``, so ``tools/test.py``
rebuilds it from any config of the same architecture.
"""
from mmengine.dist import broadcast, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..calibrate import all_calibrated, calibrate, calibrate_weights
from ..convert import all_quantizers, quant_layers
from ..quantizers import UniformQuantizer
from .distill import distilled
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
            if isinstance(layer.weight_quantizer, UniformQuantizer):
                layer.weight_quantizer.dynamic = True
        report = getattr(model, 'mmquant_report', None)
        if report is not None:
            qat = getattr(model, 'mmquant_qat', None)
            what = f'{qat["method"]} {qat["bits"]}' if qat else 'fake-quant'
            fused = f'; {len(report.fused)} convs fold their BatchNorm' if report.fused else ''
            if getattr(report, 'folded_clip', None):
                fused += (f'; {len(report.folded_clip)} layers quantize their weights in units of their readers\' '
                          'PACT clipping level')
            runner.logger.info(f'mmquant: {what}: {len(report.quantized)} layers quantized, '
                               f'{len(report.kept_float)} kept float{fused}; first {report.first_layers}, '
                               f'last {report.last_layers}')
        kd = distilled(model)
        if kd is not None:
            runner.logger.info(f'mmquant: knowledge distillation from the float model {kd.checkpoint}: loss_kd '
                               f'weight {kd.weight}, temperature {kd.temperature}')
        if all_calibrated(model):
            return
        batches = []
        for i, data in enumerate(runner.train_dataloader):
            if i >= self.num_batches:
                break
            batches.append(data)
        calibrate(model, batches, forward_fn=tensor_forward)
        if get_world_size() > 1:
            for q in all_quantizers(model):
                for t in list(q.parameters()) + list(q.buffers()):
                    broadcast(t.data, 0)
        runner.logger.info(f'mmquant: calibrated {len(layers)} layers on {len(batches)} training batches '
                           'before training')

    def before_save_checkpoint(self, runner, checkpoint):
        """The optimizer stepped after the last forward: refresh the uniform weight scales to match
        the weights being saved; record a QAT model's method."""
        model = unwrap(runner.model)
        calibrate_weights(model)
        state = checkpoint['state_dict']
        for name, layer in quant_layers(model):
            if isinstance(layer.weight_quantizer, UniformQuantizer):
                for key, value in layer.weight_quantizer.state_dict().items():
                    state[f'{name}.weight_quantizer.{key}'] = value.detach().cpu()
        qat = getattr(model, 'mmquant_qat', None)
        if qat is not None:
            checkpoint.setdefault('meta', {})['mmquant_qat'] = dict(qat)


__all__ = ['QuantCalibrationHook']
