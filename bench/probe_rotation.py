"""Does rotating a linear's inputs before GPTQ (QuIP / QuaRot-style incoherence) close the gap
between 2 and 3 bits? A probe for issue 5's 2.5-bit target, not a method RankLab ships.

For every linear of some decoder layers: the relative output error of GPTQ (act-order, group
128, the compression benchmark's calibration profile) at 2 and 3 bits,

    err = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   H = X Xᵀ of the layer's inputs,

with and without a random orthogonal rotation R of the input dimension (quantise W R with the
Hessian Rᵀ H R, then rotate back). Writes ``results/rotation_probe.json``.

    python bench/probe_rotation.py [--layers 2,15,28] [--threads 2]
"""
from __future__ import annotations

import statistics

import torch
from common import layer_weights, log, probe_args, save  # noqa: I001

from compression.quant import dequantize_affine, gptq_quantize


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); w, w_hat (m, n), h (n, n) float64."""
    d, w = (w - w_hat).double(), w.double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diag(r))


def main() -> None:
    _, layers = probe_args(__doc__)
    cal_label, items = layer_weights(layers)
    rows = []
    for name, w, h in items:  # w (m, n), h (n, n)
        rot = random_rotation(w.shape[1])
        row = dict(name=name)
        for bits in (2, 3):
            plain = dequantize_affine(*gptq_quantize(w, h, bits, 128, act_order=True), 128)
            turned = dequantize_affine(*gptq_quantize(w @ rot.float(), rot.T @ h @ rot, bits, 128, act_order=True),
                                       128) @ rot.T.float()
            row[f"gptq{bits}"], row[f"rotated{bits}"] = rel_error(w, plain, h), rel_error(w, turned, h)
        log(f"{name:34s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "name"))
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in ("gptq2", "rotated2", "gptq3", "rotated3")}
    summary = dict(median=med, rotation_gain_2bit=med["gptq2"] / med["rotated2"],
                   rotation_gain_3bit=med["gptq3"] / med["rotated3"],
                   two_vs_three_bits_plain=med["gptq2"] / med["gptq3"],
                   rotated_two_vs_plain_three=med["rotated2"] / med["gptq3"])
    log(summary)
    save("rotation_probe", dict(protocol=f"GPTQ act-order g128 on the profile of {cal_label} 32 x 2048 (seed 0); "
                                         f"layers {sorted(layers)}; fp32 CPU", rows=rows, summary=summary))


if __name__ == "__main__":
    main()
