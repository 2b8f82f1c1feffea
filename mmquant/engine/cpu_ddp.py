"""Data-parallel training on CPUs through mmengine's pytorch launcher.

mmengine 0.10.7's launcher assumes GPUs: ``init_dist`` calls ``torch.cuda.set_device`` and the
Runner hands DDP ``device_ids=[LOCAL_RANK]``, both errors without CUDA. On a machine without CUDA
``setup_cpu_distributed(cfg)`` (called by tools/train.py and tools/test.py) starts the gloo process
group itself, which the Runner then finds initialised, and wraps the model with
``CPUDistributedDataParallel``:

    python -m torch.distributed.run --nproc_per_node 2 tools/train.py CONFIG --launcher pytorch
"""
import os

import torch
import torch.distributed as dist
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for a module on the CPU (DDP then takes no device ids)."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module=module, device_ids=None, **kwargs)


def setup_cpu_distributed(cfg):
    """Prepare a launched run for CPUs when CUDA is absent; no-op otherwise."""
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise ValueError(f'launcher {launcher!r} without CUDA: only the pytorch launcher (torchrun) '
                         'is supported on CPUs')
    if not dist.is_initialized():
        dist.init_process_group('gloo', rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.update(type='CPUDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
