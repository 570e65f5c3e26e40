"""Grading metrics as plain functions returning JSON-ready dicts (numpy and scikit-learn, no torch).

Accuracy alone flatters a model on EyePACS, where always answering grade 0 scores 73.5%; the field
reports quadratic weighted kappa (the Kaggle 2015 metric) and, for screening, referable-DR
(grade >= 2) AUC and sensitivity at a fixed specificity (see /work/shared/ANCHORS.md).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from ..config import CLASS_WEIGHTS
from ..grades import DEFAULT_THRESHOLDS, GRADES, REFERABLE_GRADE

_TARGET_SPEC = 0.90


def _grades(values, name: str) -> np.ndarray:
    """``values`` as a 1-D int array, checked to hold only grades 0-4."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}.")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold whole grades 0-4, got e.g. {arr[np.mod(arr, 1) != 0][:3].tolist()}.")
        arr = arr.astype(np.int64)
    bad = arr[(arr < GRADES[0]) | (arr > GRADES[-1])]
    if bad.size:
        raise ValueError(f"{name} must hold grades 0-4, got {sorted(set(bad.tolist()))[:5]}.")
    return arr.astype(np.int64)


def quadratic_kappa(y_true, y_pred) -> float:
    """Quadratic weighted kappa over grades 0-4; 0.0 where undefined (one grade everywhere).

    Equals ``cohen_kappa_score(..., weights="quadratic", labels=GRADES)``. Passing the labels makes
    the penalty grow with the true grade distance even when a grade is absent from both lists
    (sklearn's default re-indexes the grades present, so {0, 1, 4} would be scored as {0, 1, 2});
    when every grade occurs both agree. The Kaggle reference implementation spans min..max grade,
    which gives the same numbers.
    """
    # scikit-learn (2 s to import) inside the functions that score: grading a photo needs
    # apply_thresholds from here, never a metric
    from sklearn.metrics import cohen_kappa_score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns (and returns NaN) when kappa is undefined
        kappa = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(GRADES))
    return float(kappa) if np.isfinite(kappa) else 0.0


def _referable_metrics(y_true: np.ndarray, y_pred: np.ndarray, score: Optional[np.ndarray]) -> dict:
    """Referable-DR (grade >= 2) sensitivity/specificity of hard predictions, AUC and sens at 90% spec."""
    ref_true, ref_pred = y_true >= REFERABLE_GRADE, y_pred >= REFERABLE_GRADE
    n_pos, n_neg = int(ref_true.sum()), int((~ref_true).sum())
    out = {
        "ref_sens": float((ref_pred & ref_true).sum() / n_pos) if n_pos else None,
        "ref_spec": float((~ref_pred & ~ref_true).sum() / n_neg) if n_neg else None,
        "ref_auc": None,
        "ref_sens_at_90spec": None,
    }
    if score is None or not n_pos or not n_neg:
        return out
    from sklearn.metrics import roc_auc_score
    out["ref_auc"] = float(roc_auc_score(ref_true, score))
    out["ref_sens_at_90spec"] = sensitivity_at_specificity(ref_true, score, _TARGET_SPEC)
    return out


def sensitivity_at_specificity(positive, score, specificity: float = _TARGET_SPEC) -> float:
    """Highest sensitivity over score thresholds whose specificity is at least ``specificity``."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(np.asarray(positive, dtype=bool), np.asarray(score, dtype=float), drop_intermediate=False)
    # 1e-12: a specificity of exactly 0.9 (e.g. 9 of 10 negatives) must not be lost to rounding.
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max())  # roc_curve starts at (0, 0), so ok is never empty


def classification_metrics(y_true, y_pred, *, referable_score=None, prefix: str = "") -> dict:
    """Accuracy, QWK, F1, per-grade recall/precision, confusion matrix and referable-DR figures.

    Args:
        y_true: true grades 0-4.
        y_pred: predicted grades 0-4.
        referable_score: per-image score that grows with P(grade >= 2), e.g.
            ``referable_score_from_probs(probs)`` or a regression output; enables ``ref_auc`` and
            ``ref_sens_at_90spec`` (None without it, or when y_true holds one referable class only).
        prefix: prepended to every key, e.g. "test_".

    Returns:
        Plain Python floats, ints, lists and None: ``acc, qwk, macro_f1, balanced_acc, recall,
        precision, confusion, n, ref_sens, ref_spec, ref_auc, ref_sens_at_90spec``. ``macro_f1``
        averages all five grades, so a grade missing from both lists counts as F1 0.
        ``balanced_acc`` averages recall over the grades present in y_true only.
    """
    y_true, y_pred = _grades(y_true, "y_true"), _grades(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}.")
    if not len(y_true):
        raise ValueError("No samples: y_true and y_pred are empty.")
    score = None
    if referable_score is not None:
        score = np.asarray(referable_score, dtype=float).reshape(-1)
        if len(score) != len(y_true):
            raise ValueError(f"referable_score has {len(score)} values for {len(y_true)} samples.")

    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
    labels = list(GRADES)
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    confusion = confusion_matrix(y_true, y_pred, labels=labels)  # rows: true grade, columns: predicted
    present = confusion.sum(axis=1) > 0
    out = {
        "acc": float(np.mean(y_true == y_pred)),
        "qwk": quadratic_kappa(y_true, y_pred),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "balanced_acc": float(np.mean(np.diag(confusion)[present] / confusion.sum(axis=1)[present])),
        "recall": [float(v) for v in recall],
        "precision": [float(v) for v in precision],
        "confusion": [[int(v) for v in row] for row in confusion],
        "n": int(len(y_true)),
        **_referable_metrics(y_true, y_pred, score),
    }
    return {f"{prefix}{k}": v for k, v in out.items()}


def referable_score_from_probs(probs) -> np.ndarray:
    """P(grade >= 2) from (N, 5) class probabilities. A regression model's raw score serves as is."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(GRADES):
        raise ValueError(f"probs must have shape (N, {len(GRADES)}), got {probs.shape}.")
    from ..inference.choices import p_referable  # the one definition of the referral rule's score
    return p_referable(probs)


def majority_baseline(y_true) -> dict:
    """Accuracy and QWK of always predicting the most frequent grade (ties: the lower grade)."""
    y_true = _grades(y_true, "y_true")
    if not len(y_true):
        raise ValueError("No samples: y_true is empty.")
    grade = int(np.bincount(y_true, minlength=len(GRADES)).argmax())
    y_pred = np.full_like(y_true, grade)
    return {"grade": grade, "acc": float(np.mean(y_true == grade)), "qwk": quadratic_kappa(y_true, y_pred)}


def class_weights(counts: Sequence[int], scheme: str) -> list[float]:
    """Per-grade loss weights from training-set grade counts.

    Schemes: "none" (all 1), "lab" (``1 - n_k / N``, the lab report's), "inverse"
    (``N / (K * n_k)``, sklearn's "balanced"). A grade with no samples gets weight 0 under
    "inverse" rather than inf: it never appears as a target, so its weight never enters the loss,
    and a finite vector stays printable and JSON-serialisable.
    """
    counts_arr = np.asarray(counts, dtype=float)
    if scheme not in CLASS_WEIGHTS:
        raise ValueError(f"Unknown class-weight scheme '{scheme}'. Choose one of: {', '.join(CLASS_WEIGHTS)}.")
    if counts_arr.ndim != 1 or not len(counts_arr) or (counts_arr < 0).any():
        raise ValueError(f"counts must be a non-empty list of non-negative counts, got {list(counts)}.")
    total, k = counts_arr.sum(), len(counts_arr)
    if total == 0:
        raise ValueError(f"counts are all zero: {list(counts)}.")
    if scheme == "none":
        weights = np.ones(k)
    elif scheme == "lab":
        weights = 1.0 - counts_arr / total
    else:
        weights = np.divide(total, k * counts_arr, out=np.zeros(k), where=counts_arr > 0)
    return [float(w) for w in weights]


# ---------------------------------------------------------------------------------------------
# regression: a score per image, cut into grades by four thresholds


def apply_thresholds(scores, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Grades 0-4 from scores: grade k for ``thresholds[k-1] <= score < thresholds[k]``."""
    thresholds = np.asarray(thresholds, dtype=float)
    if thresholds.shape != (len(GRADES) - 1,) or np.any(np.diff(thresholds) < 0):
        raise ValueError(f"thresholds must be {len(GRADES) - 1} non-decreasing numbers, got {thresholds.tolist()}.")
    return np.digitize(np.asarray(scores, dtype=float).reshape(-1), thresholds).astype(np.int64)


def _fast_qwk(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """quadratic_kappa without sklearn's overhead, for the threshold search's many calls."""
    k = len(GRADES)
    observed = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(float)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    denom = (weights * expected).sum()
    return float(1.0 - (weights * observed).sum() / denom) if denom > 0 else 0.0


def fit_thresholds(scores, y_true, init: Sequence[float] = DEFAULT_THRESHOLDS, *, max_rounds: int = 20) -> list[float]:
    """Thresholds that maximise QWK of ``apply_thresholds(scores)`` against ``y_true``.

    Coordinate search, as in the Kaggle 2015 winners' kappa-optimised cut-offs: each threshold in
    turn tries candidates between its neighbours (an even grid plus score quantiles, so dense score
    regions get fine steps) and moves only on a strict gain; rounds repeat until none moves. Fit on
    training (or validation) predictions, never on the test set.
    """
    scores = np.asarray(scores, dtype=float).reshape(-1)
    y_true = _grades(y_true, "y_true")
    if len(scores) != len(y_true):
        raise ValueError(f"scores has {len(scores)} values for {len(y_true)} labels.")
    thresholds = np.sort(np.asarray(init, dtype=float))
    apply_thresholds(scores[:0], thresholds)  # validates init
    if not len(scores):
        return [float(t) for t in thresholds]
    best = _fast_qwk(y_true, apply_thresholds(scores, thresholds))
    lowest, highest = min(scores.min(), thresholds[0]), max(scores.max(), thresholds[-1])
    for _ in range(max_rounds):
        moved = False
        for i in range(len(thresholds)):
            lo = thresholds[i - 1] if i > 0 else lowest
            hi = thresholds[i + 1] if i < len(thresholds) - 1 else highest
            inside = scores[(scores >= lo) & (scores <= hi)]
            candidates = np.linspace(lo, hi, 33)
            if inside.size:
                candidates = np.concatenate([candidates, np.quantile(inside, np.linspace(0, 1, 33))])
            for t in np.unique(candidates):
                trial = thresholds.copy()
                trial[i] = t
                kappa = _fast_qwk(y_true, apply_thresholds(scores, trial))
                if kappa > best + 1e-12:
                    best, thresholds, moved = kappa, trial, True
        if not moved:
            break
    return [float(t) for t in thresholds]
