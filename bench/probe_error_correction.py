"""Would a low-rank correction of the quantisation error (the design card's second way of
combining low rank and quantisation: LQER / LQ-LoRA-style) help issue 5's 2.5-bit target?
A probe, not a method RankLab ships.

For every linear of some decoder layers, the relative output error (as ``probe_rotation.py``)

    err = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   H = X Xᵀ of the layer's inputs (benchmark profile),

of GPTQ (act-order, group 128) at b bits plus a rank-r correction kept in fp16 (16 r (m + n)
bits), with r the largest rank that fits a budget of average bits per weight, against plain
GPTQ at the next width (which the same budget buys). Two ways to fit the correction:

* ``after``: quantise W, then the whitened SVD (SVD-LLM) of the error W - Q(W) (LQER-style);
* ``before``: the whitened top-r of W first, then quantise the residual W - L (LQ-LoRA-style).

Writes ``results/error_correction_probe.json``.

    python bench/probe_error_correction.py [--layers 2,15,28] [--threads 2]
"""
from __future__ import annotations

import statistics

import torch
from common import layer_weights, log, probe_args, save  # noqa: I001
from probe_rotation import rel_error

from compression.lowrank import whitened_svd_factors
from compression.quant import dequantize_affine, gptq_quantize, n_groups

GROUP = 128


def quant_bits(b: int, m: int, n: int) -> float:
    """Average bits per weight of b-bit codes with an fp16 scale and zero per group."""
    return (b * m * n + 32 * m * n_groups(n, GROUP)) / (m * n)


def gptq(w: torch.Tensor, h: torch.Tensor, b: int) -> torch.Tensor:  # (m, n) -> (m, n)
    return dequantize_affine(*gptq_quantize(w, h, b, GROUP, act_order=True), GROUP)


def lowrank(w: torch.Tensor, h: torch.Tensor, r: int) -> torch.Tensor:  # (m, n) -> rank-r (m, n)
    a, b = whitened_svd_factors(w.double(), h, r)  # (r, n), (m, r)
    return (b @ a).float()


def main() -> None:
    _, layers = probe_args(__doc__)
    cal_label, items = layer_weights(layers)
    rows = []
    for name, w, h in items:  # w (m, n), h (n, n)
        m, n = w.shape
        q = {b: gptq(w, h, b) for b in (2, 3, 4)}
        row = dict(name=name, **{f"gptq{b}": rel_error(w, q[b], h) for b in q})
        for b, budget, label in ((2, 2.5, "2.5"), (2, quant_bits(3, m, n), "next2"), (3, quant_bits(4, m, n), "next3")):
            r = int((budget - quant_bits(b, m, n)) * m * n / (16 * (m + n)))
            row[f"rank_{label}"] = r
            row[f"after_{label}"] = rel_error(w, q[b] + lowrank(w - q[b], h, r), h)
            low = lowrank(w, h, r)
            row[f"before_{label}"] = rel_error(w, low + gptq(w - low, h, b), h)
        log(f"{name:34s} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items() if k != "name"))
        rows.append(row)
    keys = [k for k in rows[0] if k != "name" and not k.startswith("rank")]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    ratio = lambda k, ref: statistics.median(r[k] / r[ref] for r in rows)  # noqa: E731
    summary = dict(
        median=med,
        after_vs_gptq2_at_2_5=ratio("after_2.5", "gptq2"), before_vs_gptq2_at_2_5=ratio("before_2.5", "gptq2"),
        after_2_5_vs_gptq3=ratio("after_2.5", "gptq3"),
        after_next2_vs_gptq3=ratio("after_next2", "gptq3"),
        before_next2_vs_gptq3=ratio("before_next2", "gptq3"),
        after_next3_vs_gptq4=ratio("after_next3", "gptq4"), before_next3_vs_gptq4=ratio("before_next3", "gptq4"),
        linears_where_correction_beats_next_width=dict(
            at_3_bits=sum(min(r["after_next2"], r["before_next2"]) < r["gptq3"] for r in rows),
            at_4_bits=sum(min(r["after_next3"], r["before_next3"]) < r["gptq4"] for r in rows), of=len(rows)))
    log(summary)
    save("error_correction_probe", dict(
        protocol=f"GPTQ act-order g{GROUP} on the profile of {cal_label} 32 x 2048 (seed 0); "
                 f"layers {sorted(layers)}; corrections in fp16 (16 r (m + n) bits), whitened SVD; fp32 CPU",
        rows=rows, summary=summary))


if __name__ == "__main__":
    main()
