"""Correcting additive predictions with measured runs: the fitted scales and their limits."""
import math

import numpy as np
import pytest

from compression.correction import MIN_PREDICTED, Correction, fit_correction

RANK = np.array([0.0, 0.2, 0.6, 0.1, 1.0, 0.0, 0.4, 0.05])
BITS = np.array([0.3, 0.0, 0.1, 0.9, 0.2, 1.4, 0.4, 0.02])


def test_two_scales_are_recovered_from_runs_that_mix_ranks_and_bits(monkeypatch):
    monkeypatch.setattr("compression.correction.TIE", 0.0)
    cal = fit_correction(RANK, BITS, 1.6 * RANK + 1.1 * BITS)
    assert cal.rank_scale == pytest.approx(1.6, rel=5e-3) and cal.bits_scale == pytest.approx(1.1, rel=5e-3)
    assert cal.rms < 5e-3 and cal.n == 8 and (cal.lo, cal.hi) == pytest.approx((0.07, 1.4))
    assert cal.apply(1.0, 2.0) == pytest.approx(1.6 + 2.2, rel=5e-3)
    assert cal.apply(0.0, 0.0) == 0.0  # a plan predicted dense stays dense


def test_the_tie_pulls_the_scales_together_only_without_evidence():
    tied = fit_correction(RANK, BITS, 1.6 * RANK + 1.1 * BITS)  # default tie: close to the truth still
    assert tied.rank_scale == pytest.approx(1.6, rel=0.05) and tied.bits_scale == pytest.approx(1.1, rel=0.05)
    bits_only = fit_correction([0.0, 0.0, 0.0], [0.2, 0.5, 1.0], [0.3, 0.75, 1.5])  # nothing says what ranks do
    assert bits_only.bits_scale == pytest.approx(1.5, rel=1e-3) and bits_only.rank_scale == pytest.approx(1.5, rel=1e-3)
    assert fit_correction([0.3], [0.2], [1.0]) is None  # one run is not enough by default (MIN_RUNS) ...
    one = fit_correction([0.3], [0.2], [1.0], min_runs=1)  # ... and would give one scale for both parts
    assert one.rank_scale == pytest.approx(2.0, rel=1e-3) and one.bits_scale == pytest.approx(2.0, rel=1e-3)
    assert one.rms == pytest.approx(0.0, abs=1e-6)


def test_residual_of_scattered_runs_is_reported():
    two = fit_correction([0.5, 0.0], [0.0, 2.0], [0.5, 8.0])  # ratios 1 and 4, one of each kind
    assert two.rank_scale > two.bits_scale / 4  # the tie keeps them from fitting both runs exactly
    assert 0.0 < two.rms < math.log(4.0)


def test_uninformative_runs_are_left_out():
    assert fit_correction([], [], []) is None
    assert fit_correction([MIN_PREDICTED / 4, 0.3], [MIN_PREDICTED / 4, 0.2], [0.3, -0.01]) is None
    cal = fit_correction([MIN_PREDICTED / 4, 0.5, 1.0, 0.25], [0.0, 0.0, 0.0, 0.0], [0.3, 0.6, float("nan"), 0.3])
    assert cal.n == 2 and cal.rank_scale == pytest.approx(1.2, rel=1e-3)
    assert fit_correction([MIN_PREDICTED / 4, 0.5], [0.0, 0.0], [0.3, 0.6]) is None  # one usable run left
    with pytest.raises(ValueError, match="pairwise"):
        fit_correction([0.1, 0.2], [0.1, 0.2], [0.1])


def test_extrapolation_is_flagged_and_described():
    cal = Correction(rank_scale=1.6, bits_scale=1.1, n=3, lo=0.2, hi=1.0, rms=0.1)
    assert not cal.extrapolates(0.5) and not cal.extrapolates(1.4)
    assert cal.extrapolates(1.6) and cal.extrapolates(0.1)
    assert cal.apply(0.5, 0.5) == pytest.approx(1.35)
    text = cal.describe()
    assert "1.60 x the rank part + 1.10 x the bits part" in text and "3 run(s)" in text
    assert "0.20-1.00 nats" in text and "11 %" in text
