"""retino.evaluation.stats: the cluster bootstrap against scikit-learn, and intervals with known answers."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from retino.evaluation import stats
from retino.data.names import parse_patient_eye
from retino.evaluation.metrics import classification_metrics


def _case(n_patients: int, seed: int = 0, eyes: int = 2):
    """Synthetic graded patients: both eyes share a grade most of the time; predictions near the truth."""
    rng = np.random.default_rng(seed)
    patient_grade = rng.choice(5, n_patients, p=[0.6, 0.1, 0.17, 0.07, 0.06])
    groups = np.repeat(np.arange(n_patients), eyes)
    y = np.repeat(patient_grade, eyes)
    y = np.where(rng.random(len(y)) < 0.2, rng.integers(0, 5, len(y)), y)
    pred = np.clip(y + rng.integers(-1, 2, len(y)) * (rng.random(len(y)) < 0.4), 0, 4)
    score = np.round(np.clip(y / 4 + rng.normal(0, 0.25, len(y)), 0, 1), 2)  # rounded: ties occur
    return y, pred, score, groups


# ---------------------------------------------------------------------------------------------
# the weights


def test_weights_resample_patients_and_keep_eyes_together():
    groups = np.array(["p3", "p1", "p3", "p2", "p1", "p2", "p4"])  # eyes not adjacent, one single-eye patient
    w = stats.bootstrap_weights(groups, n_boot=500, seed=1)
    assert w.shape == (500, 7)
    for patient in set(groups):
        cols = w[:, groups == patient]
        assert (cols == cols[:, :1]).all()  # both eyes of a patient always weigh the same
    # each resample draws exactly as many patients as there are
    per_patient = w[:, [1, 3, 0, 6]]  # one image of p1, p2, p3, p4
    assert (per_patient.sum(axis=1) == 4).all()
    assert per_patient.mean() == pytest.approx(1.0, abs=0.1)


def test_weights_are_seeded():
    groups = np.repeat(np.arange(50), 2)
    a, b = stats.bootstrap_weights(groups, 100, seed=3), stats.bootstrap_weights(groups, 100, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stats.bootstrap_weights(groups, 100, seed=4))


# ---------------------------------------------------------------------------------------------
# point estimates and single resamples agree with scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_estimates_equal_sklearn(seed):
    y, pred, score, groups = _case(150, seed)
    r = stats.intervals(y, pred, score, groups=groups, threshold=0.5, n_boot=50, seed=seed)
    assert r["qwk"]["value"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)), abs=1e-12)
    assert r["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert r["macro_f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(5)), abs=1e-12)
    assert r["referable_auc"]["value"] == pytest.approx(roc_auc_score(y >= 2, score), abs=1e-12)
    pos, flagged = y >= 2, score >= 0.5
    assert r["sensitivity"]["value"] == pytest.approx((pos & flagged).sum() / pos.sum(), abs=1e-12)
    assert r["specificity"]["value"] == pytest.approx((~pos & ~flagged).sum() / (~pos).sum(), abs=1e-12)


def test_macro_f1_and_qwk_follow_retino_metrics_when_a_grade_is_missing():
    # grade 3 absent from both lists: retino.evaluation.metrics counts its F1 as 0 and keeps the true grade distances
    y = np.array([0, 0, 1, 2, 4, 4, 2, 1, 0, 4])
    pred = np.array([0, 1, 1, 2, 4, 2, 2, 0, 0, 4])
    m = classification_metrics(y, pred)
    r = stats.intervals(y, pred, y / 4.0, groups=np.arange(10), threshold=0.5, n_boot=20)
    assert r["macro_f1"]["value"] == pytest.approx(m["macro_f1"], abs=1e-12)
    assert r["qwk"]["value"] == pytest.approx(m["qwk"], abs=1e-12)
    # sklearn without labels= would average four grades, not five: the two conventions differ here
    assert m["macro_f1"] != pytest.approx(f1_score(y, pred, average="macro"))


def test_each_resample_equals_sklearn_on_the_expanded_sample():
    """A resample with weights w is the sample with image i repeated w_i times."""
    y, pred, score, groups = _case(80, seed=5)
    w = stats.bootstrap_weights(groups, n_boot=6, seed=2)
    table = stats.metric_table(w, y, pred, score, threshold=0.4)
    for b in range(len(w)):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))
        yt, yp, s = y[idx], pred[idx], score[idx]
        assert table["qwk"][b] == pytest.approx(cohen_kappa_score(yt, yp, weights="quadratic", labels=range(5)), abs=1e-12)
        assert table["accuracy"][b] == pytest.approx(accuracy_score(yt, yp), abs=1e-12)
        assert table["macro_f1"][b] == pytest.approx(f1_score(yt, yp, average="macro", labels=range(5), zero_division=0), abs=1e-12)
        assert table["referable_auc"][b] == pytest.approx(roc_auc_score(yt >= 2, s), abs=1e-12)
        assert table["sensitivity"][b] == pytest.approx(np.mean(s[yt >= 2] >= 0.4), abs=1e-12)
        assert table["specificity"][b] == pytest.approx(np.mean(s[yt < 2] < 0.4), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# intervals


@pytest.mark.parametrize("n_patients", [6, 15, 40, 200])
def test_intervals_contain_the_point_estimate(n_patients):
    y, pred, score, groups = _case(n_patients, seed=n_patients)
    r = stats.intervals(y, pred, score, groups=groups, threshold=0.5, n_boot=300, seed=0)
    for name, entry in r.items():
        if entry["value"] is not None:
            assert entry["lo"] <= entry["value"] <= entry["hi"], name


def test_intervals_narrow_as_n_grows():
    widths = []
    for n_patients in (100, 2500):
        y, pred, score, groups = _case(n_patients, seed=1)
        r = stats.intervals(y, pred, score, groups=groups, threshold=0.5, n_boot=400, seed=0)
        widths.append({k: v["hi"] - v["lo"] for k, v in r.items()})
    for name in stats.METRICS:
        # 25x the patients: about 5x narrower; 2.5x leaves room for the bootstrap's own noise
        assert widths[1][name] < widths[0][name] / 2.5, name


def test_correlated_eyes_give_a_wider_interval_than_independent_images():
    # two identical eyes per patient: the information is one eye's, so the honest interval is
    # sqrt(2) wider than one that counts 2n independent images
    y, pred, score, _ = _case(400, seed=2, eyes=1)
    y2, pred2, score2 = (np.repeat(a, 2) for a in (y, pred, score))
    patients = np.repeat(np.arange(400), 2)
    cluster = stats.intervals(y2, pred2, score2, groups=patients, threshold=0.5, n_boot=1000, seed=0)
    naive = stats.intervals(y2, pred2, score2, groups=np.arange(800), threshold=0.5, n_boot=1000, seed=0)
    for name in ("qwk", "accuracy", "referable_auc", "sensitivity"):
        ratio = (cluster[name]["hi"] - cluster[name]["lo"]) / (naive[name]["hi"] - naive[name]["lo"])
        assert 1.2 < ratio < 1.7, (name, ratio)


def test_resamples_without_positives_are_dropped_not_nan():
    # 12 patients, one referable: about a third of resamples draw no referable patient
    y = np.array([0] * 11 + [3])
    pred = y.copy()
    score = np.linspace(0, 1, 12)
    r = stats.intervals(y, pred, score, groups=np.arange(12), threshold=0.5, n_boot=500, seed=0)
    for name in ("referable_auc", "sensitivity"):
        assert 250 < r[name]["n_boot"] < 450
        assert r[name]["value"] == 1.0 and r[name]["lo"] == 1.0 and r[name]["hi"] == 1.0
    assert r["specificity"]["n_boot"] == 500


def test_undefined_value_is_none():
    y = np.array([0, 1, 0, 1])
    r = stats.intervals(y, y, [0.1, 0.2, 0.3, 0.4], groups=np.arange(4), threshold=0.5, n_boot=50)
    assert r["referable_auc"] == {"value": None, "lo": None, "hi": None, "n_boot": 0}
    assert r["sensitivity"]["value"] is None
    assert r["specificity"]["value"] == 1.0


def test_percentile_interval_is_widened_to_reach_the_value():
    entry = stats._summary(0.5, np.array([0.6, 0.7, 0.8, np.nan]), 0.95)
    assert entry["lo"] == 0.5 and entry["hi"] == pytest.approx(0.795) and entry["n_boot"] == 3


def test_threshold_none_leaves_out_sensitivity_and_specificity():
    y, pred, score, groups = _case(30)
    r = stats.intervals(y, pred, score, groups=groups, threshold=None, n_boot=20)
    assert set(r) == {"qwk", "accuracy", "macro_f1", "referable_auc"}


# ---------------------------------------------------------------------------------------------
# paired comparison


def test_a_run_compared_with_itself_differs_by_zero_with_zero_width():
    y, pred, score, groups = _case(120, seed=3)
    run = {"y_true": y, "y_pred": pred, "ref_score": score}
    d = stats.paired_difference(run, dict(run), groups=groups, threshold_a=0.5, threshold_b=0.5, n_boot=300)
    assert {"qwk", "accuracy", "referable_auc"} <= set(d)
    for entry in d.values():
        assert entry["value"] == 0.0 and entry["lo"] == 0.0 and entry["hi"] == 0.0
        assert entry["p_b_better"] == 0.5


def test_a_clearly_better_run_wins_and_the_difference_matches_the_two_estimates():
    y, pred, score, groups = _case(300, seed=4)
    better_pred = np.where(np.random.default_rng(0).random(len(y)) < 0.7, y, pred)
    better_score = np.clip(y / 4 + np.random.default_rng(1).normal(0, 0.1, len(y)), 0, 1)
    a, b = (y, pred, score), (y, better_pred, better_score)
    d = stats.paired_difference(a, b, groups=groups, threshold_a=0.5, threshold_b=0.5, n_boot=500)
    ra = stats.intervals(*a, groups=groups, threshold=0.5, n_boot=10)
    rb = stats.intervals(*b, groups=groups, threshold=0.5, n_boot=10)
    for name in ("qwk", "accuracy", "referable_auc"):
        assert d[name]["value"] == pytest.approx(rb[name]["value"] - ra[name]["value"], abs=1e-12)
        assert 0 < d[name]["lo"] <= d[name]["value"] <= d[name]["hi"]
        assert d[name]["p_b_better"] == 1.0
    swapped = stats.paired_difference(b, a, groups=groups, threshold_a=0.5, threshold_b=0.5, n_boot=500)
    assert swapped["qwk"]["value"] == pytest.approx(-d["qwk"]["value"]) and swapped["qwk"]["p_b_better"] == 0.0


def test_runs_on_different_images_are_refused():
    y, pred, score, groups = _case(20)
    other = y.copy()
    other[0] = (other[0] + 1) % 5
    with pytest.raises(ValueError, match="not scored on the same images"):
        stats.paired_difference((y, pred, score), (other, pred, score), groups=groups, threshold_a=0.5, threshold_b=0.5)
    with pytest.raises(ValueError, match="not scored on the same images"):
        stats.paired_difference((y, pred, score), (y[:-2], pred[:-2], score[:-2]), groups=groups,
                                threshold_a=0.5, threshold_b=0.5)


# ---------------------------------------------------------------------------------------------
# patients and input checks


@pytest.mark.parametrize("name, expected", [
    ("10_left.jpeg", ("10", "left")),
    ("train/13_RIGHT.png", ("13", "right")),
    ("a_b_left", ("a_b", "left")),
    ("000c1434d8d7.png", ("000c1434d8d7", None)),  # the id APTOS's CSV uses
    ("left.png", ("left", None)),
    ("notes.txt", ("notes.txt", None)),  # only an image extension is dropped
    ("IDRiD_01.jpg", ("IDRiD_01", None)),
])
def test_parse_patient_eye(name, expected):
    assert parse_patient_eye(name) == expected


def test_patient_level_takes_the_worse_eye_and_the_higher_score():
    names = ["7_left.jpeg", "7_right.jpeg", "9_left.jpeg", "9_right.jpeg", "solo.png"]
    ids, y_ref, score = stats.patient_level(stats.patient_ids(names), [0, 3, 1, 0, 2], [0.9, 0.2, 0.1, 0.4, 0.3])
    assert ids.tolist() == ["7", "9", "solo"]
    assert y_ref.tolist() == [True, False, True]
    assert score.tolist() == [0.9, 0.4, 0.3]


def test_patient_intervals_match_sklearn_on_patients():
    y, _, score, groups = _case(100, seed=6)
    ids, y_ref, pscore = stats.patient_level(groups, y, score)
    r = stats.patient_intervals(groups, y, score, threshold=0.6, n_boot=200)
    assert set(r) == {"referable_auc", "sensitivity", "specificity"}
    assert r["referable_auc"]["value"] == pytest.approx(roc_auc_score(y_ref, pscore), abs=1e-12)
    assert r["sensitivity"]["value"] == pytest.approx(np.mean(pscore[y_ref] >= 0.6), abs=1e-12)
    assert r["specificity"]["lo"] <= r["specificity"]["value"] <= r["specificity"]["hi"]


@pytest.mark.parametrize("entry, text", [
    ({"value": 0.8421, "lo": 0.8312, "hi": 0.8529}, "0.842 [0.831-0.853]"),
    ({"value": -0.012, "lo": -0.0301, "hi": 0.004}, "-0.012 [-0.030 to 0.004]"),
    ({"value": None, "lo": None, "hi": None}, "n/a"),
    (None, "n/a"),
])
def test_format_interval(entry, text):
    assert stats.format_interval(entry) == text


@pytest.mark.parametrize("kwargs, message", [
    ({"y_true": [0, 1, 7]}, "grades 0-4"),
    ({"y_pred": [0, 1]}, "y_pred has 2 grades for 3 images"),
    ({"ref_score": [0.1, np.nan, 0.2]}, "ref_score must be finite"),
    ({"groups": [1, 2]}, "groups has 2 patient ids for 3 images"),
    ({"threshold": float("inf")}, "threshold must be a finite number"),
    ({"level": 95}, "level must be between 0 and 1"),
    ({"n_boot": 0}, "n_boot must be a positive whole number"),
])
def test_bad_input_names_what_was_expected(kwargs, message):
    args = {"y_true": [0, 2, 4], "y_pred": [0, 2, 3], "ref_score": [0.1, 0.6, 0.9], "groups": [1, 2, 3],
            "threshold": 0.5, **kwargs}
    positional = [args.pop(k) for k in ("y_true", "y_pred", "ref_score")]
    with pytest.raises(ValueError, match=message):
        stats.intervals(*positional, **args)


def test_interval_text_never_writes_minus_zero():
    from retino.evaluation.stats import format_interval
    assert format_interval({"value": 0.0, "lo": -0.0001, "hi": 0.001}) == "0.000 [0.000-0.001]"
    assert format_interval({"value": -0.012, "lo": -0.03, "hi": 0.004}) == "-0.012 [-0.030 to 0.004]"
