"""Confidence intervals and paired comparisons by patient-level (cluster) bootstrap (numpy only).

Screening data hold two photos per patient (EyePACS: ``<patient>_left`` and ``_right``), and the two
eyes of one patient are far more alike than two strangers' eyes; resampling photos as if they were
independent gives intervals that are too narrow. So each resample draws *patients* with replacement
and every image weighs as many times as its patient was drawn (the cluster bootstrap: Davison &
Hinkley 1997, "Bootstrap Methods and their Application", section 3.8; Field & Welsh 2007, JRSS B 69).

Every metric is computed for all resamples at once from a (n_boot, n_images) weight matrix: a loop
over 1,000 resamples calling scikit-learn takes 2-9 s per metric on a 7,000-image split, the
vectorised path under 0.1 s (``bench/bootstrap.py``, BENCHMARKS.md). With all weights 1 each
function equals scikit-learn's (and ``retino.evaluation.metrics``) on the same images, which the tests check.

Percentile intervals throughout (Efron & Tibshirani 1993, ch. 13). A predicted grade is referable
when >= 2 and a score is referable at ``threshold`` when ``score >= threshold``, as in
``sklearn.metrics.roc_curve``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ..data.names import parse_patient_eye
from ..grades import GRADES, REFERABLE_GRADE as REFERABLE
from .metrics import _grades

_K = len(GRADES)
METRICS = ("qwk", "accuracy", "macro_f1", "referable_auc", "sensitivity", "specificity")


# ---------------------------------------------------------------------------------------------
# resampling


def _codes(groups, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Integer patient code per image and the patient ids, in order of first appearance."""
    groups = groups.reshape(-1) if isinstance(groups, np.ndarray) else np.asarray(list(groups), dtype=object)
    if n is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} patient ids for {n} images.")
    codes, uniques = pd.factorize(groups)
    if (codes < 0).any():
        missing = np.flatnonzero(codes < 0)[:5].tolist()
        raise ValueError(f"groups holds missing patient ids (None/NaN) at images {missing}.")
    return codes, np.asarray(uniques, dtype=object)


def bootstrap_weights(groups, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Image weights of ``n_boot`` patient-level bootstrap resamples.

    Args:
        groups: patient id per image; images sharing an id are resampled together.
        n_boot: number of resamples.
        seed: seed of numpy's default generator; the same seed gives the same resamples.

    Returns:
        float32 array (n_boot, n_images): how many times each image's patient was drawn. float32
        because the counts are whole numbers, exact in float32 while the weights sum to under 2**24
        (16.7 million images), and half the memory traffic of float64 in every metric below.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive whole number, got {n_boot!r}.")
    codes, uniques = _codes(groups)
    n_patients = len(uniques)
    if not n_patients:
        raise ValueError("No images: groups is empty.")
    rng = np.random.default_rng(seed)
    # Each resample draws n_patients patients with replacement; the counts per patient are one
    # multinomial(n_patients, 1/n_patients) vector. Counted with one bincount over all resamples
    # (row r's draws offset by r * n_patients): 4x faster here than Generator.multinomial, which
    # draws a binomial per patient.
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    draws += np.arange(n_boot)[:, None] * n_patients
    counts = np.bincount(draws.ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients)
    return counts.astype(np.float32)[:, codes]


# ---------------------------------------------------------------------------------------------
# weighted metrics, all resamples at once: w is (B, n) (whole-number float32 counts, or any float64
# weights); each returns float64 (B,), NaN where undefined. Sums of float32 counts are exact, and
# every product or ratio is taken in float64, so a resample's figure equals scikit-learn's on the
# sample expanded by its weights (tested).


def weighted_confusion(w: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(B, 5, 5) weighted confusion matrices, rows true grade, columns predicted."""
    onehot = np.zeros((len(y_true), _K * _K), dtype=w.dtype)
    onehot[np.arange(len(y_true)), y_true * _K + y_pred] = 1.0
    return (w @ onehot).astype(np.float64).reshape(-1, _K, _K)


def qwk_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa per confusion matrix; 0.0 where undefined, as ``metrics.quadratic_kappa``."""
    total = cm.sum(axis=(1, 2))
    expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / np.where(total > 0, total, 1)[:, None, None]
    penalty = (np.arange(_K)[:, None] - np.arange(_K)[None, :]) ** 2.0
    observed_d, expected_d = (cm * penalty).sum(axis=(1, 2)), (expected * penalty).sum(axis=(1, 2))
    ok = expected_d > 0
    return np.where(ok, 1.0 - observed_d / np.where(ok, expected_d, 1.0), 0.0)


def accuracy_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Share of weight on the diagonal."""
    return np.trace(cm, axis1=1, axis2=2) / cm.sum(axis=(1, 2))


def macro_f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over all five grades, a grade absent from truth and prediction counting 0.

    The convention of ``retino.evaluation.metrics`` (``f1_score(labels=range(5), average="macro",
    zero_division=0)``): F1 = 2TP / (2TP + FP + FN), 0 where that is 0/0.
    """
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)  # (TP + FN) + (TP + FP)
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def weighted_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC per row of ``w``: P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney).

    Written out rather than calling ``roc_auc_score`` per resample so that one sort serves every
    resample: the negatives sorted by score once, each positive's place among them found once
    (binary search, left and right for ties), then per resample a cumulative sum of the negatives'
    weights gives each positive the negative weight below it and tied with it.
    """
    neg, pos = np.flatnonzero(~positive), np.flatnonzero(positive)
    neg = neg[np.argsort(score[neg], kind="stable")]
    left = np.searchsorted(score[neg], score[pos], side="left")  # negatives strictly below
    right = np.searchsorted(score[neg], score[pos], side="right")  # negatives below or tied
    cum = np.zeros((len(w), len(neg) + 1), dtype=w.dtype)
    np.cumsum(w[:, neg], axis=1, out=cum[:, 1:])
    pos_w = w[:, pos]
    # below + tied / 2 = (below + below_or_tied) / 2
    wins = 0.5 * np.einsum("ij,ij->i", pos_w, cum[:, left] + cum[:, right], dtype=np.float64)
    pairs = pos_w.sum(axis=1, dtype=np.float64) * cum[:, -1]
    return np.divide(wins, pairs, out=np.full(len(w), np.nan), where=pairs > 0)


def weighted_rate(w: np.ndarray, among: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Weighted share of ``hit`` among the images where ``among``: sensitivity or specificity."""
    denom = (w @ among.astype(w.dtype)).astype(np.float64)
    hits = (w @ (among & hit).astype(w.dtype)).astype(np.float64)
    return np.divide(hits, denom, out=np.full(len(w), np.nan), where=denom > 0)


def metric_table(w: np.ndarray, y_true, y_pred, ref_score, threshold: Optional[float]) -> dict:
    """Every metric of ``METRICS`` for each row of ``w``: {name: (B,) array}.

    ``y_pred`` may be None (patient level: only the referable metrics); ``threshold`` None leaves out
    sensitivity and specificity.
    """
    positive = y_true >= REFERABLE
    out = {}
    if y_pred is not None:
        cm = weighted_confusion(w, y_true, y_pred)
        out.update(qwk=qwk_from_confusion(cm), accuracy=accuracy_from_confusion(cm),
                   macro_f1=macro_f1_from_confusion(cm))
    out["referable_auc"] = weighted_auc(w, positive, ref_score)
    if threshold is not None:
        flagged = ref_score >= threshold
        out["sensitivity"] = weighted_rate(w, positive, flagged)
        out["specificity"] = weighted_rate(w, ~positive, ~flagged)
    return out


# ---------------------------------------------------------------------------------------------
# intervals


def _checked(y_true, y_pred, ref_score, threshold) -> tuple:
    """Validated arrays: grades as int64, scores as finite float64, all the same length."""
    y_true = _grades(y_true, "y_true")
    if not len(y_true):
        raise ValueError("No images: y_true is empty.")
    if y_pred is not None:
        y_pred = _grades(y_pred, "y_pred")
        if len(y_pred) != len(y_true):
            raise ValueError(f"y_pred has {len(y_pred)} grades for {len(y_true)} images.")
    score = np.asarray(ref_score, dtype=float).reshape(-1)
    if len(score) != len(y_true):
        raise ValueError(f"ref_score has {len(score)} values for {len(y_true)} images.")
    if not np.isfinite(score).all():
        raise ValueError(f"ref_score must be finite, got e.g. {score[~np.isfinite(score)][:3].tolist()}.")
    _check_threshold(threshold)
    return y_true, y_pred, score


def _check_threshold(threshold) -> None:
    if threshold is not None and not (isinstance(threshold, (int, float, np.number)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number on the referable score, got {threshold!r}.")


def _summary(value: float, boot: np.ndarray, level: float) -> dict:
    """{"value", "lo", "hi", "n_boot"}: percentile interval over the resamples where the metric is defined."""
    boot = boot[np.isfinite(boot)]
    if not np.isfinite(value) or not boot.size:
        value = float(value) if np.isfinite(value) else None
        return {"value": value, "lo": None, "hi": None, "n_boot": int(boot.size)}
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(boot, [tail, 100.0 - tail])
    # A percentile interval can miss the full-sample estimate when the bootstrap distribution is
    # skewed or lumpy (a sensitivity of 1.0 on few positives; a small set's discrete kappas); the
    # tables print "value [lo-hi]", which must read sensibly, so the interval is widened to reach it.
    return {"value": float(value), "lo": float(min(lo, value)), "hi": float(max(hi, value)), "n_boot": int(boot.size)}


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}.")


def intervals(y_true, y_pred, ref_score, *, groups, threshold: Optional[float], n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict:
    """Point estimates with patient-level bootstrap percentile intervals.

    Args:
        y_true: true grades 0-4, one per image.
        y_pred: predicted grades 0-4.
        ref_score: referable score per image: P(grade >= 2) for a classify head, the raw score for
            a regression head.
        groups: patient id per image (``patient_ids(names)``); both eyes are resampled together.
        threshold: operating point on ``ref_score`` (``calibration.operating_point``); an image is
            flagged referable when ``ref_score >= threshold``. None leaves out sensitivity and
            specificity.
        n_boot, seed: number of resamples and their seed.
        level: coverage of the interval.

    Returns:
        ``{"qwk", "accuracy", "macro_f1", "referable_auc", "sensitivity", "specificity"}``, each
        ``{"value", "lo", "hi", "n_boot"}``. ``value`` is the estimate on all images (equal to
        scikit-learn's and ``retino.evaluation.metrics``'s). A resample in which a metric is undefined (no
        referable, or no non-referable, patient drawn: AUC, sensitivity, specificity) is dropped for
        that metric only; ``n_boot`` says how many resamples the interval rests on. Where ``value``
        itself is undefined, value, lo and hi are None. The interval is widened where needed so that
        ``lo <= value <= hi`` always holds.
    """
    _check_level(level)
    y_true, y_pred, score = _checked(y_true, y_pred, ref_score, threshold)
    _codes(groups, len(y_true))
    w = bootstrap_weights(groups, n_boot, seed)
    full = metric_table(np.ones((1, len(y_true))), y_true, y_pred, score, threshold)
    boot = metric_table(w, y_true, y_pred, score, threshold)
    return {name: _summary(full[name][0], boot[name], level) for name in METRICS if name in full}


def _run(run, name: str) -> tuple:
    """(y_true, y_pred, ref_score) of one run given as a mapping or a 3-tuple."""
    if isinstance(run, Mapping):
        missing = [k for k in ("y_true", "y_pred", "ref_score") if k not in run]
        if missing:
            raise ValueError(f"Run {name} lacks {', '.join(missing)}: expected keys y_true, y_pred, ref_score.")
        return run["y_true"], run["y_pred"], run["ref_score"]
    if isinstance(run, Sequence) and len(run) == 3:
        return tuple(run)
    raise ValueError(f"Run {name} must be a dict with y_true, y_pred, ref_score or a 3-tuple of them, "
                     f"got {type(run).__name__}.")


def paired_difference(a, b, *, groups, threshold_a: Optional[float], threshold_b: Optional[float],
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """B minus A on the same test images, with a paired patient-level bootstrap.

    Both runs are scored on the same resampled patients in every resample, so what the two share
    (an easy or hard draw of patients) cancels in the difference.

    Args:
        a, b: per-image ``{"y_true", "y_pred", "ref_score"}`` (or 3-tuples) for the SAME images in
            the same order; their ``y_true`` must be equal.
        groups: patient id per image.
        threshold_a, threshold_b: each run's own operating point; None for both leaves out
            sensitivity and specificity.
        n_boot, seed, level: as in ``intervals``.

    Returns:
        ``{"qwk", "accuracy", "macro_f1", "referable_auc"[, "sensitivity", "specificity"]}``, each
        ``{"value", "lo", "hi", "p_b_better", "n_boot"}``: ``value`` is B minus A on all images,
        ``p_b_better`` the share of resamples in which B beats A (ties count half). Resamples where
        either run's metric is undefined are dropped; the interval is widened to contain ``value``.
    """
    _check_level(level)
    if (threshold_a is None) != (threshold_b is None):
        raise ValueError("Give both threshold_a and threshold_b, or neither.")
    ya, pa, sa = _checked(*_run(a, "A"), threshold_a)
    yb, pb, sb = _checked(*_run(b, "B"), threshold_b)
    if len(ya) != len(yb) or not np.array_equal(ya, yb):
        raise ValueError(f"Runs A and B were not scored on the same images: {len(ya)} vs {len(yb)} images"
                         + ("" if len(ya) != len(yb) else f", labels differ at {int((ya != yb).sum())} of them") + ".")
    _codes(groups, len(ya))
    w = bootstrap_weights(groups, n_boot, seed)
    ones = np.ones((1, len(ya)))
    full_a, full_b = metric_table(ones, ya, pa, sa, threshold_a), metric_table(ones, yb, pb, sb, threshold_b)
    boot_a, boot_b = metric_table(w, ya, pa, sa, threshold_a), metric_table(w, yb, pb, sb, threshold_b)
    out = {}
    for name in METRICS:
        if name not in full_a:
            continue
        diff = boot_b[name] - boot_a[name]
        summary = _summary(full_b[name][0] - full_a[name][0], diff, level)
        valid = diff[np.isfinite(diff)]
        summary["p_b_better"] = float(np.mean(valid > 0) + 0.5 * np.mean(valid == 0)) if valid.size else None
        out[name] = summary
    return out


# ---------------------------------------------------------------------------------------------
# patients


def patient_ids(image_names: Sequence[str]) -> np.ndarray:
    """Patient id per image name (``parse_patient_eye``), ready as ``groups``."""
    return np.array([parse_patient_eye(n)[0] for n in image_names], dtype=object)


def patient_level(patients, y_true, ref_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patient referable truth and score from per-image ones.

    A patient is referable when either eye is (grade >= 2); the patient's score is the highest of
    their eyes' scores, so flagging the patient at a threshold means flagging either eye.

    Returns:
        (patient_ids, y_ref, score): ids in order of first appearance, bool truth, float score.
    """
    y_true, _, score = _checked(y_true, None, ref_score, None)
    codes, ids = _codes(patients, len(y_true))
    worst = np.zeros(len(ids), dtype=np.int64)
    np.maximum.at(worst, codes, y_true)
    top = np.full(len(ids), -np.inf)
    np.maximum.at(top, codes, score)
    return ids, worst >= REFERABLE, top


def patient_intervals(patients, y_true, ref_score, *, threshold: Optional[float], n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict:
    """Patient-level ``{"referable_auc", "sensitivity", "specificity"}`` with bootstrap intervals.

    Each patient (``patient_level``) is one unit, resampled with replacement; the dicts are as in
    ``intervals``.
    """
    _check_level(level)
    _check_threshold(threshold)
    ids, y_ref, score = patient_level(patients, y_true, ref_score)
    grades = np.where(y_ref, REFERABLE, 0)  # stands in for the worse eye's grade: only >= 2 is read
    w = bootstrap_weights(ids, n_boot, seed)
    full = metric_table(np.ones((1, len(ids))), grades, None, score, threshold)
    boot = metric_table(w, grades, None, score, threshold)
    return {name: _summary(full[name][0], boot[name], level) for name in full}


def format_interval(entry: Optional[Mapping], digits: int = 3) -> str:
    """``0.842 [0.831-0.853]`` for a table cell; ``-0.012 [-0.030 to 0.004]`` when lo is negative,
    where a hyphen would read as a minus; ``n/a`` for a missing or undefined value. A value that
    rounds to zero is written ``0.000``, never ``-0.000``."""
    if not entry or entry.get("value") is None:
        return "n/a"

    def text(v: float) -> str:
        out = f"{v:.{digits}f}"
        return out[1:] if out.startswith("-") and float(out) == 0 else out
    value = text(entry["value"])
    if entry.get("lo") is None or entry.get("hi") is None:
        return value
    lo, hi = text(entry["lo"]), text(entry["hi"])
    return f"{value} [{lo} to {hi}]" if lo.startswith("-") else f"{value} [{lo}-{hi}]"