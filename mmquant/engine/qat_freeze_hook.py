"""``QATFreezeHook``: late-training freezes for quantization-aware training.

    custom_hooks = [dict(type='QATFreezeHook', freeze_bn_epoch=3, freeze_quant_epoch=4)]

From epoch ``freeze_bn_epoch`` (0-based) on, every BatchNorm uses and keeps its running
statistics (eval mode inside training; its affine parameters still train), the usual last phase
of QAT. From ``freeze_quant_epoch`` on, the quantizers stop adapting: learned steps / clip levels
/ scales stop receiving gradients and LQ-Net's basis refit stops.
"""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from ..convert import all_quantizers
from .ptq_loop import unwrap


@HOOKS.register_module()
class QATFreezeHook(Hook):

    def __init__(self, freeze_bn_epoch: Optional[int] = None, freeze_quant_epoch: Optional[int] = None):
        for name, v in (('freeze_bn_epoch', freeze_bn_epoch), ('freeze_quant_epoch', freeze_quant_epoch)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f'{name}={v!r} must be a non-negative integer epoch or None')
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_quant_epoch = freeze_quant_epoch

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # every iteration: the train loop puts the whole model in training mode after
        # before_train_epoch, and validation in between switches modes again
        if self.freeze_bn_epoch is not None and runner.epoch >= self.freeze_bn_epoch:
            for m in unwrap(runner.model).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def before_train_epoch(self, runner):
        model = unwrap(runner.model)
        if self.freeze_quant_epoch is not None and runner.epoch >= self.freeze_quant_epoch:
            for q in all_quantizers(model):
                q.frozen = True
                for p in q.parameters():
                    p.requires_grad_(False)
