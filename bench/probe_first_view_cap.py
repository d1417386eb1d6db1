"""Why the first view caps each token's weight (``analysis.sensitivity.TOKEN_CAP``).

1. Saturation: the real 4-bit RTN error of a linear added to its output at window positions
   0-1 only, or 2+ only, scaled by eps. KL(eps) / eps² at eps = 0.05 is the quadratic term
   the first view extrapolates; KL(1) is the real effect.
2. Level: the first view's predicted loss increase of uniform RTN g128 at 4 and 3 bits under
   several caps, against the measured increase (the app's path, ``compression.lab``).

    python bench/probe_first_view_cap.py [--text default] [--seed 0] [--calib-ids FILE.json] [--tag NAME]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MODEL, log, save  # noqa: I001

import analysis.sensitivity as S
from analysis.adapters import get_submodule
from compression.lab import Lab, LabSettings
from compression.plan import uniform_plan
from compression.quant import dequantize_affine, quantize_rtn


@torch.no_grad()
def saturation(model, ids: torch.Tensor, names: list[str], group_size: int = 64) -> list[dict]:
    ref = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)  # (C, L-1, V)

    def kl(logits: torch.Tensor) -> float:
        lq = F.log_softmax(logits[:, :-1].float(), -1)
        return float((ref.exp() * (ref - lq)).sum(-1).mean())

    rows = []
    for name in names:
        lin = get_submodule(model, name)
        for bits in (4, 3):
            d_w = dequantize_affine(*quantize_rtn(lin.weight.data, bits, group_size), group_size) - lin.weight.data
            for where, sl in (("positions 0-1", slice(0, 2)), ("positions 2+", slice(2, None))):
                out = {}
                for eps in (0.05, 1.0):
                    def hook(_m, args, y, eps=eps, sl=sl):
                        y = y.clone()
                        y[:, sl] += eps * (args[0][:, sl] @ d_w.T)
                        return y
                    h = lin.register_forward_hook(hook)
                    try:
                        out[eps] = kl(model(input_ids=ids).logits)
                    finally:
                        h.remove()
                rows.append(dict(linear=name, bits=bits, where=where, quadratic=out[0.05] / 0.05 ** 2, real=out[1.0]))
                log(f"{name} {bits}-bit {where}: quadratic {rows[-1]['quadratic']:.4f} real {rows[-1]['real']:.4f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-ids", default=None, help="JSON file with 'ids' (C x L) to use as calibration windows")
    ap.add_argument("--caps", default="none,1000,300,100,30")
    ap.add_argument("--linears", default="model.layers.0.self_attn.v_proj,model.layers.0.self_attn.o_proj")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    t0 = time.perf_counter()
    lab = Lab(Path(tempfile.mkdtemp(prefix="ranklab-bench-")),
              LabSettings(seqlen=128, calib_windows=4, eval_windows=8, seed=a.seed, latency_runs=1))
    lab.load(MODEL, a.device)
    lab.set_texts(a.text, a.text)
    data = lab.split.calib_label
    if a.calib_ids:
        ids = torch.tensor(json.loads(Path(a.calib_ids).read_text())["ids"])
        lab.split = dataclasses.replace(lab.split, calib_ids=ids)
        data = f"calibration windows from {Path(a.calib_ids).name}"
    sat = saturation(lab.lm.model, lab.split.calib_ids.to(lab.lm.device), a.linears.split(","))
    lab.run_profile()
    dense = lab.evaluate_dense()["ppl"]
    plans = {b: uniform_plan("rtn", lab.linears, bits=b, group_size=128) for b in (4, 3)}
    measured = {}
    for b, plan in plans.items():
        rec = lab.run(plan, f"rtn {b}-bit g128")
        if rec.status != "ok":
            raise RuntimeError(rec.error)
        measured[b] = math.log(rec.measured["ppl"] / dense)
    rows = []
    for cap in a.caps.split(","):
        c = None if cap == "none" else float(cap)
        lab.proxy = S.proxy_sensitivity(lab.lm.model, lab.lm.adapter, lab.split.calib_ids, lab.profile.all_stats(),
                                        token_cap=c)
        lab._refresh_predictor()
        row = dict(cap=cap, **{f"predicted_{b}bit": lab.predict(p)["dloss"] for b, p in plans.items()},
                   **{f"measured_{b}bit": measured[b] for b in plans})
        rows.append(row)
        log(f"cap {cap}: 4-bit {row['predicted_4bit']:.3f} (measured {measured[4]:.3f}); "
            f"3-bit {row['predicted_3bit']:.3f} (measured {measured[3]:.3f})")
    save(f"first_view_cap_{a.tag or 'run'}", dict(
        protocol=f"app path (compression.lab), {lab.protocol()}; calibration: {data}; saturation: the linear's "
                 "4-bit/3-bit RTN g64 error added at the positions named, on the calibration windows, mean KL per "
                 "predicted token; levels: uniform RTN g128, predicted = sum of first-view increases, measured = "
                 "log(ppl / dense ppl) on the evaluation windows",
        dense_ppl=dense, saturation=sat, levels=rows, seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
