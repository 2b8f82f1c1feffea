import torch

from .base import Observer


class MinMaxObserver(Observer):
    """The observed extremes (TF-Lite style).

    Args:
        momentum: ``None`` keeps the global min / max over all batches; a value in (0, 1) keeps an
            exponential moving average of each batch's extremes instead (used during QAT).
    """
    name = 'minmax'

    def __init__(self, per_channel=False, ch_axis=0, momentum=None):
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f'momentum={momentum!r} must be None or in (0, 1)')
        self.momentum = momentum
        super().__init__(per_channel, ch_axis)

    def reset(self):
        super().reset()
        self.ema = None

    def _update(self, flat):
        if self.momentum is None:
            return
        lo, hi = (flat.amin(-1), flat.amax(-1)) if self.per_channel else (flat.min(), flat.max())
        if self.ema is None:
            self.ema = (lo, hi)
        else:
            m = self.momentum
            self.ema = ((1 - m) * self.ema[0] + m * lo, (1 - m) * self.ema[1] + m * hi)

    def compute_range(self, scheme, signed):
        if self.momentum is not None:
            return self.ema
        return self.min_val, self.max_val
