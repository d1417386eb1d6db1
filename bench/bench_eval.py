"""Issue 2 benchmark: dense SmolLM2-135M on WikiText-2 test, seqlen 2048.

ppl on the first 16 windows and on the full split, cross-checked against a direct
transformers computation (model(..., labels=...).loss) on the same windows; prefill tok/s,
decode ms/token; first (GGUF dequantisation) vs cached load time.

    python bench/bench_eval.py [--device auto] [--full] [--tag cpu]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import torch
from common import EVAL_SPEC, MODEL, log, save  # noqa: I001

from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import latency, model_bytes, perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full", action="store_true", help="also the full split (148 windows)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    out: dict = {"protocol": f"{EVAL_SPEC.split('/')[-1]}, seqlen 2048, non-overlapping windows, no BOS, fp32"}
    # first vs cached load, with a fresh cache folder
    fresh = tempfile.mkdtemp(prefix="ranklab-bench-cache-")
    old = os.environ.get("RANKLAB_CACHE")
    os.environ["RANKLAB_CACHE"] = fresh
    t = time.perf_counter()
    load_model(MODEL, a.device)
    out["load_first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lm = load_model(MODEL, a.device)
    out["load_cached_s"] = time.perf_counter() - t
    shutil.rmtree(fresh, ignore_errors=True)
    if old:
        os.environ["RANKLAB_CACHE"] = old
    log(f"load first {out['load_first_s']:.1f}s cached {out['load_cached_s']:.2f}s")
    corpus = load_corpus(EVAL_SPEC)
    toks = tokenize(lm.tokenizer, corpus)
    ids16 = windows(toks, 2048, 16)
    t = time.perf_counter()
    p16 = perplexity(lm.model, ids16, corpus.label)
    out["ppl16"] = p16.ppl
    out["ppl16_seconds"] = time.perf_counter() - t
    # direct transformers computation on the same windows
    with torch.no_grad():
        losses = [lm.model(input_ids=w[None].to(lm.device), labels=w[None].to(lm.device)).loss.item() for w in ids16]
    out["ppl16_transformers_direct"] = math.exp(sum(losses) / len(losses))
    out["ppl16_rel_diff"] = abs(out["ppl16"] / out["ppl16_transformers_direct"] - 1)
    log(f"ppl16 {out['ppl16']:.4f} direct {out['ppl16_transformers_direct']:.4f}")
    if a.full:
        ids = windows(toks, 2048)
        t = time.perf_counter()
        pf = perplexity(lm.model, ids, corpus.label)
        out.update(ppl_full=pf.ppl, full_windows=ids.shape[0], ppl_full_seconds=time.perf_counter() - t)
        log(f"ppl full {pf.ppl:.4f} over {ids.shape[0]} windows")
    lat = latency(lm.model, seqlen=2048, decode_tokens=64, runs=5, warmup=1)
    out.update(prefill_tok_s=lat.prefill_tok_s, decode_ms_per_token=lat.decode_ms_per_token,
               latency_protocol=f"prefill 1 x 2048 random tokens, decode 64 tokens after a 64-token prompt, "
                                f"median of {lat.runs} after 1 warm-up, {lat.device}",
               weight_bytes=model_bytes(lm.model).weight_bytes, device=str(lm.device), reference_ppl16=20.714,
               reference_ppl_full=21.608)
    save("eval" + (f"_{a.tag}" if a.tag else ""), out)
    print(out)


if __name__ == "__main__":
    main()
