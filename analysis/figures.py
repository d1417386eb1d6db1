"""Plotly figure builders for RankLab: pure functions ``(data, ..., protocol) -> go.Figure``.

Every builder takes tidy pandas data (or 1-d spectra), checks its columns (a ``ValueError``
names any that are missing) and returns a ``plotly.graph_objects.Figure`` styled for a class:
a title saying what is shown, axis titles with units, the measurement ``protocol`` string as
the subtitle (also kept machine-readable in ``fig.layout.meta["protocol"]``), an Okabe-Ito
colour-blind-safe palette (viridis/cividis for colour scales), ``template="plotly_white"``,
compact margins and hover text with exact values. Nothing here touches a model, a file or a UI
toolkit (this module must never import gradio); an empty table gives an empty figure that says
so, not an error.

Input schemas
-------------
``summary`` (one row per decoder linear; ``analysis.profile.SUMMARY_COLUMNS``)::

    name             str    module name, e.g. "model.layers.3.self_attn.q_proj"
    layer            int    decoder layer index, 0 = first block (nearest the embeddings)
    role             str    e.g. "q_proj", "down_proj"
    out_features     int    m
    in_features      int    n            full rank = min(m, n)
    eff_rank_act     float  effective rank exp(H) of the output-covariance eigenvalues
    eff_rank_weight  float  effective rank exp(H) of the squared singular values of W
    rank90/95/99     int    smallest k keeping 90/95/99 % of the output (activation) energy
    weight_rank95    int    smallest k keeping 95 % of the weight energy (sum of sigma^2)
    break_even       float  m n / (m + n): factorising at rank k saves memory only if k < this

``sens`` (one row per linear x compression setting)::

    name str, layer int, role str,
    kind     str    "rank" (truncate to ``setting`` directions) or "bits" (quantise to ``setting`` bits)
    setting  int    the rank or the bit width
    dloss    float  increase of the mean cross-entropy over the dense model (nats / token)

``runs`` (one row per run and kind of number)::

    run_id               str    pairs a prediction with its measurement
    label                str    display name; the uncompressed baseline is labelled "dense"
    kind                 str    "measured" or "predicted"
    ppl                  float  perplexity
    bytes                int    bytes held by the weights
    bits_per_weight      float  average bits per weight
    decode_ms_per_token  float  decode latency (ms / token); NaN when not measured
    method               str    compression method, e.g. "svd", "int4", "svd+int8"

``table`` (the live budget: one row per linear)::

    layer int, role str,
    rank        nullable int    chosen rank; null = not factorised
    bits        nullable int    chosen bit width; null = not quantised
    break_even  float           m n / (m + n)
    full_rank   int             min(m, n)
"""
from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

__all__ = [
    "SUMMARY_COLUMNS", "SENSITIVITY_COLUMNS", "RUNS_COLUMNS", "BUDGET_COLUMNS", "OKABE_ITO",
    "rank_heatmap", "energy_curve", "effective_rank_profile", "spectrum_plot", "sensitivity_heatmap",
    "sensitivity_curves", "tradeoff", "pareto_front", "budget_bars", "to_html",
]

SUMMARY_COLUMNS = ["name", "layer", "role", "out_features", "in_features", "eff_rank_act", "eff_rank_weight",
                   "rank90", "rank95", "rank99", "weight_rank95", "break_even"]
SENSITIVITY_COLUMNS = ["name", "layer", "role", "kind", "setting", "dloss"]
RUNS_COLUMNS = ["run_id", "label", "kind", "ppl", "bytes", "bits_per_weight", "decode_ms_per_token", "method"]
BUDGET_COLUMNS = ["layer", "role", "rank", "bits", "break_even", "full_rank"]

# Okabe & Ito (2008), ordered for contrast on white; yellow (#F0E442) last, black reserved for references.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999", "#F0E442"]
ACT_COLOR, WEIGHT_COLOR, REF_COLOR, GUIDE_COLOR = "#0072B2", "#D55E00", "#000000", "#888888"
RANK_SCALE, LOSS_SCALE = "Viridis", "Cividis"
TEMPLATE = "plotly_white"

VALUE_LABELS = {
    "rank90": "rank keeping 90 % of output energy",
    "rank95": "rank keeping 95 % of output energy",
    "rank99": "rank keeping 99 % of output energy",
    "weight_rank95": "rank keeping 95 % of weight energy",
    "eff_rank_act": "effective rank of the outputs",
    "eff_rank_weight": "effective rank of the weights",
}
X_AXES = {  # tradeoff(x=...) -> (runs column, axis title, scale to plot units)
    "bytes": ("bytes", "Weights size (MB)", 1e-6),
    "latency_ms": ("decode_ms_per_token", "Decode latency (ms / token)", 1.0),
    "bits_per_weight": ("bits_per_weight", "Average bits per weight", 1.0),
}
KIND_ORDER = ["rank", "bits"]


# ------------------------------------------------------------------------ helpers
def _require(df: Any, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s): {', '.join(missing)} (needs {', '.join(columns)})")


def _unique(df: pd.DataFrame, keys: list[str], what: str) -> None:
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        first = dict(zip(keys, df.loc[dup, keys].iloc[0].tolist(), strict=True))
        raise ValueError(f"{what} has several rows for {first}: one row per {', '.join(keys)}")


def _ordered(values: pd.Series) -> list:
    """Distinct values in the order they first appear."""
    return list(dict.fromkeys(values.tolist()))


def _floats(s: pd.Series) -> np.ndarray:
    """A (possibly nullable) column as float64, nulls as NaN."""
    return pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()


def _as_1d(values: Any, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} holds non-finite values")
    return arr


def _num(v: float, digits: int = 4) -> str:
    """An exact-looking number: integers without decimals, others with ``digits`` significant figures."""
    if v is None or pd.isna(v):
        return "n/a"
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    return f"{int(round(v)):,}" if abs(v - round(v)) < 1e-9 else f"{v:,.{digits}g}"


DEFAULT_HEIGHT = 450  # plotly's default figure height (px)
CAPTION_LINE_PX = 16  # per protocol line beyond the first (12 px text)


def _color(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _style(fig: go.Figure, title: str, protocol: str, *, x_title: str | None = None, y_title: str | None = None,
           height: int | None = None, extra_top: int = 0) -> go.Figure:
    """Shared look: title + protocol subtitle, white template, compact margins."""
    protocol = "" if protocol is None else str(protocol)
    lines = textwrap.wrap(protocol, 95) or [""]  # fits a half-width figure
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=html.escape(title, quote=False), x=0.01, xanchor="left", font=dict(size=17),
                   subtitle=dict(text="<br>".join(html.escape(li, quote=False) for li in lines),
                                 font=dict(size=12, color="#555555"))),
        margin=dict(l=60, r=20, t=78 + CAPTION_LINE_PX * (len(lines) - 1) + extra_top, b=50),
        font=dict(size=13),
        hoverlabel=dict(font_size=12, namelength=-1),
        legend=dict(font=dict(size=12)),
        meta={"protocol": protocol},
    )
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    # a long caption takes its room from the figure, not from the plot: the plot keeps the height it has
    # under a one-line caption (plotly's default 450 px), so a long axis title does not run into the caption
    fig.update_layout(height=(height or DEFAULT_HEIGHT) + CAPTION_LINE_PX * (len(lines) - 1))
    return fig


def _empty(title: str, protocol: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=15, color=GUIDE_COLOR))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title, protocol)


def _energy(values: np.ndarray, squared: bool) -> np.ndarray:
    """Cumulative energy fraction kept by the top-k directions, k = 0..len (starts at 0, ends at 1)."""
    e = np.sort(values ** 2 if squared else np.clip(values, 0, None))[::-1]
    cum = np.concatenate([[0.0], np.cumsum(e)])
    if cum[-1] <= 0:
        return np.zeros_like(cum)
    return np.minimum(cum / cum[-1], 1.0)


def _rank_for(cum: np.ndarray, fraction: float) -> int | None:
    """Smallest k with ``cum[k] >= fraction`` (as ``analysis.profile.rank_for_energy``)."""
    if cum[-1] <= 0:
        return None
    return int(np.searchsorted(cum[1:], fraction - 1e-12)) + 1


# ------------------------------------------------------------------------ 1. rank heatmap
def rank_heatmap(summary: pd.DataFrame, protocol: str, value: str = "rank95") -> go.Figure:
    """Heatmap of ``value / min(out_features, in_features)`` (fraction of full rank, 0..1).

    Rows are layers (layer 0 at the bottom), columns roles in the order they first appear;
    each cell's text is the integer rank; hover gives name, rank, full rank and break-even.
    """
    _require(summary, list(dict.fromkeys(SUMMARY_COLUMNS + [value])), "summary")
    label = VALUE_LABELS.get(value, value)
    title = f"Directions each linear needs: {label}, as a fraction of full rank"
    if summary.empty:
        return _empty(title, protocol, "no linears profiled yet")
    _unique(summary, ["layer", "role"], "summary")
    layers = sorted(summary["layer"].unique().tolist())
    roles = _ordered(summary["role"])
    li, ri = {v: i for i, v in enumerate(layers)}, {v: i for i, v in enumerate(roles)}
    z = np.full((len(layers), len(roles)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hover = np.full(z.shape, "", dtype=object)
    for row in summary.itertuples(index=False):
        i, j = li[row.layer], ri[row.role]
        full = min(int(row.out_features), int(row.in_features))
        v = float(getattr(row, value))
        if math.isnan(v):
            continue
        z[i, j] = v / full if full > 0 else np.nan
        text[i, j] = f"{int(round(v))}"
        saves = "yes" if v < row.break_even else "no"
        hover[i, j] = (f"<b>{html.escape(str(row.name))}</b><br>{value}: {_num(v)} of full rank {full:,} "
                       f"({z[i, j]:.1%})<br>break-even rank: {_num(row.break_even)} "
                       f"(low-rank at {_num(v)} saves memory: {saves})")
    fig = go.Figure(go.Heatmap(
        z=z, x=roles, y=layers, text=text, texttemplate="%{text}", hovertext=hover,
        hovertemplate="%{hovertext}<extra></extra>", hoverongaps=False, colorscale=RANK_SCALE, zmin=0, zmax=1,
        xgap=1, ygap=1, colorbar=dict(title=dict(text="fraction of<br>full rank"), tickformat=".0%", thickness=14),
    ))
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=layers)  # first layer at the bottom
    fig.update_xaxes(type="category", side="bottom")
    return _style(fig, title, protocol, x_title="Linear role (text: rank k)",
                  y_title="Layer (0 = first block, at the bottom)", height=max(320, 140 + 22 * len(layers)))


# ------------------------------------------------------------------------ 2. energy curve
def energy_curve(act_eigvals: Any, weight_sv: Any, name: str, break_even: float | None, protocol: str) -> go.Figure:
    """Cumulative energy kept by the top-k directions vs k, for the outputs (eigenvalues of the
    output covariance) and for the weights (squared singular values), both 0..1.

    Traces: activations (solid), weights (dashed). Shapes: a vertical line at ``break_even``
    (when given) and horizontal guides at 90/95/99 %. Annotations mark each curve's 95 % rank.
    """
    title = f"Energy kept by the top-k directions: {name}"
    act = _energy(_as_1d(act_eigvals, "act_eigvals"), squared=False)
    wt = _energy(_as_1d(weight_sv, "weight_sv"), squared=True)
    if len(act) <= 1 and len(wt) <= 1:
        return _empty(title, protocol, "no spectrum for this linear")
    fig = go.Figure()
    curves = [("activations", "Activations (output covariance eigenvalues)", act, ACT_COLOR, "solid"),
              ("weights", "Weights (squared singular values)", wt, WEIGHT_COLOR, "dash")]
    for key, legend, cum, color, dash in curves:
        fig.add_trace(go.Scatter(
            x=np.arange(len(cum)), y=cum, mode="lines", name=legend, line=dict(color=color, width=2.5, dash=dash),
            hovertemplate=f"k = %{{x}}<br>%{{y:.4%}} of {key} energy kept<extra>{key}</extra>"))
    for f in (0.90, 0.95, 0.99):
        fig.add_hline(y=f, line=dict(color=GUIDE_COLOR, width=1, dash="dot"), annotation_text=f"{f:.0%}",
                      annotation_position="bottom right", annotation_font=dict(size=11, color=GUIDE_COLOR))
    if break_even is not None and math.isfinite(break_even):
        fig.add_vline(x=float(break_even), line=dict(color=REF_COLOR, width=1.5, dash="dashdot"),
                      annotation_text=f"break-even k = {_num(break_even, 5)}<br>low-rank saves memory left of here",
                      annotation_position="bottom left", annotation_font=dict(size=11),
                      annotation_bgcolor="rgba(255,255,255,0.85)")
    for i, (key, _, cum, color, _) in enumerate(curves):
        k = _rank_for(cum, 0.95)
        if k is None:
            continue
        n = len(cum) - 1
        ax = -80 if k / n > 0.6 else 60  # keep the label inside the plot
        ay = 50 + 70 * i  # one label under the other: the two 95 % points are often close
        fig.add_annotation(x=k, y=float(cum[k]), ax=ax, ay=ay, showarrow=True, arrowhead=2, arrowcolor=color,
                           text=f"{key}: 95 % at k = {k:,}<br>({k / n:.1%} of {n:,} directions)",
                           font=dict(size=12, color=color), bgcolor="rgba(255,255,255,0.85)", bordercolor=color)
    fig.update_yaxes(range=[0, 1.03], tickformat=".0%")
    fig.update_xaxes(rangemode="tozero")
    # above the break-even note (bottom) and right of the 95 % labels (left): the empty middle right
    fig.update_layout(legend=dict(x=0.99, y=0.2, xanchor="right", yanchor="bottom", bgcolor="rgba(255,255,255,0.8)"))
    return _style(fig, title, protocol, x_title="Rank k (number of directions kept)",
                  y_title="Share of energy kept (%)")


# ------------------------------------------------------------------------ 3. effective rank profile
def effective_rank_profile(summary: pd.DataFrame, protocol: str, normalise: bool = False) -> go.Figure:
    """Effective rank along depth: one line per role for activations (solid) and weights (dashed);
    ``normalise=True`` divides by full rank ``min(out_features, in_features)``.

    Trace order: all activation lines (roles in order of appearance), then all weight lines.
    """
    need = ["name", "layer", "role", "out_features", "in_features", "eff_rank_act", "eff_rank_weight"]
    _require(summary, need, "summary")
    title = "Effective rank along depth" + (" (fraction of full rank)" if normalise else "")
    if summary.empty:
        return _empty(title, protocol, "no linears profiled yet")
    _unique(summary, ["layer", "role"], "summary")
    fig = go.Figure()
    roles = _ordered(summary["role"])
    for kind, column, dash, group in (("activations", "eff_rank_act", "solid", "Activations (solid)"),
                                      ("weights", "eff_rank_weight", "dash", "Weights (dashed)")):
        for j, role in enumerate(roles):
            d = summary[summary["role"] == role].sort_values("layer")
            full = np.minimum(d["out_features"].to_numpy(), d["in_features"].to_numpy()).astype(float)
            raw = d[column].to_numpy(dtype=float)
            y = raw / full if normalise else raw
            custom = np.stack([d["name"].astype(str).to_numpy(), raw, full, raw / full], axis=1)
            fig.add_trace(go.Scatter(
                x=d["layer"], y=y, mode="lines+markers", name=role, legendgroup=kind,
                legendgrouptitle=dict(text=group), line=dict(color=_color(j), dash=dash, width=2),
                marker=dict(size=6, symbol="circle" if kind == "activations" else "diamond"), customdata=custom,
                hovertemplate=(f"<b>%{{customdata[0]}}</b><br>{kind} effective rank: %{{customdata[1]:.2f}}"
                               " (%{customdata[3]:.2%} of full rank %{customdata[2]:.0f})<extra></extra>")))
    fig.update_xaxes(dtick=1 if summary["layer"].nunique() <= 16 else None)
    fig.update_yaxes(rangemode="tozero", tickformat=".0%" if normalise else None)
    fig.update_layout(legend=dict(groupclick="toggleitem"))
    y_title = "Effective rank / full rank" if normalise else "Effective rank exp(entropy) (directions)"
    legend_rows = 2 * len(roles) + 2  # two groups of one line per role, each under its title
    return _style(fig, title, protocol, x_title="Layer (0 = first block)", y_title=y_title,
                  height=max(450, 160 + 21 * legend_rows))  # tall enough for the whole legend, no scrolling


# ------------------------------------------------------------------------ 4. spectra
def spectrum_plot(act_eigvals: Any, weight_sv: Any, name: str, protocol: str, log: bool = True) -> go.Figure:
    """Normalised spectra: output-covariance eigenvalues / largest, and squared singular values of
    the weight / largest, vs direction index (1 = strongest); log y by default (zeros are not drawn
    on a log axis)."""
    title = f"Normalised spectra (energy / largest): {name}"
    act = np.sort(np.clip(_as_1d(act_eigvals, "act_eigvals"), 0, None))[::-1]
    wt = np.sort(_as_1d(weight_sv, "weight_sv") ** 2)[::-1]
    if act.size == 0 and wt.size == 0:
        return _empty(title, protocol, "no spectrum for this linear")
    fig = go.Figure()
    for key, legend, e, color, dash in (
            ("activations", "Activations (eigenvalue / max)", act, ACT_COLOR, "solid"),
            ("weights", "Weights (σ² / max σ²)", wt, WEIGHT_COLOR, "dash")):
        top = e[0] if e.size and e[0] > 0 else 1.0
        y = e / top
        if log:
            y = np.where(y > 0, y, np.nan)
        fig.add_trace(go.Scatter(
            x=np.arange(1, e.size + 1), y=y, mode="lines", name=legend, line=dict(color=color, width=2, dash=dash),
            customdata=e, hovertemplate=(f"direction %{{x}}<br>{key}: %{{y:.4g}} of the largest"
                                         "<br>raw energy: %{customdata:.6g}<extra></extra>")))
    fig.update_yaxes(type="log" if log else "linear", exponentformat="power" if log else None)
    fig.update_layout(legend=dict(x=0.99, y=0.99, xanchor="right", yanchor="top", bgcolor="rgba(255,255,255,0.8)"))
    return _style(fig, title, protocol, x_title="Direction index i (1 = most energy)",
                  y_title="Energy / largest energy" + (" (log scale)" if log else ""))


# ------------------------------------------------------------------------ 5./6. sensitivity
def _loss_scale(d: np.ndarray, floor: float) -> np.ndarray:
    """Log-ish colour value: ``log10(1 + max(dloss, 0) / floor)``; 0 stays 0."""
    return np.log10(1.0 + np.clip(d, 0, None) / floor)


def _kinds(sens: pd.DataFrame) -> list[str]:
    present = _ordered(sens["kind"])
    return [k for k in KIND_ORDER if k in present] + [k for k in present if k not in KIND_ORDER]


def _kind_title(kind: str) -> str:
    return {"rank": "Low-rank: rank kept r", "bits": "Quantisation: bits per weight"}.get(kind, f"{kind}: setting")


def _setting(s: float) -> str:
    """A grid setting as text: ``64``, ``2.5`` (tables hold ranks and bits as floats)."""
    return f"{float(s):g}"


def sensitivity_heatmap(sens: pd.DataFrame, protocol: str, floor: float = 1e-3, quantity: str = "loss increase",
                        symbol: str = "Δloss") -> go.Figure:
    """Loss increase (or the ``quantity`` the table's ``dloss`` holds, e.g. a KL divergence,
    written ``symbol``) per linear and setting: one heatmap panel per ``kind`` (rank, then bits),
    rows = layer (0 at the bottom), columns = a two-level (role, setting) axis (roles in order of
    appearance, settings ascending). Colour = ``log10(1 + max(dloss, 0) / floor)`` on one shared scale whose
    ticks read in dloss; negative dloss shows as 0; hover gives the exact dloss."""
    _require(sens, SENSITIVITY_COLUMNS, "sens")
    title = f"Sensitivity: {quantity} when one linear is compressed"
    if sens.empty:
        return _empty(title, protocol, "no sensitivity measured yet")
    _unique(sens, ["layer", "role", "kind", "setting"], "sens")
    kinds = _kinds(sens)
    roles = _ordered(sens["role"])
    layers = sorted(sens["layer"].unique().tolist())
    li = {v: i for i, v in enumerate(layers)}
    panels = []
    for kind in kinds:
        d = sens[sens["kind"] == kind]
        cols = [(r, s) for r in roles for s in sorted(d.loc[d["role"] == r, "setting"].unique().tolist())]
        panels.append((kind, d, cols))
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[_kind_title(k) for k in kinds],
                        column_widths=[max(len(c), 1) for _, _, c in panels])
    for p, (kind, d, cols) in enumerate(panels, start=1):
        ci = {c: j for j, c in enumerate(cols)}
        z = np.full((len(layers), len(cols)), np.nan)
        hover = np.full(z.shape, "", dtype=object)
        for row in d.itertuples(index=False):
            i, j = li[row.layer], ci[(row.role, row.setting)]
            z[i, j] = _loss_scale(np.array([row.dloss], dtype=float), floor)[0]
            hover[i, j] = (f"<b>{html.escape(str(row.name))}</b><br>layer {row.layer}, {row.role}<br>"
                           f"{kind} = {_setting(row.setting)}<br>{symbol} = {float(row.dloss):.6g} nats/token")
        fig.add_trace(go.Heatmap(
            z=z, x=[[str(r) for r, _ in cols], [_setting(s) for _, s in cols]], y=layers, hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>", hoverongaps=False, coloraxis="coloraxis", xgap=1, ygap=1,
            name=kind), row=1, col=p)
        fig.update_xaxes(type="multicategory", tickfont=dict(size=10), row=1, col=p)
        fig.update_yaxes(type="category", categoryorder="array", categoryarray=layers, row=1, col=p)
    dmax = float(np.clip(sens["dloss"].to_numpy(dtype=float), 0, None).max())
    ticks = [0.0] + [floor * 10 ** e for e in range(1, 9) if floor * 10 ** e <= dmax * 1.0001]
    if len(ticks) == 1 and dmax > 0:
        ticks.append(dmax)
    fig.update_layout(coloraxis=dict(
        colorscale=LOSS_SCALE, cmin=0, cmax=max(float(_loss_scale(np.array([dmax]), floor)[0]), 1e-9),
        colorbar=dict(title=dict(text=f"{symbol}<br>(nats/token)"), thickness=14,
                      tickvals=_loss_scale(np.array(ticks), floor).tolist(), ticktext=[_num(t, 3) for t in ticks])))
    fig.update_yaxes(title_text="Layer (0 = first block, at the bottom)", row=1, col=1)
    return _style(fig, title, protocol, height=max(340, 170 + 22 * len(layers)), extra_top=22)


def sensitivity_curves(sens: pd.DataFrame, layer_or_name: int | str | Sequence[str], protocol: str,
                       quantity: str = "loss increase", symbol: str = "Δloss") -> go.Figure:
    """Loss increase (or ``quantity``, as in ``sensitivity_heatmap``) vs setting for the chosen
    linears: an ``int`` picks every linear of that layer, a ``str`` one linear by name, a list
    of ``str`` several. One panel per ``kind`` (rank, then bits), one line per (kind, name),
    colour per name."""
    _require(sens, SENSITIVITY_COLUMNS, "sens")
    if isinstance(layer_or_name, (int, np.integer)) and not isinstance(layer_or_name, bool):
        d, what = sens[sens["layer"] == layer_or_name], f"layer {layer_or_name}"
        if d.empty and not sens.empty:
            raise ValueError(f"no sensitivity rows for layer {layer_or_name}; layers: {sorted(sens['layer'].unique())}")
    else:
        names = [layer_or_name] if isinstance(layer_or_name, str) else list(layer_or_name)
        unknown = [n for n in names if n not in set(sens["name"])]
        if unknown and not sens.empty:
            raise ValueError(f"no sensitivity rows for {', '.join(map(str, unknown))}")
        d, what = sens[sens["name"].isin(names)], names[0] if len(names) == 1 else f"{len(names)} linears"
    title = f"{quantity[0].upper()}{quantity[1:]} vs compression setting: {what}"
    if d.empty:
        return _empty(title, protocol, "no sensitivity measured yet")
    _unique(d, ["name", "kind", "setting"], "sens")
    kinds = _kinds(d)
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[_kind_title(k) for k in kinds])
    names, in_legend = _ordered(d["name"]), set()
    for p, kind in enumerate(kinds, start=1):
        for j, name in enumerate(names):
            c = d[(d["kind"] == kind) & (d["name"] == name)].sort_values("setting")
            if c.empty:
                continue
            fig.add_trace(go.Scatter(
                x=c["setting"], y=c["dloss"], mode="lines+markers", name=str(name), legendgroup=str(name),
                showlegend=name not in in_legend,
                line=dict(color=_color(j), width=2), marker=dict(size=7),
                hovertemplate=(f"<b>{html.escape(str(name))}</b><br>{kind} = %{{x}}<br>"
                               f"{symbol} = %{{y:.6g}} nats/token<extra></extra>")), row=1, col=p)
            in_legend.add(name)
        fig.update_xaxes(title_text=_kind_title(kind).split(": ")[-1], row=1, col=p)
        fig.add_hline(y=0, line=dict(color=GUIDE_COLOR, width=1), row=1, col=p)
    fig.update_yaxes(title_text=f"{symbol} vs dense (nats / token)", row=1, col=1)
    return _style(fig, title, protocol, extra_top=22)


# ------------------------------------------------------------------------ 7. trade-off
def pareto_front(df: pd.DataFrame, x: str, y: str = "ppl") -> pd.DataFrame:
    """Rows of ``df`` not dominated when both ``x`` and ``y`` are to be minimised (no other row is
    <= in both and < in one), sorted by ``x`` ascending (so ``y`` strictly decreases, apart from
    exact ties, which are all kept). Rows with NaN in ``x`` or ``y`` are ignored; the index and
    all columns are kept. ``x`` may also be a ``tradeoff`` axis name ("latency_ms")."""
    if isinstance(df, pd.DataFrame) and x not in df.columns and x in X_AXES:
        x = X_AXES[x][0]
    _require(df, [x, y], "df")
    d = df.dropna(subset=[x, y])
    d = d.iloc[np.lexsort((d[y].to_numpy(dtype=float), d[x].to_numpy(dtype=float)))]
    keep, best, last = [], math.inf, None
    for pos, (xv, yv) in enumerate(zip(d[x].to_numpy(dtype=float), d[y].to_numpy(dtype=float), strict=True)):
        if yv < best or (xv, yv) == last:
            keep.append(pos)
            best, last = yv, (xv, yv)
    return d.iloc[keep]


POINT_LABEL_CHARS = 28  # a point's written label is cut to this many characters (the hover shows it whole)


def _clip(text: str, n: int = POINT_LABEL_CHARS) -> str:
    return text if len(text) <= n else text[:n - 1].rstrip() + "…"


MAX_POINT_LABELS = 10  # measured runs beyond which the trade-off plots stop writing labels by the points


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis spanning ``10**lo .. 10**hi``: powers of ten past 3 decades,
    1-2-5 steps past one, 1-2-3-5 past half a decade, finer steps (1, 1.2, 1.5, 2, 2.5, 3, 4,
    5, 6, 8) below."""
    span = hi - lo
    steps = ((1,) if span > 3 else (1, 2, 5) if span > 1 else (1, 2, 3, 5) if span > 0.5
             else (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8))
    vals = [round(k * 10.0 ** e, 12) for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for k in steps]
    return [v for v in vals if lo <= math.log10(v) <= hi]


def tradeoff(runs: pd.DataFrame, x: str = "bytes", protocol: str = "") -> go.Figure:
    """Perplexity (log y) vs ``x`` ("bytes" [drawn in MB], "latency_ms" [decode ms / token] or
    "bits_per_weight"). Trace order: per method (order of appearance) a measured trace (filled
    circles) then a predicted one (hollow); a grey "prediction → measurement" link per run_id
    having both; the measured Pareto front (step line, lower-left is better); the dense baseline
    (label "dense", black star; hollow if only predicted). Rows whose x or ppl is missing are
    left out and counted in a note; a method keeps its colour whichever ``x`` is drawn. Measured
    points are written with their run's label when it differs from the method, up to
    ``MAX_POINT_LABELS`` measured runs."""
    _require(runs, RUNS_COLUMNS, "runs")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    col, x_title, scale = X_AXES[x]
    title = {"bytes": "Quality vs size", "latency_ms": "Quality vs decode speed",
             "bits_per_weight": "Quality vs bits per weight"}[x] + ": perplexity of each run (lower-left is better)"
    ok = runs[col].notna() & runs["ppl"].notna() & (pd.to_numeric(runs["ppl"], errors="coerce") > 0)
    # predictions carry no latency (and none without sensitivities): only measured rows count as left out
    d, dropped = runs[ok].copy(), int((~ok & (runs["kind"] == "measured")).sum())
    if d.empty:
        return _empty(title, protocol, f"no run has both perplexity and {x_title[0].lower() + x_title[1:]} yet")
    d["_x"] = d[col].astype(float) * scale
    d["_hover"] = [
        (f"<b>{html.escape(str(r.label))}</b> ({html.escape(str(r.kind))})<br>run {html.escape(str(r.run_id))}, "
         f"method {html.escape(str(r.method))}<br>perplexity: {float(r.ppl):.4f}<br>size: {_num(r.bytes)} bytes "
         f"({float(r.bytes) / 1e6:,.2f} MB)<br>bits/weight: {float(r.bits_per_weight):.3f}<br>decode: "
         + ("not measured" if pd.isna(r.decode_ms_per_token) else f"{float(r.decode_ms_per_token):.3f} ms/token"))
        for r in d.itertuples(index=False)]
    is_dense = d["label"].astype(str) == "dense"
    colors = {m: _color(j) for j, m in enumerate(_ordered(runs.loc[runs["label"].astype(str) != "dense", "method"]))}
    fig = go.Figure()
    # measured points carry their run's label when it says more than the legend (label != method)
    # and there are few enough of them to read
    n_measured = int((~is_dense & (d["kind"] == "measured")).sum())
    for method in _ordered(d.loc[~is_dense, "method"]):
        for kind, symbol in (("measured", "circle"), ("predicted", "circle-open")):
            g = d[~is_dense & (d["method"] == method) & (d["kind"] == kind)]
            if g.empty:
                continue
            # long labels (an unlabelled run is named by its whole plan) are cut; the hover has them whole
            text = [_clip(str(lb)) if str(lb) != str(method) else "" for lb in g["label"]]
            labelled = kind == "measured" and n_measured <= MAX_POINT_LABELS and any(text)
            right = float(d["_x"].max())  # labels of points near the right edge go to their left
            where = ["middle left" if xv > 0.75 * right else "middle right" for xv in g["_x"]]
            fig.add_trace(go.Scatter(
                x=g["_x"], y=g["ppl"], mode="markers+text" if labelled else "markers", name=f"{method} ({kind})",
                legendgroup=str(method), text=text if labelled else None, textposition=where,
                textfont=dict(size=11, color="#333333"),
                marker=dict(symbol=symbol, size=11, color=colors[method], line=dict(width=2, color=colors[method])),
                hovertext=g["_hover"], hovertemplate="%{hovertext}<extra></extra>"))
    lx, ly = [], []
    for _, g in d.groupby("run_id", sort=False):
        pred, meas = g[g["kind"] == "predicted"], g[g["kind"] == "measured"]
        if len(pred) and len(meas):
            lx += [pred["_x"].iloc[0], meas["_x"].iloc[0], None]
            ly += [pred["ppl"].iloc[0], meas["ppl"].iloc[0], None]
    if lx:
        fig.add_trace(go.Scatter(x=lx, y=ly, mode="lines", name="prediction → measurement", hoverinfo="skip",
                                 line=dict(color="#AAAAAA", width=1.2, dash="dot")))
    front = pareto_front(d[d["kind"] == "measured"], "_x", "ppl")
    if len(front):
        fig.add_trace(go.Scatter(
            x=front["_x"], y=front["ppl"], mode="lines", line_shape="hv", name="Pareto front (measured)",
            line=dict(color="#444444", width=1.5), hovertext=front["_hover"],
            hovertemplate="Pareto-optimal<br>%{hovertext}<extra></extra>"))
    dense = d[is_dense]
    if len(dense):
        fig.add_trace(go.Scatter(
            x=dense["_x"], y=dense["ppl"], mode="markers+text", name="dense baseline", text=["dense"] * len(dense),
            textposition="top center", textfont=dict(size=12),
            marker=dict(symbol=["star" if k == "measured" else "star-open" for k in dense["kind"]], size=16,
                        color=REF_COLOR, line=dict(width=1.5, color=REF_COLOR)),
            hovertext=dense["_hover"], hovertemplate="%{hovertext}<extra></extra>"))
    if dropped:
        fig.add_annotation(text=f"{dropped} row(s) without {x_title.split(' (')[0].lower()} or perplexity not shown",
                           x=1, y=0, xref="paper", yref="paper", xanchor="right", yanchor="bottom", showarrow=False,
                           font=dict(size=11, color=GUIDE_COLOR))
    # a padded log range around the points (plotly pads one point by a decade each way), with
    # a few full labels (plotly labels every digit, in a small font, which reads ambiguously)
    lo, hi = math.log10(float(d["ppl"].min())), math.log10(float(d["ppl"].max()))
    pad = max(0.08 * (hi - lo), 0.12)
    ticks = log_ticks(lo - pad, hi + pad)
    fig.update_yaxes(type="log", range=[lo - pad, hi + pad], tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_xaxes(rangemode="tozero" if x != "latency_ms" else "normal")
    return _style(fig, title, protocol, x_title=x_title, y_title="Perplexity (log scale, lower is better)")


# ------------------------------------------------------------------------ 8. budget
def budget_bars(table: pd.DataFrame, protocol: str) -> go.Figure:
    """The live budget per layer: bars of ``rank / break_even`` grouped by role (no bar = not
    factorised; above the line at 1 the factorisation costs more than the dense weight), and
    ``bits`` as diamonds on a right-hand axis aligned with the bars. Trace order: per role (in
    order of appearance) a bar trace when any rank is set, then a bits trace when any bits are set."""
    _require(table, BUDGET_COLUMNS, "table")
    title = "Budget per layer: chosen rank ÷ break-even rank (bars), bits per weight (◆)"
    if table.empty:
        return _empty(title, protocol, "no budget chosen yet")
    _unique(table, ["layer", "role"], "table")
    fig = go.Figure()
    rank_max, bits_max = 1.0, 0.0
    for j, role in enumerate(_ordered(table["role"])):
        d = table[table["role"] == role].sort_values("layer")
        rank, bits = _floats(d["rank"]), _floats(d["bits"])
        be, full = _floats(d["break_even"]), _floats(d["full_rank"])
        ratio = rank / be
        hover = [f"<b>layer {layer}, {html.escape(str(role))}</b><br>rank: "
                 + ("not factorised" if math.isnan(r) else f"{_num(r)} of full {_num(f)} ({r / f:.1%})")
                 + f"<br>break-even: {_num(b)}" + ("" if math.isnan(r) else f" (rank ÷ break-even = {r / b:.3f})")
                 + "<br>bits: " + ("not quantised" if math.isnan(q) else _num(q))
                 for layer, r, q, b, f in zip(d["layer"], rank, bits, be, full, strict=True)]
        if np.isfinite(ratio).any():
            rank_max = max(rank_max, float(np.nanmax(ratio)))
            fig.add_trace(go.Bar(
                x=d["layer"], y=ratio, name=str(role), legendgroup=str(role), offsetgroup=str(role),
                marker=dict(color=_color(j)), hovertext=hover, hovertemplate="%{hovertext}<extra></extra>"))
        if np.isfinite(bits).any():
            bits_max = max(bits_max, float(np.nanmax(bits)))
            has_bars = bool(np.isfinite(ratio).any())
            fig.add_trace(go.Scatter(  # one legend entry per role, named by the role (colour = role)
                x=d["layer"], y=bits, mode="markers", name=f"{role} bits" if has_bars else str(role),
                legendgroup=str(role), offsetgroup=str(role), yaxis="y2", showlegend=not has_bars,
                marker=dict(symbol="diamond", size=9, color=_color(j), line=dict(width=1, color="#333333")),
                hovertext=hover, hovertemplate="%{hovertext}<extra></extra>"))
    fig.add_hline(y=1, line=dict(color=REF_COLOR, width=1.2, dash="dash"),
                  annotation_text="break-even (a rank below it saves memory)", annotation_position="top left",
                  annotation_font=dict(size=11))
    notes = "colour = role; no bar = not factorised" + (", no ◆ = not quantised" if bits_max > 0 else "")
    fig.update_layout(barmode="group", scattermode="group", bargap=0.2,
                      legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"))
    fig.add_annotation(text=f"({notes})", x=0, y=-0.38, xref="paper", yref="paper", xanchor="left", yanchor="top",
                       showarrow=False, font=dict(size=11, color="#555555"))
    fig.update_yaxes(range=[0, rank_max * 1.12])
    if bits_max > 0:
        top = max(8.0, bits_max)
        fig.update_layout(yaxis2=dict(title=dict(text="Bits per weight (◆)"), overlaying="y", side="right",
                                      range=[0, top * 1.12], dtick=2 if top <= 8 else 4, tickmode="linear",
                                      showgrid=False, zeroline=False))
    lo, hi = float(table["layer"].min()), float(table["layer"].max())
    fig.update_xaxes(dtick=1 if table["layer"].nunique() <= 32 else None, range=[lo - 0.6, hi + 0.6])  # every layer
    if not fig.data:
        fig.add_annotation(text="every linear dense: pick a rank or bits", x=0.5, y=0.5, xref="paper", yref="paper",
                           showarrow=False, font=dict(size=13, color="#555555"))
    fig = _style(fig, title, protocol, x_title="Layer (0 = first block)")
    fig.update_layout(yaxis_title_text="Rank ÷ break-even", margin=dict(r=60 if bits_max > 0 else 20, b=120))
    return fig


# ------------------------------------------------------------------------ 9. export
def to_html(fig: go.Figure, toolbar: bool = True) -> str:
    """A standalone HTML page for ``fig`` with plotly.js inlined (works offline); without the
    ``toolbar`` (plotly's mode bar) for pages rendered to images."""
    return pio.to_html(fig, full_html=True, include_plotlyjs=True,
                       config={"displaylogo": False, "responsive": True, "displayModeBar": toolbar})
