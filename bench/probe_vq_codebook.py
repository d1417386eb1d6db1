"""vq codebooks in int8 (one fp16 scale per tile and coordinate) against fp16: how much output
error does the cheaper codebook cost? A probe for issue 5's 2.5-bit target (RESULTS §20).

For every linear of some decoder layers and each vq width, ``compression.quant.vq_quantize``
with ``codebook_bits`` 16 and 8 (the same tiles; int8 entries are rounded before the codes are
chosen), and the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (H = X Xᵀ of the
benchmark's calibration profile). Bits per weight are ``VQConfig.nbytes`` (codes, codebooks and
their scales, column order). Writes ``results/vq_codebook_probe.json``.

    python bench/probe_vq_codebook.py [--layers 2,15,28] [--threads 2] [--bits 2,2.5,3,4]
"""
from __future__ import annotations

from common import error_summary, layer_weights, log, probe_args, save  # noqa: I001
from probe_rotation import rel_error

from compression.configs import VQConfig
from compression.quant import dequantize_vq, vq_quantize


def main() -> None:
    a, layers = probe_args(__doc__, bits="2,2.5,3,4")
    widths = [float(b) if "." in b else int(b) for b in a.bits.split(",")]
    cal_label, items = layer_weights(layers)
    rows = []
    for name, w, h in items:  # w (m, n), h (n, n)
        m, n = w.shape
        row = dict(name=name, weights=m * n)
        for bits in widths:
            for cb in (16, 8):
                cfg = VQConfig(bits, codebook_bits=cb, dim=2)  # pairs, as in §20 (before 4-vectors)
                codes, book, scale, perm, _ = vq_quantize(w, h, bits, cfg.group_size, cfg.rows(m), codebook_bits=cb)
                row[f"{bits}/{cb}"] = dict(error=rel_error(w, dequantize_vq(codes, book, perm, cfg.rows(m),
                                                                              cfg.group_size, scale=scale), h),
                                           bits_per_weight=cfg.nbytes(m, n) * 8 / (m * n))
        log(name, {k: round(v["error"], 5) for k, v in row.items() if isinstance(v, dict)})
        rows.append(row)
    summary = {}
    for bits in widths:
        for cb in (16, 8):
            summary[f"{bits}/{cb}"] = error_summary(rows, f"{bits}/{cb}")
        i8, f16 = summary[f"{bits}/8"], summary[f"{bits}/16"]
        i8["geomean_vs_fp16"] = i8["geomean_error"] / f16["geomean_error"]
        log(f"vq {bits}: fp16 {f16['bits_per_weight']:.4f} bits, error {f16['geomean_error']:.5f}; int8 "
            f"{i8['bits_per_weight']:.4f} bits, error {i8['geomean_error']:.5f} ({i8['geomean_vs_fp16']:.3f}x)")
    save("vq_codebook_probe", dict(protocol=f"profile of {cal_label} 32 x 2048 (seed 0); layers {sorted(layers)}; "
                                            "vq defaults (automatic tiles, k-means 25 iterations seed 0); fp32 CPU",
                                   rows=rows, summary=summary))


if __name__ == "__main__":
    main()
