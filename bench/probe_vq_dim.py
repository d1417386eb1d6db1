"""4-vectors (one codebook per matrix, a scale per row) against pairs (a codebook per tile):
output error and bits per weight of each decoder linear at vq's 2 and 2.5 bits. A probe for
issue 5's 2.5-bit target (RESULTS §22).

For every linear of some decoder layers, ``QuantLinear.from_linear`` with ``VQConfig(bits,
dim=2)`` and ``VQConfig(bits, dim=4)`` (otherwise the defaults), on the benchmark's calibration
profile, and the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (H = X Xᵀ). Bits per weight
are the module's stored bytes (codes, codebooks and their scales, column order, row scales).
Writes ``results/vq_dim_probe.json``.

    python bench/probe_vq_dim.py [--layers 2,15,28] [--threads 2] [--bits 2,2.5]
"""
from __future__ import annotations

import time

import torch
from common import error_summary, layer_weights, log, probe_args, save  # noqa: I001
from probe_rotation import rel_error

from analysis.stats import InputStats, LinearStats
from compression.configs import VQConfig
from compression.quant import QuantLinear


def main() -> None:
    a, layers = probe_args(__doc__, bits="2,2.5")
    widths = [float(b) if "." in b else int(b) for b in a.bits.split(",")]
    cal_label, items = layer_weights(layers)
    rows = []
    for name, w, h in items:  # w (m, n), h (n, n)
        m, n = w.shape
        lin = torch.nn.Linear(n, m, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        stats = LinearStats(InputStats(0, torch.zeros(n, dtype=torch.float64), h))
        row = dict(name=name, weights=m * n)
        for bits in widths:
            for dim in (2, 4):
                t = time.perf_counter()
                q = QuantLinear.from_linear(lin, VQConfig(bits, dim=dim), stats)
                row[f"{bits}/{dim}"] = dict(error=rel_error(w, q.dequantized_weight(), h),
                                            bits_per_weight=q.quantized_nbytes() * 8 / (m * n),
                                            seconds=time.perf_counter() - t)
        log(name, {k: (round(v["error"], 5), round(v["bits_per_weight"], 3)) for k, v in row.items()
                   if isinstance(v, dict)})
        rows.append(row)
    summary = {}
    for bits in widths:
        for dim in (2, 4):
            k = f"{bits}/{dim}"
            summary[k] = dict(error_summary(rows, k), seconds=sum(r[k]["seconds"] for r in rows))
        four, two = summary[f"{bits}/4"], summary[f"{bits}/2"]
        four["geomean_vs_pairs"] = four["geomean_error"] / two["geomean_error"]
        log(f"vq {bits}: pairs {two['bits_per_weight']:.4f} bits, error {two['geomean_error']:.5f}; 4-vectors "
            f"{four['bits_per_weight']:.4f} bits, error {four['geomean_error']:.5f} ({four['geomean_vs_pairs']:.3f}x)")
    save("vq_dim_probe", dict(protocol=f"profile of {cal_label} 32 x 2048 (seed 0); layers {sorted(layers)}; "
                                       "vq defaults otherwise (k-means 25 iterations seed 0, int8 codebooks); "
                                       f"fp32 CPU, {torch.get_num_threads()} threads",
                              rows=rows, summary=summary))


if __name__ == "__main__":
    main()
