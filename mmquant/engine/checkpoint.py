"""Loading OpenMMLab checkpoints under torch >= 2.6 without blanket unsafe unpickling.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6 defaults to
``weights_only=True`` and refuses the few non-tensor objects that mmengine writes into every
training checkpoint: the message hub's ``HistoryBuffer``, the numpy arrays / dtypes / scalars
inside it, and its statistics functions, which pickle as ``getattr(HistoryBuffer, 'min')``.
Rather than patching ``torch.load`` to unpickle anything, we allow-list exactly those: the
classes by name, and ``builtins.getattr`` mapped to a function that only resolves
``HistoryBuffer``'s registered statistics. Any other class or attribute in a checkpoint is still
refused by torch with an error naming it.
"""
import pickle

import numpy as np
import torch


def _numpy_globals():
    core = getattr(np, '_core', None) or np.core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    names += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32',
                                          'int16', 'int8', 'uint8', 'bool')]
    return names


def history_buffer_getattr(obj, name: str):
    """``getattr`` restricted to ``HistoryBuffer``'s statistics methods."""
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and name in HistoryBuffer._statistics_methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'checkpoint asks for getattr({obj!r}, {name!r}); only '
                                 'HistoryBuffer statistics are allowed')


def allow_openmmlab_checkpoints():
    """Allow-list what mmengine / mmpretrain / mmdet checkpoints contain."""
    from mmengine.logging import HistoryBuffer
    HistoryBuffer()   # registers the default statistics methods
    torch.serialization.add_safe_globals(
        [HistoryBuffer, (history_buffer_getattr, 'builtins.getattr')] + _numpy_globals())
