"""LQ-Net: learned quantizer bases (Zhang et al., ECCV 2018).

A K-bit quantizer has a basis ``v`` in R^K; its 2^K levels are ``v . b`` over the binary codes
``b`` in {-1, 1}^K (weights, signed activations) or {0, 1}^K (activations after a ReLU). The forward
pass maps every value to its nearest level; during training the basis is refit by the
quantization-error-minimisation step, the least-squares solution ``v* = (B^T B)^-1 B^T x`` for
the codes ``B`` just chosen, and moved to it by a moving average.
"""
import itertools

import torch

from .learned import QATQuantizer, channel_view


def binary_codes(bits: int, signed: bool) -> torch.Tensor:
    """All ``2^bits`` codes as rows of a ``[2^bits, bits]`` matrix of {-1, 1} (or {0, 1})."""
    codes = torch.tensor(list(itertools.product((0.0, 1.0), repeat=bits)))
    return 2 * codes - 1 if signed else codes


def encode(v: torch.Tensor, basis: torch.Tensor, codes: torch.Tensor):
    """Nearest level per element. ``v``: ``[C, M]`` rows, ``basis``: ``[C, K]``, ``codes``:
    ``[L, K]``. Returns (quantized values ``[C, M]``, code index ``[C, M]``)."""
    levels = basis @ codes.t()                          # [C, L]
    sorted_levels, order = levels.sort(dim=1)
    mids = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), v.contiguous())
    return sorted_levels.gather(1, pos), order.gather(1, pos)


def qem_basis(v: torch.Tensor, index: torch.Tensor, codes: torch.Tensor, ridge: float = 1e-6):
    """The least-squares basis for fixed codes: per row, ``argmin_v ||x - B v||^2``.

    Computed from per-level counts and sums, so the cost is one pass over the data:
    ``B^T B = sum_l n_l b_l b_l^T`` and ``B^T x = sum_l (sum of x coded l) b_l``.
    """
    c, num_levels = v.shape[0], codes.shape[0]
    flat = (index + num_levels * torch.arange(c, device=v.device)[:, None]).reshape(-1)
    counts = torch.bincount(flat, minlength=c * num_levels).reshape(c, num_levels).to(v.dtype)
    sums = torch.bincount(flat, weights=v.reshape(-1), minlength=c * num_levels).reshape(c, num_levels).to(v.dtype)
    outer = codes[:, :, None] * codes[:, None, :]               # [L, K, K]
    btb = torch.einsum('cl,lkj->ckj', counts, outer)
    btx = sums @ codes                                          # [C, K]
    eye = torch.eye(codes.shape[1], dtype=v.dtype, device=v.device)
    scale = btb.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1.0)[:, None, None]
    return torch.linalg.solve(btb + ridge * scale * eye, btx)


class _Straight(torch.autograd.Function):
    """Forward the quantized value, pass the gradient where ``x`` lies within the levels."""

    @staticmethod
    def forward(ctx, x, q, lo, hi):
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return q

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return grad * inside, None, None, None


class LQNetQuantizer(QATQuantizer):
    """K-bit learned-basis quantizer; per output channel for weights, per layer for activations.

    ``momentum``: the moving average of the basis refit (the paper's 0.9). The refit runs on
    every training forward until the quantizer is ``frozen``; evaluation uses the stored basis.
    Initial basis: powers of two (a uniform grid) scaled to the data, then a few refits.

    >>> q = LQNetQuantizer(bits=2, kind='weight')
    >>> w = torch.tensor([[-1.5, -0.5, 0.5, 1.5, -1.4, 0.6]])
    >>> q.fit(w); sorted(round(v, 3) for v in set(q(w).flatten().tolist()))   # the least-squares levels
    [-1.467, -0.533, 0.533, 1.467]
    """
    min_bits, max_bits = 1, 8

    def __init__(self, bits: int, kind: str = 'weight', num_channels: int = 1, ch_axis: int = 0,
                 per_channel: bool = False, signed=None, momentum: float = 0.9, init_refits: int = 10):
        super().__init__(bits, kind, num_channels, ch_axis, per_channel, signed)
        if not 0 <= momentum < 1:
            raise ValueError(f'momentum={momentum} must be in [0, 1)')
        self.momentum = momentum
        self.init_refits = init_refits
        self.register_buffer('basis', torch.ones(self.num_channels, bits))

    def codes(self, like: torch.Tensor) -> torch.Tensor:
        return binary_codes(self.bits, bool(self.signed)).to(like)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return channel_view(x, self.ch_axis if self.per_channel else None)

    def init_params(self, stats):
        v = stats.sample.to(self.basis)
        codes = self.codes(v)
        powers = 2.0 ** torch.arange(self.bits, dtype=v.dtype, device=v.device)
        top = (codes.abs() @ powers).max()                     # 2^K - 1
        spread = v.abs().amax(1) if not bool(self.signed) else (stats.mean_abs() + 2 * stats.std()).to(v)
        basis = (spread / top)[:, None] * powers[None, :]
        for _ in range(self.init_refits):
            _, index = encode(v, basis, codes)
            basis = qem_basis(v, index, codes)
        self.basis.copy_(basis.expand_as(self.basis))

    @torch.no_grad()
    def refit(self, x: torch.Tensor):
        """One quantization-error-minimisation step on ``x`` and the moving-average update."""
        v = self.rows(x.detach().float())
        codes = self.codes(v)
        _, index = encode(v, self.basis, codes)
        target = qem_basis(v, index, codes)
        self.basis.mul_(self.momentum).add_(target.to(self.basis), alpha=1 - self.momentum)

    def quantize(self, x):
        v = self.rows(x)
        codes = self.codes(v)
        levels = self.basis @ codes.t()
        lo, hi = levels.min(1).values[:, None], levels.max(1).values[:, None]
        q, index = encode(v.detach(), self.basis, codes)
        if self.training and not self.frozen:
            # the QEM step on the codes just chosen, for the next iteration (one encoding per step)
            with torch.no_grad():
                target = qem_basis(v.detach().float(), index, codes.float())
                self.basis.mul_(self.momentum).add_(target.to(self.basis), alpha=1 - self.momentum)
        q = _Straight.apply(v, q.to(v.dtype), lo, hi)
        if self.per_channel:
            shape = list(x.transpose(0, self.ch_axis).shape)
            return q.reshape(shape).transpose(0, self.ch_axis)
        return q.reshape(x.shape)
