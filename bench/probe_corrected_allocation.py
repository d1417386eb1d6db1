"""Would allocating with the corrected scales (``compression.correction``) choose better plans?
The correction fitted on the 24 runs of ``results/correction_runs.jsonl`` (the app path,
``LabSettings`` defaults, CPU) scales the grid's rank and bits parts; the allocator is run on
the scaled grid at 0.3 and 0.25 of the dense bytes, and the plans are run and measured. The
allocations of the raw grid at the same targets are among the stored runs. Writes
``results/corrected_allocation_cpu.json``.

    python bench/probe_corrected_allocation.py
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, log, save  # noqa: I001

from compression.allocate import Predictor, allocate
from compression.lab import Lab, LabSettings


def main() -> None:
    ws = Path(tempfile.mkdtemp())
    shutil.copy(RESULTS / "correction_runs.jsonl", ws / "runs.jsonl")
    lab = Lab(ws, LabSettings())
    lab.load("default", "cpu")
    lab.run_profile()
    lab.run_proxy()
    lab.run_sensitivity("svd-llm", "rtn", 128)
    dense = lab.evaluate_dense()
    cal, left_out = lab.correction()
    log(f"correction: {cal.describe()}; left out: {left_out}")
    base = lab.predictor

    class Scaled(Predictor):
        def dloss_parts(self, name, spec):
            r, b = super().dloss_parts(name, spec)
            return (cal.rank_scale * r, cal.bits_scale * b)

    scaled = Scaled(base.grid, base.linears, base.dense_total_bytes, base.dtype_bytes, base.biases,
                    estimator=base.estimator)
    raw_runs = {r.label: r for r in lab.history.records() if r.label.startswith("allocated to")}
    rows = []
    for ratio in (0.3, 0.25):
        plan = allocate(scaled, target_ratio=ratio)
        pr = base.predict(plan)
        rec = lab.run(plan, f"corrected allocation {ratio}")
        raw = raw_runs[f"allocated to {ratio}"]
        raw_plan_pred = base.predict(type(plan).from_dict(raw.plan))
        rows.append(dict(
            ratio=ratio, corrected_allocation=dict(
                measured_ppl=rec.measured["ppl"], bytes=rec.measured["bytes"],
                predicted_ppl=dense["ppl"] * math.exp(pr.dloss), corrected_ppl=rec.predicted.get("ppl_corrected"),
                rank_part=pr.dloss_rank, bits_part=pr.dloss_bits,
                low_rank_linears=sum(plan.spec_for(li.name).rank is not None for li in lab.linears)),
            raw_allocation=dict(
                measured_ppl=raw.measured["ppl"], bytes=raw.measured["bytes"],
                predicted_ppl=dense["ppl"] * math.exp(raw_plan_pred.dloss),
                rank_part=raw_plan_pred.dloss_rank, bits_part=raw_plan_pred.dloss_bits,
                low_rank_linears=sum(type(plan).from_dict(raw.plan).spec_for(li.name).rank is not None
                                     for li in lab.linears))))
        log(rows[-1])
    save("corrected_allocation_cpu", dict(
        protocol=f"app path (LabSettings defaults): {lab.protocol()}; dense ppl {dense['ppl']:.3f}; grid svd-llm / "
                 "RTN g128 on the first 128 calibration tokens, KL; correction fitted on results/correction_runs.jsonl",
        correction=dict(rank_scale=cal.rank_scale, bits_scale=cal.bits_scale, n=cal.n, rms=cal.rms), rows=rows))


if __name__ == "__main__":
    main()
