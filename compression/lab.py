"""The lab session behind the app: one object per browser session holding the loaded model,
its profile, sensitivities, the current plan and the run history. No gradio here; the app's
callbacks call these methods and turn exceptions into messages.

Every number this produces carries its protocol (data, seqlen, windows, device, dtype).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from analysis.data import Corpus, load_corpus, make_split
from analysis.loading import LoadedModel, cache_dir, load_model
from analysis.metrics import (
    latency,
    linear_biases,
    linear_weight_bytes,
    model_bytes,
    perplexity,
    reset_cuda_peak,
)
from analysis.profile import Profile, load_or_profile, rank_for_energy
from analysis.sensitivity import DEFAULT_TOKENS as SENSITIVITY_TOKENS
from compression import correction as correction_module
from compression.apply import apply_plan
from compression.configs import bit_width
from compression.correction import Correction, fit_correction
from compression.plan import (
    ModuleSpec,
    Plan,
    describe_plan,
    needs_statistics,
    plan_size,
    validate_for_model,
)

Progress = Callable[[float, str], None]
# the compressed model lives in memory only: a reload or another model leaves none
NO_COMPRESSED = ("(no compressed model in this session: a reload or another model clears it; run the "
                 "plan in Run & compare)")
BITS_CHOICES = [2, 2.5, 3, 4, 8, None]  # the per-layer bit widths offered (None = keep the dtype; 2.5: vq only)
DENSE_PCT = 100  # rank slider value meaning "keep full rank"
KEEP, KEEP_RANK = "keep", "full"  # override-table cells that leave a module's bits / rank uncompressed


@dataclass
class LabSettings:
    calib_text: str = "default"
    eval_text: str = "default"
    seqlen: int = 256
    calib_windows: int = 16
    eval_windows: int = 4
    sensitivity_tokens: int = SENSITIVITY_TOKENS  # probe tokens of the measured grid (first calibration windows)
    seed: int = 0
    batch_size: int = 4
    latency_seqlen: int = 128
    decode_tokens: int = 8
    latency_runs: int = 3


@dataclass
class RunRecord:
    run_id: str
    time: str
    label: str
    status: str  # ok | failed | cancelled
    fingerprint: str
    plan: dict
    predicted: dict = field(default_factory=dict)  # ppl, bytes, bits_per_weight (when a predictor exists)
    measured: dict = field(default_factory=dict)  # ppl, bytes, bits_per_weight, prefill_tok_s, decode_ms_per_token
    protocol: str = ""
    error: str = ""
    seconds: float = 0.0
    summary: str = ""  # what the plan does, in words (describe_plan)


class RunHistory:
    """Append-only JSON-lines file of runs; each line is written and flushed when a run ends,
    so a page reload or an app restart finds every finished run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "runs.jsonl"
        self.unreadable: list[int] = []  # line numbers the last ``records()`` could not read (torn last line aside)
        self._said: list[int] = []  # what ``unreadable_note`` last reported

    def append(self, rec: RunRecord) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self, fingerprint: str | None = None) -> list[RunRecord]:
        if not self.path.exists():
            return []
        out, bad = [], []
        known = {f.name for f in fields(RunRecord)}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = RunRecord(**{k: v for k, v in d.items() if k in known})  # fields of a newer RankLab: left out
            except (json.JSONDecodeError, TypeError, AttributeError):
                if i < len(lines) or line.endswith("}"):  # a torn last line (crash mid-write) is expected; others not
                    bad.append(i)
                continue
            if fingerprint is None or rec.fingerprint == fingerprint:
                out.append(rec)
        self.unreadable = bad
        return out

    def unreadable_note(self) -> str | None:
        """What the last ``records()`` skipped, for the user: None if nothing, or if the same
        lines were reported last time (said once, not on every refresh)."""
        if not self.unreadable or self.unreadable == self._said:
            return None
        self._said = list(self.unreadable)
        shown = ", ".join(map(str, self.unreadable[:5])) + (" …" if len(self.unreadable) > 5 else "")
        return (f"{len(self.unreadable)} line(s) of {self.path} could not be read and are not shown (line {shown}); "
                "the file is left as it is")

    def table(self, fingerprint: str | None = None) -> pd.DataFrame:
        rows = []
        for r in self.records(fingerprint):
            m, p = r.measured, _on_eval_scale(r.predicted)
            rows.append(dict(run_id=r.run_id, time=r.time, label=r.label, status=r.status, plan=r.summary,
                             ppl=m.get("ppl"), predicted_ppl=p.get("ppl"), corrected_ppl=p.get("ppl_corrected"),
                             bytes=m.get("bytes"),
                             bits_per_weight=m.get("bits_per_weight"), prefill_tok_s=m.get("prefill_tok_s"),
                             decode_ms_per_token=m.get("decode_ms_per_token"),
                             decode_ms_min=_at(m.get("decode_ms_range"), 0),
                             decode_ms_max=_at(m.get("decode_ms_range"), 1), seconds=r.seconds,
                             protocol=m.get("protocol", r.protocol), error=r.error))  # latency too
        # the figures first, the long texts (plan, protocol, error) last: a narrow table shows the numbers
        cols = ["run_id", "time", "label", "status", "ppl", "predicted_ppl", "corrected_ppl", "bytes",
                "bits_per_weight", "prefill_tok_s", "decode_ms_per_token", "decode_ms_min", "decode_ms_max",
                "seconds", "plan", "protocol", "error"]
        return pd.DataFrame(rows, columns=cols)

    def tradeoff_frame(self, fingerprint: str | None = None, protocol: str | None = None) -> pd.DataFrame:
        """Runs in the schema of ``analysis.figures.tradeoff`` (measured and predicted rows);
        with ``protocol``, only the runs measured with it (others do not compare)."""
        rows = []
        for r in self.records(fingerprint):
            if r.status != "ok" or (protocol is not None and r.protocol != protocol):
                continue
            method = r.plan.get("meta", {}).get("method", "plan")
            rows.append(dict(run_id=r.run_id, label=r.label, kind="measured", ppl=r.measured.get("ppl"),
                             bytes=r.measured.get("bytes"), bits_per_weight=r.measured.get("bits_per_weight"),
                             decode_ms_per_token=r.measured.get("decode_ms_per_token", math.nan), method=method))
            if _on_eval_scale(r.predicted).get("ppl"):
                rows.append(dict(run_id=r.run_id, label=r.label, kind="predicted", ppl=r.predicted["ppl"],
                                 bytes=r.predicted.get("bytes"), bits_per_weight=r.predicted.get("bits_per_weight"),
                                 decode_ms_per_token=math.nan, method=method))
        return pd.DataFrame(rows, columns=["run_id", "label", "kind", "ppl", "bytes", "bits_per_weight",
                                           "decode_ms_per_token", "method"])

    def dequantizing_runs(self, fingerprint: str | None, protocol: str) -> int:
        """Successful runs measured with ``protocol`` whose latency includes dequantising
        quantised linears on every call (their ``latency_note``)."""
        def dequantizes(m: dict) -> bool:  # runs recorded before ``latency_note`` existed: their protocol says it
            return bool(m.get("latency_note", "dequantised on every call" in m.get("protocol", "")))

        return sum(r.status == "ok" and r.protocol == protocol and dequantizes(r.measured)
                   for r in self.records(fingerprint))

    def other_protocol_runs(self, fingerprint: str | None, protocol: str) -> int:
        """Successful runs of this model measured with another protocol than ``protocol``."""
        return sum(r.status == "ok" and r.protocol != protocol for r in self.records(fingerprint))


def _on_eval_scale(predicted: dict) -> dict:
    """A run's prediction as it compares with its measurement: a perplexity predicted on the
    calibration text's scale (``ppl_basis``) is left out. Runs record their basis since
    2026-11-24 and measure the dense model first, so their predictions are on the evaluation text."""
    if predicted.get("ppl_basis", "evaluation") == "evaluation":
        return predicted
    return {k: v for k, v in predicted.items() if k not in ("ppl", "ppl_corrected")}


def new_run_id() -> str:
    """A short run id that no CSV reader takes for a number: hex digits alone are all digits
    now and then (8 of them one time in 43; read back as an int, leading zeros lost) or look
    like a float exponent ("12e45678"), so ids start with a letter. 11 hex digits: two of a
    thousand runs share an id about once in 35 million histories."""
    return "r" + uuid.uuid4().hex[:11]


def _never() -> bool:
    return False


class Lab:
    """One user's session: model, data, profile, sensitivities, plan, runs."""

    def __init__(self, workspace: Path, settings: LabSettings | None = None):
        self.workspace = Path(workspace)
        self.settings = settings or LabSettings()
        self.lm: LoadedModel | None = None
        self.split = None
        self.profile: Profile | None = None
        self.sensitivity = None  # analysis.sensitivity.SensitivityGrid (measured)
        self.proxy = None  # analysis.sensitivity.SensitivityGrid: the cheap first view
        self.predictor = None
        self.plan = Plan()
        self.compressed: nn.Module | None = None
        self.compressed_plan: Plan | None = None
        self.sensitivity_reused = False  # the grid came from the disk cache
        self.proxy_reused = False  # the first view came from the disk cache
        self.compressed_run: RunRecord | None = None  # the run that made ``compressed``: its export says it
        self.dense_eval: dict | None = None
        self.history = RunHistory(self.workspace)
        self._stop = False
        self.job: str | None = None  # what is running now (profiling, a run, ...), for Cancel
        self._closed = False  # the session ended (close()): free the models once no job runs, load nothing more
        self._lock = threading.Lock()  # close() (the unload handler's thread) against a job ending (a worker's)
        self.loads = 0  # successful loads: the app resets its sliders only when a new model arrived
        self._correction: tuple[tuple, Correction | None, dict] | None = None  # (key, fit, runs left out)

    # ----------------------------------------------------------------- state
    def require_model(self) -> LoadedModel:
        if self.lm is None:
            if self._closed:
                raise ValueError("this page's session ended (the page was closed or reloaded, or lost its "
                                 "connection) and its model was freed: reload the page")
            raise ValueError("load a model first (Model & data tab)")
        return self.lm

    def require_dense(self, what: str) -> LoadedModel:
        """The loaded model, refused with what to load instead when RankLab compressed it."""
        lm = self.require_model()
        lm.require_dense(what)
        return lm

    def request_stop(self) -> str | None:
        """Ask the running job to stop at its next layer or batch; returns what is running
        (None: nothing is, and nothing is stopped)."""
        if self.job is None:
            return None
        self._stop = True
        return self.job

    @contextmanager
    def running(self, job: str) -> Iterator[None]:
        """Mark ``job`` as running so that Cancel can name and stop it. Steps nested inside
        (profiling within a run, or the app's profile + first view) belong to the outer job,
        so one Cancel stops the whole of it; a stop asked before it started does not carry over."""
        if self.job is not None:
            yield
            return
        self.job, self._stop = job, False
        try:
            yield
        finally:
            with self._lock:
                self.job, self._stop = None, False
                closed = self._closed
            if closed:
                self._free()

    def close(self) -> None:
        """The session ended (its page was closed, reloaded, or lost its connection). A running
        job finishes (a run's result is saved in the history, nothing is lost) and the models are
        freed when it ends; with nothing running, at once. The Lab loads nothing more. The
        workspace and the caches on disk stay."""
        with self._lock:
            self._closed = True
            busy = self.job is not None
        if not busy:
            self._free()

    @property
    def closed_but_running(self) -> str | None:
        """The job still running in a closed session, if any (what a new page waits behind)."""
        return self.job if self._closed else None

    def _free(self) -> None:
        device = self.lm.device if self.lm is not None else None
        self.lm = self.compressed = self.compressed_plan = self.compressed_run = None
        self.profile = self.proxy = self.sensitivity = self.predictor = None
        self._correction = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    def should_stop(self) -> bool:
        return self._stop

    @property
    def linears(self):
        lm = self.require_model()
        return lm.adapter.linears(lm.model)

    def protocol(self) -> str:
        lm, s = self.require_model(), self.settings
        return (f"{self.split.eval_label if self.split else s.eval_text}; seqlen {s.seqlen}; "
                f"{lm.device}; {str(lm.dtype).replace('torch.', '')}")

    # ----------------------------------------------------------------- model & data
    def load(self, spec: str, device: str = "auto", dtype: str = "float32", say: Callable[[str], None] | None = None
             ) -> dict:
        """Load a model and window the current texts with its tokenizer. When they cannot be
        windowed for it (a window longer than its positions, a text gone), it takes the default
        texts with a window it can hold, and the summary's ``note`` says so. On any other error
        the session keeps its model, texts and results."""
        self._refuse_while_running("load another model")
        if self._closed:  # its page has gone: load nothing
            raise InterruptedError("the page was closed; no model is loaded for it")
        lm = load_model(spec, device, dtype, progress=say)
        if lm.tokenizer is None:
            raise ValueError(f"{spec} has no tokenizer files; RankLab needs one to read text")
        s = self.settings
        calib, evalt, note = s.calib_text, s.eval_text, None
        try:
            split, seqlen = self._split(lm, calib, evalt, None, None, None)
        except (ValueError, FileNotFoundError) as e:
            seqlen = min(s.seqlen, lm.max_positions) if lm.max_positions else s.seqlen
            calib = evalt = "default"
            split, seqlen = self._split(lm, calib, evalt, seqlen, None, None)  # fails: nothing changes
            note = (f"the texts in use could not be windowed for this model ({e}); it uses the default texts "
                    f"with a window length of {seqlen} instead: change them under Use these texts")
        with self._lock:
            if self._closed:  # the page went away while the model loaded: nobody would free it
                raise InterruptedError("the page was closed while the model loaded; it was not kept")
            self.lm, self.loads = lm, self.loads + 1
        self.compressed = self.compressed_plan = self.compressed_run = None
        self.plan = Plan()
        self._commit_split(split, calib, evalt, seqlen)
        return {**self.summary(), "note": note}

    def set_texts(self, calib_text: str, eval_text: str, seqlen: int | None = None, calib_windows: int | None = None,
                  eval_windows: int | None = None) -> str:
        """New calibration / evaluation texts or windowing (None keeps a setting). Clears what
        was measured on the old texts; refused while a job runs, which would write back results
        of the old texts."""
        self._refuse_while_running("change the texts")
        lm = self.require_model()
        split, seqlen = self._split(lm, calib_text, eval_text, seqlen, calib_windows, eval_windows)
        had = [what for what, v in (("the profile", self.profile), ("the sensitivities", self.predictor),
                                    ("the dense measurement", self.dense_eval)) if v is not None]
        self._commit_split(split, calib_text, eval_text, seqlen)
        said = f"calibration: {split.calib_label}\nevaluation: {split.eval_label}"
        if had:  # cached results come back at the next click if these texts were measured before
            said += (f"\nCleared, as measured on the texts before: {', '.join(had)} (the profile and grid come "
                     "back from the cache when these texts were measured before)")
        return said

    def _refuse_while_running(self, what: str) -> None:
        if self.job is not None:
            raise ValueError(f"{self.job} is running: wait for it to finish or press Cancel, then {what}")

    def _split(self, lm: LoadedModel, calib_text: str, eval_text: str, seqlen: int | None,
               calib_windows: int | None, eval_windows: int | None):
        s = self.settings
        seqlen = int(s.seqlen if seqlen is None else seqlen)
        for what, v in (("window length", seqlen), ("calibration windows", calib_windows),
                        ("evaluation windows", eval_windows)):
            if v is not None and int(v) < (2 if what == "window length" else 1):
                raise ValueError(f"{what} {v} is too small: use at least {2 if what == 'window length' else 1}")
        if lm.max_positions and seqlen > lm.max_positions:
            raise ValueError(f"window length (seqlen) {seqlen} exceeds the model's maximum of {lm.max_positions} "
                             "positions")
        cal, ev = self._corpus(calib_text), self._corpus(eval_text)
        split = make_split(lm.tokenizer, ev, cal, seqlen, int(s.eval_windows if eval_windows is None else eval_windows),
                           int(s.calib_windows if calib_windows is None else calib_windows), seed=s.seed)
        return split, seqlen

    def _commit_split(self, split, calib_text: str, eval_text: str, seqlen: int) -> None:
        s = self.settings
        self.split = split
        s.calib_text, s.eval_text, s.seqlen = calib_text, eval_text, seqlen
        s.calib_windows, s.eval_windows = split.calib_ids.shape[0], split.eval_ids.shape[0]
        self.profile = self.sensitivity = self.proxy = self.predictor = None
        self.dense_eval = None

    @staticmethod
    def _corpus(spec: str) -> Corpus:
        return load_corpus(spec)

    def summary(self) -> dict:
        lm = self.require_model()
        mem = model_bytes(lm.model)
        lins = self.linears
        cfg = lm.model.config
        return dict(source=lm.source, model_type=cfg.model_type, layers=len(lm.adapter.layers(lm.model)),
                    hidden=getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
                    parameters=sum(p.numel() for p in lm.model.parameters()),
                    decoder_linear_parameters=sum(li.out_features * li.in_features for li in lins),
                    bytes=mem.weight_bytes, device=str(lm.device), dtype=str(lm.dtype).replace("torch.", ""),
                    fingerprint=lm.fingerprint, compressed_from=lm.compressed_from)

    def layer_table(self) -> pd.DataFrame:
        return pd.DataFrame([dict(name=li.name, layer=li.layer, role=li.role, out_features=li.out_features,
                                  in_features=li.in_features, break_even=round(li.break_even, 1))
                             for li in self.linears])

    # ----------------------------------------------------------------- profiling
    def run_profile(self, progress: Progress | None = None, cached_only: bool = False) -> tuple[Profile | None, bool]:
        """Profile the calibration windows, or reuse the cached profile of them; with
        ``cached_only``, only reuse (None and nothing changed when there is none)."""
        lm = self.require_dense("profiling")
        sp = self.split
        with self.running("profiling"):
            prof, reused = load_or_profile(lm.model, lm.adapter, sp.calib_ids, fingerprint=lm.fingerprint,
                                           data_label=sp.calib_label, data_digest=sp.digest, cache_root=cache_dir(),
                                           batch_size=self.settings.batch_size, progress=progress,
                                           should_stop=self.should_stop, cached_only=cached_only)
        if prof is not None:
            self.profile = prof
            self.proxy = None
        return prof, reused

    def require_profile(self) -> Profile:
        if self.profile is None:
            raise ValueError("profile the model first (Spectra tab)")
        return self.profile

    # ----------------------------------------------------------------- sensitivity
    def run_proxy(self, progress: Progress | None = None, cached_only: bool = False) -> object:
        """The cheap first view of the sensitivities, or the cached one of these windows
        (``proxy_reused`` says which); with ``cached_only``, only reuse (None and nothing
        changed when there is none)."""
        from analysis.sensitivity import load_or_proxy

        lm, prof = self.require_model(), self.require_profile()
        with self.running("the first sensitivity view"):
            proxy, reused = load_or_proxy(lm.model, lm.adapter, self.split.calib_ids, prof.all_stats(),
                                          fingerprint=lm.fingerprint, data_label=self.split.calib_label,
                                          data_digest=self.split.digest, cache_root=cache_dir(), progress=progress,
                                          should_stop=self.should_stop, cached_only=cached_only)
        if proxy is None:
            return None
        self.proxy, self.proxy_reused = proxy, reused
        self._refresh_predictor()
        return self.proxy

    def sensitivity_ids(self) -> tuple[torch.Tensor, str]:
        """The measured grid's probe windows: the first ``settings.sensitivity_tokens`` tokens'
        worth of calibration windows (the whole calibration profiles; probes cost per token)."""
        sp = self.split
        tokens, seqlen = self.settings.sensitivity_tokens, sp.calib_ids.shape[1]
        n = max(1, min(sp.calib_ids.shape[0], -(-tokens // seqlen)))
        ids = sp.calib_ids[:n, :tokens] if tokens < seqlen else sp.calib_ids[:n]  # fewer than a window: its start
        return ids, f"{sp.calib_label}; probes on its first {ids.shape[0]} x {ids.shape[1]} tokens"

    def run_sensitivity(self, method: str = "svd-llm", quant: str = "rtn", group_size: int = 128,
                        progress: Progress | None = None, cached_only: bool = False) -> object:
        """Measure the grid, or reuse the cached one (``sensitivity_reused`` says which); with
        ``cached_only``, only reuse (None and nothing changed when there is none)."""
        from analysis.sensitivity import load_or_measure

        lm, prof = self.require_dense("the sensitivity grid"), self.require_profile()
        ids, label = self.sensitivity_ids()
        with self.running("the sensitivity grid"):
            grid, reused = load_or_measure(lm.model, lm.adapter, ids, prof.all_stats(), fingerprint=lm.fingerprint,
                                           data_label=label, data_digest=self.split.digest, cache_root=cache_dir(),
                                           method=method, quant=quant, group_size=group_size, progress=progress,
                                           should_stop=self.should_stop, cached_only=cached_only)
        if grid is None:
            return None
        self.sensitivity, self.sensitivity_reused = grid, reused
        self._refresh_predictor()
        return self.sensitivity

    def had(self) -> dict:
        """What this session has computed that a reloaded page can take back (``resume``)."""
        grid = self.sensitivity
        return dict(profile=self.profile is not None, proxy=self.proxy is not None, dense=self.dense_eval is not None,
                    grid=None if grid is None else {k: grid.meta.get(k) for k in ("method", "quant", "group_size")})

    def resume(self, had: dict, progress: Progress | None = None) -> list[str]:
        """Take back what a reloaded page had (``had()``): its profile, first view and measured
        grid from the disk cache (never computed anew here), and the dense model measured again. Returns what
        came back, in words; what did not is left to the user's buttons."""
        back = []
        say = progress or (lambda f, m: None)
        if had.get("profile") or had.get("grid"):
            say(0.1, "the profile, from the cache")
            if self.run_profile(cached_only=True)[0] is not None:
                back.append("the profile")
                if had.get("proxy") and self.run_proxy(cached_only=True) is not None:
                    back.append("the first sensitivity view")
                g = had.get("grid")
                if g and self.run_sensitivity(g["method"], g["quant"], int(g["group_size"]),
                                              cached_only=True) is not None:
                    back.append("the measured sensitivity grid")
        if had.get("dense"):
            self.evaluate_dense(lambda f, m: say(0.3 + 0.7 * f, "the dense model, measured again: " + m))
            back.append("the dense measurement (taken again)")
        return back

    def sensitivity_table(self) -> tuple[pd.DataFrame | None, str]:
        """The measured grid if there is one, else the cheap first view; and which it is."""
        if self.sensitivity is not None:
            est = self.sensitivity.default_estimator()
            what = "KL(dense || compressed) per token" if est == "kl" else "calibration-loss increase"
            return self.sensitivity.estimate(est), f"measured: {what}"
        if self.proxy is not None:
            return self.proxy.table, "first view (gradient-weighted estimate, not measured)"
        return None, "none"

    def _refresh_predictor(self) -> None:
        from compression.allocate import Predictor, load_measured

        lm = self.require_model()
        grid = self.sensitivity if self.sensitivity is not None else self.proxy
        if grid is None:
            self.predictor = None
            return
        self.predictor = Predictor(grid, self.linears, model_bytes(lm.model).weight_bytes,
                                   next(lm.model.parameters()).element_size(), self._biases(),
                                   estimator=grid.default_estimator())
        if grid is self.sensitivity:  # costs measured by earlier allocations on this grid (``plan_allocate``)
            load_measured(self.predictor, cache_dir())

    def _biases(self) -> dict[str, bool]:
        return linear_biases(self.require_model().model, self.linears)

    # ----------------------------------------------------------------- plans
    def plan_from_sliders(self, rank_pcts: list[float], bits: list[int | None], lowrank: str = "svd-llm",
                          quant: str = "rtn", group_size: int = 128, overrides: pd.DataFrame | None = None) -> Plan:
        """Per-layer sliders -> plan. Rank: % of each linear's break-even rank (100 = keep
        full rank), rounded to a multiple of 8. Bits: a width of ``BITS_CHOICES`` per layer
        (None keeps the dtype)."""
        lins = self.linears
        n_layers = max(li.layer for li in lins) + 1
        if len(rank_pcts) != n_layers or len(bits) != n_layers:
            raise ValueError(f"expected {n_layers} rank and bits values, got {len(rank_pcts)} and {len(bits)}")
        bad = sorted({str(b) for b in bits if b not in BITS_CHOICES})
        if bad:
            offered = ", ".join(str(b) for b in BITS_CHOICES if b is not None)
            raise ValueError(f"bits {', '.join(bad)} not offered: pick one of {offered} or keep (None) per layer, "
                             "or set any width per module with a plan file")
        mods = {}
        for li in lins:
            pct, b = float(rank_pcts[li.layer]), bits[li.layer]
            rank = None if pct >= DENSE_PCT else _round8(pct / 100 * li.break_even, li)
            spec = ModuleSpec(rank=rank, bits=b, group_size=group_size, lowrank=lowrank, quant=quant)
            if not spec.is_dense:
                mods[li.name] = spec
        plan = Plan(modules=mods, meta={"method": "sliders", "lowrank": lowrank, "quant": quant})
        return self.apply_overrides(plan, overrides,
                                    base=ModuleSpec(group_size=group_size, lowrank=lowrank, quant=quant))

    def plan_uniform(self, rank_pct: float, bits: int | None, lowrank: str = "svd-llm", quant: str = "rtn",
                     group_size: int = 128) -> Plan:
        """Every layer at one rank (% of break-even) and one width, named by them (the run label
        and legend entry of an unlabelled run), e.g. ``uniform rtn 4b g128``."""
        n = len(self.require_model().adapter.layers(self.lm.model))
        plan = self.plan_from_sliders([rank_pct] * n, [bits] * n, lowrank, quant, group_size)
        what = ModuleSpec(rank=0 if rank_pct < DENSE_PCT else None, bits=bits, group_size=group_size,
                          lowrank=lowrank, quant=quant)  # rank 0 only stands for "a rank" in the name
        plan.meta["method"] = "dense" if what.is_dense else \
            "uniform " + what.label(rank_text=f"{rank_pct:g}% of break-even")
        return plan

    def apply_overrides(self, plan: Plan, overrides: pd.DataFrame | None, base: ModuleSpec | None = None) -> Plan:
        """Rows of the per-module table (name, rank, bits) override the sliders: a number sets
        it, ``full`` (rank) or ``keep`` (bits) leaves that module uncompressed in that respect,
        blank keeps the layer's slider. A module the sliders leave dense takes its methods and
        group size from ``base`` (the sliders' own; default ``plan.default``)."""
        if overrides is None or len(overrides) == 0:
            return plan
        mods = dict(plan.modules)
        known = {li.name for li in self.linears}
        seen: set[str] = set()
        for _, row in overrides.iterrows():
            name = row.get("name")
            name = "" if name is None or (isinstance(name, float) and math.isnan(name)) else str(name).strip()
            if not name:
                if _cell(row.get("rank")) is not None or _cell(row.get("bits"), whole=False) is not None:
                    raise ValueError("a table row sets a rank or bits but names no module; type the module's name "
                                     "(the Model & data tab lists them) or clear the row")
                continue
            if name in seen:
                raise ValueError(f"{name} appears in two table rows; keep one (the rows would contradict)")
            seen.add(name)
            if name not in known:
                raise ValueError(f"table row {name!r} is not a decoder linear of this model; the Model & data tab "
                                 "lists the names")
            cur = mods.get(name) or (base if base is not None else plan.default)
            rank, bits = _cell(row.get("rank")), _cell(row.get("bits"), whole=False)
            spec = ModuleSpec(rank=cur.rank if rank is None else (None if rank == KEEP else rank),
                              bits=cur.bits if bits is None else (None if bits == KEEP else bits),
                              group_size=cur.group_size, lowrank=cur.lowrank, quant=cur.quant)
            if spec.is_dense:
                mods.pop(name, None)
            else:
                mods[name] = spec
        return Plan(default=plan.default, modules=mods, meta=plan.meta)

    def sliders_for(self, plan: Plan) -> tuple[list[int], list[int | None], pd.DataFrame]:
        """The inverse of ``plan_from_sliders`` for any plan: each layer's sliders at its most
        common setting (rank % snapped to the slider's 5 % steps), and a table row for every
        module the sliders do not reproduce, so that sliders + table give back ``plan``'s
        ranks and bits exactly."""
        lins = self.linears
        n = max(li.layer for li in lins) + 1
        rank_v: list[int] = [DENSE_PCT] * n
        bits_v: list[int | None] = [None] * n
        by_layer: dict[int, list] = {}
        for li in lins:
            by_layer.setdefault(li.layer, []).append((li, plan.spec_for(li.name)))
        for layer, items in by_layer.items():
            pcts = sorted(100 * s.rank / li.break_even if s.rank else DENSE_PCT for li, s in items)
            rank_v[layer] = int(min(DENSE_PCT, max(10, round(pcts[len(pcts) // 2] / 5) * 5)))
            bs = [s.bits for _, s in items if s.bits in BITS_CHOICES]
            bits_v[layer] = max(bs, key=bs.count) if bs else None
        probe = self.plan_from_sliders(rank_v, bits_v)
        rows = []
        for li in lins:
            s, t = plan.spec_for(li.name), probe.spec_for(li.name)
            if (s.rank, s.bits) != (t.rank, t.bits):
                rows.append({"name": li.name, "rank": "" if s.rank == t.rank else (s.rank or KEEP_RANK),
                             "bits": "" if s.bits == t.bits else (s.bits or KEEP)})
        return rank_v, bits_v, pd.DataFrame(rows, columns=["name", "rank", "bits"])

    def plan_energy(self, fraction: float, lowrank: str = "act-pca") -> Plan:
        """Ranks that keep ``fraction`` of each linear's activation energy (from the profile);
        linears whose rank would reach break-even stay full rank."""
        prof = self.require_profile()
        mods = {}
        for li in self.linears:
            k = rank_for_energy(prof.act_eigvals[li.name], fraction)
            if k < li.break_even:
                mods[li.name] = ModuleSpec(rank=max(1, k), lowrank=lowrank)
        return Plan(modules=mods, meta={"method": f"energy {fraction:.0%}", "lowrank": lowrank})

    def plan_allocate(self, target_ratio: float, only: str | None = None, measure_picks: bool = False,
                      progress: Progress | None = None) -> Plan:
        """The allocated plan at ``target_ratio`` of the dense bytes (``compression.allocate``).
        ``measure_picks`` (ranks and bits together, the measured grid): measure each rank with
        quantised factors the allocation picks and allocate again until all are measured
        (``allocate_measured``; about a second per setting on a CPU for 135M, Cancel stops it and
        keeps what was measured). Measured costs stay with the predictor and in the cache, so
        later predictions and allocations on this grid use them; ``meta["measured_picks"]`` says
        what was done."""
        from compression.allocate import allocate, allocate_measured_cached

        if self.predictor is None:
            raise ValueError("allocation needs sensitivities: compute the first view or the measured grid "
                             "(Sensitivity tab)")
        if not measure_picks:
            return allocate(self.predictor, target_ratio=target_ratio, only=only)
        if only is not None:
            raise ValueError(f"measuring the picks measures ranks with quantised factors, which an allocation of "
                             f"{only}s only never picks: allocate ranks and bits together")
        with self.running("the allocation (measuring its ranks with quantised factors)"):
            return allocate_measured_cached(self.predictor, self.setting_probe(), cache_dir(),
                                            target_ratio=target_ratio, progress=progress, should_stop=self.should_stop)

    def setting_probe(self):
        """``analysis.sensitivity.SettingProbe`` on the measured grid's probe windows, in its
        estimator: measures one setting at a time as the grid would have."""
        from analysis.sensitivity import SettingProbe

        lm = self.require_dense("measuring settings")
        grid, pred = self.sensitivity, self.predictor
        if grid is None or pred is None or pred.grid is not grid:
            raise ValueError("measuring the picks needs the measured sensitivity grid (Sensitivity tab): the first "
                             "view's estimates are not in a probe's units")
        ids, label = self.sensitivity_ids()
        if ids.numel() != grid.meta.get("n_tokens"):
            raise ValueError(f"the grid was probed on {grid.meta.get('n_tokens')} tokens, the current settings give "
                             f"{ids.numel()} ({label}): measure the grid again (Sensitivity tab)")
        return SettingProbe(lm.model, ids, self.require_profile().all_stats(), pred.estimator)

    def check(self, plan: Plan) -> list[str]:
        # the app shows the notes itself: no process-wide warning filter
        return validate_for_model(plan, self.linears, self.require_model().fingerprint)

    def stamped(self, plan: Plan) -> Plan:
        """``plan`` with the loaded model it was made for in its meta (an exported plan says so);
        a plan that already names a model (one loaded from a file) keeps it."""
        lm = self.require_model()
        if plan.meta.get("base_fingerprint"):
            return plan
        return replace(plan, meta={**plan.meta, "base_model": lm.spec, "base_fingerprint": lm.fingerprint})

    def predict(self, plan: Plan) -> dict:
        """Exact bytes always; predicted loss/ppl when sensitivities exist, and a corrected
        perplexity once runs of this model and texts have been measured. Milliseconds."""
        lm = self.require_dense("a budget")
        notes = self.check(plan)
        if plan.tuned:
            notes.append(f"this plan asks for tuning after compressing ({plan.tune.steps} steps per layer): the "
                         "prediction is for it untuned, and the app's sliders do not hold tuning (set the Run tab's "
                         "tune steps)")
        size = plan_size(plan, self.linears, model_bytes(lm.model).weight_bytes,
                         next(lm.model.parameters()).element_size(), self._biases())
        out = dict(bytes=size.total_bytes, dense_bytes=size.dense_total_bytes, ratio=size.ratio,
                   bits_per_weight=size.bits_per_weight, linear_bytes=size.linear_bytes,
                   params=self._plan_params(plan), notes=notes, ppl=None, loss=None)
        if self.predictor is not None:
            below = self.predictor.below_grid(plan)
            if below:
                name, r, r0 = min(below, key=lambda b: b[1] / b[2])
                notes.insert(0, f"{len(below)} linear(s) have ranks below those the sensitivities measured (e.g. "
                                f"{name}: rank {r}, smallest measured {r0}); their predicted damage is extrapolated "
                                "and may be far too low: run the plan to measure it")
            together = self.predictor.rank_and_bits(plan)
            if together:
                from compression.allocate import rank_and_bits_note

                notes.insert(0, rank_and_bits_note(together))
            notes[:0] = self._method_mismatch_notes(plan)
            pr = self.predictor.predict(plan)
            out.update(ppl=pr.ppl, loss=pr.loss, dloss=pr.dloss, ppl_basis="calibration")
            if self.dense_eval is not None and self.dense_eval.get("ppl"):
                # on the evaluation text: its measured dense perplexity times exp(predicted increase),
                # so that predicted and measured runs share one scale
                dense_ppl = float(self.dense_eval["ppl"])
                out.update(ppl=dense_ppl * math.exp(pr.dloss), ppl_basis="evaluation")
                cal, _ = self.correction()
                if cal is not None:
                    out.update(ppl_corrected=dense_ppl * math.exp(cal.apply(pr.dloss_rank, pr.dloss_bits)),
                               correction=cal, correction_extrapolates=cal.extrapolates(pr.dloss))
        return out

    def _method_mismatches(self, plan: Plan) -> Counter:
        """``(what, value)`` -> how many linears the plan compresses with other settings than
        the sensitivities were probed with, in the order of the linears."""
        pred, other = self.predictor, Counter()
        for li in self.linears:
            s = plan.spec_for(li.name)
            if s.rank is not None and s.lowrank != pred.method:
                other["low-rank method", s.lowrank] += 1
            if s.bits is not None and s.quant != pred.quant:
                other["quantiser", s.quant] += 1
            elif s.bits is not None and s.group_size != pred.group_size:
                other["group size", s.group_size] += 1
        return other

    def _method_mismatch_notes(self, plan: Plan) -> list[str]:
        """Where the plan compresses with other settings than the sensitivities were probed with:
        the prediction then adds the probed settings' damage, which the notes say."""
        pred = self.predictor
        return [f"{n} linear(s) use {what} {value}, but the sensitivities were probed with {pred.method} ranks and "
                f"{pred.quant} g{pred.group_size} bits: the prediction adds the probed settings' damage (measure the "
                "grid with these settings, or run the plan, for its own)"
                for (what, value), n in self._method_mismatches(plan).items()]

    def comparable_to_predictor(self, plan: Plan) -> str | None:
        """Why a measured run of ``plan`` cannot correct the current predictor (None: it can):
        its methods must be the grid's, and its ranks within the grid's (not extrapolated)."""
        pred = self.predictor
        if pred is None:
            return "no predictor"
        if plan.lillama is not None or plan.slicegpt is not None:
            return "Lillama / SliceGPT plan"
        if plan.tuned:
            return "tuned after compressing (the prediction does not model tuning)"
        probed = {"low-rank method": pred.method, "quantiser": pred.quant}  # a group size alone still compares
        for what, value in self._method_mismatches(plan):
            if what in probed:
                return f"{what} {value} (the sensitivities measured {probed[what]})"
        if pred.below_grid(plan):
            return "ranks below the measured grid"
        return None

    def correction(self) -> tuple[Correction | None, dict[str, int]]:
        """The map from the current predictor's increases to measured ones
        (``compression.correction``), fitted on this model's successful runs measured on the
        current texts and device, and how many such runs were left out, by reason (methods other
        than the grid's, ranks below it, a plan this RankLab cannot read). ``(None, ...)`` before
        the dense model is measured or without a usable run. Each run's prediction is
        recomputed with the current predictor, so the map belongs to the predictor the readout uses."""
        if self.predictor is None or not self.dense_eval or self.dense_eval.get("nll") is None:
            return None, {}
        lm = self.require_model()
        dense_nll, protocol = float(self.dense_eval["nll"]), self.protocol()
        recs = [r for r in self.history.records(lm.fingerprint)
                if r.status == "ok" and r.protocol == protocol and r.measured.get("nll") is not None]
        # the predictor by identity, and its measured costs (``plan_allocate``) that change its predictions
        key = (self.predictor, len(self.predictor.measured), dense_nll, protocol, tuple(r.run_id for r in recs))
        if self._correction is not None and self._correction[0] == key:
            return self._correction[1], dict(self._correction[2])
        rank, bits, measured, left_out = [], [], [], Counter()
        for r in recs:
            try:
                plan = Plan.from_dict(r.plan)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # a hand-edited or foreign runs.jsonl
                left_out[f"plan unreadable ({type(e).__name__})"] += 1
                continue
            why = self.comparable_to_predictor(plan)
            if why is not None:
                left_out[why] += 1
                continue
            pr = self.predictor.predict(plan)
            m = float(r.measured["nll"]) - dense_nll
            if max(pr.dloss_rank, 0.0) + max(pr.dloss_bits, 0.0) < correction_module.MIN_PREDICTED:
                left_out["predicted too close to dense to scale"] += 1  # noise would dominate (fit_correction)
                continue
            if not m > 0:
                left_out["measured at or below the dense perplexity"] += 1
                continue
            rank.append(pr.dloss_rank)
            bits.append(pr.dloss_bits)
            measured.append(m)
        cal = fit_correction(rank, bits, measured)
        self._correction = (key, cal, dict(left_out))
        return cal, dict(left_out)

    def _plan_params(self, plan: Plan) -> int:
        total = 0
        for li in self.linears:
            s = plan.spec_for(li.name)
            total += s.rank * (li.out_features + li.in_features) if s.rank else li.out_features * li.in_features
        return total

    # ----------------------------------------------------------------- runs
    def evaluate_dense(self, progress: Progress | None = None, again: bool = False) -> dict:
        """The dense model measured on the evaluation windows (perplexity, bytes, latency); kept
        until the texts change, or measured ``again`` (latency varies on a shared machine)."""
        if self.dense_eval is None or again:
            lm = self.require_model()
            with self.running("measuring the dense model"):
                self.dense_eval = self._measure(lm.model, progress)
        return self.dense_eval

    def runs_table(self) -> pd.DataFrame:
        """This model's run table, with the dense model's measurement (when made this session,
        on the current texts) as a first row, so an exported table carries its baseline."""
        table = self.history.table(self.require_model().fingerprint)
        d = self.dense_eval
        if not d:
            return table
        compressed = self.require_model().compressed
        row = dict(run_id="dense", time="", status="ok", ppl=d.get("ppl"),
                   label="this compressed model (this session)" if compressed else "dense (this session)",
                   plan="as saved" if compressed else "dense",
                   bytes=d.get("bytes"), bits_per_weight=d.get("bits_per_weight"),
                   prefill_tok_s=d.get("prefill_tok_s"), decode_ms_per_token=d.get("decode_ms_per_token"),
                   decode_ms_min=_at(d.get("decode_ms_range"), 0), decode_ms_max=_at(d.get("decode_ms_range"), 1),
                   protocol=d.get("protocol", self.protocol()), error="")
        dense = pd.DataFrame([row], columns=table.columns)
        return dense if table.empty else pd.concat([dense, table], ignore_index=True)

    def _measure(self, model: nn.Module, progress: Progress | None) -> dict:
        s = self.settings
        say = progress or (lambda f, m: None)
        reset_cuda_peak(self.require_model().device)  # the run's peak: this measurement's, not the session's
        ppl = perplexity(model, self.split.eval_ids, self.split.eval_label, progress=lambda f, m: say(0.8 * f, m),
                         should_stop=self.should_stop)
        say(0.8, f"latency: prefill 1 x {min(s.latency_seqlen, s.seqlen)} and {s.decode_tokens} decode tokens, "
                 f"{s.latency_runs + 1} rounds")
        lat = latency(model, seqlen=min(s.latency_seqlen, s.seqlen), decode_tokens=s.decode_tokens,
                      runs=s.latency_runs, warmup=1)
        say(1.0, "measured")
        mem = model_bytes(model)
        lin_bytes = linear_weight_bytes(model, self.linears)
        params = sum(li.out_features * li.in_features for li in self.linears)
        return dict(ppl=ppl.ppl, nll=ppl.nll, bytes=mem.weight_bytes, bits_per_weight=lin_bytes * 8 / params,
                    prefill_tok_s=lat.prefill_tok_s, decode_ms_per_token=lat.decode_ms_per_token,
                    prefill_tok_s_range=list(lat.prefill_range), decode_ms_range=list(lat.decode_range),
                    peak_allocated=mem.peak_allocated, latency_note=lat.note,
                    protocol=f"{ppl.protocol}; latency: prefill 1 x {lat.seqlen}, decode {lat.decode_tokens} tokens, "
                             f"median of {lat.runs}" + (f" ({lat.note})" if lat.note else ""))

    def run(self, plan: Plan, label: str = "", progress: Progress | None = None) -> RunRecord:
        """Apply ``plan``, measure it, append it to the history (also when it fails or is
        cancelled, with the reason). The loaded dense model stays usable."""
        lm = self.require_dense("compression")
        say = progress or (lambda f, m: None)
        summary = describe_plan(plan, self.linears)
        method = plan.meta.get("method")  # a preset's name; hand-set sliders are named by what they do
        rec = RunRecord(run_id=new_run_id(), time=_dt.datetime.now().isoformat(timespec="seconds"),
                        label=label.strip() or (method if method not in (None, "sliders", "plan") else summary),
                        status="failed", fingerprint=lm.fingerprint, plan=plan.to_dict(), protocol=self.protocol(),
                        summary=summary)
        t0 = time.perf_counter()
        with self.running("the run"):
            try:
                if self.predictor is not None and self.dense_eval is None:
                    # a prediction before the dense model is measured is on the calibration text's scale and
                    # would sit beside a perplexity measured on the evaluation text: measure dense first
                    say(0.0, "measuring the dense model first, so that the prediction is on the evaluation text")
                    self.evaluate_dense(lambda f, m: say(0.05 * f, f"dense model: {m}"))
                pred = self.predict(plan)
                rec.predicted = {k: pred[k] for k in ("ppl", "ppl_corrected", "bytes", "bits_per_weight",
                                                      "ppl_basis") if pred.get(k) is not None}
                if needs_statistics(plan, self.linears) and self.profile is None:
                    say(0.05, "profiling first (statistics feed the methods)")
                    self.run_profile(lambda f, m: say(0.05 + 0.15 * f, m))
                stats = self.profile.all_stats() if self.profile is not None else None
                comp, rep = apply_plan(lm.model, lm.adapter, plan, stats, device=lm.device,
                                       calib_ids=self.split.calib_ids, progress=lambda f, m: say(0.2 + 0.5 * f, m),
                                       should_stop=self.should_stop)
                rec.measured = self._measure(comp, lambda f, m: say(0.7 + 0.3 * f, m))
                if rep.tune is not None:
                    rec.measured["tune"] = rep.tune.summary()
                rec.status = "ok"
                self.compressed, self.compressed_plan, self.compressed_run = comp, plan, rec
            except InterruptedError as e:
                rec.status, rec.error = "cancelled", str(e)
            except torch.cuda.OutOfMemoryError as e:
                torch.cuda.empty_cache()
                rec.error = (f"GPU out of memory ({e}); try fewer calibration windows, a shorter seqlen, or the CPU. "
                             "The loaded model is unchanged.")
            except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
                rec.error = str(e)
            finally:
                rec.seconds = round(time.perf_counter() - t0, 2)
                self.history.append(rec)
        return rec

    # ----------------------------------------------------------------- generation & export
    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 40,
                 progress: Progress | None = None) -> tuple[str, str]:
        """Greedy continuations of ``prompt`` by the dense and the last compressed model, with
        progress per token; Cancel stops it (``InterruptedError``) after the current token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        lm = self.require_model()
        if not prompt.strip():
            raise ValueError("type a prompt first")
        say = progress or (lambda f, m: None)
        tok = lm.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(lm.device)
        models = [("dense", lm.model)] + ([("compressed", self.compressed)] if self.compressed is not None else [])
        lab = self

        class _Watch(StoppingCriteria):  # called once per generated token
            def __init__(self, k: int, which: str):
                self.k, self.which = k, which

            def __call__(self, input_ids, scores, **kwargs) -> bool:
                done = input_ids.shape[1] - ids.shape[1]
                say((self.k + done / max_new_tokens) / len(models),
                    f"{self.which} model: token {done}/{max_new_tokens}")
                return lab.should_stop()

        def gen(k: int, which: str, model: nn.Module) -> str:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([_Watch(k, which)]))
            if self.should_stop():
                raise InterruptedError(f"generation cancelled during the {which} model's continuation")
            return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

        with self.running("the generation"):
            texts = [gen(k, which, model) for k, (which, model) in enumerate(models)]
        if len(texts) > 1:
            return texts[0], texts[1]
        return texts[0], ("(the loaded model is itself compressed: its continuation is in the first box)"
                          if lm.compressed else NO_COMPRESSED)

    def export_model(self, folder: Path) -> Path:
        """The last compressed model as a folder and a zip archive beside it (``folder``.zip),
        whose entries sit under the folder's name: unzipped anywhere, it gives that folder."""
        from compression.saved import save_compressed

        if self.compressed is None:
            raise ValueError(NO_COMPRESSED.strip("()") + "; then export it")
        lm = self.require_model()
        run = self.compressed_run
        meta = {"base_model": lm.spec, "base_fingerprint": lm.fingerprint}
        if run is not None:  # what was measured of it, and how
            meta["run"] = dict(run_id=run.run_id, time=run.time, label=run.label, plan=run.summary,
                               measured={k: run.measured.get(k) for k in ("ppl", "bytes", "bits_per_weight",
                                                                          "prefill_tok_s", "decode_ms_per_token")},
                               predicted=run.predicted, protocol=run.measured.get("protocol", run.protocol))
        save_compressed(self.compressed, folder, plan_json=self.compressed_plan.to_json(), tokenizer=lm.tokenizer,
                        meta=meta)
        return Path(shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name))


def _at(pair, i: int) -> float | None:
    """Element ``i`` of a stored [low, high] pair; None for records made before ranges were kept."""
    return pair[i] if isinstance(pair, (list, tuple)) and len(pair) == 2 else None


def _round8(k: float, li) -> int:
    full = min(li.out_features, li.in_features)
    return int(min(max(8, round(k / 8) * 8), full))


def _cell(v, whole: bool = True) -> int | float | str | None:
    """A table cell: None (blank: the slider's value), ``KEEP`` (uncompressed) or a number
    (a whole one unless ``whole`` is False: bits may be vq's 2.5)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip().lower()
    if s in ("", "nan", "-"):
        return None
    if s in (KEEP, KEEP_RANK, "none", "dense"):
        return KEEP
    try:
        x = float(s)
    except ValueError as e:
        raise ValueError(f"table value {v!r} is not a number; use an integer, 'full' (rank) or 'keep' (bits), "
                         "or leave it blank for the layer's setting") from e
    if not math.isfinite(x) or (whole and x != int(x)):
        raise ValueError(f"table value {v!r} is not a whole number; use an integer, 'full' (rank) or 'keep' "
                         "(bits), or leave it blank for the layer's setting")
    return bit_width(x)
