"""What pressing Profile costs on a model and texts already profiled: the app's profile and
first sensitivity view (``compression.lab`` defaults, default corpus, CPU fp32), computed
into a fresh cache and then taken from it, in one run. Writes ``results/profile_reuse.json``.

    python bench/probe_profile_reuse.py
"""
from __future__ import annotations

import os
import tempfile
import time

os.environ["RANKLAB_CACHE"] = tempfile.mkdtemp(prefix="ranklab-reuse-")  # fresh: the first pass computes

import torch  # noqa: E402
from common import log, save  # noqa: E402,I001

from compression.lab import Lab, LabSettings  # noqa: E402


def main() -> None:
    lab = Lab(tempfile.mkdtemp(prefix="ranklab-reuse-ws-"), LabSettings())
    lab.load("default", "cpu", "float32")
    out = dict(protocol=f"{lab.protocol()}; torch threads {torch.get_num_threads()}", passes=[])
    for i in range(2):
        t = time.perf_counter()
        _, reused = lab.run_profile()
        t1 = time.perf_counter()
        lab.run_proxy()
        t2 = time.perf_counter()
        row = dict(profile_s=t1 - t, profile_reused=reused, first_view_s=t2 - t1, first_view_reused=lab.proxy_reused)
        log(f"pass {i}: {row}")
        out["passes"].append(row)
    save("profile_reuse", out)


if __name__ == "__main__":
    main()
