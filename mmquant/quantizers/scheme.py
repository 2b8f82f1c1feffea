"""The description of one integer grid: how many bits, which range, which granularity."""
from dataclasses import dataclass
from typing import Optional

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int, what: str = 'bits') -> int:
    """Return ``bits`` if a uniform quantizer accepts it, else raise one clear ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f'{what}={bits!r} is out of range: uniform quantizers accept integers '
                         f'{MIN_BITS}..{MAX_BITS} (1 bit is served by the binary quantizers)')
    return bits


@dataclass(frozen=True)
class QScheme:
    """An integer grid.

    Args:
        bits: word length, 2..16.
        symmetric: zero point fixed at 0 (``True``) or affine with a learned zero point.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``; ``None`` lets the
            calibration decide (unsigned when the observed minimum is >= 0, e.g. after a ReLU).
        narrow_range: drop the most negative signed code so the grid is symmetric
            (``[-127, 127]`` for int8, the TF-Lite / ONNX convention for weights).
        per_channel: one scale per slice along ``ch_axis`` instead of one per tensor.
        ch_axis: the channel axis for ``per_channel``.

    >>> QScheme(bits=4, signed=True).qrange()
    (-8, 7)
    >>> QScheme(bits=4, signed=True, narrow_range=True).qrange()
    (-7, 7)
    >>> QScheme(bits=4, signed=False).qrange()
    (0, 15)
    """
    bits: int = 8
    symmetric: bool = True
    signed: Optional[bool] = True
    narrow_range: bool = False
    per_channel: bool = False
    ch_axis: int = 0

    def __post_init__(self):
        check_bits(self.bits)

    def qrange(self, signed: Optional[bool] = None):
        """Integer code range ``(qmin, qmax)``; ``signed`` overrides an undecided scheme."""
        signed = self.signed if signed is None else signed
        if signed is None:
            raise ValueError('signedness is undecided: calibrate first or pass signed=')
        if signed:
            qmax = 2 ** (self.bits - 1) - 1
            return (-qmax if self.narrow_range else -qmax - 1), qmax
        return 0, 2 ** self.bits - 1
