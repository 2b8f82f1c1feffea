"""Observers watch tensors during calibration and propose a range ``(min, max)`` for a grid."""
import torch

from ..quantizers.scheme import QScheme


class Observer:
    """Base class. ``update`` sees each calibration tensor; ``compute_range`` returns the range.

    Observers are plain objects, not modules: what survives calibration is the scale and zero
    point that the quantizer stores in its buffers (and so in checkpoints).

    Every observer also tracks the exact running min / max (per tensor or per channel) because
    the quantizer needs the sign of the data to choose a signed or unsigned grid.
    """
    name = 'base'

    def __init__(self, per_channel: bool = False, ch_axis: int = 0):
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.reset()

    def reset(self):
        self.min_val = None
        self.max_val = None

    @property
    def seen(self) -> bool:
        return self.min_val is not None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """``[C, N]`` view for per-channel observers, ``[N]`` for per-tensor ones."""
        x = x.detach().float()
        if self.per_channel:
            return x.transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
        return x.reshape(-1)

    def update(self, x: torch.Tensor):
        flat = self._flat(x)
        if flat.numel() == 0:
            return
        lo, hi = (flat.amin(-1), flat.amax(-1)) if self.per_channel else (flat.min(), flat.max())
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self._update(flat)

    def _update(self, flat: torch.Tensor):
        """Hook for subclasses that keep more than min / max."""

    def compute_range(self, scheme: QScheme, signed: bool):
        """Return ``(min_val, max_val)`` tensors (shape ``[C]`` or ``[]``) for this grid."""
        raise NotImplementedError
