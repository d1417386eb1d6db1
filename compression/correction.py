"""Correcting additive predictions with measured runs.

The predictor (``compression.allocate.Predictor``) adds up per-linear loss increases. That
ranks plans well but understates heavy compression (bench/RESULTS.md §4, §9), and it
understates rank cuts more than bit cuts (§9, whole-model plans: a rank cut in every layer
measured 1.55x the grid's sum, uniform 3 bits 1.17x). Once plans of the same model have been
run and measured on the same texts, the measured increases show by how much.
``fit_correction`` fits one scale for each part of the prediction,

    measured increase ≈ a_rank * (rank part) + a_bits * (bits part)      (nats over dense)

by least squares on the logarithms, with a weak pull of the two scales towards each other
(``TIE``): runs that cut only bits say nothing about ranks, and there the rank scale follows
the bits scale. Fewer than ``MIN_RUNS`` usable runs fit nothing: on the app's own runs, a
correction fitted on one run was worse than none for the measured grid (RESULTS §13).

``Correction.apply`` maps a new prediction through the fit. The map is linear in each part,
so it keeps the order of plans within either kind but can reorder a rank-heavy plan against
a bits-heavy one. Allocation still uses the raw grid: allocating with the corrected scales
gave no consistent gain (RESULTS §13). A power law on the total was tried first and dropped:
on the first view it extrapolated wildly (``bench/bench_correction.py``, RESULTS §13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_PREDICTED = 0.02  # nats: runs predicted to cost less say nothing about the map (noise dominates)
MIN_RUNS = 2  # usable runs needed before a correction is fitted
TIE = 0.09  # weight of (log a_rank - log a_bits)^2 against the squared log residuals of the runs
LOG_RATIO = np.linspace(-3.0, 3.0, 1201)  # log(a_rank / a_bits) searched (ratios up to e^3 = 20)
EXTRAPOLATE = 1.5  # beyond this factor outside the fitted predictions, the map is an extrapolation


@dataclass(frozen=True)
class Correction:
    """``measured ≈ rank_scale * rank part + bits_scale * bits part`` (loss increases in nats),
    fitted on ``n`` runs whose predicted increases spanned ``lo`` .. ``hi``; ``rms`` is the
    root-mean-square of the fit's residuals in log(measured / corrected) (0.1 ≈ 10 %)."""

    rank_scale: float
    bits_scale: float
    n: int
    lo: float
    hi: float
    rms: float

    def apply(self, rank: float, bits: float) -> float:
        """The corrected loss increase for a prediction whose rank and bits parts are given (nats)."""
        return max(0.0, self.rank_scale * rank + self.bits_scale * bits)

    def extrapolates(self, predicted: float) -> bool:
        """Whether a total predicted increase lies well outside those it was fitted on."""
        return predicted > self.hi * EXTRAPOLATE or predicted < self.lo / EXTRAPOLATE

    def describe(self) -> str:
        return (f"measured increase ≈ {self.rank_scale:.2f} x the rank part + {self.bits_scale:.2f} x the bits part "
                f"of the prediction, fitted on {self.n} run(s) predicted at {self.lo:.2f}-{self.hi:.2f} nats "
                f"(residual {100 * (math.exp(self.rms) - 1):.0f} %)")


def fit_correction(rank: Sequence[float], bits: Sequence[float], measured: Sequence[float],
                   min_runs: int | None = None) -> Correction | None:
    """Fit the two scales on runs given by the rank and bits parts of their predicted increase
    and their measured increase (nats over dense), pairwise. Runs predicted below
    ``MIN_PREDICTED`` in all, or measured at or below zero, are left out; None when fewer than
    ``min_runs`` (default ``MIN_RUNS``) are left."""
    r = np.asarray(rank, dtype=np.float64)
    b = np.asarray(bits, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    if not (r.shape == b.shape == m.shape) or r.ndim != 1:
        raise ValueError(f"rank, bits and measured must be 1-d and pairwise, got shapes {r.shape}, {b.shape}, "
                         f"{m.shape}")
    r, b = np.clip(r, 0.0, None), np.clip(b, 0.0, None)
    keep = np.isfinite(r) & np.isfinite(b) & np.isfinite(m) & (r + b >= MIN_PREDICTED) & (m > 0.0)
    r, b, m = r[keep], b[keep], m[keep]
    if len(m) == 0 or len(m) < (MIN_RUNS if min_runs is None else min_runs):
        return None
    # a_rank = exp(c + t/2), a_bits = exp(c - t/2): for each t the best c is a mean, so search t
    half = np.exp(LOG_RATIO / 2)[:, None]  # [T, 1]
    mixed = np.log(half * r[None, :] + b[None, :] / half)  # [T, n]
    c = np.mean(np.log(m)[None, :] - mixed, axis=1)  # [T]
    resid = c[:, None] + mixed - np.log(m)[None, :]  # [T, n]
    cost = np.sum(resid ** 2, axis=1) + TIE * LOG_RATIO ** 2  # [T]
    i = int(np.argmin(cost))
    t = float(LOG_RATIO[i])
    total = r + b
    return Correction(rank_scale=math.exp(c[i] + t / 2), bits_scale=math.exp(c[i] - t / 2), n=len(m),
                      lo=float(total.min()), hi=float(total.max()), rms=float(np.sqrt(np.mean(resid[i] ** 2))))
