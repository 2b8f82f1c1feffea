"""A growing fixed-width histogram and a bounded per-channel sample: the statistics that the
percentile, MSE and KL observers search over."""
import torch

from .base import Observer


class Histogram:
    """Counts of values in bins ``[k * w, (k + 1) * w)`` for integers ``k``.

    The bin width ``w`` is fixed by the first batch (just over ``max|x| / bins``, so the first
    batch fills exactly ``bins`` bins per sign) and the index range grows
    with the data; when more than ``max_bins`` are needed, neighbouring bins are merged (width
    doubles). Because bins are aligned on 0, folding to ``|x|`` is exact.
    """

    def __init__(self, bins: int = 2048, max_bins: int = 65536):
        self.bins, self.max_bins = bins, max_bins
        self.width = None
        self.lo = 0          # index of the first bin
        self.counts = None   # float64 counts

    def add(self, x: torch.Tensor):
        x = x.detach().double().reshape(-1)
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        if self.width is None:
            amax = float(x.abs().max())
            self.width = (amax if amax > 0 else 1.0) * (1 + 1e-6) / self.bins
            self.counts = torch.zeros(0, dtype=torch.float64)
        idx = torch.floor(x / self.width).long()
        lo, hi = int(idx.min()), int(idx.max())
        self._grow(lo, hi)
        while self.counts.numel() > self.max_bins:
            self._merge()
            idx = torch.floor(x / self.width).long()
        # counts live on the CPU whatever device the activations are on
        self.counts += torch.bincount(idx - self.lo, minlength=self.counts.numel()).double().cpu()

    def _grow(self, lo, hi):
        if self.counts.numel() == 0:
            self.lo, self.counts = lo, torch.zeros(hi - lo + 1, dtype=torch.float64)
            return
        new_lo, new_hi = min(lo, self.lo), max(hi, self.lo + self.counts.numel() - 1)
        grown = torch.zeros(new_hi - new_lo + 1, dtype=torch.float64)
        grown[self.lo - new_lo:self.lo - new_lo + self.counts.numel()] = self.counts
        self.lo, self.counts = new_lo, grown

    def _merge(self):
        """Double the bin width: bin k of the new histogram holds old bins 2k and 2k+1."""
        idx = torch.arange(self.lo, self.lo + self.counts.numel())
        new_idx = torch.div(idx, 2, rounding_mode='floor')
        new_lo = int(new_idx[0])
        merged = torch.zeros(int(new_idx[-1]) - new_lo + 1, dtype=torch.float64)
        merged.index_add_(0, new_idx - new_lo, self.counts)
        self.lo, self.counts, self.width = new_lo, merged, self.width * 2

    def centers_counts(self):
        """Bin centres and counts of the signed histogram."""
        k = torch.arange(self.lo, self.lo + self.counts.numel(), dtype=torch.float64)
        return (k + 0.5) * self.width, self.counts

    def folded(self):
        """Counts of ``|x|`` in bins ``[k w, (k+1) w)``, ``k >= 0``."""
        k = torch.arange(self.lo, self.lo + self.counts.numel())
        k_abs = torch.where(k >= 0, k, -k - 1)
        out = torch.zeros(int(k_abs.max()) + 1, dtype=torch.float64)
        out.index_add_(0, k_abs, self.counts)
        return out


class ChannelSample:
    """At most ``max_per_channel`` values per channel, taken by even striding: exact for weights
    (seen once) and a bounded sample for per-channel activations."""

    def __init__(self, max_per_channel: int = 1 << 16):
        self.max_per_channel = max_per_channel
        self.data = None

    def add(self, flat: torch.Tensor):
        data = flat if self.data is None else torch.cat([self.data, flat], dim=1)
        if data.shape[1] > self.max_per_channel:
            step = data.shape[1] / self.max_per_channel
            keep = (torch.arange(self.max_per_channel) * step).long()
            data = data[:, keep]
        self.data = data


class DistributionObserver(Observer):
    """An observer that keeps the data's distribution: a histogram of all values per tensor, a
    bounded sample of each channel per channel."""

    def __init__(self, per_channel=False, ch_axis=0, bins=2048):
        self.bins = bins
        super().__init__(per_channel, ch_axis)

    def reset(self):
        super().reset()
        self.stat = ChannelSample() if self.per_channel else Histogram(self.bins)

    def _update(self, flat):
        self.stat.add(flat)
