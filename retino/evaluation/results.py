"""Test results across runs (issue 10), as pandas tables and plain dicts: intervals, best marks,
B vs A, test-set and provenance mismatches, ROC with each run's operating point, reliability, and the
photos a run gets most wrong. Read from each run's ``test.json`` / ``predictions.csv``; no I/O here
and no Streamlit, so the Compare page's numbers are testable with hand-made tables.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from . import calibration
from ..inference.choices import PROB_COLS, p_referable, referral_of
from ..grades import REFERABLE_GRADE
from ..runs import selected_on
from .stats import format_interval

# column of the test-results table -> key of test.json's "metrics" (the CLI's `evaluate --json`)
TEST_METRICS = {"QWK": "qwk", "accuracy": "accuracy", "macro-F1": "macro_f1", "ref. AUC": "referable_auc",
                "sensitivity": "sensitivity", "specificity": "specificity"}
BEST_MARK = " \u2605"  # after the best point value of a column among the runs shown


def _number(value) -> float:
    """A metric as a float; None, missing and non-numbers become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- test results (issue 10)
# A run here may also carry ``report`` (its test.json, or None before it is evaluated), ``dataset``
# (dataset_label's text), ``code`` and ``data_fingerprint`` (config.json's): the page adds them.

def dataset_label(config: Mapping) -> str:
    """``synthetic · debe0a88``: a run's data-set folder name and its labels' fingerprint, short."""
    path = (config.get("dataset") or {}).get("path") or (config.get("train") or {}).get("data") or "?"
    name = re.split(r"[\\/]", str(path).rstrip("/\\"))[-1] or str(path)
    fingerprint = config.get("data_fingerprint")
    return f"{name} · {str(fingerprint)[:8]}" if fingerprint else name


def selected_on_text(where: str) -> str:
    """What the table says about where a run's choices (epoch, thresholds, temperature) were made."""
    return "val" if where == "val" else "chosen on test (older run)"


def code_text(code) -> str:
    """``77adeb0``, ``77adeb0 + uncommitted changes``, or ``not recorded`` (config.json's ``code``)."""
    if not isinstance(code, Mapping) or not code.get("commit"):
        return "not recorded"
    return str(code["commit"])[:7] + (" + uncommitted changes" if code.get("dirty") else "")


def provenance(run: Mapping) -> dict:
    """``{"code commit", "data fingerprint"}`` as text, for the fields the run mapping carries."""
    out = {}
    if "code" in run:
        out["code commit"] = code_text(run["code"])
    if "data_fingerprint" in run:
        out["data fingerprint"] = str(run["data_fingerprint"] or "not recorded")
    return out


def provenance_differences(runs: Sequence[Mapping]) -> list[str]:
    """One warning per provenance field on which the runs differ (issue 14: other code, other labels)."""
    out = []
    for field, what in (("code commit", "code (git commit)"), ("data fingerprint", "data (labels' fingerprint)")):
        values = {run["label"]: provenance(run)[field] for run in runs if field in provenance(run)}
        if len(set(values.values())) > 1:
            out.append(f"The selected runs differ in {what}: "
                       + "; ".join(f"{label}: {v}" for label, v in values.items()) + ".")
    return out


def test_set_mismatch(tables: Mapping[str, pd.DataFrame], split: str = "test") -> str | None:
    """A warning when runs' predictions do not cover the same ``split`` images with the same labels; None if they do.

    ``tables``: run label -> its predictions.csv. Differences between such runs mix the models with
    the data, and ``compare_runs`` refuses them.
    """
    pairs = {label: set(zip(t.loc[t["split"] == split, "image"].astype(str),
                            t.loc[t["split"] == split, "label"].astype(int))) for label, t in tables.items()}
    if len({frozenset(p) for p in pairs.values()}) <= 1:
        return None
    ref = next(iter(pairs))
    ref_images = {image for image, _ in pairs[ref]}
    parts = []
    for label, p in pairs.items():
        images = {image for image, _ in p}
        text = f"{label}: {len(images)} images"
        if label != ref:
            common = images & ref_images
            relabelled = len(common) - len({i for i, _ in p & pairs[ref]})
            text += f", {len(common)} in common with {ref}" + (f" ({relabelled} with other labels)" if relabelled else "")
        parts.append(text)
    return (f"Not evaluated on the same {split} images ({'; '.join(parts)}): their differences mix the models "
            "with the data. Compare them on one data set: python -m retino compare RUN_A RUN_B --data DIR.")


def best_rows(values: pd.DataFrame, *, lower_is_better: Sequence[str] = ("ECE",)) -> dict[str, list[int]]:
    """Row positions holding each column's best value (max; min for ``lower_is_better``).

    Ties are all best; a column with fewer than two finite values, or where every run ties, has none
    (a marker there would say nothing).
    """
    out = {}
    for column in values.columns:
        v = pd.to_numeric(values[column], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(v)
        if ok.sum() < 2:
            out[column] = []
            continue
        best = np.min(v[ok]) if column in lower_is_better else np.max(v[ok])
        hits = np.flatnonzero(ok & np.isclose(v, best, rtol=0, atol=1e-12))
        out[column] = [] if len(hits) == ok.sum() else hits.tolist()
    return out


def test_results_table(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run: data set, test images, where its choices were made, and test figures as text.

    Figures are ``0.842 [0.831-0.853]`` (95% patient-level bootstrap) from the run's test report,
    chosen on val; the best point value of each column among these runs gets BEST_MARK (the lowest
    for ECE). ``threshold`` is the referable operating point sensitivity and specificity are read at.
    """
    records, values = [], []
    for run in runs:
        rep = run.get("report") or {}
        m = rep.get("metrics") or {}
        op = rep.get("operating_point") or {}
        ece = (rep.get("calibration") or {}).get("ece")
        where = rep.get("selected_on") or selected_on(run.get("rows") or [])
        rec = {"run": run["label"], "data set": run.get("dataset", "?"),
               "test images": str(rep["n_images"]) if rep else "–", "selected on": selected_on_text(where),
               "epoch": str(rep.get("epoch") if rep.get("epoch") is not None else "–")}
        for column, key in TEST_METRICS.items():
            rec[column] = format_interval(m.get(key)) if rep else "not evaluated"
        rec["ECE"] = f"{ece:.3f}" if isinstance(ece, (int, float)) else ("n/a" if rep else "not evaluated")
        t = op.get("threshold")
        default = (rep.get("referral") or {}).get("threshold")  # the run's default rule (older reports: 0.5)
        default_text = f"{default if isinstance(default, (int, float)) else 0.5:.3f} (default: none chosen)"
        rec["threshold"] = (f"{t:.3f}" if isinstance(t, (int, float)) else default_text) if rep else "–"
        records.append(rec)
        values.append({**{c: _number((m.get(k) or {}).get("value")) for c, k in TEST_METRICS.items()},
                       "ECE": _number(ece)})
    columns = ["run", "data set", "test images", "selected on", "epoch", *TEST_METRICS, "ECE", "threshold"]
    table = pd.DataFrame(records, columns=columns)
    for column, rows in best_rows(pd.DataFrame(values, columns=[*TEST_METRICS, "ECE"])).items():
        for i in rows:
            table.loc[i, column] += BEST_MARK
    return table


def versus_table(result: Mapping) -> pd.DataFrame:
    """``compare_runs`` as rows: metric, B − A with its 95% interval, p(B better), the verdict."""
    names = {key: column for column, key in TEST_METRICS.items()}
    records = []
    for key, d in (result.get("diff") or {}).items():
        p = d.get("p_b_better")
        records.append({"metric": names.get(key, key), "B − A [95% interval]": format_interval(d),
                        "p(B better)": f"{100 * p:.0f}%" if isinstance(p, (int, float)) else "n/a",
                        "verdict": (result.get("verdict") or {}).get(key, "")})
    return pd.DataFrame(records, columns=["metric", "B − A [95% interval]", "p(B better)", "verdict"])


def versus_sentence(result: Mapping, metric: str = "qwk") -> str:
    """The headline of a B vs A comparison in one plain sentence."""
    d = (result.get("diff") or {}).get(metric)
    if not d:
        return f"{metric} could not be compared on these images."
    verdict = (result.get("verdict") or {}).get(metric, "")
    p = d.get("p_b_better")
    share = f"; B scores higher in {100 * p:.0f}% of the paired patient resamples" if isinstance(p, (int, float)) else ""
    name = {k: c for c, k in TEST_METRICS.items()}.get(metric, metric)
    return (f"{name}, B − A = {format_interval(d)} on {result.get('n_images')} test images of "
            f"{result.get('n_patients')} patients{share}. {verdict[:1].upper()}{verdict[1:]}.")


# ----------------------------------------------------------------------------- from predictions.csv

def _split_part(table: pd.DataFrame, split: str) -> pd.DataFrame:
    part = table[table["split"] == split]
    if part.empty:
        raise ValueError(f"no {split} predictions")
    return part


def calibrated_probs(part: pd.DataFrame, temperature: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(probabilities as saved, after the run's temperature); (None, None) for a regress head."""
    if not set(PROB_COLS) <= set(part.columns):
        return None, None
    raw = part[PROB_COLS].to_numpy(dtype=np.float64)
    # as retino.evaluation.evaluate does before choosing the operating point: log-probabilities are logits up to
    # a per-row constant, which a softmax ignores
    return raw, calibration.apply_temperature(np.log(np.clip(raw, 1e-12, 1)), float(temperature))


def referable_score(part: pd.DataFrame, chosen: Mapping) -> np.ndarray:
    """P(grade >= 2) after the temperature (the score the operating point thresholds), else the raw score."""
    _, probs = calibrated_probs(part, chosen.get("temperature", 1.0))
    if probs is None:
        return part["referable_score"].to_numpy(dtype=np.float64)
    return p_referable(probs)


def roc(table: pd.DataFrame, chosen: Mapping, *, split: str = "test") -> dict:
    """ROC of referable DR on ``split`` and the run's operating point on it.

    Returns ``{"fpr", "tpr", "auc", "threshold", "chosen_on", "sensitivity", "specificity", "point"}``:
    the threshold chosen on val (``chosen_on`` "val"; 0.5 and None where none was chosen, as the
    test report does) applied to this split; ``point`` = (1 - specificity, sensitivity). ``{"error"}``
    when the split lacks referable or non-referable images.
    """
    part = _split_part(table, split)
    positive = part["label"].to_numpy(dtype=np.int64) >= REFERABLE_GRADE
    if positive.all() or not positive.any():
        return {"error": f"the {split} split has no {'non-' if positive.all() else ''}referable image: no ROC curve"}
    score = referable_score(part, chosen)
    fpr, tpr, _ = roc_curve(positive, score)
    threshold = (chosen.get("operating_point") or {}).get("threshold")
    head = chosen.get("head") or ("classify" if set(PROB_COLS) <= set(part.columns) else "regress")
    cut, rule = referral_of(chosen, head)
    sens, spec = float(np.mean(score[positive] >= cut)), float(np.mean(score[~positive] < cut))
    return {"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(positive, score)), "threshold": cut,
            "chosen_on": None if threshold is None else chosen.get("selected_on", "val"), "rule": rule,
            "sensitivity": sens, "specificity": spec, "point": (1.0 - spec, sens)}


def reliability(table: pd.DataFrame, chosen: Mapping, *, split: str = "test", n_bins: int = 15) -> dict | None:
    """Reliability bins and ECE on ``split``, after the run's temperature and before; None for a regress head."""
    part = _split_part(table, split)
    raw, cal = calibrated_probs(part, chosen.get("temperature", 1.0))
    if raw is None:
        return None
    y = part["label"].to_numpy(dtype=np.int64)
    raw = raw / raw.sum(1, keepdims=True)  # predictions.csv keeps 6 digits: rows sum to 1 within 1e-5
    return {"after": calibration.reliability_bins(cal, y, n_bins), "before": calibration.reliability_bins(raw, y, n_bins),
            "ece": calibration.expected_calibration_error(cal, y, n_bins),
            "ece_before": calibration.expected_calibration_error(raw, y, n_bins),
            "temperature": float(chosen.get("temperature", 1.0))}


def worst_predictions(table: pd.DataFrame, n: int = 8, *, split: str = "test") -> pd.DataFrame:
    """The ``split`` images a run gets most wrong: largest |label - grade|, then lowest P(true grade).

    A regress head has no probabilities: ties go to the score farthest from the label. Correct
    images are left out. Columns: image, patient, label, grade, distance, p_true (NaN for regress).
    """
    part = _split_part(table, split).reset_index(drop=True)
    label = part["label"].to_numpy(dtype=np.int64)
    out = part[["image", "patient", "label", "grade"]].copy()
    out["distance"] = np.abs(label - part["grade"].to_numpy(dtype=np.int64))
    if set(PROB_COLS) <= set(part.columns):
        out["p_true"] = part[PROB_COLS].to_numpy(dtype=float)[np.arange(len(part)), label]
        tie = out["p_true"]
    else:
        out["p_true"] = math.nan
        tie = -np.abs(part["score"].to_numpy(dtype=float) - label)
    order = np.lexsort((np.asarray(tie, dtype=float), -out["distance"].to_numpy()))
    out = out.iloc[order]
    return out[out["distance"] > 0].head(n).reset_index(drop=True)
