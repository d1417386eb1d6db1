"""Do per-linear sensitivities add up within a decoder layer? A probe of the predictor's
additivity assumption (``compression.allocate``), not a method RankLab ships.

Part 1, the measured grid: for some layers, every linear of the layer compressed *together*
at one grid setting (rank at a fraction of each linear's break-even, or a bit width), its KL
(dense || probe) per token against the sum of the linears' own grid KLs at that setting.
Protocol: the app's defaults (``LabSettings``: default corpus, 16 x 256 calibration tokens
for the profile, probes on the first 128 tokens), svd-llm and RTN g128, CPU.

Part 2, the first view on layer 0: all of layer 0's linears at 35 % of break-even (svd-llm).
The first view's predicted loss increase, the increase measured on 4 calibration windows
(in-sample: the factorisation was fitted on them) and on 8 held-out evaluation windows, for
several calibration sizes (windows of 128 tokens).

Writes ``results/additivity_probe.json``.

    python bench/probe_additivity.py [--layers 0,1,2,10,20,29] [--calib-windows 12,32,96]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import log, save  # noqa: I001

from analysis import sensitivity as S
from analysis.adapters import get_submodule
from analysis.layerwise import run_layer
from compression.apply import apply_plan
from compression.lab import Lab, LabSettings, _round8
from compression.plan import ModuleSpec, Plan


@torch.no_grad()
def joint_vs_singles(layers_probe: list[int]) -> list[dict]:
    lab = Lab(Path(tempfile.mkdtemp()), LabSettings())
    lab.load("default", "cpu")
    lab.run_profile()
    model, adapter = lab.lm.model, lab.lm.adapter
    ids, _ = lab.sensitivity_ids()
    stats = lab.profile.all_stats()
    names = [li.name for li in lab.linears if li.layer in layers_probe]
    grid = S.measure_sensitivity(model, adapter, ids, stats, names=names)
    kl = grid.kl.set_index(["name", "kind", "setting"])["kl"]
    layers = adapter.layers(model)
    h0, calls = S._capture(model, adapter, ids)
    inputs = [h0]
    for j, layer in enumerate(layers):
        inputs.append(run_layer(layer, inputs[-1], calls[j]))
    dense = S.dense_dist(model, adapter, inputs[-1])
    targets = ids[:, 1:]
    rows = []
    for L in layers_probe:
        lins = [li for li in lab.linears if li.layer == L]
        for kind, values in (("rank", S.FRACTIONS), ("bits", (2, 3, 4))):
            for v in values:
                twin, single = layers[L], 0.0
                for li in lins:
                    st = ("rank", S.rank_grid(li, [v])[0]) if kind == "rank" else ("bits", int(v))
                    aff = S.compressed_affines(get_submodule(model, li.name), li, [st], stats.get(li.name),
                                               "svd-llm", "rtn", 128)
                    twin = S.with_module(twin, adapter.role_path(li.role), S._stack(aff))
                    single += float(kl[(li.name, st[0], st[1])])
                h = run_layer(twin, inputs[L], calls[L])
                for k in range(L + 1, len(layers)):
                    h = run_layer(layers[k], h, calls[k])
                _, kls = S._window_losses(model, adapter, h, targets, dense)
                joint = float(kls.sum()) / targets.numel()
                rows.append(dict(layer=L, kind=kind, setting=v, sum_of_singles=single, joint=joint,
                                 ratio=joint / single if single > 0 else None))
                log(rows[-1])
    return rows


@torch.no_grad()
def first_view_layer0(calib_windows: list[int], fraction: float = 0.35) -> list[dict]:
    rows = []
    for cw in calib_windows:
        lab = Lab(Path(tempfile.mkdtemp()), LabSettings(seqlen=128, calib_windows=cw, eval_windows=8))
        lab.load("default", "cpu")
        lab.run_profile()
        lab.run_proxy()
        lm = lab.lm

        def loss(model, ids):
            return float(model(input_ids=ids, labels=ids).loss)

        cal, ev = lab.split.calib_ids[:4], lab.split.eval_ids
        plan = Plan(modules={li.name: ModuleSpec(rank=_round8(fraction * li.break_even, li))
                             for li in lab.linears if li.layer == 0})
        pred = lab.predictor.predict(plan).dloss
        comp, _ = apply_plan(lm.model, lm.adapter, plan, lab.profile.all_stats(), device=lm.device,
                             calib_ids=lab.split.calib_ids)
        rows.append(dict(calib_windows=cw, seqlen=128, first_view_dloss=pred,
                         calib_dloss_in_sample=loss(comp, cal) - loss(lm.model, cal),
                         eval_dloss_held_out=loss(comp, ev) - loss(lm.model, ev)))
        log(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,1,2,10,20,29")
    ap.add_argument("--calib-windows", default="12,32,96")
    a = ap.parse_args()
    t0 = time.perf_counter()
    joint = joint_vs_singles([int(x) for x in a.layers.split(",")])
    first = first_view_layer0([int(x) for x in a.calib_windows.split(",")])
    save("additivity_probe", dict(
        protocol=dict(
            joint="default model, CPU, float32; LabSettings defaults: default corpus, profile on 16 x 256 "
                  "calibration tokens, probes on the first 1 x 128; svd-llm ranks at the grid's fractions of "
                  "break-even, RTN g128 bits; KL(dense || probe) per predicted token",
            first_view="default model, CPU; default corpus in 128-token windows; all 7 linears of layer 0 at "
                       "35 % of break-even (svd-llm, rounded to 8); first view = the app's gradient-weighted "
                       "estimate on the calibration windows; in-sample = loss on 4 calibration windows; "
                       "held-out = loss on 8 evaluation windows"),
        joint=joint, first_view=first, seconds=round(time.perf_counter() - t0, 1)))


if __name__ == "__main__":
    main()
