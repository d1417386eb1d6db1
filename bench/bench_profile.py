"""Issue 3 benchmark: profiling SmolLM2-135M on 16,384 calibration tokens.

Profiling time (statistics) over the time of a plain forward pass of the same tokens
(model(...) with logits, same batches), measured in one run and alternated 2x to expose
noise; eigendecomposition time on its own; peak memory (CUDA allocator or process RSS).

    python bench/bench_profile.py [--device auto] [--tag cpu]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from common import CALIB_SPEC, MODEL, log, save  # noqa: I001

from analysis.data import calibration_windows, load_corpus, tokenize
from analysis.loading import load_model
from analysis.profile import collect_input_stats, spectra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    lm = load_model(MODEL, a.device)
    corpus = load_corpus(CALIB_SPEC)
    ids = calibration_windows(tokenize(lm.tokenizer, corpus), a.seqlen, a.tokens // a.seqlen, 0)
    dev = lm.device

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def forward():
        for b in ids.split(a.batch_size):
            lm.model(input_ids=b.to(dev), use_cache=False)

    forward()  # warm-up
    rounds = []
    for r in range(2):
        sync()
        t = time.perf_counter()
        forward()
        sync()
        t_fwd = time.perf_counter() - t
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        inputs = collect_input_stats(lm.model, lm.adapter, ids, a.batch_size)
        sync()
        t_prof = time.perf_counter() - t
        rounds.append(dict(forward_s=t_fwd, profile_s=t_prof, ratio=t_prof / t_fwd))
        log(f"round {r}: forward {t_fwd:.2f}s profile {t_prof:.2f}s ratio {t_prof / t_fwd:.3f}")
    peak_stats = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    t = time.perf_counter()
    _, _, summary, t_eig = spectra(lm.model, lm.adapter.linears(lm.model), inputs)
    t_spec = time.perf_counter() - t
    t = time.perf_counter()
    lw = collect_input_stats(lm.model, lm.adapter, ids, a.batch_size, layerwise=True)
    sync()
    t_lw = time.perf_counter() - t
    diff = max(float((lw[k].xxt - inputs[k].xxt).abs().max() / inputs[k].xxt.abs().max()) for k in inputs)
    full = summary[["out_features", "in_features"]].min(axis=1)
    out = dict(protocol=f"{corpus.label}, {ids.shape[0]} x {a.seqlen} tokens (GPTQ-style draw, seed 0), "
                        f"batch {a.batch_size}, fp32, {dev}",
               tokens=ids.numel(), rounds=rounds, ratio_median=sorted(r["ratio"] for r in rounds)[len(rounds) // 2],
               eig_seconds=t_eig, spectra_seconds=t_spec, layerwise_profile_s=t_lw, layerwise_max_rel_diff=diff,
               peak_cuda_bytes=peak_stats, max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               median_rank95_fraction=float((summary.rank95 / full).median()),
               median_weight_rank95_fraction=float((summary.weight_rank95 / full).median()))
    save("profile" + (f"_{a.tag}" if a.tag else ""), out)
    print(out)


if __name__ == "__main__":
    main()
