"""ppl16 of whole-model uniform plans quantised with ``probe_vq.gptvq`` against scalar GPTQ on
the same path: every decoder linear replaced by its dequantised weights, each fitted on the
dense model's input Hessian (not sequential: GPTQ's recipe re-profiles each layer on the
compressed layers below, which RankLab's own GPTQ does; both rows here skip it alike).
A probe for issue 5's 2.5-bit target, not a method RankLab ships.

Writes ``results/vq_model_probe.json``.

    python bench/probe_vq_model.py [--rows gptq3,vq2d-b2.5-t192x128] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from common import EVAL_SPEC, MODEL, calibration, log, save  # noqa: I001
from probe_vq import gptvq

from analysis.adapters import get_submodule
from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import perplexity
from compression.quant import dequantize_affine, gptq_quantize, n_groups

ROWS = {"gptq3": ("gptq", 3, 128), "gptq2": ("gptq", 2, 128),
        "vq2d-b2-t64x32": ("vq", 2, 2, 64, 32), "vq2d-b2.5-t192x128": ("vq", 2, 2.5, 192, 128),
        "vq2d-b3-t192x128": ("vq", 2, 3, 192, 128)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="gptq3,vq2d-b2.5-t192x128")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(MODEL, "cpu")
    ev_c = load_corpus(EVAL_SPEC)
    cal_c, _, _, prof, _ = calibration(lm)
    stats = prof.all_stats()
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
    out = dict(protocol=f"each decoder linear fitted on the dense input Hessian of {cal_c.label} 32 x 2048 (seed 0), "
                        f"act-order; ppl16: {ev_c.label} first 16 x 2048; fp32; cpu; threads {torch.get_num_threads()}",
               rows={})
    out["dense_ppl16"] = perplexity(lm.model, ev, ev_c.label).ppl
    log(f"dense {out['dense_ppl16']:.2f}")
    for name in a.rows.split(","):
        kind, *cfg = ROWS[name]
        model = copy.deepcopy(lm.model)
        t, bits, weights = time.perf_counter(), 0.0, 0
        for li in lm.adapter.linears(model):
            lin = get_submodule(model, li.name)
            w = lin.weight.detach().float()  # (m, n)
            m, n = w.shape
            h = stats[li.name].inputs.xxt.double()
            if kind == "gptq":
                b, g = cfg
                wq = dequantize_affine(*gptq_quantize(w, h, b, g, act_order=True), g)
                bits += b * m * n + 32 * m * n_groups(n, g)
            else:
                wq, bpw = gptvq(w, h, *cfg)
                bits += bpw * m * n
            weights += m * n
            with torch.no_grad():
                lin.weight.copy_(wq.to(lin.weight.dtype))
        row = dict(bits_per_weight=bits / weights, seconds=time.perf_counter() - t,
                   ppl16=perplexity(model, ev, ev_c.label).ppl)
        out["rows"][name] = row
        log(f"{name}: {row}")
        save("vq_model_probe", out)


if __name__ == "__main__":
    main()
