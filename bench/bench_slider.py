"""Issue 6: server time of one Budget-slider release on the default model (prediction,
readout text, trade-off and budget figures), after profiling and the first view.

    python bench/bench_slider.py [--windows 16] [--seqlen 256]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import log, save  # noqa: I001

import app
from compression.lab import BITS_CHOICES, Lab, LabSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    lab = Lab(Path(tempfile.mkdtemp()), LabSettings(seqlen=a.seqlen, calib_windows=a.windows, eval_windows=2))
    lab.load("default", "cpu")
    lab.run_profile()
    lab.run_proxy()
    n = len(lab.lm.adapter.layers(lab.lm.model))
    times = []
    for r in range(a.repeats):
        ranks = [100] * n
        ranks[r % n] = 30 + (r * 5) % 60
        bits: list[int | None] = [None] * n
        bits[(r + 3) % n] = BITS_CHOICES[r % 4]
        t = time.perf_counter()
        plan = lab.plan_from_sliders(ranks, bits)
        app._readout(lab, plan)
        times.append((time.perf_counter() - t) * 1000)
    out = dict(protocol=f"default model, CPU, profile + first view on {a.windows} x {a.seqlen} tokens of the default "
                        f"corpus; one release = plan from 30+30 sliders, prediction, readout, two figures; "
                        f"{a.repeats} releases", median_ms=statistics.median(times), max_ms=max(times),
               min_ms=min(times))
    log(out)
    save("slider_cpu", out)


if __name__ == "__main__":
    main()
