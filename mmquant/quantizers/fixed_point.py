"""F8Net's fixed-point quantizer (Jin et al., "F8Net: Fixed-Point 8-bit Only Multiplication for
Network Quantization", ICLR 2022), torch only.

A ``b``-bit fixed-point number with fractional length ``FL`` is an integer code ``q`` read as
``q 2^-FL``: the grid has scale ``2^-FL``, zero point 0 and the codes ``[-2^(b-1), 2^(b-1)-1]``
(signed) or ``[0, 2^b-1]`` (unsigned). Products of such numbers only add fractional lengths, so
a network whose every tensor is on such a grid rescales between layers by shifts: the only
multiplications left are the 8-bit ones of the convolutions.

The FL of every tensor comes from its data:

* ``fl_search='std'`` (the paper's formula): ``FL = floor(log2(C / sigma))``, ``sigma`` the
  standard deviation and ``C`` the constant of the word length and signedness
  (:data:`~mmquant.quantizers.fl_constants.FL_CONSTANTS`: 40 signed, 70 unsigned at 8 bits);
* ``fl_search='mse'``: the integer FL of least squared error (the authors' grid search).

Either is clamped to the FL window (``fl_range``). Weights get their FL from the tensor (per
tensor, or per output channel) at every training pass, and at the first evaluation pass after
training, loading or construction (then it is kept: evaluation does not change weights).
Activations get it, during training, from each batch, and keep a moving average of the
statistic (``sigma``, or the searched FL) with BatchNorm's ``momentum`` semantics (``None``:
cumulative average); evaluation uses the averaged FL, frozen. ``frozen`` (QATFreezeHook) stops
all FL updates.

``clip='pact'`` is the paper's PACT reformulated as fixed point, for activations: a learned
clipping level ``alpha`` and ``eta = 2^FL alpha / qmax`` (``qmax`` = ``2^b-1``, ``2^(b-1)-1``
signed). The layer divides its input by ``eta`` before this quantizer and multiplies the weight
by ``eta`` before its weight quantizer (``conv(Q(x / eta), Q(eta w))``): the codes are PACT's,
``round(clip(x, 0, alpha) qmax / alpha)``, and ``alpha`` lives in the integer weights (see
:mod:`mmquant.nn.qlayers` and :mod:`mmquant.nn.conv_bn`). Its FL comes from the normalized input
``x / eta`` as above.

Folding PACT's clipping level into the layer that produces the input (``fold_unit``, F8Net's
"absorbed into the folded weights"): the reader's ``x / eta`` is ``x qmax / alpha`` up to a
power of two, so the producing layer's weights are quantized in units of ``u = alpha / qmax``,
``Q(w / u) u``: its grid is ``u 2^-FL``. The network computes the same function of its
parameters up to that rounding, and in integers the product of the producer's operand scales
divided by the reader's ``eta`` is a power of two: the requantisation between them is a shift
(without the fold it needs a multiplier, ``qmax / alpha`` not being a power of two).
"""
import math
from typing import Optional, Sequence

import torch

from .fl_constants import FL_CONSTANTS
from .functional import fake_quantize
from .learned import QATQuantizer, TensorStats, channel_view

FL_SEARCHES = ('std', 'mse')
CLIPS = (None, 'pact')


def fl_window(bits: int, signed: bool, normalized: bool):
    """The default FL window: the word, ``[0, b-1]`` signed / ``[0, b]`` unsigned, for PACT's
    normalized inputs (the paper's); ``[-b, 3b]`` for tensors in their own units: BN-folded
    weights have standard deviations down to 1e-3 (``2^-7`` steps would round them to 0), and
    under PACT the weight is scaled by ``eta``, as small as ``alpha / 2^b``."""
    if normalized:
        return 0, bits - int(signed)
    return -bits, 3 * bits


def fixed_point_quantize(x: torch.Tensor, frac_len: torch.Tensor, qmin: int, qmax: int,
                         ch_axis: int = 0) -> torch.Tensor:
    """``clamp(round(x 2^FL), qmin, qmax) 2^-FL`` (per channel along ``ch_axis`` when ``frac_len``
    has several entries), with the straight-through gradient: 1 where the rounded code lies strictly
    inside the word, 0 on its end codes and beyond (as the authors' code: a code on the bound may
    have been clamped).

    >>> fixed_point_quantize(torch.tensor([0.3, 1.3, -9.0]), torch.tensor([2]), -8, 7)
    tensor([ 0.2500,  1.2500, -2.0000])
    """
    scale = torch.pow(2.0, -frac_len.to(x.dtype))
    return fake_quantize(x, scale, torch.zeros_like(scale), qmin, qmax, ch_axis)


def fl_from_std(std: torch.Tensor, bits: int, signed: bool, lo: int, hi: int) -> torch.Tensor:
    """The paper's formula ``floor(log2(C / std))`` clamped to ``[lo, hi]`` (``hi`` where the
    standard deviation is 0: anything represents a constant zero).

    >>> fl_from_std(torch.tensor([0.01, 1.0, 0.0]), 8, True, -8, 24).tolist()   # C = 40
    [11, 5, 24]
    """
    c = FL_CONSTANTS[bits][0 if signed else 1]
    std = std.double()
    fl = torch.floor(torch.log2(c / std.clamp_min(1e-30)))
    fl = torch.where(std > 0, fl, torch.full_like(fl, hi))
    return fl.clamp(lo, hi).long()


@torch.no_grad()
def fl_from_mse(rows: torch.Tensor, qmin: int, qmax: int, lo: int, hi: int) -> torch.Tensor:
    """Per row of ``rows`` (``[channels, values]``) the FL in ``[lo, hi]`` of least mean squared
    error, ties going to the larger FL; the same answer as trying every FL of the window, faster:

    * FLs below ``nc``, the largest one at which no value is clamped, are never better: without
      clamping the grid of ``FL + 1`` contains the grid of ``FL``, so every value is at least as
      close to it. The search starts at ``nc``.
    * The clamping error of a row's extreme values is a lower bound of its error that grows with
      the FL; once it exceeds the best error found, no larger FL can win and the row is done.
    """
    rows = rows.float()
    n = rows.shape[1]
    dev = rows.device
    fls = torch.arange(lo, hi + 1, dtype=torch.float64, device=dev)
    top_all = rows.max(1).values.double().reshape(-1, 1) * torch.pow(2.0, fls)
    bottom_all = rows.min(1).values.double().reshape(-1, 1) * torch.pow(2.0, fls)
    inside = (torch.round(top_all) <= qmax) & (torch.round(bottom_all) >= qmin)          # [rows, FLs]
    # inside is True up to nc, then False; no FL without clamping: lo
    nc = torch.where(inside.any(1), lo + inside.long().sum(1) - 1, torch.full((rows.shape[0], ), lo, device=dev))
    k = min(n, 1024)
    top = rows.topk(k, dim=1).values.double()
    bottom = rows.topk(k, dim=1, largest=False).values.double()
    best_err = torch.full((rows.shape[0], ), math.inf, dtype=torch.float64, device=dev)
    best = nc.clone()
    live = torch.ones(rows.shape[0], dtype=torch.bool, device=dev)
    for fl in range(int(nc.min()), hi + 1):
        s = 2.0 ** fl
        bound = ((top - qmax / s).clamp_min(0) ** 2).sum(1) + ((qmin / s - bottom).clamp_min(0) ** 2).sum(1)
        live &= ~(bound / n > best_err)
        idx = torch.nonzero(live & (fl >= nc)).flatten()
        if not bool(live.any()):
            break
        if idx.numel() == 0:
            continue
        r = rows[idx]
        err = ((torch.clamp(torch.round(r * s), qmin, qmax) / s - r) ** 2).sum(1, dtype=torch.float64) / n
        take = err <= best_err[idx]
        best_err[idx] = torch.where(take, err, best_err[idx])
        best[idx] = torch.where(take, torch.full_like(best[idx], fl), best[idx])
    return best


class FixedPointQuantizer(QATQuantizer):
    """Fixed-point fake quantization with data-driven fractional lengths (see the module doc).

    Args:
        bits: word length, 2..8.
        kind: ``'weight'`` (FL from the tensor at every pass) or ``'act'`` (moving average).
        num_channels, ch_axis, per_channel: one FL per output channel (weights only).
        signed: activation grids; ``None`` decides from the data (unsigned after a ReLU).
        fl_search: ``'std'`` (the paper's formula) or ``'mse'`` (grid search).
        fl_range: ``(lo, hi)`` the FL window; ``None``: :func:`fl_window`.
        momentum: of the activation statistic's moving average (BatchNorm's semantics,
            ``None``: cumulative average).
        clip: ``'pact'`` for the learned clipping level (activations), ``None`` for none.
        alpha_init: PACT's initial clipping level; ``None``: from the calibration data.

    Buffers: ``frac_len`` (the FL in use, integer, one per channel or one), ``running_stat`` (the
    averaged statistic), ``num_batches_tracked``; ``scale`` is ``2^-frac_len``, the zero point 0.

    >>> q = FixedPointQuantizer(bits=8, kind='weight')
    >>> w = torch.tensor([[0.02, -0.01, 0.003]])
    >>> q.fit(w); int(q.frac_len), q.scale.tolist()          # std 0.0123: floor(log2(40 / 0.0123))
    (11, [0.00048828125])
    >>> (q(w) * 2 ** 11).tolist()
    [[41.0, -20.0, 6.0]]
    """
    min_bits, max_bits = 2, 8
    learned = False

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed: Optional[bool] = None, fl_search: str = 'std',
                 fl_range: Optional[Sequence[int]] = None, momentum: Optional[float] = 0.1,
                 clip: Optional[str] = None, alpha_init: Optional[float] = None):
        super().__init__(bits, kind, num_channels, ch_axis, per_channel, signed)
        if fl_search not in FL_SEARCHES:
            raise ValueError(f"fl_search={fl_search!r} is not supported; accepted: 'std' (the paper's "
                             "formula), 'mse' (grid search)")
        if clip not in CLIPS:
            raise ValueError(f"clip={clip!r} is not supported; accepted: None, 'pact'")
        if clip is not None and kind != 'act':
            raise ValueError(f"clip={clip!r} clips activations; weights take clip=None")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0 < momentum <= 1):
            raise ValueError(f'momentum={momentum!r} is out of range; accepted: a number in (0, 1] or None '
                             '(cumulative average)')
        if fl_range is not None:
            ok = (isinstance(fl_range, (list, tuple)) and len(fl_range) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in fl_range)
                  and fl_range[0] <= fl_range[1])
            if not ok:
                raise ValueError(f'fl_range={fl_range!r} is not a window; accepted: (lo, hi) integers with '
                                 'lo <= hi, or None for the default')
            fl_range = (int(fl_range[0]), int(fl_range[1]))
        self.fl_search = fl_search
        self.fl_range = fl_range
        self.momentum = momentum
        self.clip = clip
        self.alpha_init = alpha_init
        self._clip_owner = None           # (quantizer,) whose alpha this one shares, see share_clip
        self._unit_of = None              # weights: (reader's input quantizer,) whose alpha / qmax is folded in
        self._fitted_now = False          # initialised by input_scaling in this very forward pass
        self._refit = True                # weights: fit again at the next evaluation pass
        if clip == 'pact':
            self.alpha = torch.nn.Parameter(torch.tensor(8.0 if alpha_init is None else float(alpha_init)))
        self.register_buffer('frac_len', torch.zeros(self.num_channels, dtype=torch.long))
        self.register_buffer('running_stat', torch.zeros(1))
        self.register_buffer('num_batches_tracked', torch.tensor(0))

    # -- the grid ----------------------------------------------------------------------------

    def qrange(self):
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def window(self):
        """The FL window ``(lo, hi)`` in force."""
        if self.fl_range is not None:
            return self.fl_range
        return fl_window(self.bits, bool(self.signed), self.clip is not None)

    @property
    def scale(self) -> torch.Tensor:
        """``2^-FL`` (times the folded unit, see :meth:`fold_unit`)."""
        scale = torch.pow(2.0, -self.frac_len.float())
        u = self.unit()
        return scale if u is None else scale * u.detach()

    def fold_unit(self, reader: 'FixedPointQuantizer'):
        """Weights: quantize in units of ``reader``'s ``alpha / qmax`` (``reader``: the PACT input
        quantizer of the layer that reads this layer's output; see the module doc)."""
        if self.kind != 'weight' or getattr(reader, 'clip', None) != 'pact':
            raise ValueError('fold_unit folds the clipping level of a reader with PACT into a weight quantizer')
        self._unit_of = (reader, )
        self._refit = True

    def unit(self) -> Optional[torch.Tensor]:
        """The folded ``alpha / qmax`` of the reader (computed as ``eta / 2^FL`` is: the same float),
        or ``None``."""
        if not self._unit_of:
            return None
        reader = self._unit_of[0]
        return reader.clip_level() / reader.qrange()[1]

    def choose_fl(self, x: torch.Tensor) -> torch.Tensor:
        """The FL of ``x`` by ``fl_search``: one per channel row (weights per channel) or one."""
        rows = channel_view(x.detach(), self.ch_axis if self.per_channel else None)
        return self._fl_of_rows(rows)

    def _fl_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        lo, hi = self.window()
        if self.fl_search == 'std':
            return fl_from_std(_std(rows), self.bits, bool(self.signed), lo, hi)
        qmin, qmax = self.qrange()
        return fl_from_mse(rows, qmin, qmax, lo, hi)

    def _fl_of_stat(self, stat: torch.Tensor) -> torch.Tensor:
        """The FL the averaged statistic stands for."""
        lo, hi = self.window()
        if self.fl_search == 'std':
            return fl_from_std(stat, self.bits, bool(self.signed), lo, hi)
        return torch.round(stat).clamp(lo, hi).long()

    # -- PACT as fixed point ---------------------------------------------------------------

    def clip_owner(self) -> 'FixedPointQuantizer':
        """The quantizer whose ``alpha`` this one uses: itself, or the one it shares (:meth:`share_clip`)."""
        return self._clip_owner[0] if self._clip_owner else self

    def clip_level(self) -> torch.Tensor:
        """``|alpha|``, this quantizer's or the one it shares (see :meth:`share_clip`)."""
        return self.clip_owner().alpha.abs().clamp_min(1e-4)

    def share_clip(self, owner: 'FixedPointQuantizer'):
        """Use ``owner``'s clipping level from now on (F8Net shares it between the readers of a
        residual stream); this quantizer's own ``alpha`` is dropped."""
        if self.clip != 'pact' or owner.clip != 'pact':
            raise ValueError("share_clip needs two clip='pact' quantizers")
        owner = owner.clip_owner()
        if owner is not self:
            self._clip_owner = (owner, )
            if 'alpha' in self._parameters:
                del self._parameters['alpha']

    def input_scaling(self, x: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """PACT's normalization ``eta = 2^FL alpha / qmax`` of the layer's input (``x``: the raw
        input, to initialise an uncalibrated quantizer from), or ``None`` without clipping and
        while observing, disabled or uncalibrated."""
        if self.clip is None or self.observing or not self.enabled:
            return None
        if not bool(self.calibrated):
            if x is None:
                return None
            self.fit(x)
            self._fitted_now = True
        _, qmax = self.qrange()
        return self.clip_level() * 2.0 ** float(self.frac_len[0]) / qmax

    # -- life cycle ---------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, x: torch.Tensor):
        """Weights: the FL of ``x`` (always: it is a function of the weight; in the folded unit).
        Activations: initialise from ``x`` unless calibrated (as the trained quantizers do)."""
        u = self.unit()
        self._fit(x if u is None else x / u)

    def _fit(self, x: torch.Tensor):
        if self.kind == 'weight':
            self.frac_len.copy_(self.choose_fl(x).expand_as(self.frac_len))
            self.calibrated.fill_(True)
            self._refit = False
            return
        super().fit(x)

    def train(self, mode: bool = True):
        if self.kind == 'weight' and self.training and not mode:
            self._refit = True            # the weight trained since the last fit
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refit = True

    @torch.no_grad()
    def init_params(self, stats: TensorStats):
        if self.kind == 'weight':
            rows = stats.sample if self.fl_search == 'mse' else None
            fl = self._fl_of_rows(rows) if rows is not None else \
                fl_from_std(stats.std(), self.bits, bool(self.signed), *self.window())
            self.frac_len.copy_(fl.expand_as(self.frac_len))
            return
        sigma = stats.std().max().reshape(1)
        sample = stats.sample.reshape(1, -1)
        if self.clip == 'pact':
            if self.alpha_init is None and self._clip_owner is None:
                top = stats.max.max() if not bool(self.signed) else torch.maximum(-stats.min.min(), stats.max.max())
                mean = (stats.sum / stats.n).abs().max()
                self.alpha.data.fill_(float(torch.minimum(mean + 3 * sigma[0], top).clamp_min(1e-3)))
            self._init_pact_fl(sigma, sample)
        elif self.fl_search == 'std':
            self.running_stat.copy_(sigma)
            self.frac_len.fill_(int(self._fl_of_stat(sigma)[0]))
        else:
            fl = self._fl_of_rows(sample)
            self.running_stat.fill_(float(fl[0]))
            self.frac_len.fill_(int(fl[0]))
        self.num_batches_tracked.fill_(1)

    def _init_pact_fl(self, sigma: torch.Tensor, sample: torch.Tensor):
        """The FL of the normalized input ``x / eta`` depends on ``eta``, which depends on the FL:
        start at the top of the window (``eta ~ alpha``: the clip level at the top of the word)
        and iterate the choice to its fixed point (or a repeat)."""
        _, qmax = self.qrange()
        fl = self.window()[1]
        seen = set()
        while fl not in seen:
            seen.add(fl)
            eta = float(self.clip_level()) * 2.0 ** fl / qmax
            stat = sigma / eta if self.fl_search == 'std' else self._fl_of_rows(sample / eta).double()
            new = int(self._fl_of_stat(stat)[0])
            if new == fl:
                break
            fl = new
        self.running_stat.copy_(stat.float().reshape(1))
        self.frac_len.fill_(fl)

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> torch.Tensor:
        """A training batch of activations: its FL (returned, used for this batch) and the moving
        average of the statistic, whose FL is the one evaluation uses."""
        rows = x.detach().reshape(1, -1)
        if self.fl_search == 'std':
            stat = _std(rows).float()
            fl = self._fl_of_stat(stat)
        else:
            fl = self._fl_of_rows(rows)
            stat = fl.float()
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_stat.mul_(1 - factor).add_(factor * stat)
        self.frac_len.fill_(int(self._fl_of_stat(self.running_stat)[0]))
        return fl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.unit()
        if u is None or not self.enabled:
            return self._quantize(x)
        return self._quantize(x / u) * u

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        if not self.enabled:
            return x
        if self.kind == 'weight':
            if not bool(self.calibrated) or (not self.frozen and (self.training or self._refit)):
                self._fit(x)
            fl = self.frac_len
        elif not bool(self.calibrated):
            self._fit(x)
            fl = self.frac_len
        elif self.training and not self.frozen and not self._fitted_now:
            fl = self._track(x)
        else:
            fl = self.frac_len
        self._fitted_now = False
        qmin, qmax = self.qrange()
        return fixed_point_quantize(x, fl, qmin, qmax, self.ch_axis)

    def extra_repr(self):
        fl = self.frac_len.tolist()
        fl = fl[0] if len(fl) == 1 else f'{min(fl)}..{max(fl)}'
        clip = f', clip={self.clip}' + (' (shared)' if self._clip_owner else '') if self.clip else ''
        return f'{super().extra_repr()}, fl_search={self.fl_search}, frac_len={fl}{clip}'


def _std(rows: torch.Tensor) -> torch.Tensor:
    """The (population) standard deviation of each row, the statistic of the FL formula."""
    return rows.double().std(1, correction=0)


__all__ = ['FixedPointQuantizer', 'fixed_point_quantize', 'fl_from_std', 'fl_from_mse', 'fl_window',
           'FL_SEARCHES']
