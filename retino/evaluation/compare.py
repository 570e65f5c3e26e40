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


from . import metrics
from .results import provenance
from ..runs import best_row, selected_on

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
    """Accuracy of always predicting the most common true grade (:func:`retino.evaluation.metrics.majority_baseline`
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
    from ..config import TrainConfig
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
    from ..config import TrainConfig
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
