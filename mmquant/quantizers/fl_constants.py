"""The constants of F8Net's fractional-length formula ``FL = floor(log2(C / sigma))``, and the
analysis they come from (torch only).

A ``b``-bit fixed-point word with fractional length ``FL`` has the step ``2^-FL``. For data of
standard deviation ``sigma`` the quantization error is ``2^-2FL e(sigma 2^FL)``, so the FL with the
least mean squared error steps up by one each time ``sigma`` halves: the optimal FL is
``floor(log2(C / sigma))`` for one constant ``C`` per word length and signedness, where ``C / 2``
is the ``sigma`` at which FL 0 and FL 1 quantize equally well (Jin et al., "F8Net", ICLR 2022,
Sec. 3: a zero-mean Gaussian for signed words, a rectified Gaussian for unsigned ones, ``sigma``
the Gaussian's).

The paper gives ``C = 40`` (signed) and ``C = 70`` (unsigned) for 8 bits, the values the authors'
code uses; :func:`fl_constant` recomputes them from exact Gaussian integrals (39.4 and 72.1 for our
full ``[-2^(b-1), 2^(b-1)-1]`` / ``[0, 2^b-1]`` grids). The paper has no other word lengths; for
those the table holds :func:`fl_constant` rounded to two significant digits.
"""
import math
from typing import Dict, Tuple

import torch

# bits -> (C for signed words, C for unsigned words)
FL_CONSTANTS: Dict[int, Tuple[float, float]] = {
    2: (1.4, 2.1),
    3: (2.3, 3.8),
    4: (3.9, 6.7),
    5: (6.9, 12.0),
    6: (12.0, 22.0),
    7: (22.0, 39.0),
    8: (40.0, 70.0),      # the paper's values
}


def _interval_error(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``E[(x - c)^2 ; a < x < b]`` for a standard normal ``x`` (limits may be infinite):
    ``int_a^b (t - c)^2 phi(t) dt = [Phi - t phi + 2 c phi + c^2 Phi]_a^b``."""
    def prim(t):
        phi = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        t_phi = torch.where(torch.isinf(t), torch.zeros_like(t), t * phi)
        cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
        return cdf - t_phi + 2 * c * phi + c * c * cdf
    return prim(b) - prim(a)


def gaussian_fixed_point_mse(sigma: float, frac_len: int, bits: int, signed: bool) -> float:
    """Mean squared error of the ``bits``-bit fixed-point grid with fractional length ``frac_len``
    on ``N(0, sigma^2)`` (signed) or on ``max(N(0, sigma^2), 0)`` (unsigned), in closed form."""
    step = 2.0 ** -frac_len
    s = sigma / step                                  # in steps: the error scales by step^2
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float64)
    lo = (codes - 0.5) / s
    hi = (codes + 0.5) / s
    lo[0] = -math.inf if signed else 0.0              # unsigned: the mass below 0 sits on code 0
    hi[-1] = math.inf
    # x = s t: E[(x - k)^2] over the cell of code k is s^2 E[(t - k / s)^2] over the cell
    err = (s * s * _interval_error(lo, hi, codes / s)).sum()
    return float(err) * step * step


def fl_constant(bits: int, signed: bool) -> float:
    """``C`` of ``FL = floor(log2(C / sigma))``: twice the ``sigma`` at which fractional lengths 0
    and 1 give the same error (bisection on the closed-form error)."""
    lo, hi = 0.2, 2.0 ** bits
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if gaussian_fixed_point_mse(mid, 0, bits, signed) > gaussian_fixed_point_mse(mid, 1, bits, signed):
            lo = mid                                  # the finer grid still wins: threshold is higher
        else:
            hi = mid
    return 2 * math.sqrt(lo * hi)


__all__ = ['FL_CONSTANTS', 'fl_constant', 'gaussian_fixed_point_mse']
