"""Paired comparison of two classifiers on the same test images (exact McNemar test).

Two quantized models scored on the same 10,000 images differ by a few images at high bit widths;
whether such a difference means anything depends only on the images where exactly one of them is
right. With ``b`` = images only the baseline gets right and ``c`` = images only the other model gets
right, under "no difference" each of the ``b + c`` discordant images is equally likely to fall
either way, so ``min(b, c)`` is Binomial(b + c, 1/2) and the two-sided exact p-value is
``min(1, 2 * P[X <= min(b, c)])``.
"""
from math import comb
from typing import Sequence, Tuple

__all__ = ['discordant', 'mcnemar_p', 'compare']


def discordant(baseline: Sequence[bool], other: Sequence[bool]) -> Tuple[int, int]:
    """``(b, c)``: images only ``baseline`` gets right, images only ``other`` gets right."""
    if len(baseline) != len(other):
        raise ValueError(f'paired comparison needs the same images: {len(baseline)} vs {len(other)} results')
    b = sum(1 for x, y in zip(baseline, other) if x and not y)
    c = sum(1 for x, y in zip(baseline, other) if y and not x)
    return b, c


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f'discordant counts must be >= 0, got b={b}, c={c}')
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def compare(baseline: Sequence[bool], other: Sequence[bool]) -> dict:
    """Accuracy difference (points, other - baseline), discordant counts and the McNemar p-value."""
    b, c = discordant(baseline, other)
    return dict(diff=100.0 * (c - b) / len(baseline), b=b, c=c, p=mcnemar_p(b, c))
