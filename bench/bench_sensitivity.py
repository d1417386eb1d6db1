"""Issue 5 benchmark (compression benchmark's protocol: calibration from the tokenised
validation split, ppl16 on the raw test split).

(a) Spearman correlation between predicted and measured ppl16 over random plans spanning
    light to heavy compression; (b) at 4.25 / 3.25 / 2.5 average bits per decoder-linear
    weight, the allocated plan vs uniform rtn/gptq g128 plans; (c) wall time of the grid.

    python bench/bench_sensitivity.py [--device auto] [--tokens N] [--seqlen L] [--plans 14]
        [--targets 4.25,3.25,2.5] [--variants "ranks+bits gptq,bits only gptq"] [--uniform-2bit]
        [--uniform vq:2,vq:3] [--grid-quant rtn|gptq|vq] [--skip-proxy] [--tag cpu]
        [--reuse-grids --grid-tag T --extend-bits 2.5 --extend-fractions 0.25,0.5] [--fractions none]

``--extend-bits`` / ``--extend-fractions`` probe widths / rank fractions a reused grid lacks
(each probe compresses one linear of the dense model, so probes of one setting do not depend
on the others) and join them to it; the joined grid is saved under ``--tag``.

Defaults for the grid are the CLI's (``analysis.sensitivity.DEFAULT_TOKENS`` ...).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from common import EVAL_SPEC, MODEL, calibration, grid_folder, grid_windows, log, save  # noqa: I001
from scipy.stats import spearmanr

from analysis import sensitivity as sens
from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import linear_biases, model_bytes, perplexity
from analysis.sensitivity import SensitivityGrid, agreement, measure_sensitivity, proxy_sensitivity, rank_grid
from compression.allocate import Predictor, allocate
from compression.apply import apply_plan
from compression.configs import bit_width
from compression.plan import ModuleSpec, Plan, PlanWarning

ESTIMATORS = ("dloss", "curvature", "kl")


def drop_widths(grid: SensitivityGrid, bits: list[float], quant_options: dict) -> SensitivityGrid:
    """``grid`` without its probes at ``bits``, its meta now saying ``quant_options``: for
    widths whose format changed (vq's 2 and 2.5 bits became 4-vectors), to be probed again
    and joined (``join_widths``) while the unchanged widths are kept."""
    gone = {bit_width(b) for b in bits}
    if not gone <= set(grid.meta["bits"]):
        raise SystemExit(f"--replace-bits {sorted(gone)}: the reused grid holds {grid.meta['bits']} bits")

    def keep(t):
        return None if t is None else t[~((t["kind"] == "bits") & t["setting"].isin(gone))].reset_index(drop=True)

    kept = keep(grid.table)
    meta = dict(grid.meta, bits=[b for b in grid.meta["bits"] if b not in gone], quant_options=quant_options,
                seconds=grid.meta["seconds"] * len(kept) / len(grid.table), probes=len(kept),
                replaced=dict(bits=sorted(gone), quant_options_before=grid.meta.get("quant_options"),
                              note="seconds of the kept probes are the reused grid's, prorated by probe count"))
    return SensitivityGrid(meta, kept, None, keep(grid.first_order), keep(grid.kl))


def join_widths(grid: SensitivityGrid, more: SensitivityGrid) -> SensitivityGrid:
    """``grid`` with the bit widths and rank fractions that ``more`` probed (same model, data
    and methods; each probe compresses one linear of the dense model, so probes of one setting
    do not depend on the others)."""
    keys = ("fingerprint", "data_digest", "n_tokens", "stats_tokens", "method", "quant", "quant_options", "group_size",
            "dense_loss")
    differ = [k for k in keys if grid.meta.get(k) != more.meta.get(k)]
    if differ:
        raise SystemExit(f"cannot join grids that differ in {differ}")
    for what in ("bits", "fractions"):
        both = set(grid.meta[what]) & set(more.meta[what])
        if both:
            raise SystemExit(f"the grid already holds {what} {sorted(both)}")

    def cat(x, y):
        return None if x is None or y is None else pd.concat([x, y], ignore_index=True)

    seconds, probes = grid.meta["seconds"] + more.meta["seconds"], grid.meta["probes"] + more.meta["probes"]
    meta = dict(grid.meta, bits=sorted(grid.meta["bits"] + more.meta["bits"]),
                fractions=sorted(grid.meta["fractions"] + more.meta["fractions"]), seconds=seconds, probes=probes,
                seconds_per_probe=round(seconds / probes, 4), cpu_seconds_per_probe=None,
                joined=[{k: m.get(k) for k in ("bits", "fractions", "seconds", "probes", "date")}
                        for m in (grid.meta, more.meta)])
    return SensitivityGrid(meta, cat(grid.table, more.table), None, cat(grid.first_order, more.first_order),
                           cat(grid.kl, more.kl))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", default=str(sens.DEFAULT_TOKENS),
                    help="sensitivity calibration tokens; several (comma-separated) measure one grid each, "
                         "the first one allocates")
    ap.add_argument("--seqlen", type=int, default=sens.DEFAULT_SEQLEN)
    ap.add_argument("--plans", type=int, default=14)
    ap.add_argument("--grid-only", action="store_true", help="only (c): time the grid")
    ap.add_argument("--targets", default="4.25,3.25,2.5")
    ap.add_argument("--variants", default="ranks+bits rtn,ranks+bits gptq,bits only gptq")
    ap.add_argument("--uniform-2bit", action="store_true", help="also measure uniform rtn/gptq 2-bit g128")
    ap.add_argument("--uniform", default="", help="uniform plans to measure too, e.g. vq:2,vq:3 (quantiser:bits, g128)")
    ap.add_argument("--grid-quant", default="rtn", choices=("rtn", "gptq", "vq"),
                    help="quantiser of the grid's bit settings (gptq / vq: what the allocated plans apply)")
    ap.add_argument("--fractions", default=",".join(map(str, sens.FRACTIONS)),
                    help="rank fractions of break-even the grid probes; 'none' for a bits-only grid")
    ap.add_argument("--skip-proxy", action="store_true", help="do not compute the first view (it refits every setting)")
    ap.add_argument("--estimator", default="dloss", choices=ESTIMATORS, help="what the allocating predictor adds up")
    ap.add_argument("--reuse-grids", action="store_true",
                    help="load the grids a previous run with the same tag saved (under the model cache)")
    ap.add_argument("--reuse-measured", default=None,
                    help="a previous run's JSON: reuse its measured ppl16 of the random plans (same seed, so the "
                         "same plans; checked by their size) and only recompute the predictions")
    ap.add_argument("--extend-bits", default="",
                    help="with --reuse-grids: probe these widths (e.g. 2.5 for vq) and join them to the reused grid")
    ap.add_argument("--replace-bits", default="",
                    help="with --reuse-grids: probe these widths again, in place of the reused grid's (their format "
                         "changed; the other widths' probes are kept)")
    ap.add_argument("--extend-fractions", default="",
                    help="with --reuse-grids: probe ranks at these fractions of break-even (e.g. 0.25,0.5,0.75 "
                         "for a bits-only grid) and join them to the reused grid")
    ap.add_argument("--tag", default="")
    ap.add_argument("--grid-tag", default=None, help="tag of the run whose grids --reuse-grids loads (default: --tag)")
    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    name = "sensitivity" + (f"_{a.tag}" if a.tag else "")
    lm = load_model(MODEL, a.device)
    linears = lm.adapter.linears(lm.model)
    ev_c = load_corpus(EVAL_SPEC)
    cal_c, cal_tok, cal32, prof, _ = calibration(lm)
    stats = prof.all_stats()
    out = dict(protocol=f"sensitivity: {cal_c.label} windows of up to {a.seqlen} tokens (seed 0), "
                        f"svd-llm + {a.grid_quant} g128, "
                        f"profile 32 x 2048; ppl16: {ev_c.label} first 16 x 2048; "
                        f"fp32; {lm.device}; torch threads {torch.get_num_threads()}", grids={})
    grids = {}
    fractions = () if a.fractions == "none" else tuple(float(x) for x in a.fractions.split(","))
    for n_tok in [int(x) for x in a.tokens.split(",")]:
        sens_ids = grid_windows(cal_tok, n_tok, a.seqlen)
        sl = sens_ids.shape[1]
        folder = grid_folder(a.tag if a.grid_tag is None else a.grid_tag, n_tok, a.seqlen, a.grid_quant)
        reused = a.reuse_grids and (folder / "meta.json").exists()
        t = time.perf_counter()
        if reused:  # the grid from disk; the first view below is computed anew (it is cheap)
            grid = SensitivityGrid.load(folder)
            log(f"grid on {n_tok} tokens reused from {folder}")
        else:
            grid = measure_sensitivity(lm.model, lm.adapter, sens_ids, stats, method="svd-llm", quant=a.grid_quant,
                                       group_size=128, fractions=fractions)
        t_grid = None if reused else time.perf_counter() - t
        extend = [float(b) for b in a.extend_bits.split(",") if b]
        extend_fr = [float(f) for f in a.extend_fractions.split(",") if f]
        replace = [float(b) for b in a.replace_bits.split(",") if b]
        if replace:
            if not reused or extend:
                raise SystemExit("--replace-bits re-probes widths of a reused grid: give --reuse-grids "
                                 "(and --grid-tag), not --extend-bits")
            grid, extend = drop_widths(grid, replace, sens.quant_options(a.grid_quant)), replace
        if extend or extend_fr:
            if not reused:
                raise SystemExit("--extend-bits / --extend-fractions join probes to a reused grid: give "
                                 "--reuse-grids (and --grid-tag)")
            t = time.perf_counter()
            more = measure_sensitivity(lm.model, lm.adapter, sens_ids, stats, method="svd-llm", quant=a.grid_quant,
                                       group_size=128, fractions=extend_fr, bits=extend)
            grid = join_widths(grid, more)
            t_grid = time.perf_counter() - t
            folder, reused = grid_folder(a.tag, n_tok, a.seqlen, a.grid_quant), False
            log(f"grid extended by {more.meta['bits']} bits and fractions {more.meta['fractions']} "
                f"in {t_grid:.1f}s")
        t = time.perf_counter()
        proxy = None if a.skip_proxy else proxy_sensitivity(lm.model, lm.adapter, sens_ids, stats, method="svd-llm",
                                                            quant=a.grid_quant, group_size=128)
        t_proxy = time.perf_counter() - t
        grids[n_tok] = grid
        if not reused:
            grid.save(folder)
        out["grids"][n_tok] = dict(tokens=int(sens_ids.numel()), windows=int(sens_ids.shape[0]), seqlen=sl,
                                   grid_seconds=t_grid, grid_reused_from=str(folder) if reused else None,
                                   seconds_per_probe=grid.meta.get("seconds_per_probe"),
                                   cpu_seconds_per_probe=grid.meta.get("cpu_seconds_per_probe"),
                                   probes=len(grid.table),
                                   proxy_seconds=None if proxy is None else t_proxy,
                                   proxy_agreement=None if proxy is None else agreement(proxy, grid))
        took = "reused" if reused else f"{t_grid:.1f}s"
        log(f"grid on {sens_ids.numel()} tokens: {took} ({len(grid.table)} probes), proxy {t_proxy:.1f}s")
        save(name, out)
    if a.grid_only or a.plans + len(a.targets) == 0:
        return
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
    dense_bytes = model_bytes(lm.model).weight_bytes
    biases = linear_biases(lm.model, linears)
    preds = {(n, e): Predictor(g, linears, dense_bytes, 4, biases, estimator=e)
             for n, g in grids.items() for e in ESTIMATORS if e != "kl" or g.kl is not None}
    main_tokens = next(iter(grids))
    pred = preds[(main_tokens, a.estimator)]

    dense_ppl16 = perplexity(lm.model, ev, ev_c.label).ppl
    out["dense_ppl16"] = dense_ppl16

    def predicted(plan: Plan) -> dict:
        """The allocating predictor's ppl (calibration scale), the same increase on the ppl16
        scale (dense ppl16 x exp(Σ)), and every grid x estimator's ppl (only their ranks compare)."""
        pr = pred.predict(plan)
        return dict(predicted_ppl=pr.ppl, predicted_ppl16=dense_ppl16 * math.exp(pr.dloss),
                    bits_per_weight=pr.bits_per_weight,
                    predictions={f"{n}:{e}": q.predict(plan).ppl for (n, e), q in preds.items()})

    def measure(plan: Plan) -> dict:
        comp, _ = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device, calib_ids=cal32)
        return dict(ppl16=perplexity(comp, ev, ev_c.label).ppl, bytes=model_bytes(comp).weight_bytes,
                    **predicted(plan))

    earlier = json.loads(Path(a.reuse_measured).read_text()).get("random_plans", []) if a.reuse_measured else []
    rng = random.Random(0)  # the same plans in every run: their measured ppl16 can be reused
    randoms = []
    for i in range(a.plans):
        density = 0.1 + 0.9 * i / max(1, a.plans - 1)
        mods_ = {}
        for li in linears:
            if rng.random() < density:
                if rng.random() < 0.5:
                    mods_[li.name] = ModuleSpec(rank=rng.choice(rank_grid(li)), lowrank="svd-llm")
                else:
                    mods_[li.name] = ModuleSpec(bits=rng.choice([2, 3, 4, 8]), group_size=128)
        plan = Plan(modules=mods_)
        if i < len(earlier) and abs(earlier[i]["bits_per_weight"] - pred.predict(plan).bits_per_weight) < 1e-9:
            r = dict(ppl16=earlier[i]["ppl16"], measured_in=a.reuse_measured, **predicted(plan))
        else:
            r = measure(plan)
        r["density"] = density
        randoms.append(r)
        log(f"random plan {i}: density {density:.2f} measured {r['ppl16']:.2f} predicted {r['predictions']}")
        out["random_plans"] = randoms
        ys = [x["ppl16"] for x in randoms]
        out["spearman"] = {k: spearmanr([x["predictions"][k] for x in randoms], ys).statistic
                           for k in randoms[0]["predictions"]} if len(randoms) > 2 else None
        save(name, out)
    alloc = []
    for target in [float(x) for x in a.targets.split(",") if x]:
        variants = {"ranks+bits rtn": {}, "ranks+bits gptq": {"quant": "gptq"},
                    "bits only gptq": {"quant": "gptq", "only": "bits"},
                    "ranks+bits vq": {"quant": "vq"}, "bits only vq": {"quant": "vq", "only": "bits"}}
        for variant in a.variants.split(","):
            kw = variants[variant]
            try:
                plan = allocate(pred, target_bits=target, **kw)
            except ValueError as e:
                alloc.append(dict(target_bits=target, variant=variant, error=str(e)))
                continue
            r = measure(plan)
            n_rank = sum(1 for s in plan.modules.values() if s.rank)
            n_bits = {b: sum(1 for s in plan.modules.values() if s.bits == b) for b in (2, 2.5, 3, 4, 8)}
            r.update(target_bits=target, variant=variant, modules_with_rank=n_rank, modules_by_bits=n_bits,
                     allocated_with=f"{main_tokens}:{a.estimator}")
            alloc.append(r)
            log(f"target {target} {variant}: ppl16 {r['ppl16']:.2f} (pred {r['predicted_ppl']:.2f}) "
                f"bpw {r['bits_per_weight']:.3f}")
            out["allocated"] = alloc
            save(name, out)
    for quant in ("rtn", "gptq") if a.uniform_2bit else ():
        r = measure(Plan(default=ModuleSpec(bits=2, group_size=128, quant=quant)))
        r.update(uniform=f"{quant} 2-bit g128")
        out.setdefault("uniform_2bit", []).append(r)
    for item in [x for x in a.uniform.split(",") if x]:
        quant, bits = item.split(":")
        r = measure(Plan(default=ModuleSpec(bits=float(bits), group_size=128, quant=quant)))
        r.update(uniform=f"{quant} {bits}-bit g128")
        log(f"uniform {quant} {bits}-bit: ppl16 {r['ppl16']:.2f} bpw {r['bits_per_weight']:.3f}")
        out.setdefault("uniform", []).append(r)
        save(name, out)
    save(name, out)


if __name__ == "__main__":
    main()
