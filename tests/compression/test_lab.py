"""The app's session object, without the UI: plans from sliders, runs, persistent history."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from compression.lab import BITS_CHOICES, Lab, RunHistory, RunRecord, new_run_id
from compression.plan import ModuleSpec, Plan


def test_slider_plan_and_exact_bytes(tiny_lab):
    n = 2
    plan = tiny_lab.plan_from_sliders([50, 100], [None, 4], lowrank="svd-llm", quant="rtn", group_size=32)
    l0 = [li for li in tiny_lab.linears if li.layer == 0]
    for li in l0:
        s = plan.spec_for(li.name)
        assert s.rank % 8 == 0 and s.rank <= li.break_even and s.bits is None
    for li in (li for li in tiny_lab.linears if li.layer == 1):
        assert plan.spec_for(li.name) == ModuleSpec(rank=None, bits=4, group_size=32)
    pred = tiny_lab.predict(plan)
    assert pred["bytes"] < pred["dense_bytes"] and pred["ppl"] is None  # no sensitivities yet
    with pytest.raises(ValueError, match="expected 2 rank"):
        tiny_lab.plan_from_sliders([50] * (n + 1), [None] * n)
    with pytest.raises(ValueError, match="bits 5 not offered: pick one of 2, 2.5, 3, 4, 8 or keep"):
        tiny_lab.plan_from_sliders([50] * n, [5, None])
    assert BITS_CHOICES == [2, 2.5, 3, 4, 8, None]


def test_overrides_table(tiny_lab):
    import pandas as pd

    name = tiny_lab.linears[0].name
    plan = tiny_lab.plan_from_sliders([100, 100], [None, None], overrides=pd.DataFrame({"name": [name], "rank": [16],
                                                                                     "bits": [""]}))
    assert plan.spec_for(name).rank == 16 and plan.spec_for(name).bits is None
    with pytest.raises(ValueError, match="not a number"):
        tiny_lab.plan_from_sliders([100, 100], [None, None], overrides=pd.DataFrame({"name": [name], "rank": ["x"],
                                                                                 "bits": [""]}))
    for bad in ("inf", "1e400", "-inf", "3.7", 2.5):  # infinite or fractional: refused, never truncated
        with pytest.raises(ValueError, match="not a whole number"):
            tiny_lab.plan_from_sliders([100, 100], [None, None],
                                       overrides=pd.DataFrame({"name": [name], "rank": [bad], "bits": [""]}))
    assert tiny_lab.plan_from_sliders([100, 100], [None, None], overrides=pd.DataFrame(
        {"name": [name], "rank": ["16.0"], "bits": [""]})).spec_for(name).rank == 16
    blank = pd.DataFrame({"name": ["", None], "rank": ["", None], "bits": [None, ""]})  # empty rows: ignored
    assert tiny_lab.plan_from_sliders([100, 100], [None, None], overrides=blank).modules == {}
    with pytest.raises(ValueError, match="names no module"):
        tiny_lab.plan_from_sliders([100, 100], [None, None],
                                   overrides=pd.DataFrame({"name": [""], "rank": [16], "bits": [""]}))
    with pytest.raises(ValueError, match="appears in two table rows"):
        tiny_lab.plan_from_sliders([100, 100], [None, None],
                                   overrides=pd.DataFrame({"name": [name, name], "rank": [16, 8], "bits": ["", ""]}))


def test_override_table_keeps_full_rank_and_dtype_and_refuses_unknown_names(tiny_lab):
    name = tiny_lab.linears[0].name
    table = pd.DataFrame({"name": [name], "rank": ["full"], "bits": ["keep"]})
    plan = tiny_lab.plan_from_sliders([50, 50], [4, 4], group_size=32, overrides=table)
    assert plan.spec_for(name).is_dense and name not in plan.modules
    other = tiny_lab.linears[1].name
    plan = tiny_lab.plan_from_sliders([50, 50], [4, 4], overrides=pd.DataFrame({"name": [other], "rank": [""],
                                                                                 "bits": ["keep"]}))
    assert plan.spec_for(other).bits is None and plan.spec_for(other).rank is not None  # blank = the slider
    with pytest.raises(ValueError, match="not a decoder linear of this model"):
        tiny_lab.plan_from_sliders([50, 50], [4, 4], overrides=pd.DataFrame({"name": ["model.nope"], "rank": [8],
                                                                              "bits": [""]}))


def test_sliders_for_gives_back_any_plan(tiny_lab):
    """Presets fill the sliders and the table; together they must rebuild the plan exactly,
    including modules left dense inside compressed layers and ranks between slider steps."""
    lins = tiny_lab.linears
    kw = dict(group_size=32, lowrank="act-pca", quant="gptq")  # not the defaults: they must survive too
    mods = {lins[0].name: ModuleSpec(rank=8, bits=3, **kw),
            lins[1].name: ModuleSpec(bits=4, **kw),
            lins[2].name: ModuleSpec(bits=4, **kw),
            lins[3].name: ModuleSpec(bits=6, **kw)}  # a width the pickers do not offer
    mods.update({li.name: ModuleSpec(rank=16, bits=8, **kw) for li in lins if li.layer == 1})
    mods[[li.name for li in lins if li.layer == 1][-1]] = ModuleSpec(**kw)  # a dense one among them
    mods = {k: v for k, v in mods.items() if not v.is_dense}
    plan = Plan(modules=mods)
    ranks, bits, table = tiny_lab.sliders_for(plan)
    assert all(10 <= r <= 100 and r % 5 == 0 for r in ranks) and all(b in BITS_CHOICES for b in bits)
    back = tiny_lab.plan_from_sliders(ranks, bits, overrides=table, **kw)
    for li in lins:
        assert back.spec_for(li.name) == plan.spec_for(li.name), li.name
    assert len(table) < len(lins)  # the sliders carry the common settings
    assert tiny_lab.sliders_for(Plan())[2].empty


def test_run_measures_and_history_survives_restart(tiny_lab):
    plan = tiny_lab.plan_from_sliders([50, 50], [None, 4], group_size=32)
    said = []
    rec = tiny_lab.run(plan, "half rank", progress=lambda f, m: said.append((round(f, 6), m)))
    assert rec.status == "ok", rec.error
    assert any(m.startswith("latency: prefill 1 x 16") for _, m in said) and said[-1] == (1.0, "measured")
    assert [f for f, _ in said] == sorted(f for f, _ in said)  # the bar never goes back
    pred = tiny_lab.predict(plan)
    assert rec.measured["bytes"] == pred["bytes"]  # measured bytes == predicted bytes
    assert rec.measured["ppl"] > 1 and "seqlen 32" in rec.measured["protocol"]
    # the quantised linears are dequantised per call: the timings say so, the dense one does not
    assert "unpacked and dequantised on every call" in rec.measured["protocol"]
    assert "dequantised" not in tiny_lab.evaluate_dense()["protocol"]
    assert rec.measured["latency_note"] and tiny_lab.history.dequantizing_runs(rec.fingerprint, rec.protocol) == 1
    low_rank_only = tiny_lab.run(tiny_lab.plan_from_sliders([50, 50], [None, None], group_size=32))
    assert low_rank_only.status == "ok" and low_rank_only.measured["latency_note"] == ""
    assert tiny_lab.history.dequantizing_runs(rec.fingerprint, rec.protocol) == 1
    old = RunRecord(**{**rec.__dict__, "run_id": "old", "measured": {k: v for k, v in rec.measured.items()
                                                                    if k != "latency_note"}})
    tiny_lab.history.append(old)  # recorded before latency_note existed: its protocol says it
    assert tiny_lab.history.dequantizing_runs(rec.fingerprint, rec.protocol) == 2
    again = Lab(tiny_lab.workspace)  # a restarted app reads the same folder
    rows = again.history.table(tiny_lab.lm.fingerprint)
    assert list(rows.run_id) == [rec.run_id, low_rank_only.run_id, "old"] and rows.iloc[0].label == "half rank"
    assert "latency: prefill 1 x 16" in rows.iloc[0].protocol  # the table's timings carry their protocol
    first = rows.iloc[0]  # and the range of the decode runs around their median
    assert 0 < first.decode_ms_min <= first.decode_ms_per_token <= first.decode_ms_max
    # an unlabelled run of hand-set sliders is named by what its plan does; every row says it
    fracs = [plan.spec_for(li.name).rank / li.break_even for li in tiny_lab.linears]  # the sliders' 50 %, in 8s
    mean = f"{sum(fracs[:7]) / 7:.0%}"
    assert first.plan == (f"svd-llm rank {mean} of break-even x 7 · svd-llm rank {mean} of break-even + rtn 4b g32 "
                          "x 7")
    assert rows.iloc[1].label == rows.iloc[1].plan == low_rank_only.summary
    assert low_rank_only.summary == f"svd-llm rank {mean} of break-even x 14"
    exported = tiny_lab.runs_table()  # the dense baseline measured this session comes first
    dense = tiny_lab.evaluate_dense()
    assert list(exported.run_id) == ["dense", rec.run_id, low_rank_only.run_id, "old"]
    assert exported.iloc[0].ppl == dense["ppl"] and "latency" in exported.iloc[0].protocol
    tiny_lab.dense_eval = None  # not measured (yet): the history alone
    assert tiny_lab.runs_table().equals(tiny_lab.history.table(tiny_lab.lm.fingerprint))


def test_tradeoff_draws_only_runs_measured_with_the_current_protocol(tiny_lab):
    fp = tiny_lab.lm.fingerprint
    first = tiny_lab.run(tiny_lab.plan_from_sliders([50, 50], [None, None], group_size=32), "seqlen 32")
    old = tiny_lab.protocol()
    assert "the profile" in tiny_lab.set_texts("default", "default", seqlen=16).split("Cleared")[1]  # run profiled
    assert tiny_lab.protocol() != old and tiny_lab.profile is None
    assert "Cleared" not in tiny_lab.set_texts("default", "default", seqlen=16)  # nothing left to clear
    second = tiny_lab.run(tiny_lab.plan_from_sliders([50, 50], [None, None], group_size=32), "seqlen 16")
    assert set(tiny_lab.history.tradeoff_frame(fp, protocol=tiny_lab.protocol()).run_id) == {second.run_id}
    assert set(tiny_lab.history.tradeoff_frame(fp, protocol=old).run_id) == {first.run_id}
    assert set(tiny_lab.history.tradeoff_frame(fp).run_id) == {first.run_id, second.run_id}
    assert tiny_lab.history.other_protocol_runs(fp, tiny_lab.protocol()) == 1


def test_failed_and_cancelled_runs_are_recorded(tiny_lab):
    bad = Plan(modules={tiny_lab.linears[0].name: ModuleSpec(rank=10_000)})
    rec = tiny_lab.run(bad)
    assert rec.status == "failed" and "outside" in rec.error
    tiny_lab.should_stop = lambda: True
    rec2 = tiny_lab.run(Plan(default=ModuleSpec(bits=4, group_size=32)))
    assert rec2.status == "cancelled"
    statuses = [r.status for r in tiny_lab.history.records()]
    assert statuses == ["failed", "cancelled"]
    # the loaded model still works
    assert tiny_lab.lm.model(input_ids=tiny_lab.split.eval_ids[:1]).logits.isfinite().all()


def test_cancel_stops_the_running_job_only(tiny_lab):
    assert tiny_lab.request_stop() is None  # nothing runs: nothing to stop, and nothing left armed
    said = []
    rec = tiny_lab.run(Plan(default=ModuleSpec(bits=4, group_size=32)),
                       progress=lambda f, m: said.append(tiny_lab.request_stop()))
    assert rec.status == "cancelled" and said[0] == "the run" and tiny_lab.job is None
    assert tiny_lab.run(Plan(default=ModuleSpec(bits=4, group_size=32))).status == "ok"  # the stop did not linger
    with pytest.raises(InterruptedError, match="profiling cancelled"):
        tiny_lab.run_profile(progress=lambda f, m: said.append(tiny_lab.request_stop()))
    assert "profiling" in said and tiny_lab.profile is None and tiny_lab.job is None


def test_run_ids_read_back_from_a_csv_as_the_same_strings(tmp_path):
    # bare 8-hex ids were all digits one time in 43 and came back from runs.csv as ints
    ids = [new_run_id() for _ in range(500)]
    pd.DataFrame(dict(run_id=ids)).to_csv(tmp_path / "runs.csv", index=False)
    assert len(set(ids)) == 500 and list(pd.read_csv(tmp_path / "runs.csv").run_id) == ids


def test_a_reloaded_page_takes_back_profile_first_view_and_grid_from_the_cache(tiny_lab, monkeypatch):
    import analysis.sensitivity as S

    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    assert not tiny_lab.proxy_reused
    had = tiny_lab.had()
    assert had["proxy"] and had["profile"] and had["grid"] is None
    page = Lab(tiny_lab.workspace, tiny_lab.settings)  # the same model on a reloaded page
    page.lm = tiny_lab.lm
    page.set_texts("default", "default")

    def never(*a, **k):
        raise AssertionError("resume computed what the cache holds")

    monkeypatch.setattr(S, "proxy_sensitivity", never)
    back = page.resume({**had, "dense": False})
    assert back == ["the profile", "the first sensitivity view"] and page.proxy_reused
    assert page.proxy.table.equals(tiny_lab.proxy.table) and page.predictor is not None
    assert page.predict(page.plan_from_sliders([50, 50], [4, 4], group_size=32)) is not None
    fresh = Lab(tiny_lab.workspace, tiny_lab.settings)  # a page that had profiled only: no first view
    fresh.lm = tiny_lab.lm
    fresh.set_texts("default", "default")
    assert fresh.resume({"profile": True}) == ["the profile"] and fresh.proxy is None


def test_torn_history_line_is_skipped(tmp_path):
    h = RunHistory(tmp_path)
    row = {"run_id": "a", "time": "t", "label": "l", "status": "ok", "fingerprint": "f", "plan": {}}
    h.path.write_text(json.dumps(row) + "\n{\"run_id\": \"b\", \"ti")
    assert [r.run_id for r in h.records()] == ["a"] and h.unreadable_note() is None  # a crash mid-write: expected
    newer = {**row, "run_id": "c", "field_of_a_newer_ranklab": 1}  # kept, without the unknown field
    h.path.write_text("\n".join([json.dumps(row), "not json", json.dumps(newer), json.dumps({"run_id": "d"})]) + "\n")
    assert [r.run_id for r in h.records()] == ["a", "c"]
    assert h.unreadable == [2, 4]
    note = h.unreadable_note()
    assert "2 line(s)" in note and "line 2, 4" in note
    h.records()
    assert h.unreadable_note() is None  # the same lines: said once


def test_energy_preset_needs_profile_then_works(tiny_lab):
    with pytest.raises(ValueError, match="profile the model first"):
        tiny_lab.plan_energy(0.9)
    tiny_lab.run_profile()
    plan = tiny_lab.plan_energy(0.9)
    assert all(plan.spec_for(n).rank < li.break_even for li in tiny_lab.linears
               for n in [li.name] if plan.spec_for(n).rank)


def test_first_view_makes_predictions_and_allocation_meets_target(tiny_lab):
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    table, kind = tiny_lab.sensitivity_table()
    assert "first view" in kind and len(table) > 0
    dense = tiny_lab.predict(Plan())
    assert dense["ppl"] is not None and dense["ratio"] == 1.0
    heavy = tiny_lab.predict(tiny_lab.plan_from_sliders([25, 25], [2, 2], group_size=32))
    assert heavy["ppl"] >= dense["ppl"] and heavy["bytes"] < dense["bytes"]
    plan = tiny_lab.plan_allocate(0.6)
    assert tiny_lab.predict(plan)["ratio"] <= 0.6
    assert not any("extrapolated" in n for n in tiny_lab.predict(plan)["notes"])  # grid ranks only
    name = tiny_lab.linears[0].name  # rank 1: far below the grid's smallest rank
    notes = tiny_lab.predict(Plan(modules={name: ModuleSpec(rank=1)}))["notes"]
    assert "1 linear(s) have ranks below those the sensitivities measured" in notes[0] and name in notes[0]
    assert not any("rank and bits together" in n for n in notes)
    notes = tiny_lab.predict(Plan(modules={name: ModuleSpec(rank=8, bits=4, group_size=32)}))["notes"]
    assert any(f"1 linear(s) have a rank and bits together (e.g. {name})" in n and "optimistic" in n for n in notes)
    assert dense["ppl_basis"] == "calibration" and dense["ppl"] == pytest.approx(math.exp(dense["loss"]))
    # once the dense model is measured, predictions are on the evaluation text's scale
    first = tiny_lab.evaluate_dense()
    measured = first["ppl"]
    assert tiny_lab.evaluate_dense() is first  # kept until the texts change ...
    again = tiny_lab.evaluate_dense(again=True)  # ... or asked again (the app's button)
    assert again is not first and again["ppl"] == pytest.approx(measured, rel=1e-6)
    on_eval, heavy_eval = tiny_lab.predict(Plan()), tiny_lab.predict(tiny_lab.plan_from_sliders([25, 25], [2, 2],
                                                                                                 group_size=32))
    assert on_eval["ppl_basis"] == "evaluation" and on_eval["ppl"] == pytest.approx(measured)
    assert heavy_eval["ppl"] == pytest.approx(measured * math.exp(heavy["dloss"]))


def test_a_run_before_the_dense_measurement_measures_dense_first_so_its_prediction_compares(tiny_lab):
    # the review's case: profile + first view, no "Measure dense", then Run. The prediction was on the
    # calibration text's scale and sat beside a perplexity measured on the evaluation text.
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    plan = tiny_lab.plan_from_sliders([50, 50], [None, 4], group_size=32)
    assert tiny_lab.dense_eval is None and tiny_lab.predict(plan)["ppl_basis"] == "calibration"
    said = []
    rec = tiny_lab.run(plan, progress=lambda f, m: said.append((f, m)))
    assert rec.status == "ok", rec.error
    assert said[0][1].startswith("measuring the dense model first") and tiny_lab.dense_eval is not None
    assert [f for f, _ in said] == sorted(f for f, _ in said)
    dloss = tiny_lab.predictor.predict(plan).dloss
    assert rec.predicted["ppl_basis"] == "evaluation"
    assert rec.predicted["ppl"] == pytest.approx(tiny_lab.dense_eval["ppl"] * math.exp(dloss))
    fp = tiny_lab.lm.fingerprint
    assert tiny_lab.history.table(fp).iloc[0].predicted_ppl == pytest.approx(rec.predicted["ppl"])
    # a record predicted on the calibration scale (an older app) is not shown beside its measurement
    old = RunRecord(**{**rec.__dict__, "run_id": "old-cal",
                       "predicted": {**rec.predicted, "ppl_basis": "calibration", "ppl_corrected": 3.0}})
    tiny_lab.history.append(old)
    row = tiny_lab.history.table(fp).set_index("run_id").loc["old-cal"]
    assert pd.isna(row.predicted_ppl) and pd.isna(row.corrected_ppl) and row.bytes == rec.measured["bytes"]
    frame = tiny_lab.history.tradeoff_frame(fp)
    assert set(frame[frame.run_id == "old-cal"].kind) == {"measured"}
    assert set(frame[frame.run_id == rec.run_id].kind) == {"measured", "predicted"}


def test_measured_grid_probes_the_first_calibration_windows(tiny_lab):
    tiny_lab.settings.sensitivity_tokens = 70  # 3 windows of 32 (rounded up), of the 8 calibration windows
    ids, label = tiny_lab.sensitivity_ids()
    assert torch.equal(ids, tiny_lab.split.calib_ids[:3]) and "first 3 x 32" in label
    tiny_lab.settings.sensitivity_tokens = 20  # fewer than one window: the start of the first
    short, label20 = tiny_lab.sensitivity_ids()
    assert torch.equal(short, tiny_lab.split.calib_ids[:1, :20]) and "first 1 x 20" in label20
    tiny_lab.settings.sensitivity_tokens = 70
    tiny_lab.run_profile()
    grid = tiny_lab.run_sensitivity(group_size=32)
    assert grid.meta["windows"] == 3 and grid.meta["n_tokens"] == 96 and grid.meta["data"] == label
    table, kind = tiny_lab.sensitivity_table()
    assert kind.startswith("measured: KL") and len(table) == len(grid.table) > 0
    pd.testing.assert_frame_equal(table, grid.kl_table())
    assert tiny_lab.predictor.estimator == "kl"
    assert tiny_lab.profile.meta["n_tokens"] == tiny_lab.split.calib_ids.numel()  # the profile uses all 8


def test_allocation_measures_its_rank_and_bits_picks_keeps_them_and_cancels(tiny_lab, monkeypatch):
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    with pytest.raises(ValueError, match="needs the measured sensitivity grid"):
        tiny_lab.plan_allocate(0.3, measure_picks=True)  # the first view's units are not a probe's
    tiny_lab.run_sensitivity(group_size=32)
    pred = tiny_lab.predictor
    assert pred.rank_and_bits(tiny_lab.plan_allocate(0.3))  # additive costs: ranks with quantised factors picked
    with pytest.raises(ValueError, match="allocate ranks and bits together"):
        tiny_lab.plan_allocate(0.3, "bits", measure_picks=True)
    said = []
    plan = tiny_lab.plan_allocate(0.3, measure_picks=True, progress=lambda f, m: said.append(m))
    mp = plan.meta["measured_picks"]
    assert mp["converged"] and mp["measured"] == mp["known"] == len(pred.measured) > 0 and mp["rounds"] >= 2
    assert len(said) == mp["measured"] and all("measuring" in m and "-bit factors" in m for m in said)
    got = tiny_lab.predict(plan)
    assert got["ratio"] <= 0.3 and pred.rank_and_bits(plan) == []
    assert not any("rank and bits together" in n for n in got["notes"])
    assert tiny_lab.job is None  # the job ended
    # a pick's cost is what the setting probe measures for it on the grid's probe windows
    name, spec = next((n, s) for n, s in plan.modules.items() if s.rank is not None and s.bits is not None)
    assert pred.dloss(name, spec) == pytest.approx(tiny_lab.setting_probe()(name, spec), rel=1e-6)
    # kept: a predictor made again (a reloaded page's grid) takes them from the cache, and nothing is measured again
    tiny_lab._refresh_predictor()
    assert tiny_lab.predictor is not pred and tiny_lab.predictor.measured == pred.measured
    again = tiny_lab.plan_allocate(0.3, measure_picks=True)
    assert again.meta["measured_picks"]["measured"] == 0 and again.modules == plan.modules
    # Cancel stops before the next probe and keeps what was measured (in the cache too)
    before, asked = len(tiny_lab.predictor.measured), []
    monkeypatch.setattr(tiny_lab, "should_stop", lambda: asked.append(1) or len(asked) > 1)
    with pytest.raises(InterruptedError, match="after measuring 1 setting"):
        tiny_lab.plan_allocate(0.25, measure_picks=True)
    assert len(tiny_lab.predictor.measured) == before + 1 and tiny_lab.job is None
    tiny_lab._refresh_predictor()
    assert len(tiny_lab.predictor.measured) == before + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_session_on_cuda(tmp_path, monkeypatch, dtype):
    """The app's whole path on the GPU: profile, first view, measured grid, allocation, run,
    generation, export and reload; in float32 the run measures what the CPU measures."""
    from analysis.loading import load_model, wrap_model
    from compression.lab import LabSettings
    from tests.conftest import CharTokenizer, tiny_model

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    settings = dict(seqlen=32, calib_windows=8, eval_windows=2, latency_seqlen=16, decode_tokens=2, latency_runs=1,
                    sensitivity_tokens=96)

    def lab_on(device: str, folder: str) -> Lab:
        lab = Lab(tmp_path / folder, LabSettings(**settings))
        lab.lm = wrap_model(tiny_model("llama", dtype=dtype).to(device), CharTokenizer(), spec="tiny")
        lab.set_texts("default", "default")
        return lab

    lab = lab_on("cuda", "gpu")
    lab.run_profile()
    lab.run_proxy()
    grid = lab.run_sensitivity(group_size=32)
    assert np.isfinite(grid.table["dloss"]).all() and lab.predictor.estimator == "kl"
    plan = lab.plan_allocate(0.6)
    rec = lab.run(plan, "allocated")
    assert rec.status == "ok", rec.error
    assert "cuda" in rec.measured["protocol"] and rec.measured["bytes"] == lab.predict(plan)["bytes"] < \
        lab.predict(Plan())["bytes"]
    assert all(p.device.type == "cuda" and (p.dtype == dtype or not p.is_floating_point())
               for p in lab.compressed.parameters())
    dense_text, comp_text = lab.generate("hello", max_new_tokens=4)
    assert len(dense_text) == len(comp_text) == 4
    lab.export_model(tmp_path / "export")
    again = load_model(str(tmp_path / "export"), device="cuda", dtype=dtype)
    ids = lab.split.eval_ids[:2].cuda()
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lab.compressed(ids).logits, rtol=0, atol=0)
    if dtype == torch.float32:
        cpu = lab_on("cpu", "cpu").run(plan, "allocated")
        assert cpu.status == "ok", cpu.error
        assert rec.measured["bytes"] == cpu.measured["bytes"]
        assert rec.measured["ppl"] == pytest.approx(cpu.measured["ppl"], rel=2e-2)


def test_texts_and_models_change_only_when_nothing_runs_and_only_if_valid(tiny_lab, tmp_path, monkeypatch):
    from analysis.loading import wrap_model
    from tests.conftest import CharTokenizer, tiny_model

    monkeypatch.setattr("compression.lab.load_model",
                        lambda spec, *a, **k: wrap_model(tiny_model("llama", seed=1), CharTokenizer(), spec=spec))
    split = tiny_lab.split
    with tiny_lab.running("profiling"):  # a job writes its result back when it ends: no change under it
        with pytest.raises(ValueError, match="profiling is running: wait for it to finish or press Cancel"):
            tiny_lab.set_texts("default", "default", seqlen=16)
        with pytest.raises(ValueError, match="profiling is running"):
            tiny_lab.load("other")
    assert tiny_lab.split is split
    for kw, msg in ((dict(calib_windows=0), "calibration windows 0 is too small"),
                    (dict(eval_windows=-1), "evaluation windows -1 is too small"),
                    (dict(seqlen=1), "window length 1 is too small")):
        with pytest.raises(ValueError, match=msg):
            tiny_lab.set_texts("default", "default", **kw)
        assert tiny_lab.split is split
    lm = tiny_lab.lm
    tiny_lab.settings.calib_text = str(tmp_path / "gone.txt")  # texts that cannot be windowed any more ...
    info = tiny_lab.load("other")  # ... the new model takes the default texts and says why
    assert tiny_lab.lm is not lm and tiny_lab.split is not split and tiny_lab.settings.calib_text == "default"
    assert "gone.txt" in info["note"] and "uses the default texts" in info["note"]
    tiny_lab.settings.seqlen = 512  # longer than the tiny model's 256 positions: not a dead end
    info = tiny_lab.load("other")
    assert tiny_lab.settings.seqlen == 256 and tiny_lab.split.eval_ids.shape[1] == 256
    assert tiny_lab.loads == 2  # what the app checks before resetting its sliders to a new model
    assert "window length (seqlen) 512 exceeds the model's maximum of 256" in info["note"]
    assert tiny_lab.load("other")["note"] is None  # texts that fit: nothing to say
    monkeypatch.setattr(Lab, "_corpus", staticmethod(lambda spec: (_ for _ in ()).throw(ValueError("unreadable"))))
    before, split = tiny_lab.lm, tiny_lab.split
    with pytest.raises(ValueError, match="unreadable"):  # not even the default texts: nothing changes
        tiny_lab.load("other")
    assert tiny_lab.lm is before and tiny_lab.split is split


def test_predictions_are_corrected_by_measured_runs_of_the_grids_methods(tiny_lab):
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    heavy = tiny_lab.plan_from_sliders([25, 25], [2, 2], group_size=32)
    light = tiny_lab.plan_from_sliders([75, 75], [4, 4], group_size=32)
    assert tiny_lab.correction() == (None, {})  # the dense model is not measured yet
    dense = tiny_lab.evaluate_dense()
    assert tiny_lab.correction() == (None, {}) and "ppl_corrected" not in tiny_lab.predict(heavy)
    # a random tiny model barely moves under compression (its increases can be negative): runs with
    # chosen measured increases are written into the history

    def measured(plan: Plan, label: str, factor: float) -> RunRecord:
        nll = dense["nll"] + factor * tiny_lab.predictor.predict(plan).dloss
        return RunRecord(run_id=label, time="t", label=label, status="ok", fingerprint=tiny_lab.lm.fingerprint,
                         plan=plan.to_dict(), measured=dict(nll=nll, ppl=math.exp(nll)),
                         protocol=tiny_lab.protocol())

    monkey = pytest.MonkeyPatch()
    monkey.setattr("compression.correction.MIN_PREDICTED", 0.0)
    try:
        medium = tiny_lab.plan_from_sliders([50, 50], [3, 3], group_size=32)
        tiny_lab.history.append(measured(heavy, "heavy", 1.5))
        assert tiny_lab.correction() == (None, {})  # one run: not enough (MIN_RUNS)
        assert "ppl_corrected" not in tiny_lab.predict(light)
        tiny_lab.history.append(measured(medium, "medium", 1.5))
        cal, left_out = tiny_lab.correction()
        assert cal.n == 2 and left_out == {}  # both measured 1.5x their prediction: both scales 1.5
        assert cal.rank_scale == pytest.approx(1.5, rel=1e-3) and cal.bits_scale == pytest.approx(1.5, rel=1e-3)
        # the measured runs are reproduced by the correction; other plans are scaled alike
        assert tiny_lab.predict(heavy)["ppl_corrected"] == pytest.approx(
            dense["ppl"] * math.exp(1.5 * tiny_lab.predictor.predict(heavy).dloss), rel=1e-4)
        pl = tiny_lab.predict(light)
        assert pl["ppl_corrected"] == pytest.approx(dense["ppl"] * math.exp(1.5 * pl["dloss"]), rel=1e-4)
        run = tiny_lab.run(light, "light")  # a real run records the correction fitted on the runs before it
        assert run.status == "ok", run.error
        assert run.predicted["ppl_corrected"] == pytest.approx(pl["ppl_corrected"])
        assert tiny_lab.history.table(tiny_lab.lm.fingerprint).corrected_ppl.notna().tolist() == [False, False, True]
        # runs with another quantiser than the grid's, or on other texts, say nothing about its predictions
        gptq = Plan(default=ModuleSpec(bits=3, group_size=32, quant="gptq"))
        tiny_lab.history.append(measured(gptq, "gptq", 9.0))
        other = measured(heavy, "other texts", 9.0)
        other.protocol += " (other)"
        tiny_lab.history.append(other)
        below = measured(medium, "below dense", 1.0)  # e.g. an 8-bit run measured just under dense: no scale
        below.measured = dict(nll=dense["nll"] - 0.001, ppl=math.exp(dense["nll"] - 0.001))
        tiny_lab.history.append(below)
        cal2, left_out = tiny_lab.correction()
        # the real "light" run counts only if it measured above dense (a random tiny model may not)
        above = run.measured["nll"] > dense["nll"]
        assert cal2.n == 2 + above and left_out == {"quantiser gptq (the sensitivities measured rtn)": 1,
                                                    "measured at or below the dense perplexity": 2 - above}
        # the measured grid replaces the first view: the same runs, predicted again by it
        tiny_lab.run_sensitivity()
        cal3, _ = tiny_lab.correction()
        assert cal3.n == 2 + above and cal3 != cal2
    finally:
        monkey.undo()


def test_prediction_says_when_the_plan_uses_other_settings_than_the_probes(tiny_lab):
    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    pred = tiny_lab.predictor
    same = tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=pred.group_size, quant=pred.quant)
    assert not any("the sensitivities were probed with" in n for n in tiny_lab.predict(same)["notes"])
    gptq = tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=pred.group_size, quant="gptq")
    notes = tiny_lab.predict(gptq)["notes"]
    n = len(tiny_lab.linears)
    assert f"{n} linear(s) use quantiser gptq, but the sensitivities were probed with" in notes[0]
    other_group = tiny_lab.plan_from_sliders([50, 100], [4, 4], group_size=pred.group_size // 2,
                                             lowrank="act-pca", quant=pred.quant)
    notes = " ".join(tiny_lab.predict(other_group)["notes"])
    assert f"{n} linear(s) use group size {pred.group_size // 2}" in notes and "use low-rank method act-pca" in notes
    assert tiny_lab.predict(gptq)["ppl"] == tiny_lab.predict(same)["ppl"]  # the same probed damage, now said


def test_generation_reports_progress_and_cancels(tiny_lab):
    said = []
    dense, comp = tiny_lab.generate("hello", max_new_tokens=3, progress=lambda f, m: said.append((f, m)))
    assert comp.startswith("(no compressed model in this session") and said[-1] == (1.0, "dense model: token 3/3")
    assert tiny_lab.run(Plan(default=ModuleSpec(bits=4, group_size=32))).status == "ok"
    said.clear()
    tiny_lab.generate("hello", max_new_tokens=2, progress=lambda f, m: said.append((f, m)))
    assert said[-1] == (1.0, "compressed model: token 2/2") and (0.5, "dense model: token 2/2") in said
    with pytest.raises(InterruptedError, match="generation cancelled during the dense model's continuation"):
        tiny_lab.generate("hello", max_new_tokens=50, progress=lambda f, m: tiny_lab.request_stop())
    assert tiny_lab.job is None


def test_a_compressed_model_is_measured_but_not_profiled_budgeted_or_run(tiny_lab):
    import dataclasses

    tiny_lab.lm = dataclasses.replace(tiny_lab.lm, compressed_from="tiny-base")
    assert tiny_lab.summary()["compressed_from"] == "tiny-base"
    for call, what in ((tiny_lab.run_profile, "profiling"), (lambda: tiny_lab.predict(Plan()), "a budget"),
                       (lambda: tiny_lab.run(Plan()), "compression")):
        with pytest.raises(ValueError, match=f"so {what} cannot run on it: load its base model `tiny-base`"):
            call()
    assert tiny_lab.history.table(tiny_lab.lm.fingerprint).empty  # a refused run records nothing
    assert tiny_lab.evaluate_dense()["ppl"] > 1  # measuring it as it is works, and is not called dense
    assert tiny_lab.runs_table().label.tolist() == ["this compressed model (this session)"]
    _, second = tiny_lab.generate("ab", max_new_tokens=2)
    assert "itself compressed" in second


def test_an_exported_plan_names_its_model_and_a_foreign_plan_gets_a_note(tiny_lab):
    plan = tiny_lab.stamped(Plan(default=ModuleSpec(bits=4, group_size=32)))
    assert plan.meta["base_fingerprint"] == tiny_lab.lm.fingerprint and plan.meta["base_model"] == "tiny"
    assert not any("another model" in n for n in tiny_lab.check(Plan.from_json(plan.to_json())))
    plan.meta["base_fingerprint"] = "f00d"
    assert tiny_lab.stamped(plan).meta["base_fingerprint"] == "f00d"  # re-exported, it still names its model
    notes = tiny_lab.check(plan)
    assert any(n.startswith("this plan was made for another model (`tiny`), fingerprint f00d") for n in notes)
    assert any("another model" in n for n in tiny_lab.predict(plan)["notes"])  # the readout shows it


def test_an_exported_model_says_which_run_made_it_and_what_was_measured(tiny_lab, tmp_path):
    rec = tiny_lab.run(tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=32), "four bits")
    assert rec.status == "ok", rec.error
    z = tiny_lab.export_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "ranklab.json").read_text())["meta"]
    import zipfile

    names = zipfile.ZipFile(z).namelist()  # unzipped anywhere, it gives the folder: no loose files
    assert z == tmp_path / "m.zip" and "m/ranklab.json" in names and all(n.startswith("m/") for n in names)
    assert meta["base_model"] == "tiny" and meta["base_fingerprint"] == tiny_lab.lm.fingerprint
    run = meta["run"]
    assert run["run_id"] == rec.run_id and run["label"] == "four bits" and run["plan"] == "rtn 4b g32 x 14"
    assert run["measured"]["ppl"] == rec.measured["ppl"] and run["protocol"] == rec.measured["protocol"]
    assert "seqlen 32" in run["protocol"]


def test_a_sliced_model_exported_from_the_lab_loads_back(tiny_lab, tmp_path):
    from analysis.loading import load_model
    from compression.plan import SliceGPTOptions

    rec = tiny_lab.run(Plan(slicegpt=SliceGPTOptions(0.25)), "sliced")
    assert rec.status == "ok", rec.error
    tiny_lab.export_model(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    ids = tiny_lab.split.eval_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, tiny_lab.compressed(ids).logits, rtol=0, atol=0)


def test_close_lets_the_running_job_finish_then_frees_the_models_and_loads_nothing_more(tiny_lab, monkeypatch):
    lm = tiny_lab.lm
    monkeypatch.setattr("compression.lab.load_model", lambda spec, *a, **k: lm)  # no real model
    assert tiny_lab.load("again") and tiny_lab.loads == 1
    with tiny_lab.running("the run"):
        tiny_lab.close()  # the page closed mid-job: the job goes on (its result is saved), the model stays
        assert not tiny_lab.should_stop() and tiny_lab.lm is not None
        assert tiny_lab.closed_but_running == "the run"
    assert tiny_lab.lm is None and tiny_lab.compressed is None and tiny_lab.closed_but_running is None
    with pytest.raises(ValueError, match="this page's session ended .* reload the page"):
        tiny_lab.require_model()
    with pytest.raises(InterruptedError, match="the page was closed; no model is loaded for it"):
        tiny_lab.load("again")  # a load asked for after the close does not start
    assert tiny_lab.lm is None and tiny_lab.loads == 1


def test_a_load_the_page_closes_under_keeps_nothing(tiny_lab, monkeypatch):
    lm = tiny_lab.lm

    def closing(spec, *a, **k):
        tiny_lab.close()  # the page goes away while the weights load
        return lm

    monkeypatch.setattr("compression.lab.load_model", closing)
    with pytest.raises(InterruptedError, match="the page was closed while the model loaded"):
        tiny_lab.load("again")
    assert tiny_lab.lm is None and tiny_lab.loads == 0


def test_close_with_nothing_running_frees_at_once_and_keeps_the_history(tiny_lab):
    rec = tiny_lab.run(tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=32))
    fp = tiny_lab.lm.fingerprint
    tiny_lab.close()
    assert tiny_lab.lm is None and tiny_lab.compressed is None and tiny_lab.compressed_run is None
    assert list(tiny_lab.history.table(fp).run_id) == [rec.run_id]  # on disk, for the next session


def test_a_uniform_plan_is_named_by_its_setting_and_so_are_its_runs(tiny_lab):
    plan = tiny_lab.plan_uniform(100, 4, group_size=32)
    assert plan.meta["method"] == "uniform rtn 4b g32"
    assert plan.modules == tiny_lab.plan_from_sliders([100, 100], [4, 4], group_size=32).modules
    assert tiny_lab.plan_uniform(60, None).meta["method"] == "uniform svd-llm 60% of break-even"
    assert tiny_lab.plan_uniform(100, None).meta["method"] == "dense" and not tiny_lab.plan_uniform(100, None).modules
    rec = tiny_lab.run(plan)  # unlabelled: the preset's name
    assert rec.status == "ok" and rec.label == "uniform rtn 4b g32" and rec.summary == "rtn 4b g32 x 14"


def test_a_tuned_run_says_so_and_does_not_correct_the_predictions(tiny_lab):
    from dataclasses import replace

    from compression.plan import TuneOptions

    tiny_lab.run_profile()
    tiny_lab.run_proxy()
    plan = replace(tiny_lab.plan_from_sliders([100, 100], [2, 2], group_size=32), tune=TuneOptions(steps=3))
    assert "the prediction is for it untuned" in " ".join(tiny_lab.predict(plan)["notes"])
    tiny_lab.evaluate_dense()
    rec = tiny_lab.run(plan, "tuned")
    assert rec.status == "ok", rec.error
    assert rec.measured["tune"].startswith("tuned 2 layer(s) on 256 tokens")
    assert rec.plan["tune"]["steps"] == 3 and rec.summary.endswith("tuned 3 steps per layer")
    assert tiny_lab.comparable_to_predictor(plan) == "tuned after compressing (the prediction does not model tuning)"
    assert tiny_lab.comparable_to_predictor(replace(plan, tune=None)) is None


def test_a_vq_slider_plan_runs_and_an_8_bit_vq_plan_says_what_to_change(tiny_lab):
    plan = tiny_lab.plan_from_sliders([100, 100], [2.5, 3], quant="vq", group_size=32)
    rec = tiny_lab.run(plan, "vq")
    assert rec.status == "ok", rec.error
    assert rec.measured["bytes"] == tiny_lab.predict(plan)["bytes"]
    assert rec.plan["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 2.5
    bad = tiny_lab.plan_from_sliders([100, 100], [8, 8], quant="vq", group_size=32)
    with pytest.raises(ValueError, match=r"vq: 8 bits is not supported; use one of \[2, 2.5, 3, 4\]"):
        tiny_lab.predict(bad)
    rec = tiny_lab.run(bad)
    assert rec.status == "failed" and "use one of [2, 2.5, 3, 4]" in rec.error
    with pytest.raises(ValueError, match=r"rtn: 2.5 bits is not supported; use one of \[2, 3, 4, 8\]"):
        tiny_lab.predict(tiny_lab.plan_from_sliders([100, 100], [2.5, None], quant="rtn", group_size=32))
