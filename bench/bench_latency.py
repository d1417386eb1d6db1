"""Latency of compressed models against dense, measured in one run with one protocol.

Rows: dense, data-free plans that need no calibration (rtn 4 / 3 bits g128, svd ranks at
param ratio 0.8 / 0.5). Each round measures every row once (prefill 1 x seqlen, greedy decode
of ``--decode`` tokens after a 64-token prompt, median of ``--runs`` after one warm-up); the
figure is each row's ratio to dense within the same round, so machine noise between rounds
cancels. Latency does not depend on the weights' values, so ``--random-weights`` builds
SmolLM2-135M's architecture from its config (for a machine without the GGUF); ppl is then
not measured.

    python bench/bench_latency.py [--device auto] [--seqlen 256] [--rounds 2] [--random-weights]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from common import MODEL, log, save  # noqa: I001

from analysis.loading import load_model, resolve_device, wrap_model
from analysis.metrics import latency, model_bytes
from compression.apply import apply_plan
from compression.plan import uniform_plan

ROWS = {"rtn 4-bit g128": dict(method="rtn", bits=4), "rtn 3-bit g128": dict(method="rtn", bits=3),
        "svd 0.8": dict(method="svd", param_ratio=0.8), "svd 0.5": dict(method="svd", param_ratio=0.5)}


def smollm2_random(device: torch.device):
    """SmolLM2-135M's architecture (30 layers, hidden 576, MLP 1536, 9 / 3 heads), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return wrap_model(LlamaForCausalLM(cfg).to(device), spec="SmolLM2-135M architecture, random weights")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    lm = smollm2_random(dev) if a.random_weights else load_model(MODEL, dev)
    linears = lm.adapter.linears(lm.model)
    models = {"dense": lm.model}
    for name, row in ROWS.items():
        kw = dict(row)
        models[name], _ = apply_plan(lm.model, lm.adapter, uniform_plan(kw.pop("method"), linears, **kw))
    rounds = []
    for r in range(a.rounds):
        cur = {}
        for name, m in models.items():
            lat = latency(m, seqlen=a.seqlen, decode_tokens=a.decode, runs=a.runs, warmup=1)
            cur[name] = dict(prefill_tok_s=lat.prefill_tok_s, decode_ms_per_token=lat.decode_ms_per_token,
                             note=lat.note)
            log(f"round {r} {name:16s} prefill {lat.prefill_tok_s:9.0f} tok/s  "
                f"decode {lat.decode_ms_per_token:7.2f} ms")
        for v in cur.values():
            v["decode_vs_dense"] = v["decode_ms_per_token"] / cur["dense"]["decode_ms_per_token"]
            v["prefill_vs_dense"] = v["prefill_tok_s"] / cur["dense"]["prefill_tok_s"]
        rounds.append(cur)
    summary = {name: dict(weight_bytes=model_bytes(m).weight_bytes,
                          decode_vs_dense=[rd[name]["decode_vs_dense"] for rd in rounds],
                          prefill_vs_dense=[rd[name]["prefill_vs_dense"] for rd in rounds],
                          decode_ms_median=statistics.median(rd[name]["decode_ms_per_token"] for rd in rounds),
                          prefill_tok_s_median=statistics.median(rd[name]["prefill_tok_s"] for rd in rounds))
               for name, m in models.items()}
    for name, s in summary.items():
        log(f"{name:16s} decode x{', x'.join(f'{x:.2f}' for x in s['decode_vs_dense'])}  "
            f"prefill x{', x'.join(f'{x:.2f}' for x in s['prefill_vs_dense'])} of dense")
    save(f"latency_{a.tag or dev.type}", dict(
        protocol=(f"{lm.source}; fp32; {dev}; prefill 1 x {a.seqlen} random tokens, decode {a.decode} tokens after a "
                  f"64-token prompt, median of {a.runs} after 1 warm-up; {a.rounds} rounds, every row once per "
                  "round; ratios to dense within a round"),
        rounds=rounds, summary=summary))


if __name__ == "__main__":
    main()
