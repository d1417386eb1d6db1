"""Would a vector quantiser (GPTVQ-style: k-means codebooks of d-dimensional weight vectors,
quantised in GPTQ order with the error spread through the inverse Hessian) reach 3-bit GPTQ's
error at 2.5 bits per weight? A probe for issue 5's 2.5-bit target, not a method RankLab ships.

For every linear of some decoder layers, the relative output error (as ``probe_rotation.py``)
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of:

* scalar GPTQ (act-order, asymmetric, fp16 scale and zero per group) at 2 bits g128 (2.25
  bits per weight on 128-wide rows), 2 bits g64 (2.5) and 3 bits g128 (3.25);
* vector quantisation: columns visited by decreasing ``diag(H)``, consecutive visited columns
  paired into d-dimensional vectors; each tile of R rows x C visited columns has its own
  codebook of 2^(d*b) centroids (fp16), fitted by k-means (weighted by the inverse-Hessian
  diagonal) on the tile's weights as updated when its columns are reached; each vector takes
  the centroid that adds the least loss, ``||(w - c) U_SS⁻¹||²`` with U the upper Cholesky
  factor of H⁻¹, and its error is spread onto the later columns as GPTQ does. Bits per weight
  count the codes and the codebooks (the column order, n integers, is left out: < 0.03 bits).

Writes ``results/vq_probe.json``.

    python bench/probe_vq.py [--layers 2,15,28] [--threads 2]
"""
from __future__ import annotations

import statistics

import torch
from common import layer_weights, log, probe_args, save  # noqa: I001
from probe_rotation import rel_error

from compression.quant import _inverse_hessian_chol, dequantize_affine, gptq_quantize, n_groups

# name -> (d, bits per dimension, tile rows, tile columns)
VQ = {"vq2d-b2-t32x32": (2, 2, 32, 32), "vq2d-b2-t64x32": (2, 2, 64, 32),
      "vq2d-b2.5-t128x64": (2, 2.5, 128, 64), "vq4d-b2-t256x256": (4, 2, 256, 256)}


def weighted_kmeans(v: torch.Tensor, wt: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Batched k-means. v, wt (T, N, d): vectors and per-coordinate weights -> centroids (T, k, d)."""
    t, n, d = v.shape
    idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(t)])  # (T, k)
    c = torch.gather(v, 1, idx[..., None].expand(t, k, d)).clone()  # (T, k, d)
    for _ in range(iters):
        dist = -2 * torch.bmm(wt * v, c.transpose(1, 2)) + torch.bmm(wt, (c * c).transpose(1, 2))  # (T, N, k)
        a = dist.argmin(-1)  # (T, N)
        num = torch.zeros(t, k, d).scatter_add_(1, a[..., None].expand(t, n, d), wt * v)
        den = torch.zeros(t, k, d).scatter_add_(1, a[..., None].expand(t, n, d), wt)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
    return c


def gptvq(w: torch.Tensor, h: torch.Tensor, d: int, b: float, rows: int, cols: int, iters: int = 25,
          seed: int = 0) -> tuple[torch.Tensor, float]:
    """w (m, n), h (n, n) -> (dequantised (m, n), bits per weight)."""
    m, n = w.shape
    k = round(2 ** (d * b))
    rows, cols = min(rows, m), min(cols, n)
    while m % rows:  # the largest tile height up to ``rows`` that divides m
        rows -= 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.diag(h), descending=True)
    W = w.detach().float()[:, perm].clone()  # (m, n), visiting order
    U = _inverse_hessian_chol(h.double()[perm][:, perm], 0.01).float()  # (n, n) upper
    Q = torch.empty_like(W)
    n_tiles_r = m // rows
    codebooks = 0
    for c0 in range(0, n, cols):
        c1 = min(c0 + cols, n)
        width = (c1 - c0) // d * d
        # tile vectors (T, N, d) and weights 1 / U_jj² per coordinate
        blk = W[:, c0:c0 + width].reshape(n_tiles_r, rows, width // d, d).reshape(n_tiles_r, -1, d)
        wt = (1 / torch.diag(U)[c0:c0 + width] ** 2).reshape(width // d, d)
        wt = wt[None, None].expand(n_tiles_r, rows, width // d, d).reshape(n_tiles_r, -1, d)
        cb = weighted_kmeans(blk, wt.contiguous(), min(k, blk.shape[1]), iters, gen)  # (T, k, d)
        codebooks += cb.shape[0] * cb.shape[1]
        for j in range(c0, c1, d):
            s = slice(j, min(j + d, c1))
            dd = s.stop - s.start
            tinv = torch.linalg.inv(U[s, s])  # (dd, dd)
            x = W[:, s].reshape(n_tiles_r, rows, dd)  # (T, R, dd)
            cbs = cb[..., :dd]
            xt, ct = x @ tinv, cbs @ tinv  # whitened
            dist = -2 * torch.bmm(xt, ct.transpose(1, 2)) + (ct * ct).sum(-1)[:, None, :]  # (T, R, k)
            a = dist.argmin(-1)  # (T, R)
            q = torch.gather(cbs, 1, a[..., None].expand(-1, -1, dd)).reshape(m, dd)  # (m, dd)
            Q[:, s] = q
            err = (W[:, s] - q) @ tinv  # (m, dd)
            W[:, s.stop:] -= err @ U[s, s.stop:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    bits = (m * n / d * (d * b) + codebooks * d * 16) / (m * n)
    return out, bits


def main() -> None:
    a, layers = probe_args(__doc__, only="")  # --only: comma-separated VQ names (default: all)
    vq = {k: v for k, v in VQ.items() if not a.only or k in a.only.split(",")}
    cal_label, items = layer_weights(layers)
    rows, tot = [], {}
    for name, w, h in items:  # w (m, n), h (n, n)
        m, n = w.shape
        row = dict(name=name)
        for label, bits, g in (("gptq2-g128", 2, 128), ("gptq2-g64", 2, 64), ("gptq3-g128", 3, 128)):
            wq = dequantize_affine(*gptq_quantize(w, h, bits, g, act_order=True), g)
            row[label] = rel_error(w, wq, h)
            tot.setdefault(label, [0.0, 0])
            tot[label][0] += (bits * m * n + 32 * m * n_groups(n, g))
            tot[label][1] += m * n
        for label, (d, b, r, c) in vq.items():
            wq, bpw = gptvq(w, h, d, b, r, c)
            row[label] = rel_error(w, wq, h)
            tot.setdefault(label, [0.0, 0])
            tot[label][0] += bpw * m * n
            tot[label][1] += m * n
        log(f"{name:34s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "name"))
        rows.append(row)
    keys = [k for k in rows[0] if k != "name"]
    summary = {k: dict(bits_per_weight=tot[k][0] / tot[k][1], median_error=statistics.median(r[k] for r in rows),
                       median_vs_gptq3=statistics.median(r[k] / r["gptq3-g128"] for r in rows)) for k in keys}
    for k, v in summary.items():
        log(f"{k:20s} bits {v['bits_per_weight']:.3f}  median err {v['median_error']:.4f}  "
            f"vs gptq3 {v['median_vs_gptq3']:.2f}x")
    save("vq_probe", dict(protocol=f"profile of {cal_label} 32 x 2048 (seed 0); layers {sorted(layers)}; GPTQ "
                                   "act-order; VQ codebooks fp16, k-means 25 iterations seed 0; fp32 CPU",
                          configs={k: dict(zip(("d", "bits_per_dim", "tile_rows", "tile_cols"), v))
                                   for k, v in vq.items()},
                          rows=rows, summary=summary))


if __name__ == "__main__":
    main()
