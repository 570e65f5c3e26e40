"""Plotly figures for the dashboard: grade distributions, training curves, confusion matrices.

Figures only (no Streamlit): each builder takes plain data (a stats dict, a curves frame from
:mod:`retino.evaluation.compare`, matrices) and returns a ``go.Figure`` the page hands to ``st.plotly_chart``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..grades import GRADE_INFO, GRADES, grade_label

GRADE_LABELS = tuple(grade_label(g) for g in GRADES)
PALETTE = qualitative.Plotly + qualitative.D3[1::2] + qualitative.Dark24  # distinct first, then more
SPLIT_COLOURS = {"train": "#4C78A8", "val": "#54A24B", "test": "#F58518"}
_MARGIN = dict(l=10, r=10, t=40, b=10)
SPLIT_DASH = {"train": "dash", "val": "dot", "test": "solid"}  # one run, one colour: the split is the dash


def run_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per run, stable in the given order, so a run looks the same in every chart."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


def label_distribution(stats: Mapping, *, percent: bool = False) -> go.Figure:
    """Grouped bars of grade counts per split (``retino.data.stats`` output); hover shows both units."""
    fig = go.Figure()
    for split, s in stats["splits"].items():
        counts, shares = s["counts"], [100 * v for v in s["shares"]]
        fig.add_bar(name=f"{split} (n={s['n']:,})", x=list(GRADE_LABELS), y=shares if percent else counts,
                    text=[f"{p:.1f}%" if percent else f"{c:,}" for c, p in zip(counts, shares)],
                    textposition="outside", customdata=np.column_stack([counts, shares]),
                    marker_color=SPLIT_COLOURS.get(split),
                    hovertemplate=f"{split}<br>grade %{{x}}<br>%{{customdata[0]:,}} images"
                                  f" (%{{customdata[1]:.1f}}%)<extra></extra>")
    fig.update_layout(barmode="group", margin=_MARGIN, height=360, legend_title_text="split",
                      yaxis_title="% of split" if percent else "images", xaxis_title="grade")
    fig.update_yaxes(rangemode="tozero", automargin=True)
    return fig


def curves(frame: pd.DataFrame, keys: Sequence[str], *, title: str, yaxis: str, percent: bool = False,
           colours: Mapping[str, str] | None = None, log_y: bool | str = False) -> go.Figure:
    """Per-epoch lines of ``keys`` (columns of ``compare.curves_frame``) for every run in ``frame``.

    One colour per run; a train_* key is dashed, val_* dotted and test_* solid (as in the lab report's
    accuracy figure). The legend names the run and the split; hover shows every run at that epoch.
    ``log_y="auto"`` switches to a log axis when the values span more than 100x (a diverging loss
    would otherwise flatten every other curve).
    """
    colours = colours or run_colours(frame["run"])
    scale = 100 if percent else 1
    fig = go.Figure()
    for run, df in frame.groupby("run", sort=False):
        for key in keys:
            if df[key].isna().all():
                continue
            split = key.split("_", 1)[0]
            fig.add_scatter(x=df["epoch"], y=df[key] * scale, mode="lines+markers", legendgroup=run,
                            name=f"{run} · {split}" if len(keys) > 1 else run,
                            line=dict(color=colours.get(run), dash=SPLIT_DASH.get(split, "solid")),
                            marker=dict(size=6),
                            hovertemplate=f"{run} · {key}: %{{y:.{1 if percent else 3}f}}<extra></extra>")
    fig.update_layout(title=title, margin=_MARGIN, height=340, hovermode="x unified",
                      legend=dict(orientation="h", yanchor="top", y=-0.22, x=0, font=dict(size=11)))
    fig.update_xaxes(title="epoch", dtick=1 if frame["epoch"].max(skipna=True) <= 20 else None)
    values = frame[list(keys)].to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    if log_y == "auto":
        log_y = bool(values.size) and values.max() / values.min() > 100
    fig.update_yaxes(title=yaxis, ticksuffix="%" if percent else "", type="log" if log_y else None)
    return fig


def confusion_matrices(matrices: Mapping[str, np.ndarray], *, normalized: bool = False,
                       columns: int = 3) -> go.Figure:
    """Heatmaps side by side (rows = true grade, columns = predicted), on one shared colour scale.

    Counts share 0..the largest cell of all matrices; row-normalised ones share 0..1, so equal
    colours mean equal numbers across runs.
    """
    labels = list(matrices)
    columns = max(1, min(columns, len(labels)))
    rows = math.ceil(len(labels) / columns)
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=labels, horizontal_spacing=0.06,
                        vertical_spacing=0.12 / max(rows - 1, 1) if rows > 1 else 0.1)
    top = 1.0 if normalized else max([float(np.max(m)) for m in matrices.values()] + [1.0])
    for i, (label, matrix) in enumerate(matrices.items()):
        m = np.asarray(matrix, dtype=float)
        grades = [str(g) for g in range(m.shape[0])]
        text = [[f"{100 * v:.0f}%" if normalized else f"{int(v):,}" for v in row] for row in m]
        row, col = i // columns + 1, i % columns + 1
        fig.add_trace(go.Heatmap(
            z=m, x=grades, y=grades, text=text, texttemplate="%{text}", coloraxis="coloraxis", xgap=1, ygap=1,
            hovertemplate=f"{label}<br>true %{{y}}, predicted %{{x}}: %{{text}}<extra></extra>"), row=row, col=col)
        suffix = "" if i == 0 else str(i + 1)
        fig.update_xaxes(type="category", title_text="predicted", constrain="domain", row=row, col=col)
        fig.update_yaxes(type="category", autorange="reversed", scaleanchor=f"x{suffix}", constrain="domain",
                         title_text="true grade" if col == 1 else None, row=row, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=top,
                                     colorbar=dict(title="share" if normalized else "images",
                                                   tickformat=".0%" if normalized else None)),
                      height=max(320, 300 * rows + 40), margin=dict(l=10, r=10, t=50, b=10),
                      plot_bgcolor="rgba(0,0,0,0)")
    fig.update_annotations(font_size=12)
    return fig


def _has(rows: Sequence[Mapping], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def live_curves(rows: Sequence[Mapping], steps: Sequence[Mapping] = ()) -> go.Figure:
    """One run's curves as they grow (the Train page): accuracy, loss and QWK per epoch, and the
    per-step train loss with the learning rate.

    ``rows``: metrics.jsonl lines; each of train/val/test is drawn where the rows have it (``val_qwk``
    from runs that validate, ``test_qwk`` from every run). ``steps``: ``{step, loss, lr}`` records;
    without them the fourth panel shows each epoch's learning rate (the rows' ``lr``).
    """
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.2,
                        subplot_titles=("accuracy", "loss", "QWK", "train loss per step" if steps else "learning rate"),
                        specs=[[{}, {}], [{}, {"secondary_y": bool(steps)}]])
    epochs = [r.get("epoch") for r in rows]
    shown = set()
    for (row, col), metric in zip(((1, 1), (1, 2), (2, 1)), ("acc", "loss", "qwk")):
        for split, colour in SPLIT_COLOURS.items():
            key = f"{split}_{metric}"
            if not _has(rows, key):
                continue
            values = [r.get(key) for r in rows]
            if metric == "acc":
                values = [None if v is None else 100 * v for v in values]
            fig.add_scatter(x=epochs, y=values, mode="lines+markers", name=split, legendgroup=split,
                            showlegend=split not in shown, row=row, col=col,
                            line=dict(color=colour, dash="dash" if split == "train" else "solid"))
            shown.add(split)
    if steps:
        x = [s.get("step") for s in steps]
        fig.add_scatter(x=x, y=[s.get("loss") for s in steps], mode="lines", name="step loss",
                        line=dict(color=SPLIT_COLOURS["train"], width=1), row=2, col=2)
        fig.add_scatter(x=x, y=[s.get("lr") for s in steps], mode="lines", name="learning rate",
                        line=dict(color="#B279A2", dash="dot"), row=2, col=2, secondary_y=True)
        fig.update_xaxes(title_text="step", row=2, col=2)
        fig.update_yaxes(title_text="lr", row=2, col=2, secondary_y=True, showgrid=False, exponentformat="e")
    elif _has(rows, "lr"):
        fig.add_scatter(x=epochs, y=[r.get("lr") for r in rows], mode="lines+markers", name="learning rate",
                        line=dict(color="#B279A2"), row=2, col=2)
        fig.update_yaxes(exponentformat="e", row=2, col=2)
    fig.update_yaxes(ticksuffix="%", row=1, col=1)
    for row, col in ((1, 1), (1, 2), (2, 1)) + (() if steps else ((2, 2),)):
        fig.update_xaxes(title_text="epoch", dtick=1 if len(rows) <= 20 else None, row=row, col=col)
    fig.update_layout(height=480, margin=dict(l=10, r=10, t=30, b=10), hovermode="x unified",
                      legend=dict(orientation="h", y=1.1, x=1, xanchor="right"))
    return fig


def probabilities(probs: Sequence[float], grade: int) -> go.Figure:
    """Horizontal bars of P(grade) for one photo, the predicted grade in red (the Predict page)."""
    labels = [f"{g} · {GRADE_INFO[g]['name']}" for g in GRADES]
    colours = ["#d62728" if g == grade else "#9aa5b1" for g in GRADES]
    fig = go.Figure(go.Bar(x=list(probs), y=labels, orientation="h", marker_color=colours,
                           text=[f"{p:.1%}" for p in probs], textposition="auto"))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%", title="probability"),
                      yaxis=dict(autorange="reversed"), height=260, margin=dict(l=10, r=10, t=10, b=10))
    return fig


def score_on_thresholds(score: float, thresholds: Sequence[float]) -> go.Figure:
    """A regress head's raw score as a dot on its axis, the thresholds that cut it into grades dotted."""
    fig = go.Figure(go.Scatter(x=[score], y=[0], mode="markers+text", text=[f"{score:.2f}"],
                               textposition="top center", marker=dict(size=14, color="#d62728")))
    for t in thresholds:
        fig.add_vline(x=t, line_dash="dot", line_color="#9aa5b1")
    fig.update_layout(xaxis=dict(range=[min(-0.5, score - 0.5), max(4.5, score + 0.5)], title="raw score"),
                      yaxis=dict(visible=False), height=160, margin=dict(l=10, r=10, t=10, b=10))
    return fig


def roc_curves(rocs: Mapping[str, Mapping], *, colours: Mapping[str, str] | None = None) -> go.Figure:
    """ROC curves of referable DR, one per run (``compare.roc`` output), each run's operating point a marker.

    The marker sits at (1 - specificity, sensitivity) of the threshold chosen on val, applied to test:
    the point a screening programme would run at, not the curve's best corner.
    """
    colours = colours or run_colours(list(rocs))
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#bbbbbb", dash="dot", width=1),
                    showlegend=False, hoverinfo="skip")
    for run, r in rocs.items():
        if "error" in r:
            continue
        colour = colours.get(run)
        fig.add_scatter(x=r["fpr"], y=r["tpr"], mode="lines", name=f"{run} (AUC {r['auc']:.3f})", legendgroup=run,
                        line=dict(color=colour, shape="hv"),
                        hovertemplate=f"{run}<br>1 - specificity %{{x:.3f}}<br>sensitivity %{{y:.3f}}<extra></extra>")
        where = f"chosen on {r['chosen_on']}" if r.get("chosen_on") else "none chosen: 0.5"
        fig.add_scatter(x=[r["point"][0]], y=[r["point"][1]], mode="markers", legendgroup=run, showlegend=False,
                        name=f"{run} operating point",
                        marker=dict(color=colour, size=12, symbol="diamond", line=dict(color="black", width=1)),
                        hovertemplate=(f"{run}: operating point<br>threshold {r['threshold']:.3f} ({where})<br>"
                                       f"sensitivity {r['sensitivity']:.3f}<br>specificity {r['specificity']:.3f}"
                                       "<extra></extra>"))
    fig.update_layout(title="referable DR (grade ≥ 2), test: ◆ each run's operating point", margin=_MARGIN,
                      height=380, legend=dict(orientation="h", yanchor="top", y=-0.18, x=0, font=dict(size=11)))
    fig.update_xaxes(title="1 - specificity", range=[-0.01, 1.01], constrain="domain")
    fig.update_yaxes(title="sensitivity", range=[-0.01, 1.01], scaleanchor="x", constrain="domain")
    return fig


def reliability_diagrams(diagrams: Mapping[str, Mapping], *, colours: Mapping[str, str] | None = None,
                         columns: int = 3) -> go.Figure:
    """Reliability diagrams side by side (``compare.reliability`` output): accuracy against confidence per bin.

    Solid: after the run's temperature (what Predict shows); dashed: before. The title of each
    panel gives its ECE (15 bins, Guo et al. 2017) after and before. Empty bins are left out.
    """
    labels = list(diagrams)
    colours = colours or run_colours(labels)
    columns = max(1, min(columns, len(labels)))
    rows = math.ceil(len(labels) / columns)
    titles = [f"{label}<br>ECE {d['ece']:.3f} (before T={d['temperature']:.2f}: {d['ece_before']:.3f})"
              for label, d in diagrams.items()]
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.2 / max(rows - 1, 1) if rows > 1 else 0.1)
    for i, (label, d) in enumerate(diagrams.items()):
        row, col = i // columns + 1, i % columns + 1
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#bbbbbb", dash="dot", width=1),
                        showlegend=False, hoverinfo="skip", row=row, col=col)
        for key, dash, name in (("before", "dash", "before temperature"), ("after", "solid", "after temperature")):
            bins = d[key][d[key]["count"] > 0]
            fig.add_scatter(x=bins["confidence"], y=bins["accuracy"], mode="lines+markers", name=name,
                            legendgroup=key, showlegend=i == 0, customdata=bins["count"],
                            line=dict(color=colours.get(label) if key == "after" else "#888888", dash=dash),
                            hovertemplate=(f"{label} · {name}<br>confidence %{{x:.2f}}<br>accuracy %{{y:.2f}}"
                                           "<br>%{customdata} images<extra></extra>"), row=row, col=col)
        fig.update_xaxes(title_text="confidence", range=[0, 1], row=row, col=col)
        fig.update_yaxes(title_text="accuracy" if col == 1 else None, range=[0, 1], row=row, col=col)
    fig.update_layout(height=max(340, 320 * rows + 40), margin=dict(l=10, r=10, t=70, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.15, x=0))
    fig.update_annotations(font_size=11)
    return fig
