"""How the sensitivity grid's wall time depends on its execution mode, measured in one run.

Probes the linears of a few layers (default: first, middle, last) of the default model on
the sensitivity defaults (``analysis.sensitivity.DEFAULT_TOKENS`` ...), in rounds, each mode
once per round, and reports seconds per *setting* (probed or derived) and ratios against
the first mode; also checks that every mode gives the same table.

Modes: ``1xT``: one worker with T intra-op threads, every setting probed; ``Tx1``: T
single-threaded workers, every setting probed; ``default``: T workers and the derived
widths of ``DERIVED_BITS``. ``--baseline-commit C`` adds ``measure_sensitivity`` as it was
at git commit C (loaded with ``git show``), the reference for "before".

    python bench/bench_grid_modes.py [--layers 0,14,28] [--rounds 2] [--tokens N] [--baseline-commit 45efadd]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import MODEL, ROOT, calibration, log, save  # noqa: I001

from analysis import sensitivity as sens
from analysis.data import calibration_windows
from analysis.loading import load_model


def _module_at(commit: str):
    """``analysis/sensitivity.py`` as it was at ``commit``, imported as a separate module."""
    src = subprocess.run(["git", "show", f"{commit}:analysis/sensitivity.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"sensitivity_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"sensitivity_{commit}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,14,28")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=sens.DEFAULT_TOKENS)
    ap.add_argument("--seqlen", type=int, default=sens.DEFAULT_SEQLEN)
    ap.add_argument("--baseline-commit", default=None)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    lm = load_model(MODEL, "cpu")
    threads = torch.get_num_threads()
    cal_c, cal_tok, _, prof, _ = calibration(lm)
    stats = prof.all_stats()
    sl = min(a.seqlen, a.tokens)
    ids = calibration_windows(cal_tok, sl, max(1, a.tokens // sl), 0)
    layers = {int(x) for x in a.layers.split(",")}
    names = [li.name for li in lm.adapter.linears(lm.model) if li.layer in layers]
    modes = {f"1x{threads} all probed": dict(workers=1, derive_bits=()),
             f"{threads}x1 all probed": dict(workers=threads, derive_bits=()),
             f"{threads}x1 default (derived {sens.DERIVED_BITS})": dict(workers=threads)}
    measure = {k: sens.measure_sensitivity for k in modes}
    if a.baseline_commit:
        old = _module_at(a.baseline_commit)
        key = f"commit {a.baseline_commit} (1x{threads}, all probed)"
        modes = {key: {}, **modes}
        measure[key] = old.measure_sensitivity
    times = {k: [] for k in modes}
    tables = {}
    for r in range(a.rounds):
        for k, kw in modes.items():
            t = time.perf_counter()
            g = measure[k](lm.model, lm.adapter, ids, stats, names=names, **kw)
            times[k].append(time.perf_counter() - t)
            tables[k] = g
            log(f"round {r} {k}: {times[k][-1]:.1f}s ({len(g.table)} settings)")
    first = next(iter(modes))
    ref = tables[first].kl.set_index(["name", "kind", "setting"])["kl"]
    out = dict(protocol=f"{len(names)} linears of layers {sorted(layers)}, {cal_c.label} {ids.shape[0]} x {sl} "
                        f"tokens (seed 0), svd-llm + rtn g128, profile 32 x 2048; fp32; cpu; "
                        f"{threads} torch threads; {a.rounds} rounds, modes interleaved; best round",
               settings=len(tables[first].table), modes={})
    for k in modes:
        kl = tables[k].kl.set_index(["name", "kind", "setting"])["kl"].reindex(ref.index)
        probed = [s for s in ref.index if not (s[1] == "bits" and s[2] in (tables[k].meta.get("derived") or {})
                                               .get("bits", []))]
        best = min(times[k])
        out["modes"][k] = dict(seconds=times[k], best=best, seconds_per_setting=best / len(ref),
                               ratio_vs_first=min(times[first]) / best,
                               probed_max_abs_kl_diff=float(np.abs(kl[probed] - ref[probed]).max()),
                               derived=(tables[k].meta.get("derived") or {}))
        log(f"{k}: best {best:.1f}s, {min(times[first]) / best:.2f}x vs {first}")
    save("grid_modes" + (f"_{a.tag}" if a.tag else ""), out)


if __name__ == "__main__":
    main()
