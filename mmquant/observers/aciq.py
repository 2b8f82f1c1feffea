"""ACIQ: analytical clipping for integer quantization (Banner, Nahshan & Soudry, NeurIPS 2019).

The data is fitted with a Laplace (or Gaussian) density, and the clip ``alpha`` is the one that
minimises the expected squared error of a uniform grid of ``n`` steps on ``[mu - alpha, mu + alpha]``
under that density (rounding noise ``Delta^2 / 12`` with ``Delta = 2 alpha / n``):

    Laplace(mu, b):   E(alpha) = 2 b^2 exp(-alpha / b) + alpha^2 / (3 n^2)
    Gauss(mu, sigma): E(alpha) = (alpha^2 + sigma^2) (1 - erf(alpha / (sqrt 2 sigma)))
                                 - sqrt(2 / pi) alpha sigma exp(-alpha^2 / (2 sigma^2)) + alpha^2 / (3 n^2)

Both scale with the fitted width, so ``alpha = c(n) * b``. The paper takes ``n = 2^M`` for ``M``
bits (``c = 2.83, 3.89, 5.03`` at 2, 3, 4 bits for Laplace; ``1.71, 2.15, 2.55`` for Gauss); we
take the steps the grid really has: ``2 qmax`` for a symmetric signed grid (``2^M - 2``),
``2^M - 1`` for an affine one. Data on one side of its minimum (post-ReLU activations) is fitted
by the positive half of the density (exponential / half-normal) and its grid has ``n`` steps on
``[lo, lo + alpha]``: that is the two-sided problem with ``2 n`` steps.
"""
import math
from functools import lru_cache

import torch

from .histogram import DistributionObserver

DISTRIBUTIONS = ('laplace', 'gauss', 'auto')


def _clip_error(t: float, dist: str) -> float:
    """Expected clipping error of a unit-width density at clip ``t`` (both tails)."""
    if dist == 'laplace':
        return 2.0 * math.exp(-t)
    return (t * t + 1.0) * math.erfc(t / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * t * math.exp(-t * t / 2.0)


@lru_cache(maxsize=None)
def optimal_clip(steps: int, dist: str = 'laplace') -> float:
    """``c(n)``: the clip in units of the fitted width (Laplace ``b``, Gauss ``sigma``) that
    minimises the expected error of a two-sided grid of ``steps`` steps. Golden-section search on
    a bracket found by a coarse scan (the error is unimodal in the clip).

    >>> round(optimal_clip(2 ** 2), 2), round(optimal_clip(2 ** 4, 'gauss'), 2)   # the paper's M = 2, 4
    (2.83, 2.56)
    """
    if dist not in ('laplace', 'gauss'):
        raise ValueError(f'unknown ACIQ distribution {dist!r}; accepted: laplace, gauss')
    noise = 1.0 / (3.0 * steps * steps)

    def err(t):
        return _clip_error(t, dist) + t * t * noise

    grid = [0.05 * k for k in range(1, 1001)]                    # 0.05 .. 50
    k = min(range(len(grid)), key=lambda i: err(grid[i]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(80):
        if err(a) < err(b):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
    return (lo + hi) / 2.0


def grid_steps(scheme, signed: bool) -> int:
    """Steps of the two-sided problem a grid poses (module docstring)."""
    qmin, qmax = scheme.qrange(signed)
    if not signed:
        return 2 * (qmax - qmin)
    return 2 * qmax if scheme.symmetric else qmax - qmin


def _weighted_mean(x, w, mask=None):
    """Row means of ``x`` [C, N] under weights ``w`` (None: uniform) and an optional mask."""
    w = torch.ones_like(x) if w is None else w.expand_as(x)
    if mask is not None:
        w = w * mask
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-12)


def fit_width(x, w, center, dist):
    """Maximum-likelihood width of each row of ``x`` around ``center`` [C]: Laplace ``b`` =
    mean |x - center|, Gauss ``sigma`` = rms (x - center); with ``dist='auto'`` the family of the
    higher likelihood (per row). Returns ``(width, family)``, family True where Laplace."""
    d = x - center[:, None]
    b = _weighted_mean(d.abs(), w).clamp_min(1e-12)
    sigma = _weighted_mean(d * d, w).sqrt().clamp_min(1e-12)
    if dist == 'laplace':
        return b, torch.ones_like(b, dtype=torch.bool)
    if dist == 'gauss':
        return sigma, torch.zeros_like(b, dtype=torch.bool)
    # mean log-likelihoods: Laplace -(log 2b + 1), Gauss -(log(2 pi sigma^2) + 1) / 2
    laplace = (torch.log(2 * b) + 1) < 0.5 * (torch.log(2 * math.pi * sigma * sigma) + 1)
    return torch.where(laplace, b, sigma), laplace


def fit_width_one_sided(x, w, lo, dist, tol=0.0):
    """Width of the values above ``lo`` [C] (post-ReLU data: the mass at the minimum is exact on
    the grid and carries no error): exponential ``b`` = mean(x - lo), half-normal ``sigma`` =
    rms(x - lo), over the values more than ``tol`` above ``lo`` (a histogram's bin width: its first
    bin's centre holds the values at the minimum); ``auto`` picks by likelihood as :func:`fit_width`."""
    d = x - lo[:, None]
    above = (d > tol).to(x.dtype)
    b = _weighted_mean(d, w, above).clamp_min(1e-12)
    sigma = _weighted_mean(d * d, w, above).sqrt().clamp_min(1e-12)
    if dist == 'laplace':
        return b, torch.ones_like(b, dtype=torch.bool)
    if dist == 'gauss':
        return sigma, torch.zeros_like(b, dtype=torch.bool)
    # exponential -(log b + 1); half-normal -(log(pi sigma^2 / 2) + 1) / 2
    laplace = (torch.log(b) + 1) < 0.5 * (torch.log(math.pi * sigma * sigma / 2) + 1)
    return torch.where(laplace, b, sigma), laplace


class ACIQObserver(DistributionObserver):
    """Analytical clip from a Laplace / Gauss fit of the observed data (module docstring).

    Per tensor the fit uses the histogram of all calibration values; per channel a bounded sample
    of each channel (exact for weights), one clip per channel. Signed data is clipped around its
    mean (around 0 for a symmetric grid); data that never goes below its minimum on an unsigned
    grid is fitted one-sided. The clip never widens the observed range.

    Args:
        dist: 'laplace' (the paper's choice for activations), 'gauss', or 'auto' (the family
            with the higher likelihood, per channel).
    """
    name = 'aciq'

    def __init__(self, per_channel=False, ch_axis=0, dist='laplace', bins=4096):
        if dist not in DISTRIBUTIONS:
            raise ValueError(f'unknown ACIQ distribution {dist!r}; accepted: {", ".join(DISTRIBUTIONS)}')
        self.dist = dist
        super().__init__(per_channel, ch_axis, bins)

    def _data(self):
        """Values [C, N], their weights (None: one each) and the resolution of the values."""
        if self.per_channel:
            return self.stat.data.double(), None, 0.0              # [C, N]
        x, w = self.stat.centers_counts()
        return x[None], w[None], self.stat.width                    # one "channel"

    def compute_range(self, scheme, signed):
        x, w, tol = self._data()
        lo0 = self.min_val.reshape(-1).double()
        hi0 = self.max_val.reshape(-1).double()
        x = x.to(lo0.device)
        w = None if w is None else w.to(lo0.device)
        steps = grid_steps(scheme, signed)
        coef = {fam: optimal_clip(steps, fam) for fam in ('laplace', 'gauss')}
        if signed:
            center = torch.zeros_like(lo0) if scheme.symmetric else _weighted_mean(x, w)
            width, laplace = fit_width(x, w, center, self.dist)
            alpha = width * torch.where(laplace, coef['laplace'], coef['gauss'])
            lo, hi = torch.maximum(center - alpha, lo0), torch.minimum(center + alpha, hi0)
        else:
            width, laplace = fit_width_one_sided(x, w, lo0, self.dist, tol)
            alpha = width * torch.where(laplace, coef['laplace'], coef['gauss'])
            lo, hi = lo0, torch.minimum(lo0 + alpha, hi0)
        shape = self.min_val.shape
        dtype = self.min_val.dtype
        return lo.to(dtype).reshape(shape), hi.to(dtype).reshape(shape)
