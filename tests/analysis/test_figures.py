"""analysis.figures: pure plotly builders over small hand-made tables (fast, no model)."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from analysis import figures as F

PROTOCOL = "wikitext-2 test, 8 seqs x 128 tokens, seed 0"


def _protocol_shown(fig: go.Figure) -> bool:
    return PROTOCOL in (fig.layout.title.subtitle.text or "") and fig.layout.meta["protocol"] == PROTOCOL


def _summary() -> pd.DataFrame:
    rows = []
    for layer in (0, 1):
        for role, m, n, r95 in (("q_proj", 64, 64, 8 + layer), ("k_proj", 32, 64, 4), ("down_proj", 64, 128, 32)):
            rows.append(dict(name=f"model.layers.{layer}.{role}", layer=layer, role=role, out_features=m, in_features=n,
                             eff_rank_act=r95 * 0.6, eff_rank_weight=0.8 * min(m, n), rank90=r95 - 1, rank95=r95,
                             rank99=r95 + 2, weight_rank95=int(0.9 * min(m, n)), break_even=m * n / (m + n)))
    return pd.DataFrame(rows)


def _sens() -> pd.DataFrame:
    rows = []
    for layer in (0, 1):
        for role in ("q_proj", "down_proj"):
            name = f"model.layers.{layer}.{role}"
            for r in (8, 32):
                rows.append(dict(name=name, layer=layer, role=role, kind="rank", setting=r, dloss=0.5 / r + layer))
            for b in (2, 4, 8):
                rows.append(dict(name=name, layer=layer, role=role, kind="bits", setting=b, dloss=2.0 ** -b - 0.01))
    return pd.DataFrame(rows)


def _runs() -> pd.DataFrame:
    nan = float("nan")
    rows = [("d", "dense", "measured", 20.0, 1000, 16.0, 10.0, "dense"),
            ("a", "svd half", "predicted", 23.0, 600, 9.6, nan, "svd"),
            ("a", "svd half", "measured", 25.0, 600, 9.6, 9.0, "svd"),
            ("b", "int4", "predicted", 20.5, 300, 4.5, nan, "int4"),
            ("b", "int4", "measured", 21.0, 300, 4.5, nan, "int4"),
            ("c", "int8", "measured", 20.1, 520, 8.5, 9.5, "int8")]
    return pd.DataFrame(rows, columns=F.RUNS_COLUMNS)


# ------------------------------------------------------------------------ rank heatmap
def test_rank_heatmap_fractions_text_and_layout():
    s = _summary()
    fig = F.rank_heatmap(s, PROTOCOL)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1 and fig.data[0].type == "heatmap"
    h = fig.data[0]
    assert list(h.x) == ["q_proj", "k_proj", "down_proj"] and list(h.y) == [0, 1]
    expected = np.array([[8 / 64, 4 / 32, 32 / 64], [9 / 64, 4 / 32, 32 / 64]])
    np.testing.assert_allclose(np.asarray(h.z, dtype=float), expected)
    assert h.zmin == 0 and h.zmax == 1
    assert np.asarray(h.text).tolist() == [["8", "4", "32"], ["9", "4", "32"]]
    hover = np.asarray(h.hovertext)[1, 0]
    assert "model.layers.1.q_proj" in hover and "full rank 64" in hover and "break-even rank: 32" in hover
    assert fig.layout.template.layout.paper_bgcolor is not None  # plotly_white resolved
    assert list(fig.layout.yaxis.categoryarray) == [0, 1]
    assert _protocol_shown(fig)


def test_rank_heatmap_other_value_and_bad_inputs():
    s = _summary()
    fig = F.rank_heatmap(s, PROTOCOL, value="weight_rank95")
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float)[0], [57 / 64, 28 / 32, 57 / 64])
    with pytest.raises(ValueError, match="rank95, break_even"):
        F.rank_heatmap(s.drop(columns=["rank95", "break_even"]), PROTOCOL)
    with pytest.raises(ValueError, match="nope"):
        F.rank_heatmap(s, PROTOCOL, value="nope")
    with pytest.raises(ValueError, match="several rows"):
        F.rank_heatmap(pd.concat([s, s.iloc[:1]]), PROTOCOL)
    empty = F.rank_heatmap(s.iloc[:0], PROTOCOL)
    assert len(empty.data) == 0 and _protocol_shown(empty)


# ------------------------------------------------------------------------ energy curve / spectra
@pytest.mark.parametrize("as_tensor", [False, True])
def test_energy_curve_monotone_ends_at_one_and_break_even_line(as_tensor):
    ev = np.array([1.0, 8.0, 0.5, 0.25, 0.125, 0.0, 0.0, 0.0])  # unsorted on purpose
    sv = np.linspace(2.0, 1.0, 6)
    if as_tensor:
        ev, sv = torch.tensor(ev), torch.tensor(sv, dtype=torch.float32)
    fig = F.energy_curve(ev, sv, "layers.0.q_proj", 3.2, PROTOCOL)
    assert [t.type for t in fig.data] == ["scatter", "scatter"]
    act, wt = fig.data
    for tr, n in ((act, 8), (wt, 6)):
        y = np.asarray(tr.y, dtype=float)
        assert list(tr.x) == list(range(n + 1)) and y[0] == 0.0 and y[-1] == 1.0
        assert np.all(np.diff(y) >= 0) and np.all((y >= 0) & (y <= 1))
    np.testing.assert_allclose(act.y[1], 8 / 9.875)
    assert wt.line.dash == "dash" and act.line.dash in (None, "solid")
    vlines = [s for s in fig.layout.shapes if s.x0 == s.x1 and s.xref == "x"]
    assert len(vlines) == 1 and vlines[0].x0 == pytest.approx(3.2)
    hlines = sorted(s.y0 for s in fig.layout.shapes if s.y0 == s.y1 and s.yref == "y")
    assert hlines == pytest.approx([0.90, 0.95, 0.99])
    texts = " | ".join(a.text for a in fig.layout.annotations)
    assert "break-even k = 3.2" in texts
    # activations: cum = [.81, .91, .96, ...] -> k95 = 3; weights: squared sv -> computed by hand below
    e = np.linspace(2.0, 1.0, 6) ** 2
    k_w = int(np.argmax(np.cumsum(e) / e.sum() >= 0.95)) + 1
    assert "activations: 95 % at k = 3" in texts and f"weights: 95 % at k = {k_w}" in texts
    assert _protocol_shown(fig)


def test_energy_curve_without_break_even_and_spectrum_plot():
    ev, sv = np.array([4.0, 1.0, 0.0]), np.array([3.0, 2.0, 1.0])
    fig = F.energy_curve(ev, sv, "x", None, PROTOCOL)
    assert not [s for s in fig.layout.shapes if s.x0 == s.x1 and s.xref == "x"]
    sp = F.spectrum_plot(ev, torch.tensor(sv), "x", PROTOCOL)
    assert len(sp.data) == 2 and sp.layout.yaxis.type == "log" and _protocol_shown(sp)
    a, w = (np.asarray(t.y, dtype=float) for t in sp.data)
    np.testing.assert_allclose(a[:2], [1.0, 0.25])
    assert np.isnan(a[2])  # a zero cannot sit on a log axis
    np.testing.assert_allclose(w, [1.0, 4 / 9, 1 / 9])
    assert list(sp.data[0].x) == [1, 2, 3]
    lin = F.spectrum_plot(ev, sv, "x", PROTOCOL, log=False)
    assert lin.layout.yaxis.type == "linear" and np.asarray(lin.data[0].y, dtype=float)[2] == 0.0


# ------------------------------------------------------------------------ effective rank profile
@pytest.mark.parametrize("normalise", [False, True])
def test_effective_rank_profile(normalise):
    s = _summary()
    fig = F.effective_rank_profile(s, PROTOCOL, normalise=normalise)
    assert len(fig.data) == 6 and all(t.type == "scatter" for t in fig.data)
    acts, wts = fig.data[:3], fig.data[3:]
    assert [t.name for t in acts] == ["q_proj", "k_proj", "down_proj"] == [t.name for t in wts]
    assert all(t.line.dash == "solid" for t in acts) and all(t.line.dash == "dash" for t in wts)
    q = np.asarray(acts[0].y, dtype=float)
    np.testing.assert_allclose(q, [8 * 0.6, 9 * 0.6] if not normalise else [8 * 0.6 / 64, 9 * 0.6 / 64])
    assert list(acts[0].x) == [0, 1]
    assert _protocol_shown(fig)
    with pytest.raises(ValueError, match="eff_rank_weight"):
        F.effective_rank_profile(s.drop(columns="eff_rank_weight"), PROTOCOL)


# ------------------------------------------------------------------------ sensitivity
def test_sensitivity_heatmap_panels_values_and_hover():
    sens = _sens()
    fig = F.sensitivity_heatmap(sens, PROTOCOL)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and [t.name for t in fig.data] == ["rank", "bits"]
    rank, bits = fig.data
    assert [list(level) for level in rank.x] == [["q_proj"] * 2 + ["down_proj"] * 2, ["8", "32"] * 2]
    z = np.asarray(rank.z, dtype=float)
    np.testing.assert_allclose(z[1, 0], np.log10(1 + (0.5 / 8 + 1) / 1e-3))
    zb = np.asarray(bits.z, dtype=float)
    assert zb[0, 2] == 0.0  # 2**-8 - 0.01 < 0 is clipped to 0
    assert "Δloss = -0.00609375" in np.asarray(bits.hovertext)[0, 2]  # exact value in hover
    assert rank.coloraxis == bits.coloraxis == "coloraxis" and fig.layout.coloraxis.cmin == 0
    assert _protocol_shown(fig)
    with pytest.raises(ValueError, match="dloss"):
        F.sensitivity_heatmap(sens.drop(columns="dloss"), PROTOCOL)
    kl = F.sensitivity_heatmap(sens, PROTOCOL, quantity="KL divergence from the dense model", symbol="KL")
    assert "KL divergence from the dense model" in kl.layout.title.text
    assert kl.layout.coloraxis.colorbar.title.text.startswith("KL<br>")
    assert "KL = -0.00609375" in np.asarray(kl.data[1].hovertext)[0, 2]


def test_sensitivity_curves_by_layer_and_by_name():
    sens = _sens()
    fig = F.sensitivity_curves(sens, 1, PROTOCOL)
    assert len(fig.data) == 4 and all(t.type == "scatter" for t in fig.data)  # 2 linears x (rank, bits)
    assert list(fig.data[0].x) == [8, 32] and fig.data[0].y[0] == pytest.approx(0.5 / 8 + 1)
    assert sum(bool(t.showlegend) for t in fig.data) == 2
    one = F.sensitivity_curves(sens, "model.layers.0.down_proj", PROTOCOL)
    assert len(one.data) == 2 and {t.name for t in one.data} == {"model.layers.0.down_proj"}
    two = F.sensitivity_curves(sens, ["model.layers.0.q_proj", "model.layers.1.q_proj"], PROTOCOL)
    assert len(two.data) == 4 and _protocol_shown(two)
    kl = F.sensitivity_curves(sens, 1, PROTOCOL, quantity="KL divergence from the dense model", symbol="KL")
    assert kl.layout.title.text.startswith("KL divergence from the dense model vs compression setting")
    assert "KL = " in kl.data[0].hovertemplate and kl.layout.yaxis.title.text.startswith("KL vs dense")
    with pytest.raises(ValueError, match="layer 7"):
        F.sensitivity_curves(sens, 7, PROTOCOL)
    with pytest.raises(ValueError, match="missing column"):
        F.sensitivity_curves(sens.drop(columns="setting"), 0, PROTOCOL)


# ------------------------------------------------------------------------ trade-off
def test_pareto_front_hand_made():
    df = pd.DataFrame({"x": [1, 2, 2, 3, 4, 5, 6, 7, 3, np.nan],
                       "ppl": [10, 8, 9, 8, 5, 5, 4, 6, 7, 1]}, index=list("abcdefghij"))
    front = F.pareto_front(df, "x")
    assert list(front.index) == ["a", "b", "i", "e", "g"]
    assert list(front["ppl"]) == [10, 8, 7, 5, 4]
    ties = pd.DataFrame({"bytes": [1.0, 1.0, 2.0], "ppl": [3.0, 3.0, 3.0]})
    assert list(F.pareto_front(ties, "bytes").index) == [0, 1]  # exact ties are both kept
    assert F.pareto_front(ties.iloc[:0], "bytes").empty
    with pytest.raises(ValueError, match="ppl"):
        F.pareto_front(ties.drop(columns="ppl"), "bytes")


def test_tradeoff_traces_links_front_and_dense():
    runs = _runs()
    fig = F.tradeoff(runs, x="bytes", protocol=PROTOCOL)
    names = [t.name for t in fig.data]
    assert names == ["svd (measured)", "svd (predicted)", "int4 (measured)", "int4 (predicted)", "int8 (measured)",
                     "prediction → measurement", "Pareto front (measured)", "dense baseline"]
    by = {t.name: t for t in fig.data}
    assert by["svd (measured)"].marker.symbol == "circle" and by["svd (predicted)"].marker.symbol == "circle-open"
    link = list(by["prediction → measurement"].x)
    assert link[2] is None and link[5] is None
    assert [link[i] for i in (0, 1, 3, 4)] == pytest.approx([600e-6, 600e-6, 300e-6, 300e-6])
    front = by["Pareto front (measured)"]
    assert front.line.shape == "hv" and list(front.y) == [21.0, 20.1, 20.0]
    assert list(front.x) == pytest.approx([300e-6, 520e-6, 1000e-6])
    assert list(by["dense baseline"].marker.symbol) == ["star"] and fig.layout.yaxis.type == "log"
    assert "1,000 bytes" in by["dense baseline"].hovertext[0]
    assert _protocol_shown(fig)
    # a run labelled otherwise than its method is named by its point; predictions and plain runs are not
    assert by["svd (measured)"].mode == "markers+text" and list(by["svd (measured)"].text) == ["svd half"]
    assert by["int4 (measured)"].mode == "markers" and by["svd (predicted)"].mode == "markers"
    long = "svd-llm rank 60% of break-even + rtn 3b g128 x 7 · dense x 203"  # an unlabelled run: cut
    fig = F.tradeoff(runs.assign(label=runs.label.where(runs.label != "svd half", long)), "bytes", PROTOCOL)
    point = {t.name: t for t in fig.data}["svd (measured)"]
    assert list(point.text) == [long[:F.POINT_LABEL_CHARS - 1].rstrip() + "…"] and long in point.hovertext[0]
    many = pd.concat([runs] + [runs[runs.run_id == "a"].assign(run_id=f"a{i}") for i in range(F.MAX_POINT_LABELS)])
    assert all(t.mode != "markers+text" for t in F.tradeoff(many, "bytes", PROTOCOL).data if t.name != "dense baseline")


def test_log_ticks_are_few_and_inside_the_range():
    assert F.log_ticks(math.log10(18), math.log10(30)) == [20, 25, 30]  # within a decade: fine steps
    assert F.log_ticks(math.log10(15), math.log10(600)) == [20, 50, 100, 200, 500]  # 1-2-5
    assert F.log_ticks(math.log10(18), math.log10(120)) == [20, 30, 50, 100]  # over half a decade: 1-2-3-5
    assert F.log_ticks(0, 6) == [1, 10, 100, 1000, 10000, 100000, 1000000]  # powers of ten


def test_tradeoff_log_axis_holds_every_point_with_full_labels():
    runs = _runs()
    for one in (runs.iloc[:1], runs):  # a single point too (plotly alone pads it by a decade)
        fig = F.tradeoff(one, "bytes", PROTOCOL)
        lo, hi = fig.layout.yaxis.range
        ppl = np.log10(one["ppl"].astype(float))
        span = ppl.max() - ppl.min()
        assert lo < ppl.min() and ppl.max() < hi and hi - lo <= max(1.2 * span, span + 0.25)
        ticks = list(fig.layout.yaxis.tickvals)
        assert 2 <= len(ticks) <= 10 and list(fig.layout.yaxis.ticktext) == [f"{t:g}" for t in ticks]


def test_tradeoff_latency_drops_missing_and_keeps_colours():
    runs = _runs()
    by_bytes = {t.name: t for t in F.tradeoff(runs, "bytes", PROTOCOL).data}
    fig = F.tradeoff(runs, "latency_ms", PROTOCOL)
    by = {t.name: t for t in fig.data}
    assert "int4 (measured)" not in by and "prediction → measurement" not in by
    assert list(by["Pareto front (measured)"].x) == [9.0, 9.5, 10.0]
    assert by["int8 (measured)"].marker.color == by_bytes["int8 (measured)"].marker.color
    # only the measured int4 row lacks latency; predictions never carry one and are not counted
    assert [a.text for a in fig.layout.annotations if "row(s)" in a.text] == [
        "1 row(s) without decode latency or perplexity not shown"]
    bpw = F.tradeoff(runs, "bits_per_weight", PROTOCOL)
    assert len(bpw.data) == 8
    with pytest.raises(ValueError, match="x must be one of"):
        F.tradeoff(runs, "speed", PROTOCOL)
    with pytest.raises(ValueError, match="decode_ms_per_token, method"):
        F.tradeoff(runs.drop(columns=["decode_ms_per_token", "method"]), "bytes", PROTOCOL)


# ------------------------------------------------------------------------ budget
def test_budget_bars_nullable_rank_and_bits():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "role": ["q_proj", "down_proj"] * 2,
                          "rank": pd.array([16, None, 8, 40], dtype="Int64"),
                          "bits": pd.array([4, 4, None, None], dtype="Int64"),
                          "break_even": [32.0, 42.5, 32.0, 42.5], "full_rank": [64, 64, 64, 64]})
    fig = F.budget_bars(table, PROTOCOL)
    assert [t.type for t in fig.data] == ["bar", "scatter", "bar", "scatter"]
    q_bar, q_bits, d_bar, _ = fig.data
    np.testing.assert_allclose(np.asarray(q_bar.y, dtype=float), [0.5, 0.25])
    y = np.asarray(d_bar.y, dtype=float)
    assert np.isnan(y[0]) and y[1] == pytest.approx(40 / 42.5)
    assert q_bits.yaxis == "y2" and fig.layout.yaxis2.overlaying == "y"
    assert np.asarray(q_bits.y, dtype=float)[0] == 4 and np.isnan(np.asarray(q_bits.y, dtype=float)[1])
    assert any(s.y0 == s.y1 == 1 for s in fig.layout.shapes)
    assert "not factorised" in d_bar.hovertext[0]
    assert _protocol_shown(fig)
    no_bits = F.budget_bars(table.assign(bits=pd.array([None] * 4, dtype="Int64")), PROTOCOL)
    assert [t.type for t in no_bits.data] == ["bar", "bar"]
    # one legend entry per role: its bar, or its diamonds when no linear of that role is factorised
    assert [t.name for t in fig.data if t.showlegend is not False] == ["q_proj", "down_proj"]
    only_bits = F.budget_bars(table.assign(rank=pd.array([None] * 4, dtype="Int64")), PROTOCOL)
    assert [(t.type, t.showlegend, t.name) for t in only_bits.data] == [("scatter", True, "q_proj"),
                                                                         ("scatter", True, "down_proj")]
    mixed = F.budget_bars(table.assign(rank=pd.array([16, None, 8, None], dtype="Int64")), PROTOCOL)
    assert [t.name for t in mixed.data if t.showlegend is not False] == ["q_proj", "down_proj"]  # no "down_proj bits"
    with pytest.raises(ValueError, match="full_rank"):
        F.budget_bars(table.drop(columns="full_rank"), PROTOCOL)
    # a dense plan: no traces, yet the axis spans every layer and the figure says why it is empty
    dense = F.budget_bars(table.assign(rank=pd.array([None] * 4, dtype="Int64"),
                                       bits=pd.array([None] * 4, dtype="Int64")), PROTOCOL)
    assert not dense.data and tuple(dense.layout.xaxis.range) == (-0.6, 1.6)
    assert any("every linear dense" in a.text for a in dense.layout.annotations)


# ------------------------------------------------------------------------ export + hygiene
def test_to_html_is_standalone_and_offline():
    page = F.to_html(F.rank_heatmap(_summary(), PROTOCOL))
    assert page.lstrip().lower().startswith(("<!doctype html>", "<html")) and page.rstrip().endswith("</html>")
    assert not re.search(r"<script[^>]*\bsrc=", page) and len(page) > 1_000_000  # plotly.js inlined, no CDN
    assert "Plotly.newPlot" in page
    assert PROTOCOL in page
    assert '"displayModeBar": true' in page
    still = F.to_html(F.rank_heatmap(_summary(), PROTOCOL), toolbar=False)  # for images: no toolbar drawn
    assert '"displayModeBar": false' in still


def test_protocol_is_escaped_and_wrapped():
    proto = "tokens <bos> & eos, " + "x" * 150
    fig = F.rank_heatmap(_summary(), proto)
    sub = fig.layout.title.subtitle.text
    assert "&lt;bos&gt; &amp;" in sub and "<br>" in sub and fig.layout.meta["protocol"] == proto


def test_module_imports_no_ui_toolkit():
    code = "import sys, analysis.figures; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_long_caption_adds_height_and_leaves_the_plot_its_room():
    runs = pd.DataFrame([dict(run_id="a", label="a", kind="measured", ppl=20.0, bytes=1e8, bits_per_weight=4.0,
                              decode_ms_per_token=5.0, method="rtn")])
    short, long_ = F.tradeoff(runs, "bytes", "one line"), F.tradeoff(runs, "bytes", "word " * 70)
    lines = long_.layout.title.subtitle.text.count("<br>") + 1
    assert lines >= 3 and short.layout.height == F.DEFAULT_HEIGHT
    assert long_.layout.height == F.DEFAULT_HEIGHT + F.CAPTION_LINE_PX * (lines - 1)

    def plot_px(fig):
        return fig.layout.height - fig.layout.margin.t - fig.layout.margin.b

    assert plot_px(long_) == plot_px(short)
