"""Ranks and bits together with measured costs: allocate, measure the rank-with-quantised-factors
settings the plan picked (which the grid only predicts as the sum of the rank and the bits measured
alone), allocate again with those costs, until every such setting the plan picks is measured. A
probe for issue 5's ranks + bits allocation (RESULTS §23). The loop is
``compression.allocate.allocate_measured``.

Each measured setting is probed like the grid's probes (``analysis.sensitivity.SettingProbe``):
that one linear compressed (svd-llm rank, then its factors quantised as ``compression.apply`` does,
on the calibration profile's statistics), the rest dense, and the mean KL(dense || probe) per token
on the grid's probe tokens. The script first re-probes a few of the grid's own rank and bits settings this way
and reports how close it comes to the grid's values. ``--measure`` then applies the final plan
(sequentially, like every benchmark plan) and measures ppl16. Writes
``results/measured_combos[_tag].json``.

    python bench/probe_measured_combos.py [--grid-tag vq4r] [--target 2.5] [--rounds 40] [--measure] [--tag T]
"""
from __future__ import annotations

import math
import time

import torch
from common import EVAL_SPEC, grid_parser, grid_predictor, grid_windows, log, save  # noqa: I001

from analysis.data import load_corpus, tokenize, windows
from analysis.metrics import perplexity
from analysis.sensitivity import SettingProbe
from compression.allocate import allocate_measured
from compression.apply import apply_plan
from compression.plan import ModuleSpec


def main() -> None:
    ap = grid_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--measure", action="store_true", help="apply the final plan and measure its ppl16")
    ap.add_argument("--tag", default="")
    a, lm, (cal_c, cal_tok, cal32, _, _), stats, pred = grid_predictor(ap)
    name_out = "measured_combos" + (f"_{a.tag}" if a.tag else "")
    model, linears = lm.model, pred.linears
    ids = grid_windows(cal_tok, a.grid_tokens, 256)  # (C, L): the grid's probe tokens
    probe = SettingProbe(model, ids, stats, "kl")

    out = dict(protocol=f"grid {a.grid_tag} ({a.grid_tokens} probe tokens of {cal_c.label}, KL); profile 32 x 2048; "
                        f"svd-llm + {a.quant} g128; target {a.target} bits per weight; fp32 CPU, torch threads "
                        f"{torch.get_num_threads()}", check=[], rounds=[])
    kl = pred.grid.kl.set_index(["name", "kind", "setting"])["kl"]
    for li in linears[:: max(1, len(linears) // 4)][:4]:  # the grid's own settings, probed this way
        for kind, s in (("rank", pred.grid_ranks(li.name)[1]), ("bits", 2.5 if a.quant == "vq" else 3)):
            spec = (ModuleSpec(rank=int(s), lowrank="svd-llm") if kind == "rank"
                    else ModuleSpec(bits=s, group_size=128, quant=a.quant))
            mine, theirs = probe(li.name, spec), float(kl[(li.name, kind, s)])
            out["check"].append(dict(name=li.name, kind=kind, setting=s, probe=mine, grid=theirs))
            log(f"check {li.name} {kind} {s}: this probe {mine:.6f}, grid {theirs:.6f}")
    t = time.perf_counter()
    plan, rounds = allocate_measured(pred, probe, max_rounds=a.rounds, target_bits=a.target, quant=a.quant)
    for row in rounds:
        for m in row["measured"]:
            m["additive"] = pred.rank_dloss(m["name"], m["rank"]) + pred.bits_dloss(m["name"], m["bits"])
        log(f"round {row['round']}: predicted dloss {row['predicted_dloss']:.5f}, {row['unmeasured']} unmeasured")
    out.update(rounds=rounds, seconds=time.perf_counter() - t)
    pr = pred.predict(plan)
    out["plan"] = plan.to_dict()
    out["final"] = dict(predicted_dloss=pr.dloss, with_rank=sum(1 for s in plan.modules.values() if s.rank),
                        by_bits={str(b): sum(1 for li in linears if plan.spec_for(li.name).bits == b)
                                 for b in (2, 2.5, 3, 4)})
    if a.measure:
        ev_c = load_corpus(EVAL_SPEC)
        ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
        dense_ppl16 = perplexity(model, ev, ev_c.label).ppl
        t = time.perf_counter()
        comp, _ = apply_plan(model, lm.adapter, plan, stats, device=lm.device, calib_ids=cal32)
        out["final"].update(dense_ppl16=dense_ppl16, predicted_ppl16=dense_ppl16 * math.exp(pr.dloss),
                            ppl16=perplexity(comp, ev, ev_c.label).ppl, apply_seconds=time.perf_counter() - t)
        log(f"final: {out['final']}")
    save(name_out, out)


if __name__ == "__main__":
    main()
