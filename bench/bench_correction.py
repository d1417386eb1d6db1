"""Does correcting predictions with measured runs (``compression.correction``) help, and after
how many runs? Two sets of measured plans:

A. stored: the 12 random plans of section 4 (``results/sensitivity_cpu_default.json``: the
   default 128-token svd-llm/RTN grid, KL estimator, ppl16 on WikiText-2 test). Nothing is
   measured again; their predicted and measured increases are read back. Their plans were not
   stored, so only the corrections of the total (one scale, power law) can be evaluated there.
B. the app's own path (``compression.lab.Lab`` with ``LabSettings`` defaults on the CPU:
   default corpus, 16 x 256 calibration, 4 x 256 evaluation tokens): a profile, the first view
   and the measured grid, then 24 structured and random plans run and measured
   (``--measure``, about 30 min on 2 cores; the runs are kept in
   ``results/correction_runs.jsonl``, the app's own history format). Without ``--measure``
   the stored runs are predicted again by both predictors (grid and first view, recomputed or
   read from the cache) and evaluated.

For each set, predictor and correction: the error of the raw additive prediction, leave-one-out
corrected predictions, and the *online* case a user meets (runs arrive in a random order, each
predicted from the correction fitted on the runs before it; 500 orders). Error = |predicted ppl /
measured ppl - 1|. Corrections compared: one scale on the total, a power law on the total
(``scale * total ** power``, clamped to 0.5-2; tried first and dropped), and the shipped one,
one scale for the rank part and one for the bits part (``fit_correction``). Writes
``results/correction_cpu.json``.

    python bench/bench_correction.py [--measure]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import RESULTS, log, save  # noqa: I001

from compression.allocate import Predictor
from compression.correction import MIN_PREDICTED, fit_correction
from compression.lab import Lab, LabSettings
from compression.plan import ModuleSpec, Plan

ORDERS = 500
PRIOR_RUNS = (1, 2, 3, 5, 8, 12)
RUNS = RESULTS / "correction_runs.jsonl"

# ------------------------------------------------------------------ corrections compared
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[float, float], float]]


def _usable(r, b, m):
    keep = (r + b >= MIN_PREDICTED) & (m > 0)
    return r[keep], b[keep], m[keep]


def one_scale(r, b, m):
    r, b, m = _usable(r, b, m)
    if len(m) == 0:
        return lambda x, y: x + y
    a = math.exp(float(np.mean(np.log(m) - np.log(r + b))))
    return lambda x, y: a * (x + y)


def power_law(r, b, m):  # the first version: scale * total ** power, power fitted from 3 runs spanning 2x
    r, b, m = _usable(r, b, m)
    if len(m) == 0:
        return lambda x, y: x + y
    p = r + b
    power = 1.0
    if len(m) >= 3 and p.max() / p.min() >= 2.0:
        power = float(np.clip(np.polyfit(np.log(p), np.log(m), 1)[0], 0.5, 2.0))
    a = math.exp(float(np.mean(np.log(m) - power * np.log(p))))
    return lambda x, y: a * (x + y) ** power if x + y > 0 else 0.0


def two_scales(r, b, m):  # the shipped correction
    cal = fit_correction(r, b, m)
    return (lambda x, y: x + y) if cal is None else cal.apply


FITS: dict[str, Fit] = {"one scale": one_scale, "power law": power_law, "rank + bits scales": two_scales}


def errors(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    """|exp(predicted - measured increase) - 1|: the relative error of the predicted perplexity."""
    return np.abs(np.expm1(pred - meas))


def evaluate(r: list[float], b: list[float], meas: list[float], fit: Fit, seed: int = 0) -> dict:
    r_, b_, m = np.asarray(r), np.asarray(b), np.asarray(meas)
    n = len(m)
    loo = []
    for i in range(n):
        keep = np.arange(n) != i
        loo.append(fit(r_[keep], b_[keep], m[keep])(r_[i], b_[i]))
    rng = np.random.default_rng(seed)
    online: dict[int, list[float]] = {k: [] for k in PRIOR_RUNS if k < n}
    for _ in range(ORDERS):
        order = rng.permutation(n)
        for k in online:
            f = fit(r_[order[:k]], b_[order[:k]], m[order[:k]])
            nxt = order[k]
            online[k].append(float(abs(math.expm1(f(r_[nxt], b_[nxt]) - m[nxt]))))
    raw_e, loo_e = errors(r_ + b_, m), errors(np.asarray(loo), m)
    return dict(n=n, raw_median=float(np.median(raw_e)), raw_p90=float(np.quantile(raw_e, 0.9)),
                raw_max=float(raw_e.max()), loo_median=float(np.median(loo_e)),
                loo_p90=float(np.quantile(loo_e, 0.9)), loo_max=float(loo_e.max()),
                online_median={k: float(np.median(v)) for k, v in online.items()},
                online_p90={k: float(np.quantile(v, 0.9)) for k, v in online.items()})


def stored_set() -> dict:
    d = json.loads((RESULTS / "sensitivity_cpu_default.json").read_text())
    dense = d["dense_ppl16"]
    pred = [math.log(r["predicted_ppl16"] / dense) for r in d["random_plans"]]
    meas = [math.log(r["ppl16"] / dense) for r in d["random_plans"]]
    zeros = [0.0] * len(pred)  # the total only: rank and bits parts were not stored
    return dict(protocol=d["protocol"] + "; predicted = the default grid's KL sum",
                grid_kl={name: evaluate(pred, zeros, meas, fit) for name, fit in FITS.items()
                         if name != "rank + bits scales"})


# ------------------------------------------------------------------ the app path
def app_plans(lab: Lab, n_random: int) -> list[tuple[str, Plan]]:
    n_layers = max(li.layer for li in lab.linears) + 1
    half = n_layers // 2

    def sliders(pct, bits):
        pcts = pct if isinstance(pct, list) else [pct] * n_layers
        bs = bits if isinstance(bits, list) else [bits] * n_layers
        return lab.plan_from_sliders(pcts, bs)

    plans = [("rtn 8-bit", sliders(100, 8)), ("rtn 4-bit", sliders(100, 4)), ("rtn 3-bit", sliders(100, 3)),
             ("svd-llm 75 %", sliders(75, None)), ("svd-llm 50 %", sliders(50, None)),
             ("svd-llm 75 % + 4-bit", sliders(75, 4)), ("svd-llm 50 % + 8-bit", sliders(50, 8)),
             ("4-bit below, 3-bit above", sliders(100, [4] * half + [3] * (n_layers - half))),
             ("3-bit below, 4-bit above", sliders(100, [3] * half + [4] * (n_layers - half))),
             ("svd-llm 50 % in the top half", sliders([100] * half + [50] * (n_layers - half), None))]
    for ratio in (0.5, 0.35, 0.3, 0.25):
        plans.append((f"allocated to {ratio}", lab.plan_allocate(ratio)))
    rng = random.Random(0)
    pred = lab.predictor
    for i in range(n_random):
        density = 0.15 + 0.85 * i / max(1, n_random - 1)
        mods = {}
        for li in lab.linears:
            if rng.random() < density:
                if rng.random() < 0.5 and pred.grid_ranks(li.name):
                    mods[li.name] = ModuleSpec(rank=rng.choice(pred.grid_ranks(li.name)), lowrank="svd-llm")
                else:
                    mods[li.name] = ModuleSpec(bits=rng.choice([3, 4, 8]), group_size=128)
        plans.append((f"random {density:.2f}", Plan(modules=mods, meta={"method": "random"})))
    return plans


def app_lab(workspace: Path) -> tuple[Lab, Predictor, Predictor, dict]:
    """The app's session with the first view and the measured grid (each computed or read from
    the cache), a predictor for each, and the dense model measured."""
    lab = Lab(workspace, LabSettings())
    lab.load("default", "cpu")
    lab.run_profile()
    lab.run_proxy()
    size_args = (lab.linears, lab.predictor.dense_total_bytes, lab.predictor.dtype_bytes, lab._biases())
    first_view = Predictor(lab.proxy, *size_args, estimator=lab.proxy.default_estimator())
    lab.run_sensitivity("svd-llm", "rtn", 128)
    grid = Predictor(lab.sensitivity, *size_args, estimator=lab.sensitivity.default_estimator())
    return lab, first_view, grid, lab.evaluate_dense()


def measure(n_plans: int) -> None:
    ws = Path(tempfile.mkdtemp())
    lab, _, _, _ = app_lab(ws)
    structured = app_plans(lab, 0)
    for label, plan in app_plans(lab, max(0, n_plans - len(structured))):
        rec = lab.run(plan, label)
        if rec.status != "ok":
            raise RuntimeError(f"{label}: {rec.error}")
        log(f"{label}: ppl {rec.measured['ppl']:.2f} (predicted {rec.predicted.get('ppl', math.nan):.2f}), "
            f"{rec.seconds:.0f} s")
    shutil.copy(lab.history.path, RUNS)
    log(f"wrote {RUNS}")


def app_set() -> dict:
    lab, first_view, grid, dense = app_lab(Path(tempfile.mkdtemp()))
    rows = []
    for rec in (json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()):
        if rec["status"] != "ok":
            continue
        if rec["protocol"] != lab.protocol() or rec["fingerprint"] != lab.lm.fingerprint:
            raise RuntimeError(f"run {rec['run_id']} was measured on another model or protocol: {rec['protocol']}")
        plan = Plan.from_dict(rec["plan"])
        fv, gr = first_view.predict(plan), grid.predict(plan)
        rows.append(dict(label=rec["label"], measured=rec["measured"]["nll"] - dense["nll"],
                         measured_ppl=rec["measured"]["ppl"], bits_per_weight=rec["measured"]["bits_per_weight"],
                         first_view=(fv.dloss_rank, fv.dloss_bits), grid=(gr.dloss_rank, gr.dloss_bits)))
    meas = [r["measured"] for r in rows]
    out = dict(protocol=f"app path (compression.lab, LabSettings defaults): {lab.protocol()}; dense ppl "
                        f"{dense['ppl']:.3f}; grid: svd-llm / RTN g128 probed on the first 128 calibration tokens, "
                        "KL; first view: gradient-weighted, token cap 100; runs: results/correction_runs.jsonl",
               plans=rows)
    for src in ("first_view", "grid"):
        r = [row[src][0] for row in rows]
        b = [row[src][1] for row in rows]
        out[src] = {name: evaluate(r, b, meas, fit) for name, fit in FITS.items()}
        full = fit_correction(r, b, meas)
        out[src]["fit_all"] = dict(rank_scale=full.rank_scale, bits_scale=full.bits_scale, n=full.n, rms=full.rms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="run and measure the plans of set B again")
    ap.add_argument("--plans", type=int, default=24, help="plans measured in set B (14 structured, the rest random)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.measure or not RUNS.exists():
        measure(a.plans)
    out = dict(stored=stored_set(), app=app_set())
    out["seconds"] = time.perf_counter() - t0
    save("correction_cpu", out)
    for name, res in out["stored"]["grid_kl"].items():
        log("stored grid", name, json.dumps(res))
    for src in ("first_view", "grid"):
        for name, res in out["app"][src].items():
            log(src, name, json.dumps(res))


if __name__ == "__main__":
    main()
