"""Loading OpenMMLab checkpoints under torch >= 2.6 without blanket unsafe unpickling.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6 defaults to
``weights_only=True`` and refuses the few non-tensor classes that mmengine writes into every
checkpoint (the message hub's ``HistoryBuffer`` and the numpy arrays / dtypes / scalars inside
it). Rather than patching ``torch.load`` to unpickle anything, we add exactly those classes to
torch's allow-list; any other global in a checkpoint is still refused by torch with its own
error naming the class.
"""
import numpy as np
import torch


def _numpy_globals():
    core = getattr(np, '_core', None) or np.core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    names += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                          'int16', 'int8', 'uint8', 'bool')]
    return names


def allow_openmmlab_checkpoints():
    """Allow-list the classes mmengine / mmpretrain / mmdet checkpoints contain."""
    from mmengine.logging import HistoryBuffer
    torch.serialization.add_safe_globals([HistoryBuffer] + _numpy_globals())
