"""Command line: ``python -m compression {apply,allocate} ...``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

from analysis.cli import progress_stderr, require_at_least_one, run_command, say


def prepare_calibration(lm, text: str, calib_tokens: int, seqlen: int, seed: int, cache: bool = True,
                        statistics: bool = True):
    """Calibration windows and (cached) profile statistics for ``lm`` on ``text``; with
    ``statistics=False`` only the windows (the profile returned is None)."""
    from analysis.data import calibration_windows, load_corpus, tokenize
    from analysis.loading import cache_dir
    from analysis.profile import load_or_profile
    from analysis.sensitivity import probe_digest

    lm.check_seqlen(seqlen)
    corpus = load_corpus(text)
    n_win = max(1, -(-calib_tokens // seqlen))
    ids = calibration_windows(tokenize(lm.tokenizer, corpus), seqlen, n_win, seed)
    label = f"{corpus.label}, {n_win} x {seqlen} tokens (seed {seed})"
    if not statistics:
        say(f"calibration windows: {label} (no profile needed)")
        return ids, None, label
    prof, reused = load_or_profile(lm.model, lm.adapter, ids, fingerprint=lm.fingerprint, data_label=label,
                                   data_digest=probe_digest(corpus.digest, seqlen, seed), cache_root=cache_dir(),
                                   progress=progress_stderr)
    say(("reused cached profile " if reused else "profiled ") + label)
    return ids, prof, label


LILLAMA_FLAGS = {"steps": 100, "lr": 1e-3, "granularity": "linear", "lillama_init": "svd-llm"}


def tune_options(a: argparse.Namespace):
    """The ``TuneOptions`` that ``--tune-steps`` / ``--tune-lr`` ask for."""
    from compression.plan import TuneOptions

    return TuneOptions(steps=a.tune_steps, **({} if a.tune_lr is None else {"lr": a.tune_lr}))


def check_apply_flags(a: argparse.Namespace) -> None:
    """Refuse flags the chosen --plan / --method would silently ignore, and fill the defaults
    of the flags that only some methods read (they default to None so that an explicit value
    can be told apart)."""
    from compression.plan import FIXED_BITS, LOWRANK_METHODS, Plan, uniform_plan

    def given(*names: str) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names if getattr(a, n) is not None]

    if a.plan and a.method:
        raise ValueError("give either --plan PLAN.json or --method NAME, not both")
    if not a.plan and not a.method:
        raise ValueError("give --plan PLAN.json or --method NAME")
    method = a.method
    if method is not None:  # an unknown method or a missing --param-ratio / --bits / --slice, before the model loads
        uniform_plan(method, [], param_ratio=a.param_ratio, bits=a.bits, slice_fraction=a.slice,
                     group_size=128 if a.group_size is None else a.group_size)
    extra = []
    if a.plan:
        extra = given("param_ratio", "bits", "group_size", "slice", *LILLAMA_FLAGS)
        why = "the plan sets every module's method, rank and bits (and its Lillama options)"
    elif method == "slicegpt":
        extra = given("param_ratio", "bits", "group_size", *LILLAMA_FLAGS)
        why = "slicegpt reads only --slice"
    elif method in LOWRANK_METHODS:
        extra = given("bits", "group_size", "slice", *([] if method == "lillama" else LILLAMA_FLAGS))
        why = (f"{method} reads --param-ratio" + (" and the Lillama flags" if method == "lillama" else "")
               + ("; for quantised factors write or allocate a plan whose modules set both rank and bits"
                  if "--bits" in extra else ""))
    elif method is not None:
        fixed = method in FIXED_BITS and a.bits in (None, FIXED_BITS[method])  # --bits 1 with binary: fine
        extra = given("param_ratio", "slice", *LILLAMA_FLAGS, *(["group_size"] if method in ("fp8", "mxfp4") else []),
                      *([] if fixed or method not in FIXED_BITS else ["bits"]))
        why = f"{method} reads " + ("no other setting" if method in ("fp8", "mxfp4") else
                                    "--group-size" if method in FIXED_BITS else "--bits and --group-size")
    if extra:
        raise ValueError(f"{', '.join(extra)} would be ignored: {why}. Drop {'it' if len(extra) == 1 else 'them'}")
    if a.tune_lr is not None and a.tune_steps is None:
        raise ValueError("--tune-lr is read only with --tune-steps N (block-wise tuning after compression)")
    if a.tune_steps is not None and method == "slicegpt":
        raise ValueError("--tune-steps tunes quantised and low-rank weights; slicegpt has none: drop --tune-steps")
    if a.tune_steps is not None:  # its options, before the model loads
        if errors := Plan(tune=tune_options(a)).option_errors():
            raise ValueError("; ".join(errors).replace("tune: steps", "--tune-steps").replace("tune: lr", "--tune-lr"))
    require_at_least_one(("--calib-tokens", a.calib_tokens), ("--seqlen", a.seqlen))
    if a.seqlen == 1:
        raise ValueError("--seqlen 1 is too short: a window needs at least 2 tokens (one predicts the next)")
    for name, default in (("group_size", 128), *LILLAMA_FLAGS.items()):
        if getattr(a, name) is None:
            setattr(a, name, default)
    if method in ("lillama", "slicegpt"):  # their options, before the model loads
        from compression.plan import LillamaOptions, SliceGPTOptions

        opts = Plan(lillama=LillamaOptions(init=a.lillama_init, steps=a.steps, lr=a.lr, calib_tokens=a.calib_tokens,
                                           granularity=a.granularity) if method == "lillama" else None,
                    slicegpt=SliceGPTOptions(a.slice) if method == "slicegpt" else None)
        if errors := opts.option_errors():
            raise ValueError("; ".join(errors).replace("slicegpt slice_fraction", "--slice"))


def cmd_apply(a: argparse.Namespace) -> dict:
    from analysis.atomic import check_replaceable
    from analysis.data import check_text_spec
    from analysis.loading import COMPRESSED_MARKER, load_model
    from analysis.metrics import linear_biases, linear_weight_bytes, model_bytes
    from compression.apply import apply_plan
    from compression.plan import (
        LillamaOptions,
        Plan,
        PlanWarning,
        needs_calibration,
        needs_statistics,
        plan_size,
        uniform_plan,
    )
    from compression.saved import save_compressed

    check_apply_flags(a)
    plan = Plan.load(a.plan) if a.plan else None  # a bad plan file fails before the model loads
    if plan is not None and a.tune_steps is not None:
        if plan.tune is not None:
            raise ValueError(f"{a.plan} carries its own 'tune' options ({plan.tune.steps} steps); drop --tune-steps "
                             "/ --tune-lr, or edit the plan")
        plan = dataclasses.replace(plan, tune=tune_options(a))
    if plan is not None and (errors := plan.option_errors() + plan.spec_errors()):
        raise ValueError(f"{a.plan}: " + "; ".join(errors))
    check_replaceable(a.out, (COMPRESSED_MARKER,), "a compressed model")  # before the long work
    check_text_spec(a.text)  # a missing text file is said before the model loads (read only if calibrating)
    lm = load_model(a.model, a.device, a.dtype, trust_remote_code=a.trust_remote_code, progress=say)
    lm.require_dense("compression")
    linears = lm.adapter.linears(lm.model)
    if plan is not None:
        method = plan.meta.get("method", "plan")
    else:  # check_apply_flags: a method when there is no plan
        lil = LillamaOptions(init=a.lillama_init, steps=a.steps, lr=a.lr, calib_tokens=a.calib_tokens,
                             granularity=a.granularity) if a.method == "lillama" else None
        plan = uniform_plan(a.method, linears, param_ratio=a.param_ratio, bits=a.bits, group_size=a.group_size,
                            lillama=lil, slice_fraction=a.slice)
        method = a.method
        if a.tune_steps is not None:
            plan = dataclasses.replace(plan, tune=tune_options(a))
    from compression.plan import validate_for_model

    for note in validate_for_model(plan, linears, lm.fingerprint):  # before the long step
        say(f"note: {note}")  # said once, as notes, not as Python warnings with source lines
    dense = model_bytes(lm.model)
    dtype_bytes = next(lm.model.parameters()).element_size()
    t0 = time.perf_counter()
    if needs_calibration(plan, linears):
        ids, prof, label = prepare_calibration(lm, a.text, a.calib_tokens, a.seqlen, a.seed,
                                               statistics=needs_statistics(plan, linears))
        stats = prof.all_stats() if prof is not None else None
    else:
        ids, stats, label = None, None, "none (data-free methods)"
        say(f"{method} is data-free: no calibration text is read")
    t_prof = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        comp, rep = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device, calib_ids=ids,
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
        out["lillama"] = {**dataclasses.asdict(plan.lillama or LillamaOptions()), "tokens_used": rep.lillama.tokens,
                          "init_loss": rep.lillama.init_loss,
                          "final_loss": rep.lillama.final_loss, "seconds": rep.lillama.seconds,
                          "kept_init": sorted(rep.lillama.kept_init)}
    if rep.tune is not None:
        t = rep.tune
        out["tune"] = {**dataclasses.asdict(plan.tune), "tokens_used": t.tokens, "layers_tuned": len(t.losses),
                       "output_error": {k: [round(b, 6), round(f, 6)] for k, (b, f) in t.losses.items()},
                       "kept": sorted(t.kept), "skipped": t.skipped, "seconds": round(t.seconds, 2),
                       "summary": t.summary()}
    meta = dict(base_model=a.model, base_fingerprint=lm.fingerprint, calibration=label, summary=out)
    save_compressed(comp, Path(a.out), plan_json=plan.to_json(), tokenizer=lm.tokenizer, meta=meta,
                    extra_modules=getattr(rep.slicegpt, "manifest", None))
    return out


def cmd_allocate(a: argparse.Namespace) -> dict:
    from compression.allocate import cli_allocate

    return cli_allocate(a, say=say, progress=progress_stderr)


def _bits_arg(text: str) -> int | float:
    """``--bits``: a width such as 4, or vq's 2.5 (the quantiser says which it takes)."""
    from compression.configs import bit_width

    try:
        return bit_width(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width; give a number such as 4 (or 2.5 for vq)") \
            from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression", description="RankLab compression")
    sub = p.add_subparsers(dest="cmd", required=True)
    ap = sub.add_parser("apply", help="compress a model with a plan or a uniform method, and save it")
    ap.add_argument("--model", default="default", help="default | model id | folder | file.gguf")
    ap.add_argument("--text", default="default", help="calibration text: default | PATH | wikitext2:PATH")
    ap.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier compressed model)")
    ap.add_argument("--plan", help="plan JSON (from `allocate` or the app's Export tab): per-module ranks and bits; "
                                   "instead of --method")
    ap.add_argument("--method", help="svd act-pca svd-llm lillama rtn gptq vq binary ternary fp8 mxfp4 slicegpt")
    ap.add_argument("--param-ratio", type=float,
                    help="low-rank methods: fraction of each linear's parameters the factors keep, in (0, 1]")
    ap.add_argument("--bits", type=_bits_arg, help="quantisers: bit width (rtn/gptq: 2, 3, 4 or 8; vq: 2, 2.5, 3 or 4)")
    ap.add_argument("--group-size", type=int, help="quantisation group (default 128; vq pairs: tile width)")
    ap.add_argument("--slice", type=float, help="SliceGPT: fraction of the hidden width to delete")
    ap.add_argument("--calib-tokens", type=int, default=32 * 2048)
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="Lillama: Adam steps per module (default 100)")
    ap.add_argument("--lr", type=float, help="Lillama: learning rate (default 1e-3)")
    ap.add_argument("--granularity", help="Lillama: linear (default) | mlp | layer")
    ap.add_argument("--lillama-init",
                    help="Lillama initialisation: svd-llm (default: on SmolLM2 plain svd starts at ppl 1.8e8 and "
                         "ends worse, bench/RESULTS.md §5) | svd | act-pca")
    ap.add_argument("--tune-steps", type=int,
                    help="after compressing, tune each decoder layer's rtn/gptq weights, vq codebooks and low-rank "
                         "factors for N Adam steps so its output matches the dense layer's (sizes unchanged; about 60 "
                         "is enough, bench/RESULTS.md §15); default: no tuning")
    ap.add_argument("--tune-lr", type=float, help="tuning learning rate (default 1e-2; offsets are in quantisation "
                                                  "steps, scales in log space)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.set_defaults(fn=cmd_apply)

    al = sub.add_parser("allocate", help="per-layer ranks and bits that meet a size target")
    al.add_argument("--model", default="default", help="default | model id | folder | file.gguf")
    al.add_argument("--sensitivity", required=True, help="folder written by `python -m analysis sensitivity`")
    g = al.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-bytes", type=int, help="whole-model weight bytes")
    g.add_argument("--target-ratio", type=float, help="fraction of the dense model's weight bytes")
    g.add_argument("--target-bits", type=float, help="average bits per decoder-linear weight")
    al.add_argument("--only", choices=["rank", "bits"], help="allocate ranks only or bits only (default: both)")
    al.add_argument("--lowrank", help="low-rank method the plan applies its ranks with (default: the grid's); "
                                      "lillama refines them from the grid's method (e.g. svd-llm), whose "
                                      "sensitivities the prediction still uses")
    al.add_argument("--estimator", choices=["auto", "dloss", "curvature", "kl"], default="auto",
                    help="what the predictor adds up: measured loss increases, minus their first-order part, "
                         "or KL(dense || probe); auto: kl when the grid has it, else dloss")
    al.add_argument("--measure-picks", action="store_true",
                    help="measure each rank with quantised factors the allocation picks (that linear alone, on the "
                         "grid's probe windows, ~1 s each on a CPU for 135M) and allocate again until every such pick "
                         "is measured: the grid's sums for them are optimistic (bench/RESULTS.md §23); measured costs "
                         "are cached for later allocations on the same grid")
    al.add_argument("--text", help="with --measure-picks: the text the grid was measured on (default | PATH | "
                                   "wikitext2:PATH; default: default)")
    al.add_argument("--out", required=True, help="plan JSON file to write")
    al.add_argument("--device", default="auto", help="auto | cpu | cuda")
    al.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    al.add_argument("--trust-remote-code", action="store_true")
    al.set_defaults(fn=cmd_allocate)

    a = p.parse_args(argv)
    return run_command(a)

if __name__ == "__main__":
    sys.exit(main())
