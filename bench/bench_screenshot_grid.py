"""The README screenshot's runs predicted again from the *measured* grid (the app's defaults:
svd-llm and RTN g128 probed on the first 128 calibration tokens, KL estimator), next to their
first-view predictions and measurements (``results/screenshot_runs.jsonl``, taken in the app
with ``LabSettings`` defaults on the CPU). Writes ``results/screenshot_grid.json``.

    python bench/bench_screenshot_grid.py
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, log, save  # noqa: I001

from compression.lab import Lab, LabSettings
from compression.plan import Plan


def main() -> None:
    runs = [json.loads(line) for line in (RESULTS / "screenshot_runs.jsonl").read_text().splitlines() if line]
    lab = Lab(Path(tempfile.mkdtemp()), LabSettings())
    lab.load("default", "cpu")
    lab.run_profile()
    t0 = time.perf_counter()
    lab.run_sensitivity("svd-llm", "rtn", 128)
    grid_s = time.perf_counter() - t0
    dense = lab.evaluate_dense()
    rows = []
    for r in runs:
        if r["status"] != "ok":
            continue
        plan = Plan.from_dict(r["plan"])
        pred = lab.predict(plan)
        rows.append(dict(label=r["label"], measured_ppl=r["measured"]["ppl"], first_view_ppl=r["predicted"].get("ppl"),
                         grid_ppl=pred["ppl"], bytes_equal=pred["bytes"] == r["measured"]["bytes"]))
        log(rows[-1])
    save("screenshot_grid", dict(
        protocol="default model, CPU, float32; LabSettings defaults (default corpus, 16 x 256 calibration, 4 x 256 "
                 "evaluation, seqlen 256); measured grid: svd-llm / RTN g128 probed on the first 128 calibration "
                 "tokens, KL estimator; predictions on the evaluation scale (measured dense ppl x exp(sum))",
        dense_ppl=dense["ppl"], grid_seconds=round(grid_s, 1), runs=rows))


if __name__ == "__main__":
    main()
