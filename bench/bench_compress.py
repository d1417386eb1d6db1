"""Issue 4 benchmark (protocol of ../shared/data/*/README.md).

SmolLM2-135M; calibration: 32 x 2048 tokens of wikitext2:valid.txt drawn GPTQ-style
(seed 0); evaluation: ppl on the first 16 windows of 2048 of wikitext2:test.txt ("ppl16").
Rows: dense; svd / act-pca / svd-llm at param-ratio 0.8 and 0.6; rtn and gptq at 4 and 3
bits, group 128; ternary; fp8; mxfp4 (plus any extra rows asked for).

``alloc-METHOD:R`` rows (e.g. ``alloc-lillama:0.8``) spend the bytes of the uniform plan at
param-ratio R on ranks chosen by the allocator (rank only) from a sensitivity grid: the
issue-5 benchmark's default grid (svd-llm ranks, 128 tokens of the validation split, KL),
reused from the bench cache or measured.

    python bench/bench_compress.py [--device auto] [--rows svd-llm:0.8,rtn:4] [--tag gpu]
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from common import EVAL_SPEC, MODEL, calibration, grid_folder, grid_windows, log, save  # noqa: I001

from analysis import sensitivity as sens
from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import linear_biases, linear_weight_bytes, model_bytes, perplexity
from analysis.sensitivity import SensitivityGrid, measure_sensitivity
from compression.allocate import Predictor, allocate, module_kinds
from compression.apply import apply_plan
from compression.plan import LillamaOptions, PlanWarning, plan_size, uniform_plan

DEFAULT_ROWS = ("dense,svd:0.8,svd:0.6,act-pca:0.8,act-pca:0.6,svd-llm:0.8,svd-llm:0.6,rtn:4,rtn:3,gptq:4,gptq:3,"
                "ternary,fp8,mxfp4")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--lillama-steps", type=int, default=200)
    ap.add_argument("--lillama-tokens", type=int, default=16384)
    ap.add_argument("--lillama-init", default="svd")
    ap.add_argument("--lillama-order", default="bottom-first")
    ap.add_argument("--lillama-granularity", default="linear")
    ap.add_argument("--lillama-lr", type=float, default=1e-3)
    ap.add_argument("--grid", default=None, help="sensitivity grid folder for alloc-* rows (default: the "
                                                  "issue-5 bench's default grid, measured if missing)")
    ap.add_argument("--grid-estimator", default="kl")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    lm = load_model(MODEL, a.device)
    linears = lm.adapter.linears(lm.model)
    ev_c = load_corpus(EVAL_SPEC)
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, a.eval_windows)
    t = time.perf_counter()
    cal_c, cal_tok, cal, prof, reused = calibration(lm)
    t_prof = time.perf_counter() - t
    stats = prof.all_stats()
    dense_bytes = model_bytes(lm.model).weight_bytes
    dense_params = sum(li.out_features * li.in_features for li in linears)
    rows = []
    predictor = None
    lillama = LillamaOptions(init=a.lillama_init, steps=a.lillama_steps, lr=a.lillama_lr, calib_tokens=a.lillama_tokens,
                             granularity=a.lillama_granularity, order=a.lillama_order)  # lillama and alloc-lillama rows

    def rank_allocator() -> Predictor:
        nonlocal predictor
        if predictor is None:
            n_tok = sens.DEFAULT_TOKENS
            folder = Path(a.grid) if a.grid else grid_folder("cpu_default", n_tok, sens.DEFAULT_SEQLEN)
            if (folder / "meta.json").exists():
                grid = SensitivityGrid.load(folder)
            else:
                log(f"measuring the sensitivity grid into {folder}")
                sens_ids = grid_windows(cal_tok, n_tok, sens.DEFAULT_SEQLEN)
                grid = measure_sensitivity(lm.model, lm.adapter, sens_ids, stats, method="svd-llm", quant="rtn",
                                           group_size=128)
                grid.save(folder)
            predictor = Predictor(grid, linears, dense_bytes, 4, linear_biases(lm.model, linears),
                                  estimator=a.grid_estimator)
        return predictor
    for spec in a.rows.split(","):
        method, _, arg = spec.partition(":")
        t0 = time.perf_counter()
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if method == "dense":
            model, plan = lm.model, None
        else:
            kw = {}
            if method in ("svd", "act-pca", "svd-llm", "lillama") or method.startswith("alloc-"):
                kw["param_ratio"] = float(arg)
            elif method == "slicegpt":
                kw["slice_fraction"] = float(arg)
            elif arg:
                kw["bits"] = int(arg)
            if method.startswith("alloc-"):
                p = rank_allocator()
                target = plan_size(uniform_plan("svd-llm", linears, **kw), linears, dense_bytes, 4, {}).total_bytes
                plan = allocate(p, target_bytes=target, only="rank", lowrank=method.removeprefix("alloc-"))
                if plan.lillama is not None:
                    plan.lillama = lillama
            else:
                plan = uniform_plan(method, linears, group_size=a.group_size,
                                    lillama=lillama if method == "lillama" else None, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PlanWarning)
                # Lillama runs take tens of minutes on a CPU: log each module's loss as it finishes
                prog = (lambda f, m: log(f"  [{f * 100:5.1f}%] {m}")) if plan.lillama is not None else None
                model, rep = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device, calib_ids=cal,
                                        progress=prog)
        secs = time.perf_counter() - t0
        ppl = perplexity(model, ev, ev_c.label).ppl
        wb = model_bytes(model).weight_bytes
        peak = torch.cuda.max_memory_allocated() if lm.device.type == "cuda" else None
        row = dict(row=spec, ppl16=ppl, peak_cuda_bytes=peak, weight_bytes=wb, bytes_ratio=wb / dense_bytes,
                   bits_per_weight=linear_weight_bytes(model, linears) * 8 / dense_params, seconds=secs)
        if method.startswith("alloc-"):
            row.update(allocation=dict(grid=str(predictor.grid.folder), estimator=a.grid_estimator,
                                       modules=module_kinds(plan, linears),
                                       predicted_ppl_calibration_scale=plan.meta["predicted_ppl"],
                                       ranks={nm: sp.rank for nm, sp in plan.modules.items()}))
        if plan is not None and plan.lillama is not None:
            row.update(lillama=dict(init=a.lillama_init, order=a.lillama_order, granularity=a.lillama_granularity,
                                    steps=a.lillama_steps, lr=a.lillama_lr, tokens=a.lillama_tokens,
                                    init_loss=rep.lillama.init_loss, final_loss=rep.lillama.final_loss,
                                    kept_init=rep.lillama.kept_init, peak_bytes=rep.lillama.peak_bytes))
        if method == "slicegpt":
            row.update(slicegpt={k: v for k, v in vars(rep.slicegpt).items() if isinstance(v, (int, float, bool))})
        if plan is not None and plan.slicegpt is None:
            row["predicted_bytes_match"] = plan_size(plan, linears, dense_bytes, 4, {}).total_bytes == wb
        log(f"{spec:14s} ppl16 {ppl:10.3f}  bytes {wb:,}  bpw {row['bits_per_weight']:.3f}  {secs:.1f}s")
        rows.append(row)
        save("compress" + (f"_{a.tag}" if a.tag else ""),  # after every row: a timeout keeps what finished
             dict(protocol=f"calibration {cal_c.label} 32 x 2048 (GPTQ-style, seed 0); eval {ev_c.label} first "
                           f"{a.eval_windows} x 2048; group {a.group_size}; fp32; {lm.device}",
                  profile_seconds=t_prof, profile_reused=reused, rows=rows))
        if model is not lm.model:
            del model
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
