"""The app's small pure helpers (no server, no browser)."""
import math

import pandas as pd
import pytest

app = pytest.importorskip("app", reason="the app needs gradio")


def test_bits_labels_round_trip_to_widths():
    from compression.lab import BITS_CHOICES

    assert app.BITS_LABELS == ["2", "3", "4", "8", "keep"]
    assert [app._bits_value(lb) for lb in app.BITS_LABELS] == BITS_CHOICES
    assert [app._bits_label(b) for b in BITS_CHOICES] == app.BITS_LABELS
    assert app._bits_value(None) is None and app._bits_value("") is None


def test_bytes_in_decimal_units_like_the_axes():
    assert app._fmt_bytes(538_060_000) == "538.06 MB"
    assert app._fmt_bytes(999) == "999 B" and app._fmt_bytes(1500) == "1.50 kB"
    assert app._fmt_bytes(2.5e9) == "2.50 GB" and app._fmt_bytes(None) == "–"


def test_run_table_is_rounded_for_display_and_the_original_kept():
    raw = pd.DataFrame([dict(run_id="a", time="t", label="l", status="ok", ppl=87.57683563232422,
                             predicted_ppl=24.016888177408546, bytes=528807424, bits_per_weight=31.302777777777777,
                             prefill_tok_s=339.1034226, decode_ms_per_token=59.44, seconds=8.4, protocol="p",
                             error=""),
                        dict(run_id="b", time="t", label="failed", status="failed", ppl=None, predicted_ppl=None,
                             bytes=None, bits_per_weight=None, prefill_tok_s=None, decode_ms_per_token=None,
                             seconds=1.0, protocol="p", error="boom")])
    shown = app._runs_display(raw)
    row = shown.iloc[0]
    assert (row.ppl, row.predicted_ppl, row.MB, row.bits_per_weight) == (87.58, 24.02, 528.81, 31.303)
    assert (row.prefill_tok_s, row.decode_ms_per_token, row.seconds) == (339, 59.4, 8)
    assert "bytes" not in shown.columns and math.isnan(shown.iloc[1].ppl) and shown.iloc[1].error == "boom"
    assert raw.iloc[0].bytes == 528807424  # the CSV export keeps full precision


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
