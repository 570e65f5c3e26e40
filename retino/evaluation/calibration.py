"""Calibration and the screening operating point, fit on validation predictions (numpy + scikit-learn).

- Expected calibration error and reliability bins (Guo et al. 2017, "On Calibration of Modern
  Neural Networks", ICML, section 2: confidence = top-class probability, equal-width bins, 15 of
  them as in their tables).
- Temperature scaling (Guo et al. 2017, section 4.2): one scalar T dividing the logits, fit by
  minimising the validation negative log-likelihood. It changes no argmax, so grades, accuracy and
  QWK stay as they are; only the probabilities (and so P(grade >= 2), ECE and NLL) move.
- The operating point: the threshold on the referable score chosen on val for a target sensitivity,
  then held fixed on test (Gulshan et al. 2016, JAMA 316(22): a threshold fixed in advance).

A regression head has no class probabilities: there is nothing to scale and ECE does not apply.
For such a run store ``temperature = 1.0`` and ``ece = ece_before_temperature = None`` (JSON null,
shown as "n/a"); its operating point is a threshold on the raw score, found by the same
``operating_point``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from ..grades import GRADES, REFERABLE_GRADE as REFERABLE
from .metrics import _grades

_K = len(GRADES)
# Bounds of the temperature search: a 400-fold range around 1, far wider than a trained network's
# over- or under-confidence calls for, and narrow enough to keep exp(logits / T) finite.
T_MIN, T_MAX = 0.05, 20.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _probs_and_labels(probs, y) -> tuple[np.ndarray, np.ndarray]:
    """Validated (n, 5) probabilities whose rows sum to 1 and their grades."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != _K:
        raise ValueError(f"probs must have shape (n, {_K}), got {probs.shape}.")
    y = _grades(y, "y")
    if len(y) != len(probs):
        raise ValueError(f"y has {len(y)} grades for {len(probs)} rows of probs.")
    if not len(y):
        raise ValueError("No samples: probs and y are empty.")
    sums = probs.sum(axis=1)
    if not np.isfinite(probs).all() or (probs < 0).any() or np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError("probs must be non-negative rows summing to 1 (softmax outputs), not logits; "
                         f"row sums range {sums.min():.3g}-{sums.max():.3g}.")
    return probs, y


def reliability_bins(probs, y, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram.

    Args:
        probs: (n, 5) class probabilities.
        y: true grades.
        n_bins: equal-width bins over (0, 1]; bin m holds confidences in (m/M, (m+1)/M].

    Returns:
        One row per bin (empty bins included, with NaN confidence and accuracy): ``bin, lo, hi,
        confidence, accuracy, count``.
    """
    probs, y = _probs_and_labels(probs, y)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive whole number, got {n_bins!r}.")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    # Right-closed bins as in Guo et al.: ceil(c * M) - 1, so a confidence of exactly 1 lands in the last bin.
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lo": edges[:-1], "hi": edges[1:],
                         "confidence": mean_conf, "accuracy": accuracy, "count": count})


def expected_calibration_error(probs, y, n_bins: int = 15) -> float:
    """ECE: sum over bins of (bin share of images) x |accuracy - mean confidence| (Guo et al. 2017, section 2)."""
    bins = reliability_bins(probs, y, n_bins)
    full = bins[bins["count"] > 0]
    return float((full["count"] * (full["accuracy"] - full["confidence"]).abs()).sum() / bins["count"].sum())


# ---------------------------------------------------------------------------------------------
# temperature scaling


def _logits_and_labels(logits, y) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=float)
    if logits.ndim != 2 or logits.shape[1] != _K:
        raise ValueError(f"logits must have shape (n, {_K}), got {logits.shape}.")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite numbers.")
    y = _grades(y, "y")
    if len(y) != len(logits):
        raise ValueError(f"y has {len(y)} grades for {len(logits)} rows of logits.")
    if not len(y):
        raise ValueError("No samples: logits and y are empty.")
    return logits, y


def _check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float, np.number)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
    return float(temperature)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)  # shift for stability; the softmax is unchanged
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits, y, temperature: float = 1.0) -> float:
    """Mean NLL of the true grades under ``softmax(logits / temperature)``."""
    logits, y = _logits_and_labels(logits, y)
    temperature = _check_temperature(temperature)
    return float(-_log_softmax(logits / temperature)[np.arange(len(y)), y].mean())


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / temperature)``, shape (n, 5)."""
    logits = np.asarray(logits, dtype=float)
    if logits.ndim != 2 or logits.shape[1] != _K:
        raise ValueError(f"logits must have shape (n, {_K}), got {logits.shape}.")
    return np.exp(_log_softmax(logits / _check_temperature(temperature)))


def fit_temperature(logits, y, *, tol: float = 1e-6) -> float:
    """The temperature T in [0.05, 20] that minimises the mean NLL of ``softmax(logits / T)``.

    Fit on validation logits only. A golden-section search on log T: the NLL is convex in 1/T
    (a log-sum-exp of linear functions minus a linear one), hence unimodal in log T, so the search
    is exact up to ``tol`` in log T, deterministic and needs no gradient or extra library. A
    minimum beyond a bound returns the bound (e.g. T_MIN when val is separated perfectly by the
    argmax, where sharper is always better).
    """
    logits, y = _logits_and_labels(logits, y)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logits / math.exp(log_t))[rows, y].mean())

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    f1, f2 = nll(x1), nll(x2)
    while hi - lo > tol:
        if f1 <= f2:  # the minimum lies in [lo, x2]
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _GOLDEN * (hi - lo)
            f1 = nll(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _GOLDEN * (hi - lo)
            f2 = nll(x2)
    best = (lo + hi) / 2.0
    # The bracket never evaluates the bounds themselves: check them, so a monotone NLL returns a bound.
    candidates = [(nll(best), best), (nll(math.log(T_MIN)), math.log(T_MIN)), (nll(math.log(T_MAX)), math.log(T_MAX))]
    return float(math.exp(min(candidates)[1]))


# ---------------------------------------------------------------------------------------------
# operating point


def operating_point(ref_score_val, y_val, target_sensitivity: float = 0.90) -> dict:
    """The screening threshold on the referable score, chosen on validation predictions.

    Args:
        ref_score_val: referable score per val image: P(grade >= 2) (after temperature scaling) for
            a classify head, the raw score for a regression head.
        y_val: true grades of the val images.
        target_sensitivity: the lowest acceptable sensitivity for referable DR (grade >= 2).

    Returns:
        ``{"threshold", "target_sensitivity", "val_sensitivity", "val_specificity"}``: the highest
        threshold whose val sensitivity reaches the target (so the specificity is the highest any
        threshold meeting the target gives). An image is flagged referable when
        ``score >= threshold``, as in ``sklearn.metrics.roc_curve``; apply it unchanged to test.
    """
    y_val = _grades(y_val, "y_val")
    score = np.asarray(ref_score_val, dtype=float).reshape(-1)
    if len(score) != len(y_val):
        raise ValueError(f"ref_score_val has {len(score)} values for {len(y_val)} val grades.")
    if not np.isfinite(score).all():
        raise ValueError("ref_score_val must be finite numbers.")
    if not (isinstance(target_sensitivity, (int, float, np.number)) and 0.0 < target_sensitivity <= 1.0):
        raise ValueError(f"target_sensitivity must be in (0, 1], e.g. 0.90, got {target_sensitivity!r}.")
    positive = y_val >= REFERABLE
    if not positive.any():
        raise ValueError(f"The validation set has no referable image (grade >= {REFERABLE}): "
                         "cannot choose a threshold for a sensitivity.")
    if positive.all():
        raise ValueError(f"The validation set has no non-referable image (grade < {REFERABLE}): "
                         "cannot measure the specificity a threshold gives.")
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)  # thresholds decreasing
    # 1e-12: a sensitivity of exactly 0.9 (9 of 10 positives) must not be lost to rounding.
    i = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # first (highest) threshold reaching the target
    return {"threshold": float(thresholds[i]), "target_sensitivity": float(target_sensitivity),
            "val_sensitivity": float(tpr[i]), "val_specificity": float(1.0 - fpr[i])}
