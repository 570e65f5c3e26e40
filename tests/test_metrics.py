"""retino.evaluation.metrics: agreement with scikit-learn, the degenerate cases, and the regression thresholds."""

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from retino.evaluation.metrics import (GRADES, apply_thresholds, class_weights, classification_metrics,
                                       fit_thresholds, majority_baseline, quadratic_kappa,
                                       referable_score_from_probs, sensitivity_at_specificity)
from retino.evaluation import metrics

KEYS = {"acc", "qwk", "macro_f1", "balanced_acc", "recall", "precision", "confusion", "n",
        "ref_sens", "ref_spec", "ref_auc", "ref_sens_at_90spec"}


def _random_case(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, n)
    # predictions near the truth, so kappa is far from 0 and every grade appears
    y_pred = np.clip(y_true + rng.integers(-1, 2, n) * (rng.random(n) < 0.4), 0, 4)
    probs = rng.dirichlet(np.ones(5), n)
    return y_true, y_pred, probs


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_agrees_with_sklearn_on_random_labels(seed):
    y_true, y_pred, probs = _random_case(seed)
    m = classification_metrics(y_true, y_pred, referable_score=referable_score_from_probs(probs))
    assert set(m) == KEYS
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"))
    assert m["acc"] == pytest.approx(np.mean(y_true == y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=list(GRADES)))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=list(GRADES)).tolist()
    assert m["ref_auc"] == pytest.approx(roc_auc_score(y_true >= 2, probs[:, 2:].sum(1)))
    assert m["n"] == len(y_true)
    json.dumps(m)  # plain Python types only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwk_penalises_true_grade_distance_when_a_grade_is_missing(seed):
    """With a grade absent, sklearn's default re-indexes the grades; ours keeps 0-4 distances."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 4], 100)
    y_pred = rng.choice([0, 1, 4], 100)
    expected = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(GRADES))
    assert quadratic_kappa(y_true, y_pred) == pytest.approx(expected)
    assert metrics._fast_qwk(y_true, y_pred) == pytest.approx(expected)


def test_all_one_grade_gives_qwk_zero_not_nan():
    y = np.zeros(20, dtype=int)
    m = classification_metrics(y, y)
    assert m["qwk"] == 0.0
    assert m["acc"] == 1.0
    assert m["ref_sens"] is None and m["ref_auc"] is None and m["ref_sens_at_90spec"] is None
    assert m["ref_spec"] == 1.0


def test_predicting_zero_everywhere_scores_the_majority_share():
    y_true = np.array([0] * 7 + [1, 2, 4])
    m = classification_metrics(y_true, np.zeros(10, dtype=int), prefix="test_")
    assert m["test_acc"] == pytest.approx(0.7)
    assert m["test_qwk"] == 0.0
    assert m["test_ref_sens"] == 0.0 and m["test_ref_spec"] == 1.0
    assert m["test_balanced_acc"] == pytest.approx(0.25)  # recall 1, 0, 0, 0 over the 4 grades present
    assert set(m) == {f"test_{k}" for k in KEYS}
    assert majority_baseline(y_true) == {"grade": 0, "acc": pytest.approx(0.7), "qwk": 0.0}


def test_per_grade_recall_precision_and_balanced_accuracy():
    y_true = [0, 0, 0, 0, 2, 2, 4, 4]
    y_pred = [0, 0, 0, 2, 2, 0, 4, 3]
    m = classification_metrics(y_true, y_pred)
    assert m["recall"] == pytest.approx([0.75, 0.0, 0.5, 0.0, 0.5])
    assert m["precision"] == pytest.approx([0.75, 0.0, 0.5, 0.0, 1.0])
    assert m["balanced_acc"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert m["ref_sens"] == pytest.approx(3 / 4)  # true referable: 2, 2, 4, 4; predicted >= 2: 2, 4, 3
    assert m["ref_spec"] == pytest.approx(3 / 4)


def test_sensitivity_at_90_specificity_by_hand():
    # 10 negatives scored 0.0..0.9; 5 positives scored 0.85, 0.95, 0.75, 0.5, 0.2.
    # Specificity >= 0.9 allows one negative above the cut: threshold 0.8 keeps negative 0.9 only,
    # and catches positives 0.85 and 0.95: sensitivity 2/5. Going lower (0.75) adds negative 0.8.
    negatives = np.arange(10) / 10
    positives = np.array([0.85, 0.95, 0.75, 0.5, 0.2])
    score = np.concatenate([negatives, positives])
    positive = np.r_[np.zeros(10, bool), np.ones(5, bool)]
    assert sensitivity_at_specificity(positive, score, 0.9) == pytest.approx(0.4)
    y_true = np.where(positive, 3, 0)
    m = classification_metrics(y_true, y_true, referable_score=score)
    assert m["ref_sens_at_90spec"] == pytest.approx(0.4)
    assert m["ref_auc"] == pytest.approx(roc_auc_score(positive, score))


def test_referable_score_from_probs():
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(referable_score_from_probs(probs), [0.3, 1.0])
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        referable_score_from_probs(np.ones((2, 3)))


def test_input_validation_names_the_problem():
    with pytest.raises(ValueError, match="differ in length"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match=r"grades 0-4, got \[7\]"):
        classification_metrics([0, 7], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])


def test_class_weights_for_known_counts():
    counts = [60, 20, 10, 10, 0]  # N = 100, K = 5
    assert class_weights(counts, "none") == [1.0] * 5
    assert class_weights(counts, "lab") == pytest.approx([0.4, 0.8, 0.9, 0.9, 1.0])
    assert class_weights(counts, "inverse") == pytest.approx([100 / 300, 1.0, 2.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="Choose one of: none, lab, inverse"):
        class_weights(counts, "sqrt")


def test_apply_thresholds_at_boundaries():
    scores = [-1.0, 0.49, 0.5, 1.5, 2.4999, 2.5, 3.5, 9.0]
    assert apply_thresholds(scores).tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    assert apply_thresholds([1.0, 2.0], [0.5, 1.0, 1.0, 3.0]).tolist() == [3, 3]
    with pytest.raises(ValueError, match="non-decreasing"):
        apply_thresholds([1.0], [2.5, 0.5, 1.5, 3.5])


def test_fit_thresholds_improves_qwk_on_biased_scores():
    """A regressor that shrinks towards 0 (score = 0.6 * grade + noise) is cut badly at x.5."""
    rng = np.random.default_rng(0)
    y = rng.choice(5, 600, p=[0.5, 0.15, 0.2, 0.08, 0.07])
    scores = 0.6 * y + rng.normal(0, 0.25, len(y))
    default = quadratic_kappa(y, apply_thresholds(scores))
    fitted = fit_thresholds(scores, y)
    tuned = quadratic_kappa(y, apply_thresholds(scores, fitted))
    assert tuned > default + 0.05
    assert fitted == sorted(fitted) and len(fitted) == 4
    assert all(type(t) is float for t in fitted)
    # the fitted cut-offs sit near the midpoints 0.3, 0.9, 1.5, 2.1 of the shrunk grade means
    np.testing.assert_allclose(fitted, [0.3, 0.9, 1.5, 2.1], atol=0.2)


def test_fit_thresholds_keeps_init_when_nothing_to_gain():
    y = np.zeros(10, dtype=int)
    assert fit_thresholds(np.zeros(10), y) == [0.5, 1.5, 2.5, 3.5]
