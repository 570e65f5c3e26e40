"""retino.evaluation.calibration: ECE, temperature scaling and the operating point, on cases with known answers."""

import numpy as np
import pytest

from retino.evaluation import calibration as cal


def _calibrated(n: int, seed: int = 0, spread: float = 2.0):
    """Logits and grades drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, spread, (n, 5))
    probs = cal.apply_temperature(logits, 1.0)
    # inverse-CDF sampling of one grade per row from its own probabilities
    y = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1).clip(0, 4)
    return logits, probs, y


# ---------------------------------------------------------------------------------------------
# ECE and reliability bins


def test_ece_of_calibrated_probabilities_is_near_zero_and_of_overconfident_ones_is_not():
    logits, probs, y = _calibrated(20000)
    calibrated = cal.expected_calibration_error(probs, y)
    overconfident = cal.expected_calibration_error(cal.apply_temperature(logits, 1 / 3), y)  # logits x 3
    assert calibrated < 0.02
    assert overconfident > 0.1


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins (13/15, 14/15] and (8/15, 9/15]
    probs = np.array([[0.9, 0.025, 0.025, 0.025, 0.025],
                      [0.9, 0.025, 0.025, 0.025, 0.025],
                      [0.1, 0.6, 0.1, 0.1, 0.1]])
    y = np.array([0, 3, 1])
    # |0.5 - 0.9| x 2/3 + |1 - 0.6| x 1/3
    assert cal.expected_calibration_error(probs, y) == pytest.approx(0.4 * 2 / 3 + 0.4 / 3)
    bins = cal.reliability_bins(probs, y)
    assert len(bins) == 15 and bins["count"].sum() == 3
    full = bins[bins["count"] > 0]
    assert full["bin"].tolist() == [8, 13]
    assert full["accuracy"].tolist() == [1.0, 0.5]
    assert full["confidence"].tolist() == pytest.approx([0.6, 0.9])
    assert bins.loc[bins["count"] == 0, "accuracy"].isna().all()


def test_ece_refuses_logits():
    with pytest.raises(ValueError, match="rows summing to 1"):
        cal.expected_calibration_error(np.array([[2.0, 1.0, 0.0, 0.0, 0.0]]), [0])
    with pytest.raises(ValueError, match=r"shape \(n, 5\)"):
        cal.reliability_bins(np.ones((3, 4)) / 4, [0, 1, 2])


# ---------------------------------------------------------------------------------------------
# temperature scaling


@pytest.mark.parametrize("true_t", [2.5, 0.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    logits, _, y = _calibrated(20000, seed=1)
    t = cal.fit_temperature(logits * true_t, y)  # over-confident (2.5) or under-confident (0.5)
    assert t == pytest.approx(true_t, rel=0.05)


def test_temperature_lowers_val_nll_and_keeps_grades():
    logits, _, y = _calibrated(3000, seed=2)
    sharp = logits * 3.0
    t = cal.fit_temperature(sharp, y)
    assert t > 1.5
    assert cal.negative_log_likelihood(sharp, y, t) < cal.negative_log_likelihood(sharp, y) - 0.1
    scaled = cal.apply_temperature(sharp, t)
    assert np.array_equal(scaled.argmax(axis=1), sharp.argmax(axis=1))
    assert np.allclose(scaled.sum(axis=1), 1.0)
    assert cal.expected_calibration_error(scaled, y) < cal.expected_calibration_error(cal.apply_temperature(sharp, 1.0), y)
    assert cal.fit_temperature(sharp, y) == t  # deterministic


def test_fit_temperature_stops_at_the_bound_when_sharper_is_always_better():
    y = np.arange(5).repeat(4)
    logits = np.eye(5)[y] * 3.0  # argmax always right
    assert cal.fit_temperature(logits, y) == pytest.approx(cal.T_MIN)


def test_temperature_input_checks():
    with pytest.raises(ValueError, match="temperature must be a positive"):
        cal.apply_temperature(np.zeros((2, 5)), 0.0)
    with pytest.raises(ValueError, match="y has 1 grades for 2 rows"):
        cal.fit_temperature(np.zeros((2, 5)), [0])


# ---------------------------------------------------------------------------------------------
# operating point


def test_operating_point_by_hand():
    # positives score 0.1..1.0; negatives 0.05..0.95 by 0.1. 90% of 10 positives: threshold 0.2
    pos = np.round(np.arange(1, 11) / 10, 2)
    neg = np.round(np.arange(10) / 10 + 0.05, 2)
    score = np.r_[pos, neg]
    y = np.r_[np.full(10, 3), np.zeros(10, int)]
    op = cal.operating_point(score, y, 0.9)
    assert op == {"threshold": 0.2, "target_sensitivity": 0.9, "val_sensitivity": 0.9,
                  "val_specificity": pytest.approx(0.2)}  # negatives below 0.2: 0.05 and 0.15


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_operating_point_reaches_the_target_with_the_highest_threshold(target):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 500)
    score = y + rng.normal(0, 1.2, 500)  # a regression head's raw score
    op = cal.operating_point(score, y, target)
    pos = y >= 2
    sens = np.mean(score[pos] >= op["threshold"])
    assert sens >= target and sens == pytest.approx(op["val_sensitivity"])
    assert op["val_specificity"] == pytest.approx(np.mean(score[~pos] < op["threshold"]))
    higher = score[score > op["threshold"]].min()  # the next threshold up misses the target
    assert np.mean(score[pos] >= higher) < target


@pytest.mark.parametrize("y, message", [
    ([0, 1, 0, 1], "no referable image"),
    ([2, 3, 4, 2], "no non-referable image"),
])
def test_operating_point_needs_both_classes(y, message):
    with pytest.raises(ValueError, match=message):
        cal.operating_point([0.1, 0.2, 0.3, 0.4], y)


def test_operating_point_rejects_a_bad_target():
    with pytest.raises(ValueError, match="target_sensitivity must be in"):
        cal.operating_point([0.1, 0.9], [0, 3], 90)
