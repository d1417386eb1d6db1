"""Rank and bits together: how far is quantising the low-rank factors from the sum of its
parts? A probe for issue 5's ranks + bits allocation (RESULTS §23).

The allocator predicts a linear given rank ``r`` and ``b``-bit factors as ``dloss(rank r) +
dloss(b bits on W)``, both measured alone. For every linear that the ranks + bits plan
allocated at ``--target`` bits per weight on a cached grid gives rank and bits together, this
measures the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (H = X Xᵀ of the calibration
profile) of: the rank-r factors (svd-llm) in full precision; W quantised at b bits; factor A
alone quantised, factor B alone quantised, and both, as ``compression.apply`` quantises them
(``factor_quants`` groups, B's statistics from A). Writes ``results/factor_quant_probe.json``.

    python bench/probe_factor_quant.py [--grid-tag vq4r] [--quant vq] [--target 2.5] [--threads 2]
"""
from __future__ import annotations

import copy
import statistics

import torch
from common import grid_parser, grid_predictor, log, save  # noqa: I001
from probe_rotation import rel_error

from analysis.adapters import get_submodule
from compression.allocate import allocate
from compression.apply import factor_stats
from compression.configs import factor_quants
from compression.plan import ModuleSpec
from compression.registry import handler_for


def main() -> None:
    ap = grid_parser(__doc__)
    ap.add_argument("--threads", type=int, default=2)
    a, lm, (cal_c, *_), stats, pred = grid_predictor(ap)
    torch.set_num_threads(a.threads)
    plan = allocate(pred, target_bits=a.target, quant=a.quant)
    rows = []
    with torch.no_grad():
        for name, spec in plan.modules.items():
            if not (spec.rank and spec.bits):
                continue
            lin = get_submodule(lm.model, name)
            w, h = lin.weight.detach().float(), stats[name].inputs.xxt.double()  # (m, n), (n, n)
            lr = ModuleSpec(rank=spec.rank, lowrank="svd-llm").lowrank_config()
            q = ModuleSpec(bits=spec.bits, group_size=128, quant=a.quant).quant_config()
            low = handler_for(lr)(copy.deepcopy(lin), lr, stats[name])
            fa, fb = low.A.weight.detach().float(), low.B.weight.detach().float()  # (r, n), (m, r)
            qa, qb = factor_quants(q, w.shape[1], spec.rank)
            a_hat = handler_for(qa)(copy.deepcopy(low.A), qa, stats[name]).dequantized_weight().float()
            b_hat = handler_for(qb)(copy.deepcopy(low.B), qb, factor_stats(stats[name], low.A.weight)
                                    ).dequantized_weight().float()
            w_hat = handler_for(q)(copy.deepcopy(lin), q, stats[name]).dequantized_weight().float()
            kl_rank, kl_bits = pred.dloss_parts(name, spec)
            r = dict(name=name, rank=spec.rank, bits=spec.bits, groups=[qa.group_size, qb.group_size],
                     rank_error=rel_error(w, fb @ fa, h), bits_error=rel_error(w, w_hat, h),
                     a_error=rel_error(w, fb @ a_hat, h), b_error=rel_error(w, b_hat @ fa, h),
                     both_error=rel_error(w, b_hat @ a_hat, h), predicted_kl_rank=kl_rank, predicted_kl_bits=kl_bits)
            r["both_over_sum"] = r["both_error"] / (r["rank_error"] + r["bits_error"])
            log(name, spec.rank, spec.bits, {k: round(v, 5) for k, v in r.items() if isinstance(v, float)})
            rows.append(r)
    ratios = [r["both_over_sum"] for r in rows]
    added_by_b = [(r["b_error"] - r["rank_error"]) / r["bits_error"] for r in rows]
    added_by_a = [(r["a_error"] - r["rank_error"]) / r["bits_error"] for r in rows]
    summary = dict(linears=len(rows), median_both_over_sum=statistics.median(ratios), min_both_over_sum=min(ratios),
                   max_both_over_sum=max(ratios), median_added_by_b_over_bits=statistics.median(added_by_b),
                   median_added_by_a_over_bits=statistics.median(added_by_a))
    log(summary)
    save("factor_quant_probe", dict(protocol=f"profile of {cal_c.label} 32 x 2048 (seed 0); plan: ranks + bits "
                                             f"allocated at {a.target} bits per weight on grid {a.grid_tag} (KL); "
                                             f"svd-llm factors, {a.quant} g128 defaults; fp32 CPU, "
                                             f"{torch.get_num_threads()} threads",
                                    rows=rows, summary=summary))


if __name__ == "__main__":
    main()
