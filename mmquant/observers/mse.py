import torch

from ..quantizers.functional import calc_qparams, fake_quantize
from .histogram import DistributionObserver


class MSEObserver(DistributionObserver):
    """Lp range search: shrink the observed range by ``alpha`` in ``(0, 1]`` and keep the
    ``alpha`` whose fake-quantized data is closest to the data in Lp norm (``p=2``: MSE).

    Per tensor the error is evaluated on a histogram of all calibration values (bin centres
    weighted by counts); per channel on a bounded sample of each channel, one ``alpha`` per channel.
    """
    name = 'mse'

    def __init__(self, per_channel=False, ch_axis=0, p=2.0, grid=100, bins=4096):
        if p <= 0:
            raise ValueError(f'p={p!r} must be > 0')
        self.p, self.grid = p, grid
        super().__init__(per_channel, ch_axis, bins)

    def _alphas(self):
        return torch.linspace(1.0 / self.grid, 1.0, self.grid)

    def compute_range(self, scheme, signed):
        qmin, qmax = scheme.qrange(signed)
        if self.per_channel:
            x = self.stat.data                                   # [C, N]
            weights = None
        else:
            x, weights = self.stat.centers_counts()              # [K], [K]
            x, weights = x.float()[None], weights.float()[None]  # one "channel"
        lo0 = self.min_val.reshape(-1).float()
        hi0 = self.max_val.reshape(-1).float()
        x = x.to(lo0.device)                  # the histogram lives on the CPU
        weights = None if weights is None else weights.to(lo0.device)
        best_err = torch.full_like(lo0, float('inf'))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for a in self._alphas():
            lo, hi = lo0 * a, hi0 * a
            scale, zp = calc_qparams(lo, hi, scheme, signed)
            xq = fake_quantize(x, scale, zp, qmin, qmax, ch_axis=0)
            err = (x - xq).abs().pow(self.p)
            err = (err * weights).sum(1) if weights is not None else err.mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        shape = self.min_val.shape
        return best_lo.reshape(shape), best_hi.reshape(shape)
