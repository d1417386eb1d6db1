"""Per-linear ranks and bits that meet a size target, from a measured sensitivity grid.

``Predictor`` turns a sensitivity grid (``analysis.sensitivity``) into a predicted loss
for any plan: ``loss = dense_loss + Σ dloss(linear, spec)``, sizes from
``compression.plan.plan_size``. Per linear:

* rank ``r``: linear interpolation of the measured dloss between the grid ranks, with
  ``dloss = 0`` at full rank ``min(m, n)``; below the smallest grid rank, the line through
  the two smallest grid points extended (never below the smallest's value; still likely
  optimistic far below the grid: ``below_grid`` names such linears), above full rank 0;
* bits ``b``: the grid value at ``b``; an off-grid width uses the nearest *lower* grid
  width (5-7 bits read the 4-bit value), a width below the grid the lowest grid width;
* rank and bits together: ``dloss_rank + dloss_bits``. This is an approximation: it
  assumes the error of quantising the two factors costs what quantising the dense weight
  did, and that the two errors add (both were only measured alone). On SmolLM2 it does
  not: whitened factors leave quantisation's error compensation little to work with, and
  the quantised factors' output error was 2.2x the sum of the parts (median; 1.4-46x;
  bench/RESULTS.md §23), so such plans are predicted optimistically (``rank_and_bits``
  names the linears). ``set_measured`` gives a setting its measured cost instead, and
  ``allocate_measured`` allocates, measures the ones the plan picks and allocates again
  (``compression allocate --measure-picks`` and the app's allocate preset; the costs are
  cached per grid, ``save_measured`` / ``load_measured``);
* the spec's ``lowrank`` / ``quant`` method is not looked at: the grid's own methods are
  what the numbers describe (``allocate`` uses them).

``allocate`` solves the multiple-choice knapsack "one option per linear, minimise Σ dloss,
size ≤ target" over the options dense, grid ranks (never above break-even), grid bits and
(unless ``only``) every rank x bits pair:

* ``solver="exact"``: dynamic programming over the Pareto front of (cost, dloss) of the
  linears seen so far (pruned by feasibility). Exact; ``"auto"`` uses it for up to
  ``EXACT_MAX_LINEARS`` linears while the front stays below ``max_front`` points (tiny
  models, and the tests' brute-force check). On SmolLM2's 210 linears the front reaches
  ~10^5 points (a minute): too slow for an interactive allocator;
* ``solver="lagrangian"``: each linear's options reduced to their lower convex hull in
  (bytes, dloss); starting from every linear's best option, hull steps are taken in order
  of increasing "dloss added per byte saved" until the target is met; that is exactly the
  Lagrangian sweep over λ (each prefix of steps is the minimiser of ``Σ dloss + λ Σ bytes``
  for the λ of its last step), without needing a bisection. The last step usually saves
  more than needed, so a greedy fill then upgrades single linears (to any option, hull or
  not) while the budget allows, largest dloss reduction first. It can miss the optimum by
  the "gap" of the knapsack (at most about one step's dloss; on a synthetic SmolLM2-shaped
  grid 0-0.3 % of the total dloss); it never exceeds the target.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from analysis.adapters import LinearInfo
from analysis.sensitivity import SensitivityGrid
from compression.configs import bit_width, break_even_rank, check_factor_quants
from compression.plan import (
    LILLAMA_INITS,
    LOWRANK_METHODS,
    QUANT_METHODS,
    LillamaOptions,
    ModuleSpec,
    Plan,
    SizeReport,
    keeps_bias,
    plan_size,
    weight_bytes,
)

EXACT_MAX_LINEARS = 48  # "auto" tries the exact solver on problems up to this many linears ...
MAX_FRONT = 20000  # ... and falls back to the Lagrangian sweep if its Pareto front grows past this


@dataclass(frozen=True)
class Prediction:
    loss: float  # predicted mean token NLL (nats)
    ppl: float  # exp(loss)
    dloss: float  # loss - dense loss
    bytes: int  # whole model after compression
    bits_per_weight: float  # over the decoder linears (SizeReport.bits_per_weight)
    ratio: float  # bytes / dense bytes
    dloss_rank: float = 0.0  # the part of dloss from ranks (rank-only settings, and the rank of rank + bits)
    dloss_bits: float = 0.0  # the part from bit widths (dloss = dloss_rank + dloss_bits)


@dataclass(frozen=True)
class Option:
    """One choice for one linear: its spec, weight bytes, model-bytes change, predicted dloss."""

    spec: ModuleSpec
    weight_bytes: int  # compressed weight (factors, codes, scales; no bias)
    delta_bytes: int  # change of the whole model's bytes vs dense (bias changes included)
    dloss: float


class Predictor:
    """Predicted loss and size of plans from a sensitivity grid (see the module docstring).

    ``linears`` are the model's decoder linears, ``dense_total_bytes`` its ``model_bytes``,
    ``dtype_bytes`` the bytes of its float dtype, ``biases`` which linears have a bias;
    ``base_plan`` is the template allocated plans start from (its ``lillama`` / ``slicegpt``
    options and meta are kept). ``estimator`` picks what is added up (``SensitivityGrid.estimate``):
    ``dloss``, the measured calibration-loss increases; ``curvature``, ``dloss`` minus its
    first-order part (less noisy on a small calibration sample, but no longer the calibration
    loss itself); ``kl``, the KL(dense || probe) per token (never negative, stable on a few
    hundred tokens). ``curvature_only=True`` is the same as ``estimator="curvature"``."""

    def __init__(self, grid: SensitivityGrid, linears: list[LinearInfo], dense_total_bytes: int, dtype_bytes: int,
                 biases: dict[str, bool], base_plan: Plan | None = None, curvature_only: bool = False,
                 estimator: str = "dloss"):
        self.grid = grid
        self.linears = list(linears)
        self.by_name = {li.name: li for li in self.linears}
        self.dense_total_bytes = int(dense_total_bytes)
        self.dtype_bytes = int(dtype_bytes)
        self.biases = dict(biases)
        self.base_plan = base_plan or Plan()
        self.dense_loss = float(grid.meta["dense_loss"])
        self.method = grid.meta.get("method", "svd-llm")
        self.quant = grid.meta.get("quant", "rtn")
        self.group_size = int(grid.meta.get("group_size", 128))
        self.dense_linear_params = sum(li.out_features * li.in_features for li in self.linears)
        self.estimator = "curvature" if curvature_only else estimator
        self.curvature_only = self.estimator == "curvature"
        t = grid.estimate(self.estimator)
        self._ranks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._bits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for (name, kind), d in t.groupby(["name", "kind"], sort=False):
            if name not in self.by_name:
                continue
            d = d.sort_values("setting")
            xs, ys = d["setting"].to_numpy(dtype=np.float64), d["dloss"].to_numpy(dtype=np.float64)
            if kind == "rank":
                li = self.by_name[name]
                full = min(li.out_features, li.in_features)
                keep = xs < full
                self._ranks[name] = (np.append(xs[keep], full).astype(np.float64), np.append(ys[keep], 0.0))
            elif kind == "bits":
                self._bits[name] = (xs, ys)
        self._cache: dict[tuple[str, ModuleSpec], tuple[float, float]] = {}
        # measured increases of ranks with quantised factors (``set_measured``), in place of the sum
        self.measured: dict[tuple[str, int, float], float] = {}

    # -------------------------------------------------------------------- per linear
    def grid_ranks(self, name: str) -> list[int]:
        if name not in self._ranks:
            return []
        li = self.by_name[name]
        full = min(li.out_features, li.in_features)
        return [int(r) for r in self._ranks[name][0] if r < full]

    def grid_bits(self, name: str) -> list[int | float]:
        return [bit_width(b) for b in self._bits[name][0]] if name in self._bits else []

    def rank_dloss(self, name: str, rank: int) -> float:
        if name not in self._ranks:
            raise ValueError(f"the sensitivity grid has no rank settings for {name}")
        xs, ys = self._ranks[name]
        if rank < xs[0] and len(xs) > 1:  # below the grid: extend the line through its two smallest ranks
            slope = (ys[0] - ys[1]) / (xs[1] - xs[0])
            return float(ys[0] + max(slope, 0.0) * (xs[0] - rank))
        return float(np.interp(float(rank), xs, ys))  # 0 at and above full rank

    def below_grid(self, plan) -> list[tuple[str, int, int]]:
        """``(name, rank, smallest grid rank)`` of every linear whose rank in ``plan`` lies
        below the ranks the grid measured: their dloss is extrapolated."""
        out = []
        for li in self.linears:
            s = plan.spec_for(li.name)
            if s.rank is not None and li.name in self._ranks and s.rank < self._ranks[li.name][0][0]:
                out.append((li.name, int(s.rank), int(self._ranks[li.name][0][0])))
        return out

    def rank_and_bits(self, plan) -> list[str]:
        """The linears that ``plan`` gives a rank and bits together without a measured cost
        (``set_measured``): their prediction adds the two parts measured alone, which quantised
        factors exceed (module docstring)."""
        return [li.name for li in self.linears
                if (s := plan.spec_for(li.name)).rank is not None and s.bits is not None
                and _combo(li.name, s) not in self.measured]

    def set_measured(self, name: str, rank: int, bits: float, dloss: float) -> None:
        """The measured increase (in this predictor's estimator) of ``name`` at ``rank`` with
        ``bits``-bit factors, used from now on in place of the rank's plus the bits' parts (the
        rank part stays the grid's, the bits part is the rest)."""
        if name not in self.by_name:
            raise ValueError(f"{name} is not a decoder linear of this model")
        if not (rank and bits) or not math.isfinite(dloss):
            raise ValueError(f"a measured cost needs a rank, bits and a finite value, got {rank}, {bits}, {dloss}")
        self.measured[_combo(name, ModuleSpec(rank=rank, bits=bits))] = float(dloss)
        self._cache.clear()

    def bits_dloss(self, name: str, bits: float) -> float:
        if name not in self._bits:
            raise ValueError(f"the sensitivity grid has no bit-width settings for {name}")
        xs, ys = self._bits[name]
        i = int(np.searchsorted(xs, bits, side="right")) - 1  # nearest lower grid width
        return float(ys[max(i, 0)])

    def dloss_parts(self, name: str, spec: ModuleSpec) -> tuple[float, float]:
        """``(rank part, bits part)`` of one linear's predicted increase."""
        if spec.is_dense:
            return (0.0, 0.0)
        key = (name, spec)
        hit = self._cache.get(key)
        if hit is None:
            if name not in self.by_name:
                raise ValueError(f"{name} is not a decoder linear of this model")
            rank = self.rank_dloss(name, spec.rank) if spec.rank is not None else 0.0
            bits = self.bits_dloss(name, spec.bits) if spec.bits is not None else 0.0
            both = self.measured.get(_combo(name, spec)) if spec.rank is not None and spec.bits is not None else None
            hit = (rank, bits if both is None else both - rank)  # a measured cost: its rest is the bits part
            self._cache[key] = hit
        return hit

    def dloss(self, name: str, spec: ModuleSpec) -> float:
        r, b = self.dloss_parts(name, spec)
        return r + b

    def option(self, li: LinearInfo, spec: ModuleSpec) -> Option:
        lil = self.base_plan.lillama
        w = weight_bytes(spec, li, self.dtype_bytes, lil)
        hb = self.biases.get(li.name, False)
        bias_delta = (int(keeps_bias(spec, hb, lil)) - int(hb)) * li.out_features * self.dtype_bytes
        delta = w - li.out_features * li.in_features * self.dtype_bytes + bias_delta
        return Option(spec, int(w), int(delta), self.dloss(li.name, spec))

    # -------------------------------------------------------------------- whole plans
    def size(self, plan: Plan) -> SizeReport:
        return plan_size(plan, self.linears, self.dense_total_bytes, self.dtype_bytes, self.biases)

    def predict(self, plan: Plan) -> Prediction:
        parts = [self.dloss_parts(li.name, plan.spec_for(li.name)) for li in self.linears]
        dr, db = math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts)
        d = dr + db
        rep = self.size(plan)
        loss = self.dense_loss + d
        return Prediction(loss, math.exp(loss), d, rep.total_bytes, rep.bits_per_weight, rep.ratio, dr, db)


def _combo(name: str, spec: ModuleSpec) -> tuple[str, int, int | float]:
    """The key of a rank with quantised factors in ``Predictor.measured``."""
    return name, int(spec.rank), bit_width(spec.bits)


# ------------------------------------------------------------------------ options
def _valid(spec: ModuleSpec, li: LinearInfo) -> bool:
    """The checks ``compression.plan.validate`` makes for one module."""
    try:
        lr, q = spec.lowrank_config(), spec.quant_config()
        if lr is not None:
            lr.check(li.out_features, li.in_features)
        if q is not None:
            if lr is None:
                q.check(li.in_features)
            else:
                check_factor_quants(q, li.in_features, spec.rank, li.out_features)
    except ValueError:
        return False
    return True


def candidate_options(predictor: Predictor, *, only: str | None = None, group_size: int | None = None,
                      quant: str | None = None, lowrank: str | None = None) -> dict[str, list[Option]]:
    """Each linear's options: dense, grid ranks (never above break-even), grid bits and, unless
    ``only`` is 'rank' or 'bits', every rank x bits pair. Invalid settings are left out."""
    if only not in (None, "rank", "bits"):
        raise ValueError(f"only must be 'rank', 'bits' or None, got {only!r}")
    gs = predictor.group_size if group_size is None else int(group_size)
    qm = quant or predictor.quant
    lm = lowrank or predictor.method
    out = {}
    for li in predictor.linears:
        be = break_even_rank(li.out_features, li.in_features)
        ranks = [r for r in predictor.grid_ranks(li.name) if r <= be] if only != "bits" else []
        bits = predictor.grid_bits(li.name) if only != "rank" else []
        specs = [ModuleSpec(lowrank=lm, quant=qm, group_size=gs)]
        specs += [ModuleSpec(rank=r, lowrank=lm, quant=qm, group_size=gs) for r in ranks]
        specs += [ModuleSpec(bits=b, lowrank=lm, quant=qm, group_size=gs) for b in bits]
        if only is None:
            specs += [ModuleSpec(rank=r, bits=b, lowrank=lm, quant=qm, group_size=gs) for r in ranks for b in bits]
        out[li.name] = [predictor.option(li, s) for s in specs if s.is_dense or _valid(s, li)]
    return out


# ------------------------------------------------------------------------ solvers
def _solve_exact(costs: list[np.ndarray], dls: list[np.ndarray], cap: int, max_front: int) -> list[int] | None:
    """Exact multiple-choice knapsack by Pareto-front DP; None when the front grows past
    ``max_front``. Returns the chosen option index per item."""
    n = len(costs)
    suffix_min = np.zeros(n + 1, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        suffix_min[i] = suffix_min[i + 1] + int(costs[i].min())
    f_cost = np.zeros(1, dtype=np.int64)
    f_d = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        k = len(costs[i])
        c = (f_cost[:, None] + costs[i][None, :]).ravel()
        d = (f_d[:, None] + dls[i][None, :]).ravel()
        parent = np.repeat(np.arange(len(f_cost)), k)
        choice = np.tile(np.arange(k), len(f_cost))
        ok = c + suffix_min[i + 1] <= cap
        c, d, parent, choice = c[ok], d[ok], parent[ok], choice[ok]
        order = np.lexsort((d, c))  # by cost, then dloss
        c, d, parent, choice = c[order], d[order], parent[order], choice[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], d[:-1]]))
        keep = d < best_before  # strictly better than every cheaper (or equal-cost earlier) point
        c, d, parent, choice = c[keep], d[keep], parent[keep], choice[keep]
        if len(c) > max_front:
            return None
        back.append((parent, choice))
        f_cost, f_d = c, d
    j = int(np.argmin(f_d))
    picks = [0] * n
    for i in range(n - 1, -1, -1):
        parent, choice = back[i]
        picks[i] = int(choice[j])
        j = int(parent[j])
    return picks


def _lower_hull(cost: np.ndarray, d: np.ndarray, start: int) -> list[int]:
    """Indices of the lower convex hull of the options no dearer than ``start`` (the best
    one), from the cheapest to ``start``: dloss falls and slopes rise along it."""
    idx = [i for i in range(len(cost)) if cost[i] <= cost[start]]
    idx.sort(key=lambda i: (cost[i], d[i], i != start))
    pts: list[int] = []
    for i in idx:
        if pts and cost[pts[-1]] == cost[i]:
            continue  # same cost, worse (or equal) dloss
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b if it lies on or above the segment a -> i
            if (d[b] - d[a]) * (cost[i] - cost[a]) >= (d[i] - d[a]) * (cost[b] - cost[a]):
                pts.pop()
            else:
                break
        pts.append(i)
    while pts and pts[-1] != start and d[pts[-1]] >= d[start]:
        pts.pop()
    if not pts or pts[-1] != start:
        pts.append(start)
    return pts


def _solve_lagrangian(costs: list[np.ndarray], dls: list[np.ndarray], cap: int) -> list[int]:
    """Hull sweep in order of dloss added per byte saved, then a greedy fill (module docstring)."""
    n = len(costs)
    picks = [int(np.lexsort((costs[i], dls[i]))[0]) for i in range(n)]  # best dloss, cheapest on ties
    total = sum(int(costs[i][picks[i]]) for i in range(n))
    if total > cap:
        steps = []  # (rate, item, position along the chain, target option)
        for i in range(n):
            hull = _lower_hull(costs[i], dls[i], picks[i])
            for pos in range(len(hull) - 1, 0, -1):
                hi, lo = hull[pos], hull[pos - 1]
                saved = int(costs[i][hi] - costs[i][lo])
                rate = float(dls[i][lo] - dls[i][hi]) / saved
                steps.append((rate, i, len(hull) - pos, lo, saved))
        steps.sort(key=lambda s: (s[0], s[1], s[2]))
        for _, i, _, lo, saved in steps:
            if total <= cap:
                break
            picks[i] = lo
            total -= saved
    # greedy fill: single upgrades that fit, largest dloss reduction first
    while True:
        slack = cap - total
        best = None
        for i in range(n):
            cur_c, cur_d = costs[i][picks[i]], dls[i][picks[i]]
            gain = cur_d - dls[i]
            fits = (costs[i] - cur_c) <= slack
            cand = np.where(fits & (gain > 1e-15))[0]
            if len(cand):
                k = int(cand[np.argmax(gain[cand])])
                if best is None or gain[k] > best[0]:
                    best = (float(gain[k]), i, k)
        if best is None:
            break
        _, i, k = best
        total += int(costs[i][k] - costs[i][picks[i]])
        picks[i] = k
    return picks


# ------------------------------------------------------------------------ allocation
TARGET_FLAGS = {"bytes": "--target-bytes", "ratio": "--target-ratio", "bits": "--target-bits"}
TARGET_WORDS = {"bytes": "target bytes", "ratio": "target ratio", "bits": "target bits per weight"}


def check_target(kind: str, value: float) -> None:
    """A size target must be a finite positive number (whole bytes for a byte target)."""
    flag = TARGET_FLAGS[kind]
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):  # numpy scalars too
        raise ValueError(f"the {TARGET_WORDS[kind]} ({flag}) must be a finite positive number, got {value}")
    if kind == "bytes" and value != int(value):
        raise ValueError(f"the {TARGET_WORDS[kind]} ({flag}) must be a whole number of bytes, got {value}")


def allocate(predictor: Predictor, *, target_bytes: int | None = None, target_ratio: float | None = None,
             target_bits: float | None = None, only: str | None = None, group_size: int | None = None,
             quant: str | None = None, lowrank: str | None = None, solver: str = "auto",
             max_front: int = MAX_FRONT) -> Plan:
    """The plan with the least predicted loss whose size meets exactly one target: whole-model
    bytes, a fraction of the dense bytes, or average bits per decoder-linear weight
    (``SizeReport.bits_per_weight``). ``group_size`` / ``quant`` / ``lowrank`` default to the
    grid's (what its dloss describes). Never exceeds the target; the dense plan when it fits;
    ``ValueError`` naming the smallest reachable size when nothing fits."""
    t0 = time.perf_counter()
    given = [(k, v) for k, v in (("bytes", target_bytes), ("ratio", target_ratio), ("bits", target_bits))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of target_bytes, target_ratio, target_bits")
    kind, value = given[0]
    check_target(kind, value)
    if solver not in ("auto", "exact", "lagrangian"):
        raise ValueError(f"solver must be auto, exact or lagrangian, got {solver!r}")
    p = predictor
    for what, name, known in (("low-rank method", lowrank, LOWRANK_METHODS), ("quantiser", quant, QUANT_METHODS)):
        if name is not None and name not in known:
            raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(sorted(known))}")
    if (lowrank or p.method) == "lillama" and p.base_plan.lillama is None:
        # the ranks are refined from the grid's closed-form method (its dloss is the init's)
        p = copy.copy(p)
        p.base_plan = replace(p.base_plan, lillama=LillamaOptions(init=p.method if p.method in LILLAMA_INITS
                                                                  else LillamaOptions().init))
    opts = candidate_options(p, only=only, group_size=group_size, quant=quant, lowrank=lowrank)
    names = [li.name for li in p.linears]
    dense_linear_bytes = p.dense_linear_params * p.dtype_bytes
    if kind == "bits":
        cap = math.floor(value * p.dense_linear_params / 8 + 1e-9)
        costs = [np.array([o.weight_bytes for o in opts[nm]], dtype=np.int64) for nm in names]
        dense_cost = dense_linear_bytes
    else:
        if kind == "ratio":
            total_cap = math.floor(value * p.dense_total_bytes + 1e-9)
        else:
            total_cap = int(value)
        cap = total_cap - p.dense_total_bytes
        costs = [np.array([o.delta_bytes for o in opts[nm]], dtype=np.int64) for nm in names]
        dense_cost = 0
    dls = [np.array([o.dloss for o in opts[nm]], dtype=np.float64) for nm in names]
    target = {"kind": kind, "value": value}
    base = p.base_plan
    meta_common = dict(method="allocate", target=target, only=only, sensitivity=p.grid.folder,
                       sensitivity_fingerprint=p.grid.meta.get("fingerprint"), dense_loss=p.dense_loss,
                       curvature_only=p.curvature_only, estimator=p.estimator)

    if dense_cost <= cap:  # the dense model already meets the target
        plan = replace(base, modules={}, meta={**base.meta, **meta_common, "solver": "dense"})
        return _finish(p, plan, t0)

    min_cost = sum(int(c.min()) for c in costs)
    if min_cost > cap:
        smallest = replace(base, modules={nm: opts[nm][int(np.argmin(c))].spec for nm, c in zip(names, costs)
                                          if not opts[nm][int(np.argmin(c))].spec.is_dense})
        rep = p.size(smallest)
        want = {"bytes": f"{value} bytes", "ratio": f"ratio {value}", "bits": f"{value} bits per weight"}[kind]
        raise ValueError(f"the target ({want}) is below the smallest plan these options reach: "
                         f"{rep.total_bytes:,} bytes = {rep.total_bytes / 1e6:.1f} MB (ratio {rep.ratio:.4f} of the "
                         f"dense {p.dense_total_bytes / 1e6:.1f} MB, {rep.bits_per_weight:.3f} bits per weight); aim "
                         "at or above that"
                         + ("" if only is None else f", or allow ranks and bits together (this allocation changes "
                                                    f"{'ranks' if only == 'rank' else 'bits'} only)"))

    picks = None
    used = "lagrangian"
    if solver == "exact" or (solver == "auto" and len(names) <= EXACT_MAX_LINEARS):
        picks = _solve_exact(costs, dls, cap, max_front if solver == "auto" else 10**9)
        used = "exact"
    if picks is None:
        picks = _solve_lagrangian(costs, dls, cap)
        used = "lagrangian"
    modules = {nm: opts[nm][k].spec for nm, k in zip(names, picks) if not opts[nm][k].spec.is_dense}
    plan = replace(base, modules=modules, meta={**base.meta, **meta_common, "solver": used})
    plan = _finish(p, plan, t0)
    rep = p.size(plan)
    over = (rep.bits_per_weight > value + 1e-12) if kind == "bits" else (rep.total_bytes > cap + p.dense_total_bytes)
    if over:  # would be a bug in the solvers: refuse rather than return a plan over target
        raise RuntimeError(f"internal error: the allocated plan exceeds the target {target}")
    return plan


def _finish(p: Predictor, plan: Plan, t0: float) -> Plan:
    pred = p.predict(plan)
    plan.meta.update(predicted_loss=pred.loss, predicted_ppl=pred.ppl, predicted_dloss=pred.dloss,
                     predicted_bytes=pred.bytes, bits_per_weight=pred.bits_per_weight, ratio=pred.ratio,
                     seconds=round(time.perf_counter() - t0, 4))
    return plan


def module_kinds(plan: Plan, linears: list[LinearInfo]) -> dict[str, int]:
    """How many linears a plan keeps dense, low-rank, quantised, or both."""
    out = {"dense": 0, "rank": 0, "bits": 0, "rank+bits": 0}
    for li in linears:
        s = plan.spec_for(li.name)
        out["dense" if s.is_dense else "rank+bits" if s.rank is not None and s.bits is not None
            else "rank" if s.rank is not None else "bits"] += 1
    return out


# ------------------------------------------------------------------------ measured picks
def allocate_measured(predictor: Predictor, probe, *, max_rounds: int = 40, progress=None, should_stop=None,
                      **allocate_kw) -> tuple[Plan, list[dict]]:
    """``allocate``, then measure the ranks with quantised factors the plan picks that have no
    measured cost yet (``probe(name, spec) -> increase`` in the predictor's estimator: that
    linear alone compressed as ``spec``), give them to the predictor (``set_measured``) and
    allocate again, until the plan picks none unmeasured or ``max_rounds`` rounds have measured.
    The sums the grid predicts for such settings are optimistic (module docstring), so each round
    can only move the plan away from a setting that measured worse. Returns the last plan and one
    record per round (its predicted increase, the settings it measured). ``should_stop()`` is
    polled before each probe and raises ``InterruptedError`` when true; what was measured until
    then stays in the predictor."""
    rounds: list[dict] = []
    while True:
        plan = allocate(predictor, **allocate_kw)
        todo = [(n, plan.spec_for(n)) for n in predictor.rank_and_bits(plan)]
        rounds.append(dict(round=len(rounds), predicted_dloss=predictor.predict(plan).dloss, unmeasured=len(todo),
                           measured=[]))
        if not todo or len(rounds) > max_rounds:
            return plan, rounds
        for i, (name, spec) in enumerate(todo):
            if should_stop is not None and should_stop():
                done = sum(len(r["measured"]) for r in rounds)
                raise InterruptedError(f"the allocation was cancelled in round {len(rounds)} after measuring {done} "
                                       "setting(s); they are kept, and the next allocation does not measure them "
                                       "again")
            if progress is not None:
                progress(i / len(todo), f"round {len(rounds)}: measuring {name} at rank {spec.rank} with "
                                        f"{spec.bits}-bit factors ({i + 1} of {len(todo)})")
            value = float(probe(name, spec))
            predictor.set_measured(name, spec.rank, spec.bits, value)
            rounds[-1]["measured"].append(dict(name=name, rank=int(spec.rank), bits=bit_width(spec.bits),
                                               dloss=value))


def measured_summary(rounds: list[dict], seconds: float, known: int) -> dict:
    """What an ``allocate_measured`` run did, for a plan's meta and the readouts."""
    return dict(rounds=len(rounds), measured=sum(len(r["measured"]) for r in rounds), seconds=round(seconds, 1),
                known=known, converged=rounds[-1]["unmeasured"] == 0)


def allocate_measured_cached(predictor: Predictor, probe, cache_root: str | Path, **kw) -> Plan:
    """``allocate_measured`` (``kw``: its options and the target) with the measured costs written
    to the cache (``save_measured``) also when a probe fails or the run is stopped; the plan's
    ``meta["measured_picks"]`` is its ``measured_summary``."""
    t0 = time.perf_counter()
    try:
        plan, rounds = allocate_measured(predictor, probe, **kw)
    finally:
        save_measured(predictor, cache_root)
    plan.meta["measured_picks"] = measured_summary(rounds, time.perf_counter() - t0, len(predictor.measured))
    return plan


MEASURED_FORMAT = 1
# what the measured costs of a grid depend on: its model, probe tokens and settings, and its date
# (a grid measured again is another grid)
_GRID_IDENTITY = ("fingerprint", "data_digest", "n_tokens", "stats_tokens", "method", "quant", "group_size",
                  "quant_options", "date", "dense_loss")


def measured_path(predictor: Predictor, cache_root: str | Path) -> Path:
    """The cache file of the measured costs for ``predictor``'s grid and estimator."""
    ident = {k: predictor.grid.meta.get(k) for k in _GRID_IDENTITY}
    ident["estimator"] = predictor.estimator
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_root) / "measured-picks" / f"{key}.json"


def load_measured(predictor: Predictor, cache_root: str | Path) -> int:
    """Give ``predictor`` the costs measured earlier for its grid and estimator
    (``save_measured``); returns how many. An unreadable cache file is warned about and skipped."""
    from analysis.atomic import CacheWarning

    path = measured_path(predictor, cache_root)
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MEASURED_FORMAT:
            raise ValueError(f"format {data.get('format')} is not {MEASURED_FORMAT}")
        recs = [(r["name"], int(r["rank"]), float(r["bits"]), float(r["dloss"])) for r in data["measured"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"the measured costs cached in {path} cannot be read ({e}): they are measured again when an "
                      "allocation picks them", CacheWarning, stacklevel=2)
        return 0
    n = 0
    for name, rank, bits, value in recs:
        if name in predictor.by_name and math.isfinite(value):
            predictor.set_measured(name, rank, bits, value)
            n += 1
    return n


def save_measured(predictor: Predictor, cache_root: str | Path) -> bool:
    """Write ``predictor.measured`` to the cache (atomically), so that later allocations on the
    same grid (another target, a reloaded page, the command line) reuse them. A cache that
    cannot be written is warned about (``save_to_cache``); returns whether it was saved."""
    from analysis.atomic import save_to_cache, write_text_atomic

    if not predictor.measured:
        return False
    path = measured_path(predictor, cache_root)
    data = dict(format=MEASURED_FORMAT, estimator=predictor.estimator, grid=predictor.grid.meta.get("data"),
                measured=[dict(name=n, rank=r, bits=b, dloss=v) for (n, r, b), v in sorted(predictor.measured.items())])

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1))

    return save_to_cache(save, "the measured costs", path.parent)


def rank_and_bits_note(names: list[str]) -> str:
    """What a prediction of ranks and bits together is worth (``Predictor.rank_and_bits``)."""
    return (f"{len(names)} linear(s) have a rank and bits together (e.g. {names[0]}): their predicted damage is the "
            "rank's plus the bits' measured alone, but quantised low-rank factors lose more than that (the factors' "
            "inputs are decorrelated, so quantisation's error compensation gains little; bench/RESULTS.md §23), "
            "so it is optimistic: run the plan to measure it, or allocate bits only")


# ------------------------------------------------------------------------ command line
def cli_allocate(args, say=None, progress=None) -> dict:
    """``python -m compression allocate``: load the model and the sensitivity grid (refusing a
    grid of another model), allocate (with ``--measure-picks``, measuring the ranks with quantised
    factors it picks on the grid's own probe windows, rebuilt from ``--text``), write the plan
    JSON; returns a summary dict."""
    from analysis.loading import cache_dir, load_model
    from analysis.metrics import linear_biases, model_bytes
    from analysis.sensitivity import check_compatible
    from compression.plan import check_plan_path, validate

    say = say or (lambda _m: None)
    try:
        check_plan_path(args.out)
    except ValueError as e:
        raise ValueError(f"--out: {e}") from None
    for kind in TARGET_FLAGS:  # cheap checks before the model loads
        value = getattr(args, f"target_{kind}", None)
        if value is not None:
            check_target(kind, value)
    measure = bool(getattr(args, "measure_picks", False))
    text = getattr(args, "text", None)
    if text is not None and not measure:
        raise ValueError("--text is read only with --measure-picks (the text the grid was measured on): add "
                         "--measure-picks, or drop --text")
    if measure and getattr(args, "only", None) is not None:
        raise ValueError("--measure-picks measures ranks with quantised factors, which an allocation of "
                         f"{args.only}s only never picks: drop --only, or --measure-picks")
    grid = SensitivityGrid.load(args.sensitivity)
    estimator = getattr(args, "estimator", None)
    estimator = grid.default_estimator() if estimator in (None, "auto") else estimator
    if measure and estimator not in ("kl", "dloss"):
        raise ValueError(f"--measure-picks measures KL or loss increases, not the {estimator} estimator: use "
                         "--estimator kl (or dloss)")
    corpus = windowing = None
    if measure:  # the grid's probe windows must be rebuilt: checked before the model loads
        from analysis.data import load_corpus
        from analysis.sensitivity import probe_windowing

        windowing = probe_windowing(grid.meta.get("data_digest"))
        if windowing is None:
            raise ValueError(f"{args.sensitivity}: this grid's probe windows cannot be rebuilt from a text (it was "
                             "not measured by `python -m analysis sensitivity`): measure the picks in the app (Budget "
                             "tab), or measure a grid with `python -m analysis sensitivity`")
        text = text or "default"
        corpus = load_corpus(text)
        if corpus.digest != windowing[0]:
            raise ValueError(f"--text {text} ({corpus.label}) is not the text the grid was measured on "
                             f"({grid.meta.get('data') or 'unnamed data'}): give that text")
    lm = load_model(args.model, args.device, args.dtype, trust_remote_code=args.trust_remote_code, progress=say)
    lm.require_dense("allocation")
    check_compatible(grid, lm.fingerprint, dtype=str(lm.dtype).replace("torch.", ""))
    linears = lm.adapter.linears(lm.model)
    biases = linear_biases(lm.model, linears)
    dense = model_bytes(lm.model).weight_bytes
    dtype_bytes = next(lm.model.parameters()).element_size()
    pred = Predictor(grid, linears, dense, dtype_bytes, biases,
                     base_plan=Plan(meta={"base_fingerprint": lm.fingerprint, "model": args.model}),
                     curvature_only=bool(getattr(args, "curvature_only", False)), estimator=estimator)
    known = load_measured(pred, cache_dir())
    if known:
        say(f"using {known} measured cost(s) of ranks with quantised factors from earlier --measure-picks runs on "
            "this grid (RankLab's cache)")
    target_kw = dict(target_bytes=getattr(args, "target_bytes", None), target_ratio=getattr(args, "target_ratio", None),
                     target_bits=getattr(args, "target_bits", None), only=getattr(args, "only", None),
                     lowrank=getattr(args, "lowrank", None))
    measured = None
    if measure:
        from analysis.sensitivity import SettingProbe, probe_inputs

        gm = grid.meta
        _, seqlen, seed = windowing
        ids, prof, _, _ = probe_inputs(lm, corpus, tokens=int(gm["n_tokens"]), seqlen=seqlen, seed=seed,
                                       profile_tokens=int(gm.get("stats_tokens") or gm["n_tokens"]),
                                       progress=progress, say=say)
        probe = SettingProbe(lm.model, ids, prof.all_stats(), estimator)
        plan = allocate_measured_cached(pred, probe, cache_dir(), progress=progress, **target_kw)
        measured = plan.meta["measured_picks"]
        say(f"measured {measured['measured']} rank(s) with quantised factors in {measured['rounds']} round(s) "
            f"({measured['seconds']:.0f} s; {measured['known']} known in all, cached for later allocations)"
            + ("" if measured["converged"] else "; stopped at the round limit with some picks unmeasured"))
    else:
        plan = allocate(pred, **target_kw)
    validate(plan, linears)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    m = plan.meta
    gm = grid.meta
    basis = (f"on the grid's probe text: {gm.get('data') or 'unnamed data'}, {gm.get('n_tokens', '?')} tokens "
             f"({gm.get('windows', '?')} x {gm.get('seqlen', '?')}), {pred.estimator} estimator, probed on "
             f"{gm.get('device', '?')}")
    say(f"allocated {len(plan.modules)} of {len(linears)} linears ({m['solver']} solver): predicted perplexity "
        f"{m['predicted_ppl']:.3f} (dense {math.exp(pred.dense_loss):.3f}) at {m['predicted_bytes']} bytes; "
        f"perplexities {basis} (measure the plan with `compression apply --plan` for the evaluation text)")
    kinds = module_kinds(plan, linears)
    if kinds["dense"] == len(linears):
        say(f"note: the target is at or above what the dense model takes ({dense} bytes); the plan keeps every "
            "module dense")
    if m["predicted_ppl"] < math.exp(pred.dense_loss):
        say(f"note: the {pred.estimator} estimator predicts a perplexity below the dense model's (some of its "
            "per-module estimates are negative); use the prediction to rank plans, not as a perplexity")
    together = pred.rank_and_bits(plan)
    if together:
        say(f"note: {rank_and_bits_note(together)} (--only bits, or --measure-picks)")
    lowrank = getattr(args, "lowrank", None)
    if lowrank and lowrank != pred.method:
        say(f"the prediction is for {pred.method} (the grid's method); the plan applies its ranks with {lowrank}"
            + (f", initialised from {pred.method}" if plan.lillama is not None else ""))
    return dict(out=str(out), target=m["target"], solver=m["solver"], predicted_loss=m["predicted_loss"],
                predicted_ppl=m["predicted_ppl"], dense_ppl=math.exp(pred.dense_loss), bytes=m["predicted_bytes"],
                dense_bytes=dense, ratio=m["ratio"], bits_per_weight=m["bits_per_weight"],
                modules=kinds, seconds=m["seconds"], sensitivity=str(args.sensitivity), ppl_protocol=basis,
                measured_picks=measured)
