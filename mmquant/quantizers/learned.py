"""The common life cycle of the quantization-aware-training quantizers (LSQ, PACT, DoReFa,
LQ-Net, binary): the same protocol as :class:`UniformQuantizer`, so ``calibrate``, the hooks and
checkpoints treat every quantizer alike.

* ``observe(x)`` records statistics (``observing`` mode, float pass-through);
* ``compute_qparams()`` initialises the method's parameters from them and sets ``calibrated``;
* a quantizer used before it was calibrated initialises itself from its first input;
* ``fit(w)`` initialises a weight quantizer from the weight unless it already is (learned
  parameters are never overwritten by a re-fit);
* ``enabled = False`` passes the input through.
"""
from typing import Optional

import torch
from torch import nn

from .functional import broadcast_param


def channel_view(x: torch.Tensor, ch_axis: Optional[int]) -> torch.Tensor:
    """``x`` as ``[channels, elements]`` (``ch_axis=None``: one row)."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1)


class TensorStats:
    """Per-channel running statistics of what a quantizer saw: mean |x|, mean x, mean x^2,
    min, max and a bounded sample of values (for methods that fit levels to data).

    ``numel_per_item``: the elements that share one parameter per item seen, i.e. per sample of
    a batch (``per_sample=True``, activations) or per channel row of the whole tensor (weights).
    """

    def __init__(self, ch_axis: Optional[int], sample_size: int = 1 << 15, per_sample: bool = False):
        self.ch_axis = ch_axis
        self.per_sample = per_sample
        self.sample_size = sample_size
        self.reset()

    def reset(self):
        self.n = 0
        self.abs_sum = self.sum = self.sq_sum = self.min = self.max = self.sample = None
        self.numel_per_item = None

    @property
    def seen(self) -> bool:
        return self.n > 0

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        v = channel_view(x.detach().float(), self.ch_axis)
        if self.n == 0:
            self.abs_sum = v.abs().sum(1)
            self.sum, self.sq_sum = v.sum(1), (v * v).sum(1)
            self.min, self.max = v.min(1).values, v.max(1).values
        else:
            self.abs_sum += v.abs().sum(1)
            self.sum += v.sum(1)
            self.sq_sum += (v * v).sum(1)
            self.min, self.max = torch.minimum(self.min, v.min(1).values), torch.maximum(self.max, v.max(1).values)
        self.n += v.shape[1]
        if self.per_sample and self.ch_axis is None and x.dim() > 1:
            self.numel_per_item = x[0].numel()
        else:
            self.numel_per_item = x.numel() // max(v.shape[0], 1)
        step = max(1, v.shape[1] // self.sample_size)
        part = v[:, ::step][:, :self.sample_size]
        self.sample = part if self.sample is None else torch.cat([self.sample, part], 1)[:, -4 * self.sample_size:]

    def mean_abs(self):
        return self.abs_sum / self.n

    def std(self):
        mean = self.sum / self.n
        return (self.sq_sum / self.n - mean * mean).clamp_min(0).sqrt()


class QATQuantizer(nn.Module):
    """Base of the trained quantizers.

    Args:
        bits: word length (1 for the binary quantizers).
        kind: ``'weight'`` or ``'act'``.
        num_channels, ch_axis: per-channel parameters along ``ch_axis`` when ``per_channel``.
        per_channel: one set of parameters per output channel (weights only).
        signed: activation grids: ``None`` decides from calibration (unsigned after a ReLU).
    """
    min_bits, max_bits = 2, 16
    learned = True

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed: Optional[bool] = None):
        super().__init__()
        if kind not in ('weight', 'act'):
            raise ValueError(f"kind={kind!r}; accepted: 'weight', 'act'")
        if isinstance(bits, bool) or not isinstance(bits, int) or not self.min_bits <= bits <= self.max_bits:
            raise ValueError(f'{type(self).__name__} takes {self.min_bits}..{self.max_bits} bits, got {bits!r}')
        self.kind = kind
        self._bits = bits
        self.per_channel = bool(per_channel) and kind == 'weight'
        self.ch_axis = ch_axis
        self.num_channels = num_channels if self.per_channel else 1
        if signed is None and kind == 'weight':
            signed = True
        self.fixed_signed = signed
        self.register_buffer('signed', torch.tensor(True if signed is None else bool(signed)))
        self.register_buffer('calibrated', torch.tensor(False))
        self.register_buffer('bits_', torch.tensor(bits))
        self.observer = TensorStats(ch_axis if self.per_channel else None, per_sample=kind == 'act')
        self.observing = False
        self.enabled = True
        self.frozen = False     # no statistic-driven updates (LQ-Net's basis refit) once frozen

    @property
    def bits(self) -> int:
        return self._bits

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'bits_'
        if key in state_dict and int(state_dict[key]) != self._bits:
            raise ValueError(f'checkpoint holds a {int(state_dict[key])}-bit quantizer at '
                             f'{prefix[:-1]!r} but the model is configured for {self._bits} bits')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.update(x)
        return x

    @torch.no_grad()
    def compute_qparams(self):
        if not self.observer.seen:
            raise RuntimeError('compute_qparams() before the quantizer saw any data')
        if self.fixed_signed is None:
            self.signed.fill_(bool(self.observer.min.min() < 0))
        self.init_params(self.observer)
        self.calibrated.fill_(True)

    def init_params(self, stats: TensorStats):
        """Set the method's parameters from ``stats`` (override)."""

    @torch.no_grad()
    def fit(self, x: torch.Tensor):
        if not bool(self.calibrated):
            self.observer.reset()
            self.observer.update(x)
            self.compute_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        if not self.enabled:
            return x
        if not bool(self.calibrated):
            self.fit(x)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def param_view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel (or per-tensor) parameter shaped to broadcast against ``x``."""
        return broadcast_param(p, x, self.ch_axis)

    def extra_repr(self):
        granularity = 'per-channel' if self.per_channel else 'per-tensor'
        return f'bits={self._bits}, {self.kind}, {granularity}, calibrated={bool(self.calibrated)}'
