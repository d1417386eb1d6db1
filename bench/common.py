"""Shared bench helpers. Benchmarks may read ../shared (the product never does)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("RANKLAB_SHARED", ROOT.parent / "shared"))
TEST_TXT = SHARED / "data" / "wikitext-2-raw" / "test.txt"
VALID_TOKENS = SHARED / "data" / "wikitext-2-tokens" / "valid.txt"
EVAL_SPEC = f"wikitext2:{TEST_TXT}"
CALIB_SPEC = f"wikitext2:{VALID_TOKENS}"
RESULTS = Path(os.environ.get("RANKLAB_BENCH_OUT", ROOT / "bench" / "results"))
MODEL = os.environ.get("RANKLAB_BENCH_MODEL", "default")


def machine() -> dict:
    d = dict(date=_dt.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
             cpu_threads=torch.get_num_threads(), host=platform.machine())
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return path


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def calibration(lm, windows: int = 32, seqlen: int = 2048, seed: int = 0):
    """The compression benchmark's calibration: ``windows`` x ``seqlen`` windows of the tokenised
    validation split, and their profile (cached). Returns (corpus, tokens, ids, profile, reused)."""
    from analysis.data import calibration_windows, load_corpus, tokenize
    from analysis.loading import cache_dir
    from analysis.profile import load_or_profile

    cal_c = load_corpus(CALIB_SPEC)
    cal_tok = tokenize(lm.tokenizer, cal_c)
    ids = calibration_windows(cal_tok, seqlen, windows, seed)
    prof, reused = load_or_profile(lm.model, lm.adapter, ids, fingerprint=lm.fingerprint,
                                   data_label=f"{cal_c.label} {windows}x{seqlen} seed {seed}",
                                   data_digest=f"{cal_c.digest}-{seqlen}-{seed}", cache_root=cache_dir(), batch_size=2)
    return cal_c, cal_tok, ids, prof, reused


def grid_windows(cal_tok, n_tok: int, seqlen: int):
    """The issue-5 bench's sensitivity windows: ``n_tok`` tokens of the calibration split in
    windows of ``min(seqlen, n_tok)`` (fewer tokens than a window: one shorter window), seed 0.
    Returns (C, L) ids."""
    from analysis.data import calibration_windows

    sl = min(seqlen, n_tok)
    return calibration_windows(cal_tok, sl, max(1, n_tok // sl), 0)


def grid_folder(tag: str, n_tok: int, seqlen: int, quant: str = "rtn") -> Path:
    """Where the issue-5 bench caches the grid measured on ``n_tok`` tokens (tag, quantiser)."""
    from analysis.loading import cache_dir

    suffix = "" if quant == "rtn" else f"-{quant}"
    return cache_dir() / "bench-grids" / f"sensitivity_{tag}-{n_tok}-{min(seqlen, n_tok)}{suffix}"


def grid_parser(description: str):
    """The command line of the probes that allocate on a cached grid (``--grid-tag``,
    ``--grid-tokens``, ``--quant``, ``--target``); add more, then give it to ``grid_predictor``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--grid-tag", default="vq4r")
    ap.add_argument("--grid-tokens", type=int, default=128)
    ap.add_argument("--quant", default="vq", choices=("gptq", "vq"))
    ap.add_argument("--target", type=float, default=2.5)
    return ap


def grid_predictor(ap, predictor_cls=None):
    """Parse ``ap`` (``grid_parser``), load the benchmark model on the CPU, its calibration and
    the cached grid; returns (args, model, calibration tuple, profile stats, KL predictor of
    ``predictor_cls``, default ``compression.allocate.Predictor``)."""
    import warnings

    from analysis.loading import load_model
    from analysis.metrics import linear_biases, model_bytes
    from analysis.sensitivity import SensitivityGrid
    from compression.allocate import Predictor
    from compression.plan import PlanWarning

    a = ap.parse_args()
    warnings.simplefilter("ignore", PlanWarning)
    lm = load_model(MODEL, "cpu")
    linears = lm.adapter.linears(lm.model)
    cal = calibration(lm)
    grid = SensitivityGrid.load(grid_folder(a.grid_tag, a.grid_tokens, 256, a.quant))
    pred = (predictor_cls or Predictor)(grid, linears, model_bytes(lm.model).weight_bytes, 4,
                                         linear_biases(lm.model, linears), estimator="kl")
    return a, lm, cal, cal[3].all_stats(), pred


def probe_args(description: str, **extra: str):
    """The per-linear probes' command line (``--layers 2,15,28``, ``--threads 2``, and ``extra``
    string options with their defaults); sets torch's threads. Returns (args, layer set)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--layers", default="2,15,28")
    ap.add_argument("--threads", type=int, default=2)
    for flag, default in extra.items():
        ap.add_argument(f"--{flag}", default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a, {int(x) for x in a.layers.split(",")}


def error_summary(rows: list[dict], key: str) -> dict:
    """Per-linear probe rows (``row["weights"]`` = m n, ``row[key]`` holding ``error`` and
    ``bits_per_weight``) -> bits per weight over all their weights, median and geomean error."""
    e = [r[key]["error"] for r in rows]
    return dict(bits_per_weight=sum(r[key]["bits_per_weight"] * r["weights"] for r in rows)
                / sum(r["weights"] for r in rows),
                median_error=statistics.median(e),
                geomean_error=math.exp(sum(map(math.log, e)) / len(e)))


def layer_weights(layers: set[int]):
    """The benchmark model's decoder linears in ``layers`` with their calibration Hessians:
    (calibration label, [(name, W (m, n) fp32, H = X Xᵀ (n, n) fp64)])."""
    from analysis.adapters import get_submodule
    from analysis.loading import load_model

    lm = load_model(MODEL, "cpu")
    cal_c, _, _, prof, _ = calibration(lm)
    stats = prof.all_stats()
    return cal_c.label, [(li.name, get_submodule(lm.model, li.name).weight.detach().float(),
                          stats[li.name].inputs.xxt.double())
                         for li in lm.adapter.linears(lm.model) if li.layer in layers]
