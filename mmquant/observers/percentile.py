import torch

from .histogram import DistributionObserver


def _hist_quantile(lower_edges, counts, width, q):
    """The ``q`` quantile of histogram data, interpolated linearly inside its bin."""
    cdf = torch.cumsum(counts, 0) / counts.sum()
    i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype)).clamp(max=len(cdf) - 1))
    below = float(cdf[i - 1]) if i > 0 else 0.0
    frac = (q - below) / max(float(cdf[i]) - below, 1e-300)
    return float(lower_edges[i]) + min(max(frac, 0.0), 1.0) * width


class PercentileObserver(DistributionObserver):
    """Clip at a percentile of the data instead of its extremes.

    Per tensor the percentile is read from a histogram of all calibration values; per channel
    from a bounded sample of each channel. For symmetric grids it is the percentile of ``|x|``,
    for affine grids the lower and upper tails are cut separately (``100 - p`` and ``p``).
    """
    name = 'percentile'

    def __init__(self, per_channel=False, ch_axis=0, percentile=99.99, bins=16384):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f'percentile={percentile!r} must be in (50, 100]')
        self.percentile = percentile
        super().__init__(per_channel, ch_axis, bins)

    def compute_range(self, scheme, signed):
        q = self.percentile / 100.0
        if self.per_channel:
            d = self.stat.data
            if scheme.symmetric:
                hi = torch.quantile(d.abs(), q, dim=1)
                return (-hi if signed else torch.zeros_like(hi)), hi
            return torch.quantile(d, 1 - q, dim=1), torch.quantile(d, q, dim=1)
        if scheme.symmetric:
            folded, w = self.stat.folded(), self.stat.width
            edges = torch.arange(len(folded), dtype=torch.float64) * w
            hi = torch.as_tensor(_hist_quantile(edges, folded, w, q))
            hi = torch.minimum(hi, torch.maximum(-self.min_val, self.max_val))
            return (-hi if signed else torch.zeros_like(hi)), hi
        centers, counts = self.stat.centers_counts()
        w = self.stat.width
        edges = centers - w / 2
        lo = torch.maximum(torch.as_tensor(_hist_quantile(edges, counts, w, 1 - q)), self.min_val)
        hi = torch.minimum(torch.as_tensor(_hist_quantile(edges, counts, w, q)), self.max_val)
        return lo, hi
