"""Issue 5's ranks + bits allocation through the product's command line: ``analysis sensitivity``
on the calibration split (its probe windows and profile are the benchmark's: 32 x 2048, seed 0),
then ``compression allocate --target-bits T`` three ways: ranks and bits with the grid's sums
(``additive``), ranks and bits with ``--measure-picks`` (``measured``), and ``--only bits``. Each
plan is applied sequentially on the 32 x 2048 calibration (as ``compression apply --plan`` does)
and measured on the first 16 x 2048 of the test split (ppl16). A second ``--measure-picks`` run
checks that the cached costs give the same plan without measuring. Writes
``results/measured_picks_<quant>_<target>.json``.

    python bench/bench_measured_picks.py [--quant gptq] [--target 2.5] [--apply additive,measured,"bits only"]
        [--skip-proxy]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
from common import CALIB_SPEC, EVAL_SPEC, MODEL, calibration, log, save  # noqa: I001

from analysis.data import load_corpus, tokenize, windows
from analysis.loading import load_model
from analysis.metrics import perplexity
from analysis.sensitivity import cli_sensitivity
from compression.allocate import cli_allocate
from compression.apply import apply_plan
from compression.plan import Plan


def _grid_only(lm, quant: str, out: Path) -> dict:
    """``analysis sensitivity``'s grid on the benchmark calibration (its windows, profile and cache),
    saved to ``out``, without the first view; the fields of its summary this script reads."""
    from analysis.loading import cache_dir
    from analysis.sensitivity import load_or_measure, probe_inputs

    ids, prof, digest, label = probe_inputs(lm, load_corpus(CALIB_SPEC), tokens=128, seqlen=2048, seed=0,
                                            profile_tokens=32 * 2048, say=log)
    grid, reused = load_or_measure(lm.model, lm.adapter, ids, prof.all_stats(), fingerprint=lm.fingerprint,
                                   data_label=label, data_digest=digest, cache_root=cache_dir(), method="svd-llm",
                                   quant=quant, group_size=128)
    grid.save(out)
    return dict(reused=reused, probes=int(len(grid.table)), seconds_measure=grid.meta["seconds"],
                seconds_per_probe=grid.meta.get("seconds_per_probe"), dense_loss=grid.dense_loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quant", default="gptq", choices=("rtn", "gptq", "vq"))
    ap.add_argument("--target", type=float, default=2.5)
    ap.add_argument("--apply", default="additive,measured,bits only",
                    help="the plans to apply and measure (ppl16), comma-separated; '' allocates only")
    ap.add_argument("--skip-proxy", action="store_true",
                    help="measure the grid as `analysis sensitivity` does but skip the gradient first view it adds "
                         "(for vq it fits every setting again)")
    a = ap.parse_args()
    modes = {"additive": {}, "measured": dict(measure_picks=True, text=CALIB_SPEC), "bits only": dict(only="bits"),
             "measured again": dict(measure_picks=True, text=CALIB_SPEC)}
    applied = [m.strip() for m in a.apply.split(",") if m.strip()]
    unknown = sorted(set(applied) - set(modes))
    if unknown:
        raise SystemExit(f"--apply: unknown plan(s) {unknown}; pick from {sorted(modes)}")
    work = Path(tempfile.mkdtemp(prefix="ranklab-picks-"))
    lm = load_model(MODEL, "cpu")
    common = dict(model=MODEL, device="cpu", dtype="float32", trust_remote_code=False)
    t = time.perf_counter()
    if a.skip_proxy:  # the command's grid (same windows, same cache), without the first view it adds
        sens = _grid_only(lm, a.quant, work / "sens")
    else:
        sens = cli_sensitivity(Namespace(**common, text=CALIB_SPEC, tokens=128, seqlen=2048, seed=0,
                                         method="svd-llm", quant=a.quant, group_size=128, profile_tokens=32 * 2048,
                                         out=str(work / "sens"), json=True), progress=None, say=log)
    out = dict(protocol=f"`python -m analysis sensitivity --text {CALIB_SPEC} --tokens 128 --seqlen 2048 "
                        f"--profile-tokens 65536 --quant {a.quant}` (KL), then `python -m compression allocate "
                        f"--target-bits {a.target}`; plans applied sequentially on 32 x 2048 of the same split, "
                        f"ppl16 on the first 16 x 2048 of {EVAL_SPEC}; fp32 CPU, torch threads "
                        f"{torch.get_num_threads()}",
               grid=dict(seconds=round(time.perf_counter() - t, 1), reused=sens["reused"], probes=sens["probes"],
                         seconds_measure=sens["seconds_measure"], seconds_per_probe=sens["seconds_per_probe"]),
               plans={})
    for mode, extra in modes.items():
        path = work / f"plan-{mode.replace(' ', '-')}.json"
        args = Namespace(**{**common, "sensitivity": str(work / "sens"), "target_bytes": None, "target_ratio": None,
                            "target_bits": a.target, "only": None, "out": str(path), **extra})
        t = time.perf_counter()
        got = cli_allocate(args, say=log)
        out["plans"][mode] = dict(seconds=round(time.perf_counter() - t, 1), predicted_ppl=got["predicted_ppl"],
                                  bits_per_weight=got["bits_per_weight"], modules=got["modules"],
                                  measured_picks=got["measured_picks"], plan=Plan.load(path).to_dict())
        log(f"{mode}: {out['plans'][mode]['modules']}, predicted {got['predicted_ppl']:.3f}, "
            f"{out['plans'][mode]['seconds']} s, {got['measured_picks']}")
    same = out["plans"]["measured again"]["plan"]["modules"] == out["plans"]["measured"]["plan"]["modules"]
    out["cached_costs_same_plan"] = same
    if applied:
        _, _, cal32, prof, _ = calibration(lm)
        stats = prof.all_stats()
        ev_c = load_corpus(EVAL_SPEC)
        ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
        dense = perplexity(lm.model, ev, ev_c.label).ppl
        out["dense_ppl16"] = dense
        for mode in applied:
            rec = out["plans"][mode]
            t = time.perf_counter()
            comp, _ = apply_plan(lm.model, lm.adapter, Plan.from_dict(rec["plan"]), stats, device=lm.device,
                                 calib_ids=cal32)
            rec.update(apply_seconds=round(time.perf_counter() - t, 1), ppl16=perplexity(comp, ev, ev_c.label).ppl)
            # the grid's prediction on the test split's scale: dense ppl16 x exp(predicted increase)
            rec["predicted_ppl16"] = dense * math.exp(math.log(rec["predicted_ppl"]) - sens["dense_loss"])
            log(f"{mode}: ppl16 {rec['ppl16']:.2f} (predicted {rec['predicted_ppl16']:.2f}), apply "
                f"{rec['apply_seconds']} s")
            del comp
    save(f"measured_picks_{a.quant}_{a.target}", out)


if __name__ == "__main__":
    main()
