"""Issue 5, goal (b) at 2.5 bits: does an end-to-end pass after block-wise tuning help? A probe,
not a method RankLab ships.

The plan allocated at ``--bits`` (ranks + bits, on the cached GPTQ grid of
``bench_sensitivity.py --tokens 128 --grid-quant gptq --tag TAG``) is applied with sequential
GPTQ and block-wise tuned (``compression.tune`` defaults), as in ``bench_tune.py``. Then, as in
EfficientQAT's E2E-QP, every group scale of every affine-quantised linear is trained at once
(log-scales ``t`` of ``TunableQuant``; the per-weight offsets stay frozen, so the codes move
only through the scales) together with the plain low-rank factors (at lr / 10), on the KL
divergence from the dense model's next-token distribution, over 512-token sequences of the
calibration windows (2 per step, Adam). ppl16 on the raw test split before and after.
Writes ``results/e2e_probe.json``; the block-tuned model is kept in ``--checkpoint`` so that
the end-to-end phase can be re-run alone.

    python bench/probe_e2e.py [--bits 2.5] [--steps 200] [--lr 1e-3] [--checkpoint /tmp/e2e/alloc_2.5.pt]
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from common import EVAL_SPEC, MODEL, calibration, grid_folder, log, save  # noqa: I001

from analysis.adapters import get_submodule, set_submodule
from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import linear_biases, model_bytes, perplexity
from analysis.sensitivity import SensitivityGrid
from compression.allocate import Predictor, allocate
from compression.apply import apply_plan
from compression.plan import PlanWarning, TuneOptions
from compression.quant import QuantLinear
from compression.tune import TunableQuant, tunable_paths, tune, tune_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--grid-tag", default="tmpq")
    ap.add_argument("--checkpoint", default="/tmp/e2e/alloc_2.5.pt")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--tag", default="", help="results/e2e_probe_TAG.json")
    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    lm = load_model(MODEL, "cpu")
    linears = lm.adapter.linears(lm.model)
    ev_c = load_corpus(EVAL_SPEC)
    cal_c, _, cal32, prof, _ = calibration(lm)
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
    out = dict(protocol=f"calibration {cal_c.label} 32 x 2048 (seed 0), sequential GPTQ g128, block-wise tune "
                        f"(TuneOptions defaults), then end-to-end: {a.steps} Adam steps at lr {a.lr} on log-scales "
                        f"(factors lr {a.lr / 10}), KL to the dense logits, 2 x 512-token sequences per step; ppl16: "
                        f"{ev_c.label} first 16 x 2048; fp32; cpu; torch threads {torch.get_num_threads()}",
               bits=a.bits, curve=[])
    ck = Path(a.checkpoint)
    if ck.exists():
        comp = torch.load(ck, weights_only=False)
        log(f"block-tuned model from {ck}")
    else:
        grid = SensitivityGrid.load(grid_folder(a.grid_tag, 128, 256, "gptq"))
        pred = Predictor(grid, linears, model_bytes(lm.model).weight_bytes, 4, linear_biases(lm.model, linears),
                         estimator="kl")
        plan = allocate(pred, target_bits=a.bits, quant="gptq")
        t = time.perf_counter()
        comp, _ = apply_plan(lm.model, lm.adapter, plan, prof.all_stats(), device=lm.device, calib_ids=cal32)
        out["apply_seconds"] = time.perf_counter() - t
        out["ppl16_untuned"] = perplexity(comp, ev, ev_c.label).ppl
        log(f"applied in {out['apply_seconds']:.0f} s: ppl16 {out['ppl16_untuned']:.2f}")
        rep = tune(lm.model, comp, lm.adapter, TuneOptions(), cal32, device=lm.device)
        out["block_tune"] = rep.summary()
        ck.parent.mkdir(parents=True, exist_ok=True)
        torch.save(comp, ck)
    bytes_before = model_bytes(comp).weight_bytes
    out["ppl16_block_tuned"] = perplexity(comp, ev, ev_c.label).ppl
    log(f"block-tuned ppl16 {out['ppl16_block_tuned']:.2f}")
    # every affine QuantLinear of the model becomes a TunableQuant: scales train, offsets stay
    scales, factors, swapped = [], [], []
    for layer in lm.adapter.layers(comp):
        for path in tunable_paths(layer)[0]:
            mod = get_submodule(layer, path)
            if isinstance(mod, QuantLinear):
                tq = TunableQuant.from_quant(mod)
                tq.d.requires_grad_(False)
                set_submodule(layer, path, tq)
                scales.append(tq.t)
            else:
                mod.weight.requires_grad_(True)
                factors.append(mod.weight)
            swapped.append((layer, path))
    out["trained"] = dict(log_scales=sum(p.numel() for p in scales), factor_weights=sum(p.numel() for p in factors))
    log(f"end-to-end: {out['trained']}")
    ids = tune_ids(cal32, TuneOptions(calib_tokens=65536))  # (128, 512)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([{"params": scales, "lr": a.lr}] + ([{"params": factors, "lr": a.lr / 10}] if factors
                                                               else []))
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        x = ids[torch.randperm(ids.shape[0], generator=gen)[:2]]
        with torch.no_grad():
            target = F.log_softmax(lm.model(x).logits.float(), -1)
        kl = F.kl_div(F.log_softmax(comp(x).logits.float(), -1), target, log_target=True,
                      reduction="none").sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        point = dict(step=step, kl=float(kl.detach()), seconds=time.perf_counter() - t0)
        if step % a.eval_every == 0 or step == a.steps:
            with torch.no_grad():
                point["ppl16"] = perplexity(comp, ev, ev_c.label).ppl
        if step % 10 == 0 or "ppl16" in point:
            log(point)
            out["curve"].append(point)
            save("e2e_probe" + (f"_{a.tag}" if a.tag else ""), out)
    out["e2e_seconds"] = time.perf_counter() - t0
    with torch.no_grad():  # encoded back on the grid (same bits and groups): measured as stored
        for layer, path in swapped:
            mod = get_submodule(layer, path)
            if isinstance(mod, TunableQuant):
                set_submodule(layer, path, mod.to_quant())
            else:
                mod.weight.requires_grad_(False)
        out["ppl16_e2e"] = perplexity(comp, ev, ev_c.label).ppl
    out["weight_bytes"] = model_bytes(comp).weight_bytes
    out["bytes_unchanged"] = out["weight_bytes"] == bytes_before
    log(f"end-to-end: ppl16 {out['ppl16_block_tuned']:.2f} -> {out['ppl16_e2e']:.2f} in {out['e2e_seconds']:.0f} s; "
        f"bytes unchanged: {out['bytes_unchanged']}")
    save("e2e_probe" + (f"_{a.tag}" if a.tag else ""), out)


if __name__ == "__main__":
    main()
