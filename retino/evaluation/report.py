"""A run's evaluation computed from per-image outputs: the tables and reports, no model and no data loading.

At the end of training, :func:`write_evaluation` saves the chosen (best val QWK) checkpoint's outputs
on val and test as ``predictions.csv`` and, from them,
- everything chosen on **val**: the temperature (Guo et al. 2017) and the referable-DR operating
  point for a target sensitivity, in ``evaluation.json``, which ``predict`` applies;
- the **test** report, once, with 95% patient-level bootstrap intervals, in ``test.json``.
The verbs that read these (and run a model for older runs) are in :mod:`retino.evaluation.evaluate`.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from . import calibration, metrics, stats
from .. import runs
from ..inference.choices import PROB_COLS, p_referable, referral_of
from .. import fileio

N_BOOT = 1000
BOOT_SEED = 0


# ----------------------------------------------------------------------------- predictions.csv

def prediction_table(parts: dict, *, head: str, thresholds) -> pd.DataFrame:
    """One row per image: image, patient, eye, split, label, p0..p4 (or score), grade, referable score.

    ``parts``: split name -> (frame with image/patient/eye/grade, outputs (N, 5) logits or (N, 1) scores).
    """
    tables = []
    for split, (frame, outputs) in parts.items():
        t = pd.DataFrame({"image": frame["image"].astype(str).to_numpy(), "patient": frame["patient"].astype(str),
                          "eye": frame["eye"].to_numpy(), "split": split,
                          "label": frame["grade"].to_numpy(dtype=np.int64)})
        outputs = np.asarray(outputs, dtype=np.float64)
        if head == "regress":
            t["score"] = outputs.reshape(-1)
            t["grade"] = metrics.apply_thresholds(t["score"].to_numpy(), thresholds)
            t["referable_score"] = t["score"]
        else:
            z = outputs - outputs.max(1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            for g, col in enumerate(PROB_COLS):
                t[col] = probs[:, g]
            t["grade"] = probs.argmax(1)
            t["referable_score"] = p_referable(probs)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def read_predictions(run_dir) -> pd.DataFrame:
    """predictions.csv of a run (RunError when missing or malformed)."""
    path = Path(run_dir) / "predictions.csv"
    try:
        table = pd.read_csv(path, dtype={"image": str, "patient": str, "eye": str})
    except FileNotFoundError:
        raise runs.RunError(f"{path}: missing") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise runs.RunError(f"{path}: not a predictions table ({e})") from None
    need = {"image", "patient", "split", "label", "grade", "referable_score"}
    if not need <= set(table.columns):
        raise runs.RunError(f"{path}: missing columns {sorted(need - set(table.columns))}")
    return table


def _probs(table: pd.DataFrame) -> np.ndarray | None:
    return table[PROB_COLS].to_numpy(dtype=np.float64) if set(PROB_COLS) <= set(table.columns) else None


# ----------------------------------------------------------------------------- chosen on val

def choose_on(table: pd.DataFrame, split: str, *, head: str, target_sensitivity: float) -> dict:
    """Temperature and operating point fit on ``split``'s predictions (val; test only for older runs)."""
    part = table[table["split"] == split]
    y = part["label"].to_numpy(dtype=np.int64)
    chosen = {"selected_on": split, "temperature": 1.0}
    probs = _probs(part)
    if head != "regress" and probs is not None:
        chosen["temperature"] = float(calibration.fit_temperature(np.log(np.clip(probs, 1e-12, 1)), y))
    ref = _calibrated_referable(part, chosen["temperature"])
    try:
        chosen["operating_point"] = calibration.operating_point(ref, y, target_sensitivity)
    except ValueError as e:  # val without referable or non-referable images
        chosen["operating_point"] = {"threshold": None, "target_sensitivity": target_sensitivity, "error": str(e)}
    return chosen


def _calibrated_probs(part: pd.DataFrame, temperature: float) -> np.ndarray | None:
    probs = _probs(part)
    if probs is None:
        return None
    return calibration.apply_temperature(np.log(np.clip(probs, 1e-12, 1)), temperature)


def _calibrated_referable(part: pd.DataFrame, temperature: float) -> np.ndarray:
    probs = _calibrated_probs(part, temperature)
    if probs is None:
        return part["referable_score"].to_numpy(dtype=np.float64)
    return p_referable(probs)


def head_of(table: pd.DataFrame, chosen: dict | None = None) -> str:
    """The run's head: as evaluation.json says, else from the table's columns (probabilities or a score)."""
    return (chosen or {}).get("head") or ("classify" if set(PROB_COLS) <= set(table.columns) else "regress")


def add_referable(table: pd.DataFrame, chosen: dict, thresholds=None) -> pd.DataFrame:
    """``referable`` per image at the run's rule (:func:`retino.inference.choices.referral_of`), the answer every door gives."""
    cut, _ = referral_of(chosen, head_of(table, chosen), thresholds)
    table = table.copy()
    table["referable"] = _calibrated_referable(table, chosen.get("temperature", 1.0)) >= cut
    return table


# ----------------------------------------------------------------------------- the report

def report(table: pd.DataFrame, chosen: dict, *, split: str = "test", epoch: int | None = None,
           n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """Metrics of one split with 95% patient-level bootstrap intervals, at the operating point chosen on val."""
    part = table[table["split"] == split]
    if part.empty:
        raise runs.RunError(f"no {split} predictions to evaluate")
    y, pred = part["label"].to_numpy(dtype=np.int64), part["grade"].to_numpy(dtype=np.int64)
    ref = _calibrated_referable(part, chosen["temperature"])
    op = chosen.get("operating_point") or {}
    threshold = op.get("threshold")
    groups = part["patient"].to_numpy()
    cut, rule = referral_of(chosen, head_of(part, chosen))
    ivs = stats.intervals(y, pred, ref, groups=groups, threshold=cut, n_boot=n_boot, seed=seed)
    patient = stats.patient_intervals(groups, y, ref, threshold=cut, n_boot=n_boot, seed=seed)
    probs_raw, probs_cal = _probs(part), _calibrated_probs(part, chosen["temperature"])
    calib = {"temperature": chosen["temperature"], "ece": None, "ece_before_temperature": None}
    if probs_raw is not None:
        calib["ece_before_temperature"] = calibration.expected_calibration_error(probs_raw, y)
        calib["ece"] = calibration.expected_calibration_error(probs_cal, y)
    per_grade = metrics.classification_metrics(y, pred)
    return fileio.json_safe({
        "split": split, "selected_on": chosen["selected_on"], "epoch": epoch, "n_images": int(len(part)),
        "n_patients": int(len(np.unique(groups))), "metrics": ivs,
        "referral": {"threshold": cut, "rule": rule},
        "operating_point": {"threshold": threshold, "target_sensitivity": op.get("target_sensitivity"),
                            "val_sensitivity": op.get("val_sensitivity"),
                            "val_specificity": op.get("val_specificity")},
        "patient": patient, "calibration": calib,
        "per_grade_recall": per_grade["recall"], "confusion": per_grade["confusion"],
        "majority_baseline": metrics.majority_baseline(y), "n_boot": n_boot})


def write_evaluation(run_dir, parts: dict, *, head: str, thresholds, epoch: int, target_sensitivity: float) -> dict:
    """The end of a run: predictions.csv, evaluation.json (chosen on val) and test.json (reported once)."""
    run_dir = Path(run_dir)
    table = prediction_table(parts, head=head, thresholds=thresholds)
    chosen = {**choose_on(table, "val", head=head, target_sensitivity=target_sensitivity), "epoch": epoch,
              "head": head, "thresholds": [float(t) for t in thresholds]}
    table = add_referable(table, chosen)
    _write_csv(run_dir / "predictions.csv", table)
    fileio.write_json(run_dir / "evaluation.json", chosen)
    test = report(table, chosen, split="test", epoch=epoch)
    fileio.write_json(run_dir / "test.json", test)
    return test


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6g")
    fileio.write_atomic(path, buf.getvalue().encode())
