"""The paired comparison of benchmarks/ptq_table.py against closed forms."""
import os.path as osp
import sys

import pytest

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'benchmarks'))
from paired import compare, discordant, mcnemar_p  # noqa: E402


def test_discordant_counts_only_images_where_one_model_is_right():
    base = [True, True, False, False, True]
    other = [True, False, True, False, False]
    assert discordant(base, other) == (2, 1)


def test_mcnemar_p_closed_forms():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0                         # symmetric: no evidence either way
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)       # all 5 discordant images one way
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)  # P[X<=1], X ~ Bin(10, 1/2) = 11/1024
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9)


def test_mcnemar_p_falls_as_the_split_gets_lopsided():
    ps = [mcnemar_p(b, 20 - b) for b in range(11)]
    assert all(x < y for x, y in zip(ps, ps[1:]))


def test_compare_difference_in_points():
    base = [True] * 90 + [False] * 10
    other = [True] * 88 + [False] * 2 + [True] * 5 + [False] * 5
    q = compare(base, other)
    assert (q['b'], q['c']) == (2, 5) and q['diff'] == pytest.approx(3.0)


def test_unequal_lengths_are_rejected():
    with pytest.raises(ValueError, match='same images: 2 vs 3'):
        discordant([True, False], [True, False, True])
