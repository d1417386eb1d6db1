"""Block-wise tuning on the app's protocol (``compression.lab``, ``LabSettings`` defaults: default
corpus, 16 x 256 calibration tokens, 4 x 256 evaluation tokens): does tuning on the app's few
calibration tokens still help on its evaluation windows? Runs one plan untuned and tuned.

    python bench/probe_tune_app.py [--bits 3] [--steps 60]
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

from common import log, save  # noqa: I001

from analysis.loading import load_model
from compression.lab import Lab, LabSettings
from compression.plan import ModuleSpec, Plan, TuneOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--steps", type=int, default=TuneOptions.steps)
    a = ap.parse_args()
    lab = Lab(tempfile.mkdtemp(prefix="ranklab-tune-"), LabSettings())
    lab.lm = load_model("default", "cpu")
    lab.set_texts("default", "default")
    dense = lab.evaluate_dense()
    plan = Plan(default=ModuleSpec(bits=a.bits, group_size=128, quant="rtn"))
    out = dict(protocol=lab.protocol(), dense_ppl=dense["ppl"], rows=[])
    for tune in (None, TuneOptions(steps=a.steps)):
        rec = lab.run(replace(plan, tune=tune), "tuned" if tune else "untuned")
        row = dict(label=rec.label, status=rec.status, seconds=rec.seconds, **rec.measured)
        log(f"{rec.label}: {rec.status} ppl {rec.measured.get('ppl')} ({rec.seconds:.0f}s) {rec.measured.get('tune')}")
        out["rows"].append(row)
        save(f"tune_app_rtn{a.bits}", out)


if __name__ == "__main__":
    main()
