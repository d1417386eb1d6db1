"""Two cached vq grids measured on different probe-token counts (e.g. 128 and 512): how much
do their KLs and their allocations differ? (RESULTS §20.)

Loads the grids ``bench_sensitivity.py --grid-quant vq --fractions none --tag TAG`` cached,
allocates bits only at ``--bits`` on each (KL estimator), and reports each plan's widths, each
plan's predicted ppl16 under both grids (dense ppl16 x exp(Σ KL)), how many linears the two
plans set differently, and the Spearman correlation and median |log ratio| of the grids' KLs
setting by setting. Writes ``results/grid_tokens_probe.json``.

    python bench/probe_grid_tokens.py [--grids vq8:128,vq8b512:512] [--bits 2.5]
"""
from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch
from common import MODEL, grid_folder, log, save  # noqa: I001
from scipy.stats import spearmanr

from analysis.loading import load_model
from analysis.metrics import linear_biases, model_bytes
from analysis.sensitivity import SensitivityGrid
from compression.allocate import Predictor, allocate
from compression.plan import PlanWarning

DENSE_PPL16 = 20.71  # RESULTS §1 (CPU: 20.7133)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", default="vq8:128,vq8b512:512", help="TAG:TOKENS of two cached vq grids")
    ap.add_argument("--bits", type=float, default=2.5)
    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    torch.set_num_threads(1)
    lm = load_model(MODEL, "cpu")
    linears = lm.adapter.linears(lm.model)
    dense_bytes, biases = model_bytes(lm.model).weight_bytes, linear_biases(lm.model, linears)
    keys = [(t, int(n)) for t, n in (x.split(":") for x in a.grids.split(","))]
    grids = {f"{t}:{n}": SensitivityGrid.load(grid_folder(t, n, 256, "vq")) for t, n in keys}
    preds = {k: Predictor(g, linears, dense_bytes, 4, biases, estimator="kl") for k, g in grids.items()}
    plans = {k: allocate(p, target_bits=a.bits, quant="vq", only="bits") for k, p in preds.items()}
    out = dict(protocol=f"grids {list(grids)} (vq, bits only, KL); allocation bits only at {a.bits} bits per "
                        f"weight; predicted ppl16 = {DENSE_PPL16} x exp(sum KL)", plans={})
    for k, plan in plans.items():
        widths = {str(b): sum(plan.spec_for(li.name).bits == b for li in linears) for b in (2, 2.5, 3, 4)}
        predicted = {m: DENSE_PPL16 * math.exp(p.predict(plan).dloss) for m, p in preds.items()}
        out["plans"][k] = dict(widths=widths, predicted_ppl16=predicted)
        log(f"plan on {k}: {widths}; predicted {({m: round(v, 2) for m, v in predicted.items()})}")
    (k1, p1), (k2, p2) = plans.items()
    out["linears_set_differently"] = sum(p1.spec_for(li.name).bits != p2.spec_for(li.name).bits for li in linears)
    t1, t2 = (grids[k].kl.sort_values(["name", "setting"])["kl"].to_numpy() for k in (k1, k2))
    out["kl_spearman"] = float(spearmanr(t1, t2).statistic)
    out["kl_median_abs_log_ratio"] = float(np.median(np.abs(np.log(t1 / t2))))
    log(f"{out['linears_set_differently']} linears set differently; KL Spearman {out['kl_spearman']:.3f}, "
        f"median |log ratio| {out['kl_median_abs_log_ratio']:.3f}")
    save("grid_tokens_probe", out)


if __name__ == "__main__":
    main()
