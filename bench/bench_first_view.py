"""The app's first view (gradient proxy, no probe per setting) against measurement, on the
app's own path: ``compression.lab.Lab`` on the default corpus, small settings, then uniform
RTN plans predicted (dense ppl x exp(Σ predicted increase)) and run (measured ppl).

    python bench/bench_first_view.py [--device auto] [--seqlen 128] [--calib-windows 4] [--eval-windows 2]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from common import MODEL, log, save  # noqa: I001

from compression.lab import Lab, LabSettings
from compression.plan import uniform_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    t0 = time.perf_counter()
    lab = Lab(Path(tempfile.mkdtemp(prefix="ranklab-bench-")),
              LabSettings(seqlen=a.seqlen, calib_windows=a.calib_windows, eval_windows=a.eval_windows))
    lab.load(MODEL, a.device)
    lab.run_profile()
    lab.run_proxy()
    dense = lab.evaluate_dense()
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        plan = uniform_plan("rtn", lab.linears, bits=bits, group_size=128)
        pred = lab.predict(plan)
        rec = lab.run(plan, f"rtn {bits}-bit g128")
        if rec.status != "ok":
            raise RuntimeError(f"run failed: {rec.error}")
        row = dict(plan=f"rtn {bits}-bit g128", predicted_ppl=pred["ppl"], measured_ppl=rec.measured["ppl"],
                   predicted_dloss=pred["dloss"], measured_dloss=math.log(rec.measured["ppl"] / dense["ppl"]))
        rows.append(row)
        log(f"{row['plan']}: predicted {row['predicted_ppl']:.2f} measured {row['measured_ppl']:.2f} "
            f"(increase {row['predicted_dloss']:.3f} vs {row['measured_dloss']:.3f} nats)")
    save(f"first_view_{a.tag or lab.require_model().device.type}", dict(
        protocol=f"app path (compression.lab), {lab.protocol()}; first view from the calibration windows; "
                 "predicted = dense ppl on the evaluation windows x exp(sum of per-linear predicted increases)",
        dense_ppl=dense["ppl"], rows=rows, seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
