"""A report to hand in: one self-contained HTML file of one or more runs, readable with no network.

The origin of this project is a lab report with accuracy curves and confusion matrices pasted into a
document. This file holds Retino's own figures instead, drawn by the same builders the Compare page
uses (:mod:`retino.dashboard.charts`, numbers from :mod:`retino.evaluation.compare` / :mod:`retino.evaluation.results`, Grad-CAM from
:mod:`retino.inference.explain`): the data set's grades per split, the test metrics with their intervals, B vs A
for two runs, ROC with each run's operating point, reliability, curves, confusion matrices, each
run's config, and the test photos each run gets most wrong with their Grad-CAM.

Self-contained: plotly's JavaScript is inlined once (the first figure), the other figures reuse it,
and photos are PNG data URIs; nothing is fetched when the file is opened.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import charts, runs_view as dashboard
from ..evaluation import compare, evaluate
from .. import runs
from ..fileio import write_atomic
from ..grades import grade_label
from ..evaluation import results

N_WORST = 4  # most-wrong photos per run: Grad-CAM of each runs the model once

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } .note { color: #666; font-size: 0.9em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1em; }
.grid figure { margin: 0; } .grid img { width: 100%; } figcaption { font-size: 0.85em; color: #444; }
"""


class _Page:
    """The HTML being written; plotly's JavaScript goes in with the first figure only."""

    def __init__(self):
        self.parts: list[str] = []
        self.js_done = False

    def add(self, text: str) -> None:
        self.parts.append(text)

    def heading(self, text: str, level: int = 2) -> None:
        self.add(f"<h{level}>{html.escape(text, quote=False)}</h{level}>")

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{html.escape(text, quote=False)}</p>')

    def table(self, frame: pd.DataFrame, *, index: bool = False) -> None:
        self.add(frame.to_html(index=index, border=0, na_rep="–", escape=True))

    def figure(self, fig) -> None:
        self.add(fig.to_html(full_html=False, include_plotlyjs=not self.js_done, config={"displaylogo": False}))
        self.js_done = True

    def html(self, title: str) -> str:
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{_CSS}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n")


def png_data_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) uint8 image as a PNG data URI, so the report needs no files beside it."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _records(run_dirs: Sequence) -> list[dict]:
    """Each run as the Compare page's mapping, plus its test report and saved evaluation."""
    infos = []
    for d in run_dirs:
        path = Path(d)
        if not (path / "config.json").is_file():
            raise runs.RunError(f"{d}: not a Retino run folder (no config.json); expected a folder made by "
                                f"`python -m retino train`")
        infos.append(runs.load_run(path))
    labels = compare.run_labels([r.name for r in infos], [r.id for r in infos],
                                [r.config.get("train", {}) for r in infos])
    records = []
    for r, label in zip(infos, labels):
        records.append({"label": label, "id": r.id, "path": r.path, "state": r.state,
                        "config": r.config.get("train", {}),
                        "full_config": r.config, "rows": runs.read_metrics(r.path),
                        "dataset": results.dataset_label(r.config), "code": r.config.get("code"),
                        "data_fingerprint": r.config.get("data_fingerprint"),
                        "report": dashboard.read_test_report(r.path), "evaluated": dashboard.read_evaluation(r.path)})
    return records


def _dataset(page: _Page, records: list[dict]) -> None:
    from ..data import DatasetError, read_dataset, stats
    page.heading("Data set: grades per split")
    seen = set()
    for r in records:
        ds_info = r["full_config"].get("dataset") or {}
        path = ds_info.get("path") or r["config"].get("data")
        if path in seen:
            continue
        seen.add(path)
        split = ds_info.get("split", "?")
        if isinstance(split, dict):  # how the splits were made, without the bookkeeping
            split = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in split.items()
                              if k in ("method", "val_method", "val_fraction", "patients"))
        page.add(f"<p><b>{html.escape(str(path))}</b> ({html.escape(str(ds_info.get('layout', '?')))} layout; "
                 f"split: {html.escape(str(split))})</p>")
        try:
            report = stats(read_dataset(path, val_fraction=float(r["config"].get("val_fraction") or 0.1)))
        except (DatasetError, OSError, TypeError) as e:
            sizes = ds_info.get("sizes") or {}
            page.note(f"The data set can no longer be read here ({e}); the sizes the run recorded: "
                      + ", ".join(f"{k} {v}" for k, v in sizes.items()))
            continue
        page.figure(charts.label_distribution(report))
        page.table(pd.DataFrame([{"split": split, "images": s["n"], **dict(zip(charts.GRADE_LABELS, s["counts"]))}
                                 for split, s in report["splits"].items()]))


def _test_results(page: _Page, records: list[dict]) -> None:
    page.heading("On the test split, everything chosen on val")
    page.table(results.test_results_table(records))
    page.note("95% patient-level bootstrap intervals (both eyes resampled together); the star marks the best "
              "point value among these runs. Sensitivity and specificity of referable DR (grade >= 2) at each "
              "run's threshold, chosen on val for its target sensitivity and applied once to test.")
    for warning in results.provenance_differences(records):
        page.note(warning)


def _versus(page: _Page, a: dict, b: dict) -> None:
    page.heading(f"B vs A: B = {b['label']}, A = {a['label']}")
    if a["evaluated"] is None or b["evaluated"] is None:
        page.note("Both runs need a test evaluation (predictions.csv) to be compared.")
        return
    try:
        result = evaluate.compare_runs(a["path"], b["path"])
    except (runs.RunError, ValueError) as e:
        page.note(f"A and B cannot be compared: {e}")
        return
    page.add(f"<p>{html.escape(results.versus_sentence(result))}</p>")
    page.table(results.versus_table(result))


def _roc_and_reliability(page: _Page, records: list[dict], colours: dict) -> None:
    tables = {r["label"]: r["evaluated"] for r in records if r["evaluated"] is not None}
    if not tables:
        return
    page.heading("Referable DR and calibration (test split)")
    rocs = {label: results.roc(t, c) for label, (t, c) in tables.items()}
    page.figure(charts.roc_curves(rocs, colours=colours))
    for label, r in rocs.items():
        if "error" in r:
            page.note(f"{label}: {r['error']}.")
        else:
            where = f"chosen on {r['chosen_on']}" if r["chosen_on"] else "none could be chosen: 0.5"
            page.note(f"{label}: operating point (diamond) at threshold {r['threshold']:.3f} ({where}): sensitivity "
                      f"{r['sensitivity']:.1%}, specificity {r['specificity']:.1%}; AUC {r['auc']:.3f}.")
    diagrams = {k: d for k, d in ((label, results.reliability(t, c)) for label, (t, c) in tables.items()) if d}
    if diagrams:
        page.figure(charts.reliability_diagrams(diagrams, colours=colours))
        page.note("Solid: after the temperature fitted on val; dashed: before. A calibrated model lies on the "
                  "diagonal.")


def _curves_and_confusion(page: _Page, with_rows: list[dict], colours: dict) -> None:
    page.heading("Curves")
    frame = compare.curves_frame(with_rows)
    page.figure(charts.curves(frame, ["train_acc", "val_acc", "test_acc"], yaxis="accuracy", percent=True,
                              title="accuracy (train dashed, val dotted, test solid)", colours=colours))
    page.figure(charts.curves(frame, ["train_loss", "val_loss", "test_loss"], yaxis="loss", log_y="auto",
                              title="loss (train dashed, val dotted, test solid)", colours=colours))
    page.figure(charts.curves(frame, ["val_qwk", "test_qwk"], title="QWK (val dotted, test solid)", yaxis="QWK",
                              colours=colours))
    page.heading("Confusion matrices (test split, at each run's best epoch by val QWK)")
    matrices = {r["label"]: compare.confusion_at(r["rows"], "best") for r in with_rows}
    matrices = {k: m for k, m in matrices.items() if m is not None}
    if matrices:
        page.figure(charts.confusion_matrices(matrices))
        page.note("Rows: true grade; columns: predicted grade.")


def _config(page: _Page, records: list[dict]) -> None:
    page.heading("Each run's config")
    diff = compare.config_diff(records, diff_only=False)
    if not diff.empty:
        page.table(diff, index=True)
    for r in records:
        prov = {"run folder": r["id"], "state": r["state"], **results.provenance(r)}
        page.note(f"{r['label']}: " + "; ".join(f"{k} {v}" for k, v in prov.items()))


def _worst(page: _Page, records: list[dict], n: int) -> None:
    from ..data import DatasetError, ImageError
    from ..inference.explain import explain
    from ..inference.trained import load_trained
    page.heading("The test photos each run gets most wrong, with Grad-CAM")
    page.note("Largest distance between the label and the predicted grade, then the lowest probability of the "
              "true grade. Maps of the predicted grade against grade 0, over what the model saw.")
    for r in records:
        if r["evaluated"] is None:
            continue
        worst = results.worst_predictions(r["evaluated"][0], n=n)
        page.heading(r["label"], 3)
        if worst.empty:
            page.note("This run grades every test photo right.")
            continue
        try:
            files = dashboard.image_files(r["full_config"])
            trained = load_trained(r["path"])
        except (DatasetError, runs.RunError, OSError) as e:
            page.note(f"No photos: {e}")
            continue
        cells = []
        for _, w in worst.iterrows():
            p = f", P(true) {w['p_true']:.0%}" if w["p_true"] == w["p_true"] else ""
            caption = html.escape(f"{w['image']}: true {grade_label(w['label'])}, "
                                  f"predicted {grade_label(w['grade'])}{p}")
            try:
                uri = png_data_uri(explain(trained, files[w["image"]]).overlay)
                img = f'<img alt="Grad-CAM of {html.escape(str(w["image"]))}" src="{uri}">'
            except (KeyError, ImageError) as e:
                img = f'<p class="note">no photo ({html.escape(str(e))})</p>'
            cells.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
        page.add('<div class="grid">' + "".join(cells) + "</div>")


def build_report(run_dirs: Sequence, *, n_worst: int = N_WORST) -> str:
    """The report of ``run_dirs`` (in the order given; with two, A is the first and B the second) as HTML.

    Raises:
        RunError: a folder is not a run (the message names it).
    """
    if not run_dirs:
        raise runs.RunError("no runs given; expected one or more run folders")
    records = _records(run_dirs)
    colours = charts.run_colours([r["label"] for r in records])
    page = _Page()
    page.heading("Retino report", 1)
    page.note(f"Written {time.strftime('%Y-%m-%d %H:%M')} from " + ", ".join(f"{r['label']} ({r['id']})"
                                                                               for r in records))
    _dataset(page, records)
    _test_results(page, records)
    if len(records) == 2:
        _versus(page, *records)
    _roc_and_reliability(page, records, colours)
    with_rows = [r for r in records if r["rows"]]
    if with_rows:
        _curves_and_confusion(page, with_rows, colours)
    _config(page, records)
    if n_worst > 0:
        _worst(page, records, n_worst)
    return page.html("Retino report: " + ", ".join(r["label"] for r in records))


def write_report(run_dirs: Sequence, out, *, n_worst: int = N_WORST) -> Path:
    """:func:`build_report` written atomically to ``out`` (a reader never sees half a report)."""
    text = build_report(run_dirs, n_worst=n_worst)
    out = Path(out)
    if out.parent and not out.parent.is_dir():
        raise runs.RunError(f"{out}: its folder {out.parent} does not exist; expected a path in an existing folder")
    write_atomic(out, text.encode("utf-8"))
    return out
