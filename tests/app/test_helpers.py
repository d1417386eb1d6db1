"""The app's small pure helpers (no server, no browser)."""
import math
from pathlib import Path

import pandas as pd
import pytest

app = pytest.importorskip("app", reason="the app needs gradio")


def test_bits_labels_round_trip_to_widths():
    from compression.lab import BITS_CHOICES

    assert app.BITS_LABELS == ["2", "2.5", "3", "4", "8", "keep"]
    assert [app._bits_value(lb) for lb in app.BITS_LABELS] == BITS_CHOICES
    assert type(app._bits_value("3")) is int and app._bits_value("2.5") == 2.5
    assert [app._bits_label(b) for b in BITS_CHOICES] == app.BITS_LABELS
    assert app._bits_value(None) is None and app._bits_value("") is None


def test_bytes_in_decimal_units_like_the_axes():
    assert app._fmt_bytes(538_060_000) == "538.06 MB"
    assert app._fmt_bytes(999) == "999 B" and app._fmt_bytes(1500) == "1.50 kB"
    assert app._fmt_bytes(2.5e9) == "2.50 GB" and app._fmt_bytes(None) == "–"


def test_run_table_is_rounded_for_display_and_the_original_kept():
    raw = pd.DataFrame([dict(run_id="a", time="t", label="l", status="ok", ppl=87.57683563232422,
                             predicted_ppl=24.016888177408546, corrected_ppl=30.123456,
                             bytes=528807424, bits_per_weight=31.302777777777777,
                             prefill_tok_s=339.1034226, decode_ms_per_token=59.44, decode_ms_min=58.04,
                             decode_ms_max=61.96, seconds=8.4, protocol="p", error=""),
                        dict(run_id="b", time="t", label="failed", status="failed", ppl=None, predicted_ppl=None,
                             corrected_ppl=None,
                             bytes=None, bits_per_weight=None, prefill_tok_s=None, decode_ms_per_token=None,
                             decode_ms_min=None, decode_ms_max=None, seconds=1.0, protocol="p", error="boom")])
    raw.loc[1, "label"] = "svd-llm rank 45% of break-even + rtn 4b g128 x 98 · " * 3
    shown = app._runs_display(raw)
    assert len(shown.label[1]) == app.LABEL_CHARS and shown.label[1].endswith("…") and shown.label[0] == "l"
    assert raw.label[1].startswith(shown.label[1][:-1])  # the table shown is a copy: the export keeps it whole
    row = shown.iloc[0]
    assert (row.ppl, row.predicted_ppl, row.MB, row.bits_per_weight) == (87.58, 24.02, 528.81, 31.303)
    assert (row.prefill_tok_s, row.decode_ms_per_token, row.seconds) == (339, 59.4, 8)
    assert (row.decode_ms_min, row.decode_ms_max) == (58.0, 62.0)
    assert "bytes" not in shown.columns and math.isnan(shown.iloc[1].ppl) and shown.iloc[1].error == "boom"
    assert raw.iloc[0].bytes == 528807424  # the CSV export keeps full precision


def test_latency_text_gives_the_run_range_and_flags_a_busy_machine():
    steady = dict(prefill_tok_s=1234.4, decode_ms_per_token=20.04, decode_ms_range=[19.5, 21.0])
    assert app._latency_text(steady) == "prefill 1234 tok/s, decode 20.0 ms/token (runs 19.5–21.0)"
    busy = dict(steady, decode_ms_range=[12.0, 30.0])
    assert "differed 2.5x: the machine was busy" in app._latency_text(busy)
    # records made before ranges were kept read as before
    old = dict(prefill_tok_s=1234.4, decode_ms_per_token=20.04)
    assert app._latency_text(old) == "prefill 1234 tok/s, decode 20.0 ms/token"


def test_same_specs_compares_what_compresses_each_linear():
    from analysis.adapters import LinearInfo
    from compression.plan import ModuleSpec, Plan

    lins = [LinearInfo(f"l.{i}", i, "q", "attn_in", 64, 64) for i in range(2)]
    a = Plan(modules={"l.0": ModuleSpec(rank=8, lowrank="act-pca")}, meta={"method": "energy 95%"})
    same = Plan(modules={"l.0": ModuleSpec(rank=8, lowrank="act-pca", quant="gptq")}, meta={"method": "sliders"})
    assert app._same_specs(a, same, lins)  # the quantiser of a module with no bits does not matter
    assert not app._same_specs(a, Plan(modules={"l.0": ModuleSpec(rank=8, lowrank="svd-llm")}), lins)
    assert not app._same_specs(a, Plan(modules={"l.0": ModuleSpec(rank=16, lowrank="act-pca")}), lins)
    assert not app._same_specs(a, Plan(modules={**a.modules, "l.1": ModuleSpec(bits=4)}), lins)


def test_readout_gives_the_prediction_corrected_by_measured_runs(tiny_lab, monkeypatch):
    from compression.lab import RunRecord

    monkeypatch.setattr("compression.correction.MIN_PREDICTED", 0.0)  # a random tiny model moves little
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    plan = tiny_lab.plan_from_sliders([25, 25], [2, 2], group_size=32)
    text, *_ = app._readout(tiny_lab, plan)
    assert "corrected" not in text.split("\n")[0] and "After two measured runs" not in text  # dense not measured
    caption = app._readout(tiny_lab, plan)[1].layout.meta["protocol"]
    assert "predicted on the calibration text" in caption  # not the evaluation protocol's scale yet
    dense = tiny_lab.evaluate_dense()
    text, fig, *_ = app._readout(tiny_lab, plan)
    assert "After two measured runs of plans compressed with the methods this prediction assumes" in text
    assert ") (" not in text.split("\n")[0] + text.split("\n")[2]  # one parenthesis at a time
    assert not any("corrected" in (t.name or "") for t in fig.data)
    for label, p in (("heavy", plan), ("medium", tiny_lab.plan_from_sliders([50, 50], [3, 3], group_size=32))):
        nll = dense["nll"] + 2.0 * tiny_lab.predictor.predict(p).dloss  # measured: twice the predicted increase
        tiny_lab.history.append(RunRecord(run_id=label, time="t", label=label, status="ok",
                                          fingerprint=tiny_lab.lm.fingerprint, plan=p.to_dict(),
                                          measured=dict(nll=nll, ppl=math.exp(nll)), protocol=tiny_lab.protocol()))
        if label == "heavy":
            heavy_ppl = math.exp(nll)
            assert "measured run" not in app._readout(tiny_lab, plan)[0].split("\n")[0]  # one run is not enough
    text, fig, *_ = app._readout(tiny_lab, plan)
    head = text.split("\n")[0]
    assert f"(corrected by 2 measured runs: {heavy_ppl:.2f})" in head
    assert "measured increase ≈ 2.00 x the rank part + 2.00 x the bits part of the prediction, fitted on 2 run(s)" \
        in text
    assert "current, corrected by runs (predicted)" in {t.name for t in fig.data}


def test_a_cancelled_job_is_said_once():
    assert app._cancelled(InterruptedError("profiling cancelled")) == "**Profiling cancelled.**"
    assert app._cancelled(InterruptedError("lillama stopped at step 3 of 30"), "Kept.") == \
        "**Lillama stopped at step 3 of 30.** Kept."
    assert app._cancelled(InterruptedError("the page was closed")) == "**Cancelled.** The page was closed."


def test_cancel_with_nothing_running_keeps_the_finished_result(tiny_lab):
    kept = app._cancel_text(tiny_lab)  # nothing runs: the box keeps what it shows (a toast says so)
    assert not isinstance(kept, str) and kept.get("__type__") == "update" and "value" not in kept
    with tiny_lab.running("the run"):
        said = app._cancel_text(tiny_lab)
    assert said.startswith("Cancel requested: the run stops")


def test_two_step_jobs_share_one_progress_bar():
    seen = []
    bar = lambda frac, desc: seen.append((frac, desc))  # noqa: E731 (gr.Progress's call signature)
    app._stage(bar, 0, 2, "profile")(1.0, "spectra 210/210")
    app._stage(bar, 1, 2, "first sensitivity view")(0.0, "gradient pass")
    app._stage(bar, 1, 2, "first sensitivity view")(1.5, "done")
    assert seen == [(0.5, "step 1/2, profile: spectra 210/210"),
                    (0.5, "step 2/2, first sensitivity view: gradient pass"),
                    (1.0, "step 2/2, first sensitivity view: done")]  # never back to 0, never past the end


def test_scratch_folders_are_pruned_after_keep_s_and_removed_on_close():
    import os
    import time

    scratch = app.Scratch(keep_s=60)
    old, new = scratch.folder(), scratch.folder()
    (old / "runs.csv").write_text("x")
    aged = time.time() - 120
    os.utime(old, (aged, aged))  # served two minutes ago: gradio holds its own copy by now
    third = scratch.folder()
    assert not old.exists() and new.exists() and third.exists() and third.parent == scratch.root
    scratch.close()
    assert not scratch.root.exists()
    scratch.close()  # a second close (at exit, after an explicit one) is harmless


def test_summary_of_a_compressed_model_says_what_it_is_for(tiny_lab):
    import dataclasses

    dense = app._summary_md(tiny_lab, tiny_lab.summary())
    assert "M parameters" in dense and "compressed" not in dense
    tiny_lab.lm = dataclasses.replace(tiny_lab.lm, compressed_from="default")
    text = app._summary_md(tiny_lab, tiny_lab.summary())
    assert "compressed by RankLab" in text and "M parameters" not in text  # packed counts would mislead
    assert "load its base model `default` for those" in text


def test_readout_without_sensitivities_says_how_to_get_a_prediction_and_no_caveat(tiny_lab):
    text, *_ = app._readout(tiny_lab, tiny_lab.plan_from_sliders([50, 50], [None, None], group_size=32))
    assert "No sensitivities yet: profile the model" in text and "bits per decoder-linear weight" in text
    assert "runs optimistic" not in text  # a caveat on a prediction that is not there would confuse
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    text, *_ = app._readout(tiny_lab, tiny_lab.plan_from_sliders([50, 50], [None, None], group_size=32))
    assert "runs optimistic" in text and ", from the first view (an estimate)" in text


def test_sessions_close_the_lab_of_a_closed_page_and_only_that_one(tiny_lab, tmp_path):
    from compression.lab import Lab

    lm = tiny_lab.lm
    other = Lab(tmp_path / "ws2")
    other.lm = lm
    sessions = app.Sessions()
    sessions.track("a", tiny_lab)
    sessions.track("b", other)
    sessions.track(None, tiny_lab)  # no session id (a direct API call): not tracked
    assert len(sessions) == 2
    assert sessions.new_model("b", other) and not sessions.new_model("b", other)  # shown once per load
    other.loads += 1
    assert sessions.new_model("b", other)
    sessions.close("a")
    assert tiny_lab.lm is None and other.lm is not None and len(sessions) == 1
    sessions.close("a")  # closing twice, or an unknown session, is harmless
    sessions.close("zzz")
    late = Lab(tmp_path / "late")  # made for a page that has already closed: closed at once, never loads
    sessions.track("a", late)
    assert len(sessions) == 1
    with pytest.raises(InterruptedError):
        late.load("anything")
    with other.running("the run"):  # a page closed mid-run: the run finishes, and a new page is told
        sessions.close("b")
        assert sessions.still_running() == ["the run"] and other.lm is not None
    assert sessions.still_running() == [] and other.lm is None
    replacement, newer = Lab(tmp_path / "ws3"), Lab(tmp_path / "ws4")
    replacement.lm = newer.lm = lm
    sessions.track("c", replacement)
    sessions.track("c", newer)  # the session made a new Lab: the old one is closed
    assert replacement.lm is None and newer.lm is not None and len(sessions) == 1


def _callback(demo, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", None) == name)


def test_export_of_runs_and_figures_writes_csv_pages_and_toolbar_free_images(tiny_lab, tmp_path, monkeypatch):
    import shutil as sh

    demo = app.build_app(app.AppConfig(autoload=False, workspace=tmp_path / "ws"))
    tiny_lab.run_profile()
    rec = tiny_lab.run(tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=32), "four bits")
    assert rec.status == "ok", rec.error
    files, note = _callback(demo, "on_runs")(tiny_lab)
    names = sorted(Path(f).name for f in files)
    runs = pd.read_csv([f for f in files if f.endswith("runs.csv")][0])
    assert list(runs.run_id) == [rec.run_id] and runs.plan[0] == "rtn 4b g32 x 14"
    assert runs.fingerprint[0] == tiny_lab.lm.fingerprint and runs.model[0] == tiny_lab.lm.source  # which model
    pages = {"rank_heatmap.html", "tradeoff_bytes.html", "tradeoff_latency_ms.html"}
    assert pages <= set(names) and not any(n.endswith("_png.html") for n in names)  # the image pages are removed
    if sh.which("chromium"):
        assert {p.replace(".html", ".png") for p in pages} <= set(names), note
        assert not list(Path(files[0]).parent.glob("*_png.html"))
    # no chromium, or chromium failing: the pages still come, and the note says which
    monkeypatch.setattr(app, "html_to_png", lambda html, png: None)
    said = []
    files, note = _callback(demo, "on_runs")(tiny_lab, lambda f, desc: said.append((f, desc)))
    assert not any(f.endswith(".png") for f in files) and note.endswith("which is not installed here.")
    # the slow part (a chromium start per figure) says what it is doing
    assert said[0] == (0.0, "writing runs.csv") and len(said) == 4
    assert [f for f, _ in said] == sorted(f for f, _ in said)
    assert all(d.startswith("rendering ") and f"({k}/3; the HTML pages are written)" in d
               for k, (_, d) in enumerate(said[1:], 1))

    def broken(html, png):
        raise RuntimeError("chromium ran but wrote no image")

    monkeypatch.setattr(app, "html_to_png", broken)
    files, note = _callback(demo, "on_runs")(tiny_lab)
    assert pages <= {Path(f).name for f in files} and "could not be rendered (chromium ran but wrote no image)" in note
    tried = []

    def sandboxed(html, png):  # chromium's own last line and status, not its command line; tried once
        import subprocess

        tried.append(html)
        raise subprocess.CalledProcessError(1, ["chromium", "--headless"], stderr=b"[0101]\nNo usable sandbox!\n")

    monkeypatch.setattr(app, "html_to_png", sandboxed)
    files, note = _callback(demo, "on_runs")(tiny_lab)
    assert "(chromium exited with status 1: No usable sandbox!)" in note and "--headless" not in note
    assert len(tried) == 1 and pages <= {Path(f).name for f in files}


def test_page_state_round_trips_through_json_and_only_this_app_restores_it(tiny_lab):
    import json

    plan = tiny_lab.plan_from_sliders([50, 100], [4, None], group_size=32)
    saved = json.loads(json.dumps(app.page_state(tiny_lab, "tok", plan.to_json())))  # the browser keeps JSON
    assert saved["model"] == "tiny" and saved["device"] == "cpu" and saved["dtype"] == "float32"
    assert saved["texts"] == dict(calib_text="default", eval_text="default", seqlen=32, calib_windows=8,
                                  eval_windows=2)
    assert saved["fingerprint"] == tiny_lab.lm.fingerprint and app.Plan.from_json(saved["plan"]) == plan
    assert app.restorable(saved, "tok") == saved
    assert app.restorable(saved, "an earlier run of the app") is None
    for broken in ({**saved, "version": 99}, {**saved, "texts": {**saved["texts"], "seqlen": "32"}},
                   {**saved, "texts": {**saved["texts"], "seqlen": True}}, {**saved, "model": " "},
                   {**saved, "device": "tpu"}, {**saved, "plan": 3}, "junk", None):
        assert app.restorable(broken, "tok") is None, broken
    assert app.page_state(None, "tok", "{}") is None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.conftest import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("tiny"))


class _Request:
    def __init__(self, session: str):
        self.session_hash = session


@pytest.mark.filterwarnings("ignore::analysis.profile.TooFewTokens")
def test_a_reloaded_page_gets_its_model_texts_and_plan_back(tiny_dir, tmp_path, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = tiny_dir
    monkeypatch.setattr(app.secrets, "token_hex", lambda n: "tok")
    demo = app.build_app(app.AppConfig(model=str(folder), workspace=tmp_path / "ws",
                                       settings=app.LabSettings(seqlen=32, calib_windows=4, eval_windows=2)))
    initial, restore = _callback(demo, "initial"), _callback(demo, "restore")
    # a first visit: the app's model, the boxes as built, nothing to restore
    lab, status, _, *boxes, plan_text = initial(None, _Request("a"))
    assert lab.lm.spec == str(folder) and all(isinstance(b, dict) for b in boxes) and plan_text is None
    lab.set_texts(str(text), "default", 16, 3, 1)
    plan = lab.plan_uniform(50, 4, group_size=32)
    saved = app.page_state(lab, "tok", plan.to_json())
    assert saved["had"] == dict(profile=False, proxy=False, dense=False, grid=None)
    # the same page reloaded: its texts and windowing, and the plan for the sliders
    lab2, status, _, *boxes, plan_text = initial(saved, _Request("b"))
    assert boxes == [str(folder), "cpu", "float32", str(text), "default", 16, 3, 1]
    assert lab2.split.calib_ids.shape == (3, 16) and lab2.split.eval_ids.shape == (1, 16)
    assert plan_text == plan.to_json()
    out = restore(lab2, plan_text)
    ranks, bits = out[:app.MAX_LAYERS], out[app.MAX_LAYERS:2 * app.MAX_LAYERS]
    assert [u["value"] for u in ranks[:2]] == [50, 50] and [u["value"] for u in bits[:2]] == ["4", "4"]
    assert "Restored the plan this page had" in out[-4] and lab2.plan == plan  # runs keep the preset's name
    assert "Predicted" in out[-4]
    # meanwhile (the model just loaded, the plan not yet back) the readout does not predict the dense plan
    after_load = _callback(demo, "after_load")
    texts = [o for o in after_load(lab2, plan_text, _Request("b")) if isinstance(o, str)]
    assert any("Restoring the plan this page had" in t for t in texts) and not any("Predicted" in t for t in texts)
    texts = [o for o in after_load(lab2, app.Plan().to_json(), _Request("b2")) if isinstance(o, str)]
    assert any("Predicted" in t for t in texts)  # a dense plan to restore: nothing to wait for
    # a plan that no longer fits is said, the sliders stay dense; nothing to restore changes nothing
    wrong = app.Plan.from_json(plan.to_json())
    wrong.modules["model.layers.9.mlp.up_proj"] = wrong.default
    out = restore(lab2, wrong.to_json())
    assert "was not restored" in out[-4] and all(u == gr.update() for u in out[:2 * app.MAX_LAYERS])
    assert all(u == gr.update() for u in restore(lab2, None))
    # plans the sliders cannot hold are refused as a plan file would be (Run would use another plan)
    from compression.plan import ModuleSpec, SliceGPTOptions

    sliced = app.Plan.from_json(plan.to_json())
    sliced.slicegpt = SliceGPTOptions(0.25)
    mixed = app.Plan.from_json(plan.to_json())
    first = lab2.linears[0].name
    mixed.modules[first] = ModuleSpec(bits=4, group_size=32, quant="gptq")
    for bad, why in ((sliced, "Lillama or SliceGPT options"), (mixed, "mixes low-rank methods, quantisers")):
        out = restore(lab2, bad.to_json())
        assert why in out[-4] and all(u == gr.update() for u in out[:2 * app.MAX_LAYERS])
    own = lab2.plan_uniform(50, None, lowrank="lillama")  # the sliders' own Lillama plans come back
    own.lillama = app.APP_LILLAMA
    out = restore(lab2, own.to_json())
    assert "Restored the plan" in out[-4] and out[2 * app.MAX_LAYERS + 1]["value"] == "lillama"
    # the browser keeps the saved plan until it is back on the sliders
    remember = _callback(demo, "remember")
    assert remember(lab2, app.Plan().to_json(), plan.to_json()) == gr.skip()
    assert remember(lab2, plan.to_json(), None)["plan"] == plan.to_json()
    # what the page had computed comes back from the cache (never computed anew), the dense model measured again
    lab2.run_profile()
    lab2.run_proxy()
    lab2.run_sensitivity(group_size=32)
    lab2.evaluate_dense()
    had = app.page_state(lab2, "tok", plan.to_json())
    assert had["had"] == dict(profile=True, proxy=True, dense=True,
                              grid=dict(method="svd-llm", quant="rtn", group_size=32))
    lab6, status, *_ = initial(had, _Request("f"))
    assert lab6.profile is not None and lab6.sensitivity is not None and lab6.sensitivity_reused
    assert lab6.proxy is not None and lab6.proxy_reused and lab6.proxy.table.equals(lab2.proxy.table)
    assert lab6.dense_eval is not None and lab6.predictor is not None
    assert ("Taken back from before the reload: the profile, the first sensitivity view, the measured sensitivity "
            "grid, the dense") in status
    import shutil

    shutil.rmtree(tmp_path / "cache" / "sensitivity")  # a cache emptied since: nothing is measured at load
    lab7, status, *_ = initial(had, _Request("g"))
    assert lab7.profile is not None and lab7.sensitivity is None and lab7.proxy is None
    assert "sensitivity grid" not in status and "first sensitivity view" not in status
    # another process's state restores nothing; a page whose model is gone gets the app's with a note
    lab3, *_, plan_text = initial({**saved, "app": "old"}, _Request("c"))
    assert lab3.settings.seqlen == 32 and plan_text is None
    gone = {**saved, "model": str(tmp_path / "moved-away")}
    lab4, status, _, *boxes, plan_text = initial(gone, _Request("d"))
    assert lab4.lm.spec == str(folder) and "moved-away` could not be loaded again" in status
    assert plan_text is None and all(isinstance(b, dict) for b in boxes)
    # a page closed while its model loads: that load stops, and no other model is loaded in its place
    loads = []
    real_load = app.Lab.load

    def closing_load(self, spec, *a, **k):
        loads.append(spec)
        _callback(demo, "on_unload")(_Request("e"))  # the page goes away mid-load
        return real_load(self, spec, *a, **k)

    monkeypatch.setattr(app.Lab, "load", closing_load)
    lab5, status, *_ = initial(saved, _Request("e"))
    assert lab5 is None and loads == [str(folder)] and "page was closed" in status


def test_the_readout_says_when_the_table_overrides_the_sliders():
    assert app._overrides_note(None) == "" and app._overrides_note(pd.DataFrame({"name": [], "rank": []})) == ""
    note = app._overrides_note(pd.DataFrame({"name": ["model.layers.0.mlp.up_proj", " "], "rank": [8, None]}))
    assert "sets 1 module(s) (e.g. `model.layers.0.mlp.up_proj`)" in note and "sliders change nothing" in note


def test_the_run_tab_runs_the_plan_tuned_when_asked(tiny_lab, tmp_path):
    demo = app.build_app(app.AppConfig(autoload=False, workspace=tmp_path / "ws"))
    on_run = _callback(demo, "on_run")
    said = []
    sliders = [app.DENSE_PCT] * app.MAX_LAYERS + ["2"] * app.MAX_LAYERS
    table = pd.DataFrame({"name": [], "rank": [], "bits": []})
    lab, msg, *_ = on_run(lambda f, desc="": said.append(desc), tiny_lab, "", 3, "svd-llm", "rtn", 32, table,
                          *sliders)
    rec = lab.history.records()[-1]
    assert rec.status == "ok" and rec.plan["tune"]["steps"] == 3
    assert "; tuned 2 layer(s) on 256 tokens" in msg and "(the prediction is for the plan untuned)" in msg
    assert any(d.startswith("tune model.layers.1") for d in said)
    lab, msg, *_ = on_run(lambda f, desc="": None, tiny_lab, "", 0, "svd-llm", "rtn", 32, table, *sliders)
    assert "tune" not in lab.history.records()[-1].plan and "tuned" not in msg  # 0 = off


def test_the_allocate_preset_measures_its_rank_and_bits_picks_when_asked(tiny_lab, tmp_path):
    demo = app.build_app(app.AppConfig(autoload=False, workspace=tmp_path / "ws"))
    btn = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "alloc-btn")
    alloc = next(f.fn for f in demo.fns.values() if any(t[0] == btn._id for t in f.targets))
    said = []

    def progress(frac, desc=""):
        said.append(desc)

    args = (tiny_lab, "svd-llm", "rtn", 32, 100, "keep", 0.95, 0.3, "ranks and bits")
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    readout = alloc(*args, True, p=progress)[-4]  # the first view only: allocated, not measured, and said so
    assert "picks were not measured: that needs the measured grid" in readout
    assert "rank and bits together" in readout and tiny_lab.plan.meta.get("measured_picks") is None
    tiny_lab.run_sensitivity(group_size=32)
    said.clear()
    readout = alloc(*args, True, p=progress)[-4]
    mp = tiny_lab.plan.meta["measured_picks"]
    assert f"Measured {mp['measured']} rank(s) with quantised factors in {mp['rounds']} round(s)" in readout
    assert mp["measured"] > 0 and "rank and bits together" not in readout
    assert sum("-bit factors" in d for d in said) == mp["measured"]
    readout = alloc(*args[:-1], "bits", True, p=progress)[-4]  # bits only: nothing to measure, nothing said
    assert "with quantised factors in" not in readout and "not measured" not in readout
    assert "Allocated bits only" in readout
    radio = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Allocate")
    grey = next(f.fn for f in demo.fns.values() if (radio._id, "change") in f.targets)
    assert grey("bits")["interactive"] is False and grey("ranks and bits")["interactive"] is True
    assert "Allocated ranks only" in alloc(*args[:-2], 0.6, "rank", True, p=progress)[-4]


def test_profile_says_whether_the_first_view_was_computed_and_how_long_it_took(tiny_lab, tmp_path):
    demo = app.build_app(app.AppConfig(autoload=False, workspace=tmp_path / "ws"))
    on_profile = _callback(demo, "on_profile")
    _, first, *_ = on_profile(tiny_lab, lambda f, desc="": None)
    took = tiny_lab.proxy.meta["seconds"]
    assert f"A first sensitivity view is ready (computed now; it took {took:.1f} s): the Budget tab" in first
    _, again, *_ = on_profile(tiny_lab, lambda f, desc="": None)
    assert again.startswith("Reused the cached profile") and tiny_lab.proxy_reused
    assert f"(from the cache; it took {took:.1f} s when it was made)" in again


def test_an_uploaded_text_is_kept_so_a_reloaded_page_still_finds_it(tiny_lab, tmp_path):
    from pydoc_data.topics import topics

    demo = app.build_app(app.AppConfig(autoload=False, workspace=tmp_path / "ws"))
    on_data = _callback(demo, "on_data")
    up = tmp_path / "gradio-tmp" / "my notes.txt"  # gradio's temporary copy of the user's file
    up.parent.mkdir()
    up.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]), encoding="utf-8")
    lab, msg = on_data(tiny_lab, "default", "default", str(up), 32, 8, 2)
    kept = Path(lab.settings.calib_text)
    assert lab.settings.eval_text == str(kept) and kept.name == "my notes.txt"
    assert kept.is_relative_to(tmp_path / "cache" / "uploads")  # RANKLAB_CACHE of the fixture
    assert "`my notes.txt` is used for both texts" in msg
    up.unlink()  # the server deletes its copy; the restored page's texts still load
    lab, msg = on_data(lab, str(kept), str(kept), None, 32, 8, 2)
    assert "The texts were not changed" not in msg and lab.settings.calib_text == str(kept)
