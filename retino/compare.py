"""Comparing runs: curves, the best-epoch table, config diffs and seed groups, as pandas tables.

A run here is a plain mapping ``{"label": str, "config": dict, "rows": list[dict]}``: ``config`` is
the run's TrainConfig dict (``config.json["train"]``) and ``rows`` its metrics.jsonl lines. No I/O
and no Streamlit, so every number the Compare page shows is testable with hand-made rows.

The best epoch is the one with the highest validation QWK (the Kaggle metric; see ANCHORS.md: accuracy
rewards predicting grade 0 for everything), as in the trainer's own ``best.pt``; test QWK for runs
made before Retino kept a validation split.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sklearn.metrics import roc_auc_score, roc_curve

from . import calibration, metrics
from .grades import REFERABLE_GRADE
from .runs import best_row, selected_on  # noqa: F401  (the chosen epoch is the run folder's fact)
from .stats import format_interval

# column of the best-epoch table -> key of a metrics.jsonl row
TABLE_METRICS = {
    "accuracy": "test_acc",
    "qwk": "test_qwk",
    "macro_f1": "test_macro_f1",
    "balanced_acc": "test_balanced_acc",
    "ref_auc": "test_ref_auc",
    "sens_at_90spec": "test_ref_sens_at_90spec",
}
CURVE_KEYS = ("train_acc", "test_acc", "train_loss", "test_loss", "test_qwk", "test_macro_f1",
              "val_acc", "val_loss", "val_qwk", "val_macro_f1")
SEED_FREE = ("seed", "name")  # runs whose configs differ only in these form one seed group
# column of the test-results table -> key of test.json's "metrics" (the CLI's `evaluate --json`)
TEST_METRICS = {"QWK": "qwk", "accuracy": "accuracy", "macro-F1": "macro_f1", "ref. AUC": "referable_auc",
                "sensitivity": "sensitivity", "specificity": "specificity"}
BEST_MARK = " ★"  # after the best point value of a column among the runs shown
PROB_COLS = [f"p{g}" for g in range(5)]


def _number(value) -> float:
    """A metric as a float; None, missing and non-numbers become NaN."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


# ----------------------------------------------------------------------------- single runs

def pick_row(rows: Sequence[Mapping], which: str = "best") -> Mapping | None:
    """The ``"best"`` (max validation QWK, else test) or ``"last"`` epoch's row; None for a run with no epochs."""
    if which not in ("best", "last"):
        raise ValueError(f"Invalid epoch choice {which!r}. Choose best or last.")
    if not rows:
        return None
    return best_row(rows) if which == "best" else rows[-1]


def confusion_at(rows: Sequence[Mapping], which: str = "best", *, normalize: bool = False) -> np.ndarray | None:
    """The test confusion matrix (rows = true grade) at the best or last epoch, optionally row-normalised."""
    row = pick_row(rows, which)
    if row is None or not row.get("test_confusion"):
        return None
    matrix = np.asarray(row["test_confusion"], dtype=float)
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    return matrix


def majority_acc(confusion) -> float:
    """Accuracy of always predicting the most common true grade (:func:`retino.metrics.majority_baseline`
    of the true grades the confusion matrix's rows count); NaN without a matrix or images."""
    if confusion is None:
        return math.nan
    totals = np.asarray(confusion, dtype=np.int64).sum(axis=1)  # images per true grade
    if not totals.size or totals.sum() == 0:
        return math.nan
    return metrics.majority_baseline(np.repeat(np.arange(totals.size), totals))["acc"]


def run_labels(names: Sequence[str], ids: Sequence[str], configs: Sequence[Mapping]) -> list[str]:
    """Short, unique display labels for runs.

    The name the user gave, else the config's display name (``resnet18-scratch-classify-128px``)
    rather than the folder name; runs that still share a label get their start time from the
    folder name (``YYYYMMDD-HHMMSS-...``), then, if that collides too, the whole folder name.
    """
    from .config import TrainConfig
    base = [n if n and n != i or not c else TrainConfig.from_dict({**c, "name": ""}).display_name()
            for n, i, c in zip(names, ids, configs)]
    labels = list(base)
    for _ in range(2):
        counts = pd.Series(labels).value_counts()
        if (counts <= 1).all():
            break
        for k, (label, i) in enumerate(zip(list(labels), ids)):
            if counts[label] > 1:
                stamp = _STAMP.match(i)
                labels[k] = (f"{base[k]} ({stamp['mo']}-{stamp['d']} {stamp['h']}:{stamp['mi']}:{stamp['s']})"
                             if stamp and label == base[k] else f"{base[k]} [{i}]")
    return labels


_STAMP = re.compile(r"^\d{4}(?P<mo>\d\d)(?P<d>\d\d)-(?P<h>\d\d)(?P<mi>\d\d)(?P<s>\d\d)")


# ----------------------------------------------------------------------------- tables

def curves_frame(runs: Sequence[Mapping]) -> pd.DataFrame:
    """Long table of per-epoch curves: run, epoch and the CURVE_KEYS columns (NaN where missing)."""
    records = [{"run": run["label"], "epoch": int(r.get("epoch", i + 1)),
                **{k: _number(r.get(k)) for k in CURVE_KEYS}}
               for run in runs for i, r in enumerate(run["rows"])]
    return pd.DataFrame(records, columns=["run", "epoch", *CURVE_KEYS])


def best_epoch_table(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run at its best epoch: the TABLE_METRICS, the majority-grade baseline and the lift.

    Columns: run, best_epoch, epochs, accuracy, qwk, macro_f1, balanced_acc, ref_auc,
    sens_at_90spec, majority_acc (always predicting the test split's most common grade, from the
    confusion matrix's row sums) and acc_over_majority. A run with no epochs has NaNs.
    """
    records = []
    for run in runs:
        row = best_row(run["rows"]) or {}
        rec = {"run": run["label"], "best_epoch": row.get("epoch"), "epochs": len(run["rows"])}
        rec.update({col: _number(row.get(key)) for col, key in TABLE_METRICS.items()})
        rec["majority_acc"] = majority_acc(row.get("test_confusion"))
        rec["acc_over_majority"] = rec["accuracy"] - rec["majority_acc"]
        records.append(rec)
    table = pd.DataFrame(records, columns=["run", "best_epoch", "epochs", *TABLE_METRICS,
                                           "majority_acc", "acc_over_majority"])
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    return table


def _canonical(value) -> str:
    """A config value as comparable text: 0.001 equals 1e-3, lists and dicts compare by content."""
    return json.dumps(value, sort_keys=True, default=str)


def config_diff(runs: Sequence[Mapping], *, diff_only: bool = True) -> pd.DataFrame:
    """Config fields (rows) by run (columns), as text; ``diff_only`` keeps the fields that differ.

    A field one run lacks (an older Retino) shows as "(missing)" and counts as a difference. Runs
    carrying ``code`` / ``data_fingerprint`` (config.json's) get a "code commit" and a "data
    fingerprint" row (:func:`provenance`), so a diff shows when two runs ran other code or data.
    """
    configs = [{**run["config"], **provenance(run)} for run in runs]
    fields: list[str] = []
    for config in configs:
        fields += [k for k in config if k not in fields]
    missing = object()
    table = {}
    for run, config in zip(runs, configs):
        table[run["label"]] = [config.get(f, missing) for f in fields]
    keep = []
    for i, f in enumerate(fields):
        values = {_canonical(col[i]) if col[i] is not missing else "\x00missing" for col in table.values()}
        keep.append(len(values) > 1 or not diff_only)
    out = pd.DataFrame({label: ["(missing)" if v is missing else _display(v) for v in col]
                        for label, col in table.items()}, index=pd.Index(fields, name="field"))
    return out[keep]


def _display(value) -> str:
    return value if isinstance(value, str) else _canonical(value)


def seed_groups(runs: Sequence[Mapping], *, min_size: int = 2, ignore: Sequence[str] = SEED_FREE) -> pd.DataFrame:
    """Runs whose configs differ only in ``ignore`` (the seed), with mean and std of best-epoch metrics.

    One row per group of at least ``min_size`` runs: group, n, runs, seeds, then ``<metric>_mean``
    and ``<metric>_std`` for every TABLE_METRICS column and the best epoch. The std is the sample
    standard deviation (ddof=1), the usual "mean +- std over seeds"; NaN metrics are left out.
    """
    table = best_epoch_table(runs).set_index("run")
    groups: dict[str, list[Mapping]] = {}
    for run in runs:
        key = _canonical({k: v for k, v in run["config"].items() if k not in ignore})
        groups.setdefault(key, []).append(run)
    columns = ["group", "n", "runs", "seeds"] + [f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")]
    records = []
    for members in groups.values():
        if len(members) < min_size:
            continue
        labels = [m["label"] for m in members]
        rec = {"group": _group_name(members[0]["config"]), "n": len(members), "runs": ", ".join(labels),
               "seeds": ", ".join(str(m["config"].get("seed", "?")) for m in members)}
        for metric in TABLE_METRICS:
            values = table.loc[labels, metric].astype(float).dropna()
            rec[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            rec[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        records.append(rec)
    return pd.DataFrame(records, columns=columns)


def _group_name(config: Mapping) -> str:
    from .config import TrainConfig
    return TrainConfig.from_dict({**config, "name": ""}).display_name()


def mean_std_text(groups: pd.DataFrame, *, percent: Sequence[str] = ("accuracy", "macro_f1", "balanced_acc",
                                                                     "sens_at_90spec")) -> pd.DataFrame:
    """seed_groups() with each metric as one "mean ± std" text column (percentages for ``percent``)."""
    out = groups[["group", "n", "runs", "seeds"]].copy()
    for metric in TABLE_METRICS:
        scale, fmt = (100, "{:.1f}") if metric in percent else (1, "{:.3f}")

        def cell(mean, std):
            if math.isnan(mean):
                return "–"
            text = fmt.format(mean * scale)
            return text if math.isnan(std) else f"{text} ± {fmt.format(std * scale)}"
        out[metric] = [cell(m, s) for m, s in zip(groups[f"{metric}_mean"], groups[f"{metric}_std"])]
    return out


def run_table(runs: Sequence[Mapping]) -> pd.DataFrame:
    """The run picker's table, one row per run in the given order (newest first from list_runs).

    Runs may also carry id, state, tags and created (epoch seconds); columns: id, run, state, arch,
    pretrained, head, loss, image_size, epochs (done/planned), best_qwk, best_acc, tags, created.
    """
    records = []
    for run in runs:
        cfg, rows = run["config"], run["rows"]
        best = best_row(rows) or {}
        records.append({
            "id": run.get("id", run["label"]), "run": run["label"], "state": run.get("state", "unknown"),
            "arch": cfg.get("arch"), "pretrained": bool(cfg.get("pretrained") or cfg.get("weights")),
            "head": cfg.get("head"), "loss": cfg.get("loss"), "image_size": cfg.get("image_size"),
            "epochs": f"{len(rows)}/{cfg.get('epochs', '?')}", "best_qwk": _number(best.get(f"{selected_on(rows)}_qwk")),
            "best_acc": _number(best.get("test_acc")), "tags": ", ".join(run.get("tags") or []),
            "created": datetime.fromtimestamp(float(run.get("created") or 0))})  # local time, as the user reads it
    return pd.DataFrame(records, columns=["id", "run", "state", "arch", "pretrained", "head", "loss", "image_size",
                                          "epochs", "best_qwk", "best_acc", "tags", "created"])


def filter_runs(table: pd.DataFrame, *, states=(), archs=(), pretrained=(), text: str = "") -> pd.DataFrame:
    """Rows of ``run_table`` matching every given filter (an empty filter matches all), reindexed from 0."""
    keep = pd.Series(True, index=table.index)
    for column, wanted in (("state", states), ("arch", archs), ("pretrained", pretrained)):
        if len(wanted):
            keep &= table[column].isin(list(wanted))
    if text:
        keep &= (table["run"].str.contains(text, case=False, regex=False)
                 | table["tags"].str.contains(text, case=False, regex=False))
    return table[keep].reset_index(drop=True)


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
        rec["threshold"] = (f"{t:.3f}" if isinstance(t, (int, float)) else "0.5 (none chosen)") if rep else "–"
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
    # as retino.evaluate does before choosing the operating point: log-probabilities are logits up to
    # a per-row constant, which a softmax ignores
    return raw, calibration.apply_temperature(np.log(np.clip(raw, 1e-12, 1)), float(temperature))


def referable_score(part: pd.DataFrame, chosen: Mapping) -> np.ndarray:
    """P(grade >= 2) after the temperature (the score the operating point thresholds), else the raw score."""
    _, probs = calibrated_probs(part, chosen.get("temperature", 1.0))
    if probs is None:
        return part["referable_score"].to_numpy(dtype=np.float64)
    return probs[:, REFERABLE_GRADE:].sum(1)


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
    cut = 0.5 if threshold is None else float(threshold)
    sens, spec = float(np.mean(score[positive] >= cut)), float(np.mean(score[~positive] < cut))
    return {"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(positive, score)), "threshold": cut,
            "chosen_on": None if threshold is None else chosen.get("selected_on", "val"),
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
