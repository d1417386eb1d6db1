"""Does re-measuring the grid *around a plan* fix heavy plans? (issue 5, goal b at 2.5 bits)

The allocator adds up per-linear KLs measured with only that linear compressed. Heavy plans
come out optimistic (RESULTS §4: 2.5 bits predicted 83.8, measured 150; §9 part 3). This probe
measures each linear's options *in the context of a plan P*: the model with P applied, that
one linear set to each grid setting or back to dense, the KL against the dense model. Costs
``c_i(o) = KL(P, i<-o) - KL(P, i<-dense)`` are then what the allocator adds up (with
``KL(P)`` itself measured, so the prediction at P is exact on the probe tokens), and the
allocation is repeated around the new plan.

Protocol: the issue-5 bench (calibration profile 32 x 2048 of WikiText-2 validation tokens,
grid and context probes on its first 1 x 128 tokens, svd-llm + RTN g128, KL estimator;
ppl16 = the first 16 x 2048 windows of the raw test split), CPU fp32.

    python bench/probe_conditional.py [--targets 2.5,3.0] [--rounds 2] [--tag cpu]
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from common import EVAL_SPEC, MODEL, calibration, grid_folder, grid_windows, log, save  # noqa: I001

from analysis.adapters import get_submodule
from analysis.data import load_corpus, tokenize, windows
from analysis.layerwise import run_layer
from analysis.loading import load_model
from analysis.metrics import linear_biases, model_bytes, perplexity
from analysis.sensitivity import (
    SensitivityGrid,
    _capture,
    _stack,
    _window_losses,
    compressed_affines,
    dense_dist,
    with_module,
)
from compression.allocate import Predictor, allocate
from compression.apply import apply_plan
from compression.plan import Plan, PlanWarning


@torch.no_grad()
def context_kls(model, ctx, adapter, ids, stats, grid: SensitivityGrid, workers: int = 2) -> tuple[float, dict]:
    """KL(dense || P) per token on ``ids``, and per linear {setting: KL(P, i<-setting)} with
    setting ``("dense", 0)`` for the linear put back to dense."""
    layers_d, layers_c = adapter.layers(model), adapter.layers(ctx)
    h0, calls = _capture(model, adapter, ids)
    h = h0
    for j, layer in enumerate(layers_d):
        h = run_layer(layer, h, calls[j])
    dense = dense_dist(model, adapter, h)
    targets = ids[:, 1:]
    inputs = [h0]
    for j, layer in enumerate(layers_c):
        inputs.append(run_layer(layer, inputs[-1], calls[j]))
    _, kl = _window_losses(ctx, adapter, inputs[-1], targets, dense)
    base = float(kl.sum()) / targets.numel()
    settings = {n: list(zip(d["kind"], d["setting"].astype(int)))
                for n, d in grid.table.groupby("name", sort=False)}
    linears = [li for li in adapter.linears(model) if li.name in settings]
    c = ids.shape[0]
    calls_g = {}
    for g in {len(s) + 1 for s in settings.values()}:
        calls_g[g] = _capture(model, adapter, ids.repeat(g, 1))[1]

    def probe(li):
        torch.set_num_threads(1)
        with torch.no_grad():
            orig = get_submodule(model, li.name)
            sets = settings[li.name]
            aff = compressed_affines(orig, li, sets, stats.get(li.name), grid.meta["method"], grid.meta["quant"],
                                     int(grid.meta["group_size"]))
            w, b = orig.weight.detach(), None if orig.bias is None else orig.bias.detach()
            aff.append((w, b))
            g = len(aff)
            path = adapter.role_path(li.role)
            hh = inputs[li.layer].repeat(g, 1, 1)
            hh = run_layer(with_module(layers_c[li.layer], path, _stack(aff)), hh, calls_g[g][li.layer])
            for k in range(li.layer + 1, len(layers_c)):
                hh = run_layer(layers_c[k], hh, calls_g[g][k])
            _, kls = _window_losses(ctx, adapter, hh, targets, dense)
            vals = (kls.view(g, c).sum(1) / targets.numel()).tolist()
            return li.name, dict(zip([*sets, ("dense", 0)], vals))

    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            out = dict(pool.map(probe, linears))
    finally:
        torch.set_num_threads(before)
    return base, out


class ContextPredictor(Predictor):
    """Adds up costs measured around plan ``P``: ``dloss(i, o) = KL(P, i<-o) - KL(P, i<-dense)``
    (grid settings; rank x bits pairs as the sum of their parts, as in ``Predictor``), except
    P's own option of each linear, whose cost ``KL(P) - KL(P, i<-dense)`` is exact; the level
    is set so that ``predict(P)`` is ``KL(P)`` over dense."""

    def __init__(self, grid, linears, dense_bytes, biases, plan: Plan, base: float, kls: dict):
        t = grid.kl.copy()
        t["kl"] = [kls[n][(k, int(s))] - kls[n][("dense", 0)] for n, k, s in zip(t["name"], t["kind"], t["setting"])]
        cgrid = SensitivityGrid(dict(grid.meta), grid.table, first_order=grid.first_order, kl=t)
        super().__init__(cgrid, linears, dense_bytes, 4, biases, estimator="kl")
        self.plan = plan
        self.own = {n: base - v[("dense", 0)] for n, v in kls.items()}
        own_sum = math.fsum(self.dloss(li.name, plan.spec_for(li.name)) for li in linears)
        self.dense_loss = float(grid.meta["dense_loss"]) + base - own_sum + 0.0
        self.base = base

    def dloss(self, name, spec):
        mine = self.plan.spec_for(name)
        if not spec.is_dense and not mine.is_dense and (spec.rank, spec.bits) == (mine.rank, mine.bits):
            return self.own[name]
        return super().dloss(name, spec)


def describe(plan: Plan) -> dict:
    mods = plan.modules.values()
    return dict(low_rank=sum(1 for s in mods if s.rank), bits={b: sum(1 for s in mods if s.bits == b)
                                                                  for b in (2, 3, 4, 8)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="2.5,3.0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=None, choices=(None, "rank", "bits"))
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    lm = load_model(MODEL, "cpu")
    linears = lm.adapter.linears(lm.model)
    ev_c = load_corpus(EVAL_SPEC)
    cal_c, cal_tok, cal32, prof, _ = calibration(lm)
    stats = prof.all_stats()
    ids = grid_windows(cal_tok, 128, 128)
    grid = SensitivityGrid.load(grid_folder("cpu_default", 128, 128))
    ev = windows(tokenize(lm.tokenizer, ev_c), 2048, 16)
    dense_bytes = model_bytes(lm.model).weight_bytes
    biases = linear_biases(lm.model, linears)
    additive = Predictor(grid, linears, dense_bytes, 4, biases, estimator="kl")
    t = time.perf_counter()
    dense16 = perplexity(lm.model, ev, ev_c.label).ppl
    log(f"dense ppl16 {dense16:.3f} ({time.perf_counter() - t:.0f}s)")
    out = dict(protocol="issue-5 bench: profile 32 x 2048 WikiText-2 valid tokens; grid and context probes on "
                        "its first 1 x 128 tokens (svd-llm + rtn g128, KL); ppl16 on 16 x 2048 of the raw test "
                        "split; CPU fp32, 2 probe threads", dense_ppl16=dense16, runs=[])
    kw = {} if a.only is None else {"only": a.only}
    for target in [float(x) for x in a.targets.split(",")]:
        pred, plan, label = additive, allocate(additive, target_bits=target, **kw), "additive grid"
        for rnd in range(a.rounds + 1):
            p = pred.predict(plan)
            t = time.perf_counter()
            comp, _ = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device, calib_ids=cal32)
            t_apply = time.perf_counter() - t
            ppl16 = perplexity(comp, ev, ev_c.label).ppl
            t_eval = time.perf_counter() - t - t_apply
            t = time.perf_counter()
            base, kls = context_kls(lm.model, comp, lm.adapter, ids, stats, grid)
            t_ctx = time.perf_counter() - t
            r = dict(target_bits=target, round=rnd, allocated_by=label, bits_per_weight=p.bits_per_weight,
                     ppl16=ppl16, predicted_ppl16=dense16 * math.exp(p.dloss),
                     additive_ppl16=dense16 * math.exp(additive.predict(plan).dloss),
                     probe_kl=base, probe_kl_ppl16=dense16 * math.exp(base), plan=describe(plan),
                     seconds=dict(apply=t_apply, eval=t_eval, context_grid=t_ctx))
            out["runs"].append(r)
            log(f"{target} bits, round {rnd} ({label}): ppl16 {ppl16:.2f}, predicted {r['predicted_ppl16']:.2f}, "
                f"additive {r['additive_ppl16']:.2f}, probe KL x dense {r['probe_kl_ppl16']:.2f}; {r['plan']}; "
                f"apply {t_apply:.0f}s eval {t_eval:.0f}s context grid {t_ctx:.0f}s")
            save(f"conditional_probe_{a.tag}", out)
            if rnd == a.rounds:
                break
            pred = ContextPredictor(grid, linears, dense_bytes, biases, plan, base, kls)
            plan, label = allocate(pred, target_bits=target, **kw), f"context of round {rnd}"
            del comp


if __name__ == "__main__":
    main()
