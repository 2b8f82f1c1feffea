"""A uniform fake quantizer module: a grid, an observer, and the calibrated scale / zero point."""
import torch
from torch import nn

from .functional import calc_qparams, dequantize, fake_quantize, quantize
from .scheme import QScheme


class UniformQuantizer(nn.Module):
    """Fake-quantizes a tensor on a uniform grid.

    Life cycle: ``observe`` mode feeds every tensor to the observer and passes it through
    unchanged; ``compute_qparams()`` turns the observation into ``scale`` / ``zero_point``
    (buffers, saved in checkpoints together with ``signed`` and ``calibrated``); after that
    the forward pass fake-quantizes. A quantizer loaded from a calibrated checkpoint needs no
    observation.

    Args:
        scheme: the grid (:class:`QScheme`); ``signed=None`` is decided from the data.
        num_channels: number of channels for per-channel schemes (sizes the buffers).
        observer: the range estimator used while observing (an ``mmquant.observers.Observer``);
            ``None`` for a quantizer whose parameters come from a checkpoint or are learned.

    >>> from mmquant.observers import MinMaxObserver
    >>> q = UniformQuantizer(QScheme(bits=4, signed=None), observer=MinMaxObserver())
    >>> with torch.no_grad():
    ...     _ = q.observe(torch.tensor([0.0, 1.5, 3.0]))
    >>> q.compute_qparams()
    >>> q(torch.tensor([1.1])), q.int_repr(torch.tensor([1.1])), bool(q.signed)
    (tensor([1.2000]), tensor([6], dtype=torch.int32), False)
    """

    def __init__(self, scheme: QScheme, num_channels: int = 1, observer=None):
        super().__init__()
        self.scheme = scheme
        n = num_channels if scheme.per_channel else 1
        self.register_buffer('scale', torch.ones(n))
        self.register_buffer('zero_point', torch.zeros(n))
        self.register_buffer('signed', torch.tensor(bool(scheme.signed) if scheme.signed is not None else True))
        self.register_buffer('calibrated', torch.tensor(False))
        self.register_buffer('bits_', torch.tensor(scheme.bits))
        self.observer = observer
        self.observing = False
        self.enabled = True
        self.dynamic = False   # re-derive scale from every tensor (weights during fake-quant training)

    @property
    def bits(self) -> int:
        return self.scheme.bits

    def qrange(self):
        return self.scheme.qrange(bool(self.signed))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'bits_'
        if key in state_dict and int(state_dict[key]) != self.scheme.bits:
            raise ValueError(f'checkpoint holds a {int(state_dict[key])}-bit quantizer at '
                             f'{prefix[:-1]!r} but the model is configured for {self.scheme.bits} bits')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is None:
            raise RuntimeError('this quantizer has no observer to calibrate with')
        self.observer.update(x)
        return x

    def compute_qparams(self):
        """Turn what the observer saw into ``scale`` / ``zero_point``; mark calibrated."""
        if self.observer is None or not self.observer.seen:
            raise RuntimeError('compute_qparams() before the observer saw any data')
        signed = self.scheme.signed
        if signed is None:
            signed = bool(self.observer.min_val.min() < 0)
        lo, hi = self.observer.compute_range(self.scheme, signed)
        scale, zp = calc_qparams(lo.reshape(-1), hi.reshape(-1), self.scheme, signed)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero_point.copy_(zp.expand_as(self.zero_point))
        self.signed.fill_(signed)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def fit(self, x: torch.Tensor):
        """Set the parameters from ``x`` alone (a weight tensor): observe it afresh and compute."""
        if self.observer is None:
            raise RuntimeError('this quantizer has no observer to calibrate with')
        self.observer.reset()
        self.observer.update(x.detach())
        self.compute_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        if self.dynamic and self.enabled:
            self.fit(x)
        if not self.enabled or not bool(self.calibrated):
            return x
        qmin, qmax = self.qrange()
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax, self.scheme.ch_axis)

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32), for export."""
        qmin, qmax = self.qrange()
        return quantize(x, self.scale, self.zero_point, qmin, qmax, self.scheme.ch_axis)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.scale, self.zero_point, self.scheme.ch_axis)

    def extra_repr(self):
        s = self.scheme
        sign = {True: 'signed', False: 'unsigned', None: 'auto-signed'}[s.signed]
        return (f'bits={s.bits}, {"symmetric" if s.symmetric else "affine"}, {sign}, '
                f'{"per-channel" if s.per_channel else "per-tensor"}, '
                f'observer={getattr(self.observer, "name", None)}, calibrated={bool(self.calibrated)}')
