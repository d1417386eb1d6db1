"""Block-wise tuning after compression (``compression.tune``), issue 5 goal (b): measured ppl16
of plans with and without ``Plan.tune``, on the compression benchmark's protocol
(calibration: 32 x 2048 windows of the tokenised validation split; ppl16 on the raw test split).

    python bench/bench_tune.py [--rows uniform:3,alloc:2.5,alloc:3.25] [--quant gptq|vq] [--grid-tag tmpq]
        [--grid-tokens 128] [--steps 60] [--no-tune] [--tag cpu]

``uniform:B`` is B-bit g128 of ``--quant`` (default GPTQ) on every decoder linear; ``alloc:B`` the
ranks + bits plan allocated at B bits per weight on the cached sensitivity grid of that quantiser
(``--grid-tokens`` probe tokens, default 128; KL) that ``bench_sensitivity.py --tokens N --grid-quant QUANT --tag TAG``
measured;
``bits:B`` the bits-only plan allocated there. (``--norms both``, which also tuned a copy with
the norm scales trained, was removed with that option: see RESULTS §19.)
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import asdict

import torch
from common import EVAL_SPEC, MODEL, calibration, grid_folder, log, save  # noqa: I001

from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import linear_biases, linear_weight_bytes, model_bytes, perplexity
from analysis.sensitivity import SensitivityGrid
from compression.allocate import Predictor, allocate
from compression.apply import apply_plan
from compression.plan import ModuleSpec, Plan, PlanWarning, TuneOptions
from compression.tune import tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="uniform:3,alloc:2.5")
    ap.add_argument("--grid-tag", default="tmpq")
    ap.add_argument("--grid-tokens", type=int, default=128, help="probe tokens of the cached grid")
    ap.add_argument("--quant", default="gptq", choices=("gptq", "vq"))
    ap.add_argument("--steps", type=int, default=TuneOptions.steps)
    ap.add_argument("--lr", type=float, default=TuneOptions.lr)
    ap.add_argument("--by-input", action="store_true",
                    help="quantise each layer one input group at a time (GPTQ's true-sequential)")
    ap.add_argument("--no-tune", action="store_true", help="measure the plans untuned only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    lm = load_model(MODEL, a.device)
    linears = lm.adapter.linears(lm.model)
    ev_c = load_corpus(EVAL_SPEC)
    cal_c, _, cal32, prof, _ = calibration(lm)
    stats = prof.all_stats()
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
    opts = TuneOptions(steps=a.steps, lr=a.lr)
    dense_params = sum(li.out_features * li.in_features for li in linears)
    how = "sequential by input" if a.by_input else "sequential"
    out = dict(protocol=f"calibration {cal_c.label} 32 x 2048 (seed 0), {how} {a.quant} g128; tune {asdict(opts)} "
                        f"on the first windows cut into {opts.seqlen}-token sequences; ppl16: {ev_c.label} first "
                        f"16 x 2048; fp32; {lm.device}; torch threads {torch.get_num_threads()}",
               dense_ppl16=perplexity(lm.model, ev, ev_c.label).ppl, rows=[])
    pred = None

    def measure(comp, seconds: float) -> dict:
        return dict(ppl16=perplexity(comp, ev, ev_c.label).ppl, seconds=seconds,
                    weight_bytes=model_bytes(comp).weight_bytes,
                    bits_per_weight=linear_weight_bytes(comp, lm.adapter.linears(comp)) * 8 / dense_params)

    for row in a.rows.split(","):
        kind, bits = row.split(":")
        if kind in ("alloc", "bits"):
            if pred is None:
                grid = SensitivityGrid.load(grid_folder(a.grid_tag, a.grid_tokens, 256, a.quant))
                pred = Predictor(grid, linears, model_bytes(lm.model).weight_bytes, 4,
                                 linear_biases(lm.model, linears), estimator="kl")
            plan = allocate(pred, target_bits=float(bits), quant=a.quant, only="bits" if kind == "bits" else None)
        else:
            plan = Plan(default=ModuleSpec(bits=float(bits), group_size=128, quant=a.quant))
        r = dict(row=row, modules_with_rank=sum(1 for s in plan.modules.values() if s.rank),
                 modules_by_bits={b: sum(plan.spec_for(li.name).bits == b for li in linears)
                                  for b in (2, 2.5, 3, 4, 8)})
        t = time.perf_counter()
        comp, _ = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device, calib_ids=cal32,
                             by_input=a.by_input)
        r["plain"] = measure(comp, time.perf_counter() - t)
        log(f"{row} plain: {r['plain']}")
        if a.no_tune:
            out["rows"].append(r)
            save("tune" + (f"_{a.tag}" if a.tag else ""), out)
            continue
        # the tuned model is the same one tuned in place: apply_plan's last step with plan.tune set
        rep = tune(lm.model, comp, lm.adapter, opts, cal32, device=lm.device)
        r["tuned"] = measure(comp, rep.seconds)
        r["tuned"].update(summary=rep.summary(), kept=sorted(rep.kept), losses=rep.losses)
        log(f"{row} tuned: {r['tuned']['ppl16']:.2f} ({rep.summary()})")
        out["rows"].append(r)
        save("tune" + (f"_{a.tag}" if a.tag else ""), out)


if __name__ == "__main__":
    main()
