"""OpenMMLab glue: registered entry points found through ``custom_imports=['mmquant']``."""
from importlib.util import find_spec

from .checkpoint import allow_openmmlab_checkpoints
from .cpu_ddp import CPUDistributedDataParallel, setup_cpu_distributed
from .distill import DistilledLoss, attach_distillation
from .hooks import QuantCalibrationHook
from .qat_freeze_hook import QATFreezeHook
from .model import build_quantized_model
from .transforms import RepeatChannels
from .ptq_loop import PTQLoop, task_loss, tensor_forward

allow_openmmlab_checkpoints()

if find_spec('mmdet') is not None:
    from .. import det  # noqa: F401  (registers BlendMask in mmdet)

__all__ = ['CPUDistributedDataParallel', 'setup_cpu_distributed', 'PTQLoop', 'RepeatChannels', 'QuantCalibrationHook', 'QATFreezeHook', 'build_quantized_model', 'tensor_forward', 'task_loss',
           'allow_openmmlab_checkpoints', 'DistilledLoss', 'attach_distillation']
