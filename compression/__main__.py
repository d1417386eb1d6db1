"""Command line: ``python -m compression {apply,allocate} ...``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from analysis.cli import progress_stderr, run_command, say


def prepare_calibration(lm, text: str, calib_tokens: int, seqlen: int, seed: int, cache: bool = True):
    """Calibration windows and (cached) profile statistics for ``lm`` on ``text``."""
    from analysis.data import calibration_windows, load_corpus, tokenize
    from analysis.loading import cache_dir
    from analysis.profile import load_or_profile

    corpus = load_corpus(text)
    n_win = max(1, -(-calib_tokens // seqlen))
    ids = calibration_windows(tokenize(lm.tokenizer, corpus), seqlen, n_win, seed)
    label = f"{corpus.label}, {n_win} x {seqlen} tokens (seed {seed})"
    prof, reused = load_or_profile(lm.model, lm.adapter, ids, fingerprint=lm.fingerprint, data_label=label,
                                   data_digest=f"{corpus.digest}-{seqlen}-{seed}", cache_root=cache_dir(),
                                   progress=progress_stderr)
    say(("reused cached profile " if reused else "profiled ") + label)
    return ids, prof, label


def cmd_apply(a: argparse.Namespace) -> dict:
    from analysis.loading import load_model
    from analysis.metrics import linear_biases, linear_weight_bytes, model_bytes
    from compression.apply import apply_plan
    from compression.plan import LillamaOptions, Plan, plan_size, uniform_plan
    from compression.saved import save_compressed

    lm = load_model(a.model, a.device, a.dtype, trust_remote_code=a.trust_remote_code, progress=say)
    linears = lm.adapter.linears(lm.model)
    if a.plan:
        plan = Plan.load(a.plan)
        method = plan.meta.get("method", "plan")
    elif a.method:
        lil = LillamaOptions(init=a.lillama_init, steps=a.steps, lr=a.lr, calib_tokens=a.calib_tokens,
                             granularity=a.granularity) if a.method == "lillama" else None
        plan = uniform_plan(a.method, linears, param_ratio=a.param_ratio, bits=a.bits, group_size=a.group_size,
                            lillama=lil, slice_fraction=a.slice)
        method = a.method
    else:
        raise ValueError("give --plan PLAN.json or --method NAME")
    from compression.plan import validate

    validate(plan, linears)  # before any long step
    dense = model_bytes(lm.model)
    dtype_bytes = next(lm.model.parameters()).element_size()
    t0 = time.perf_counter()
    ids, prof, label = prepare_calibration(lm, a.text, a.calib_tokens, a.seqlen, a.seed)
    t_prof = time.perf_counter() - t0
    comp, rep = apply_plan(lm.model, lm.adapter, plan, prof.all_stats(), device=lm.device, calib_ids=ids,
                           progress=progress_stderr)
    seconds = time.perf_counter() - t0
    mem = model_bytes(comp)
    linear_bytes = linear_weight_bytes(comp, lm.adapter.linears(comp))
    dense_params = sum(li.out_features * li.in_features for li in linears)
    out = dict(method=method, weight_bytes=mem.weight_bytes, dense_weight_bytes=dense.weight_bytes,
               bits_per_weight=linear_bytes * 8 / dense_params, seconds=round(seconds, 2),
               seconds_profile=round(t_prof, 2), seconds_apply=round(rep.seconds, 2), calibration=label,
               device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""), out=a.out)
    if plan.slicegpt is None:
        out["predicted_weight_bytes"] = plan_size(plan, linears, dense.weight_bytes, dtype_bytes,
                                                  linear_biases(lm.model, linears)).total_bytes
    if rep.slicegpt is not None:
        out["slicegpt"] = {k: v for k, v in rep.slicegpt.__dict__.items() if isinstance(v, (int, float, bool, str))}
    if rep.lillama is not None:
        out["lillama"] = {**dataclasses.asdict(plan.lillama), "init_loss": rep.lillama.init_loss,
                          "final_loss": rep.lillama.final_loss, "seconds": rep.lillama.seconds,
                          "kept_init": sorted(rep.lillama.kept_init)}
    meta = dict(base_model=a.model, base_fingerprint=lm.fingerprint, calibration=label, summary=out)
    save_compressed(comp, Path(a.out), plan_json=plan.to_json(), tokenizer=lm.tokenizer, meta=meta,
                    extra_modules=getattr(rep.slicegpt, "manifest", None))
    return out


def cmd_allocate(a: argparse.Namespace) -> dict:
    from compression.allocate import cli_allocate

    return cli_allocate(a, say=say)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression", description="RankLab compression")
    sub = p.add_subparsers(dest="cmd", required=True)
    ap = sub.add_parser("apply", help="compress a model with a plan or a uniform method, and save it")
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default="default", help="calibration text: default | PATH | wikitext2:PATH")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan")
    ap.add_argument("--method", help="svd act-pca svd-llm lillama rtn gptq binary ternary fp8 mxfp4 slicegpt")
    ap.add_argument("--param-ratio", type=float)
    ap.add_argument("--bits", type=int)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--slice", type=float, help="SliceGPT: fraction of the hidden width to delete")
    ap.add_argument("--calib-tokens", type=int, default=32 * 2048)
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100, help="Lillama: Adam steps per module")
    ap.add_argument("--lr", type=float, default=1e-3, help="Lillama: learning rate")
    ap.add_argument("--granularity", default="linear", help="Lillama: linear | mlp | layer")
    ap.add_argument("--lillama-init", default="svd-llm",
                    help="Lillama initialisation: svd-llm (default: on SmolLM2 plain svd starts at ppl 1.8e8 and "
                         "ends worse, bench/RESULTS.md §5) | svd | act-pca")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.set_defaults(fn=cmd_apply)

    al = sub.add_parser("allocate", help="per-layer ranks and bits that meet a size target")
    al.add_argument("--model", default="default")
    al.add_argument("--sensitivity", required=True, help="folder written by `python -m analysis sensitivity`")
    g = al.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-bytes", type=int)
    g.add_argument("--target-ratio", type=float)
    g.add_argument("--target-bits", type=float)
    al.add_argument("--only", choices=["rank", "bits"])
    al.add_argument("--lowrank", help="low-rank method the plan applies its ranks with (default: the grid's); "
                                      "lillama refines them from the grid's method (e.g. svd-llm), whose "
                                      "sensitivities the prediction still uses")
    al.add_argument("--estimator", choices=["auto", "dloss", "curvature", "kl"], default="auto",
                    help="what the predictor adds up: measured loss increases, minus their first-order part, "
                         "or KL(dense || probe); auto: kl when the grid has it, else dloss")
    al.add_argument("--out", required=True)
    al.add_argument("--device", default="auto")
    al.add_argument("--dtype", default="float32")
    al.add_argument("--trust-remote-code", action="store_true")
    al.set_defaults(fn=cmd_allocate)

    a = p.parse_args(argv)
    return run_command(a)

if __name__ == "__main__":
    sys.exit(main())
