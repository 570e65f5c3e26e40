"""retino.evaluation.compare on hand-made metric rows: the best-epoch table, the config diff, seed groups."""
import math

import numpy as np
import pandas as pd
import pytest

from retino.dashboard import charts
from retino.evaluation import compare, metrics
from retino.config import TrainConfig
from retino.evaluation import results
from retino import runs

# 10 test images: 7 of grade 0, 1 of grade 1, 2 of grade 2 -> the majority baseline is 70%
CONF_A = [[7, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 1, 0, 0], [0] * 5, [0] * 5]
CONF_B = [[6, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 2, 0, 0], [0] * 5, [0] * 5]


def row(epoch, qwk, acc, conf=CONF_A, **kw):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc - 0.05, "test_loss": 1.2 / epoch,
            "test_acc": acc, "test_qwk": qwk, "test_macro_f1": qwk / 2, "test_balanced_acc": acc - 0.1,
            "test_ref_auc": 0.5 + qwk / 2, "test_ref_sens_at_90spec": qwk / 3, "test_confusion": conf, **kw}


def run(label, rows, **config):
    return {"label": label, "config": {**TrainConfig().to_dict(), **config}, "rows": rows}


def test_best_epoch_is_max_qwk_not_max_accuracy_nor_last():
    rows = [row(1, 0.10, 0.80), row(2, 0.60, 0.70, CONF_B), row(3, 0.40, 0.75)]
    assert runs.best_row(rows)["epoch"] == 2
    assert compare.pick_row(rows, "last")["epoch"] == 3
    assert runs.best_row([row(1, 0.5, 0.7), row(2, 0.5, 0.9)])["epoch"] == 1  # ties: the earliest
    assert runs.best_row([]) is None
    chosen_on_val = [row(1, 0.9, 0.8, val_qwk=0.2), row(2, 0.1, 0.7, val_qwk=0.5)]
    assert runs.best_row(chosen_on_val)["epoch"] == 2  # validation decides, even where test disagrees
    assert compare.run_table([run("v", chosen_on_val)])["best_qwk"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="best or last"):
        compare.pick_row(rows, "first")


def test_best_epoch_table_values_and_majority_baseline():
    runs = [run("a", [row(1, 0.10, 0.80), row(2, 0.60, 0.70, CONF_B), row(3, 0.40, 0.75)]),
            run("empty", [])]
    table = compare.best_epoch_table(runs)
    assert list(table.columns) == ["run", "best_epoch", "epochs", "accuracy", "qwk", "macro_f1", "balanced_acc",
                                   "ref_auc", "sens_at_90spec", "majority_acc", "acc_over_majority"]
    a = table.set_index("run").loc["a"]
    assert a["best_epoch"] == 2 and a["epochs"] == 3
    assert a["accuracy"] == pytest.approx(0.70) and a["qwk"] == pytest.approx(0.60)
    assert a["macro_f1"] == pytest.approx(0.30) and a["ref_auc"] == pytest.approx(0.80)
    assert a["sens_at_90spec"] == pytest.approx(0.20) and a["balanced_acc"] == pytest.approx(0.60)
    assert a["majority_acc"] == pytest.approx(0.70)  # row sums 7, 1, 2 of 10
    assert a["acc_over_majority"] == pytest.approx(0.0)
    empty = table.set_index("run").loc["empty"]
    assert pd.isna(empty["best_epoch"]) and pd.isna(empty["qwk"]) and empty["epochs"] == 0
    assert table["qwk"].dtype == float
    assert table.to_csv(index=False).startswith("run,best_epoch")


def test_missing_metric_is_nan_not_an_error():
    r = row(1, 0.3, 0.7)
    r["test_ref_auc"] = None  # a test split with no referable cases
    del r["test_ref_sens_at_90spec"]
    table = compare.best_epoch_table([run("a", [r])])
    assert math.isnan(table["ref_auc"][0]) and math.isnan(table["sens_at_90spec"][0])


def test_confusion_at_counts_and_row_normalised():
    rows = [row(1, 0.1, 0.8, CONF_A), row(2, 0.6, 0.7, CONF_B), row(3, 0.2, 0.7, CONF_A)]
    assert compare.confusion_at(rows, "best").tolist() == np.array(CONF_B, float).tolist()
    assert compare.confusion_at(rows, "last").tolist() == np.array(CONF_A, float).tolist()
    norm = compare.confusion_at(rows, "best", normalize=True)
    assert norm[0].tolist() == pytest.approx([6 / 7, 1 / 7, 0, 0, 0])
    assert norm[3].tolist() == [0.0] * 5  # a grade absent from the test split: zeros, not NaN
    assert compare.confusion_at([], "best") is None
    assert compare.majority_acc(None) != compare.majority_acc(None)  # NaN
    assert compare.majority_acc(CONF_B) == pytest.approx(metrics.majority_baseline([0] * 7 + [1] + [2] * 2)["acc"])


def test_config_diff_only_lists_differences():
    runs = [run("a", [], arch="resnet18", lr=0.001), run("b", [], arch="resnet50", lr=1e-3),
            run("c", [], arch="resnet18", lr=0.01)]
    diff = compare.config_diff(runs)
    assert list(diff.index) == ["arch", "lr"]  # 0.001 == 1e-3 for b, but c differs
    assert list(diff.columns) == ["a", "b", "c"]
    assert diff.loc["arch"].tolist() == ["resnet18", "resnet50", "resnet18"]
    full = compare.config_diff(runs, diff_only=False)
    assert len(full) == len(TrainConfig().to_dict()) and "epochs" in full.index
    same = compare.config_diff(runs[:1] + [run("a2", [], arch="resnet18", lr=0.001)])
    assert same.empty


def test_config_diff_field_missing_in_an_older_run():
    old = {"label": "old", "config": {"arch": "resnet18"}, "rows": []}
    diff = compare.config_diff([old, run("new", [], arch="resnet18")])
    assert "epochs" in diff.index and diff.loc["epochs", "old"] == "(missing)"
    assert "arch" not in diff.index


def test_seed_groups_mean_and_std():
    runs = [run("s0", [row(1, 0.50, 0.70), row(2, 0.60, 0.75)], seed=0, name="x0"),
            run("s1", [row(1, 0.70, 0.80)], seed=1, name="x1"),
            run("s2", [row(1, 0.80, 0.85)], seed=2),
            run("other-lr", [row(1, 0.90, 0.90)], seed=0, lr=0.1),  # differs by more than the seed
            run("pre", [row(1, 0.40, 0.70)], seed=0, pretrained=True),
            run("pre1", [row(1, 0.50, 0.72)], seed=1, pretrained=True)]
    groups = compare.seed_groups(runs)
    assert len(groups) == 2
    g = groups.set_index("group").loc["resnet18-scratch-classify-128px"]
    assert g["n"] == 3 and g["runs"] == "s0, s1, s2" and g["seeds"] == "0, 1, 2"
    assert g["qwk_mean"] == pytest.approx(np.mean([0.6, 0.7, 0.8]))
    assert g["qwk_std"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert g["accuracy_mean"] == pytest.approx(np.mean([0.75, 0.80, 0.85]))  # at each run's best epoch
    text = compare.mean_std_text(groups).set_index("group")
    assert text.loc["resnet18-scratch-classify-128px", "qwk"] == "0.700 ± 0.100"
    assert text.loc["resnet18-scratch-classify-128px", "accuracy"] == "80.0 ± 5.0"
    assert "resnet18-pre-classify-128px" in text.index
    assert compare.seed_groups(runs[:1]).empty


def test_curves_frame_and_labels():
    runs = [run("a", [row(1, 0.1, 0.8), row(2, 0.2, 0.8)]), run("b", [row(1, 0.3, 0.6)])]
    frame = compare.curves_frame(runs)
    assert frame.shape == (3, 2 + len(compare.CURVE_KEYS)) and frame["run"].tolist() == ["a", "a", "b"]
    assert {"val_acc", "val_loss", "val_qwk"} <= set(frame.columns) and frame["val_qwk"].isna().all()
    assert frame["test_qwk"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    cfg = TrainConfig().to_dict()
    ids = ["20260101-101500-resnet18-scratch-classify-128px", "20260102-111111-resnet18-scratch-classify-128px",
           "20260102-111111-resnet18-scratch-classify-128px-1", "mine"]
    assert compare.run_labels(ids[:2] + ["x", "y"], ids, [cfg, cfg, {}, {}]) == [
        "resnet18-scratch-classify-128px (01-01 10:15:00)", "resnet18-scratch-classify-128px (01-02 11:11:11)",
        "x", "y"]
    same_second = compare.run_labels(ids[1:3], ids[1:3], [cfg, cfg])
    assert same_second == [f"resnet18-scratch-classify-128px [{i}]" for i in ids[1:3]]
    assert compare.run_labels(["lab", "lab", "b"], ["1", "2", "3"], [cfg] * 3) == ["lab [1]", "lab [2]", "b"]


def test_run_table_and_charts_build():
    runs = [{**run("a", [row(1, 0.1, 0.8), row(2, 0.4, 0.7)], epochs=6), "id": "20260101-a", "state": "completed",
             "tags": ["lab"], "created": 1.7e9}]
    table = compare.run_table(runs)
    assert table.loc[0, "epochs"] == "2/6" and table.loc[0, "best_qwk"] == pytest.approx(0.4)
    assert table.loc[0, "tags"] == "lab" and not table.loc[0, "pretrained"]
    frame = compare.curves_frame(runs)
    fig = charts.curves(frame, ["train_acc", "test_acc"], title="accuracy", yaxis="accuracy", percent=True)
    assert len(fig.data) == 2 and fig.data[0].line.dash == "dash"
    mats = {"a": compare.confusion_at(runs[0]["rows"]), "b": np.array(CONF_A)}
    fig = charts.confusion_matrices(mats)
    assert fig.layout.coloraxis.cmax == 7 and len(fig.data) == 2
    assert charts.confusion_matrices(mats, normalized=True).layout.coloraxis.cmax == 1
    assert len(charts.live_curves(runs[0]["rows"]).data) == 5  # train/test x accuracy, loss; test QWK
    with_lr = charts.live_curves([{**r, "lr": 1e-3} for r in runs[0]["rows"]])
    assert [t.name for t in with_lr.data if t.xaxis == "x4"] == ["learning rate"]  # per epoch, without steps
    val_rows = [{**r, "val_qwk": 0.5} for r in runs[0]["rows"]]
    steps = [{"step": 1, "loss": 1.2, "lr": 1e-3}, {"step": 2, "loss": 1.0, "lr": 9e-4}]
    fig = charts.live_curves(val_rows, steps)
    assert [t.name for t in fig.data if t.xaxis == "x3"] == ["val", "test"]  # QWK: whichever the rows have
    assert [t.name for t in fig.data if t.xaxis == "x4"] == ["step loss", "learning rate"]
    assert charts.probabilities([0.1, 0.2, 0.4, 0.2, 0.1], 2).data[0].marker.color[2] == "#d62728"
    assert len(charts.score_on_thresholds(1.7, [0.5, 1.5, 2.5, 3.5]).layout.shapes) == 4


def test_filter_runs():
    runs = [{**run("a", [], arch="resnet18"), "id": "1", "state": "completed", "tags": ["lab"]},
            {**run("b", [], arch="resnet50", pretrained=True), "id": "2", "state": "failed"},
            {**run("c", [], arch="resnet50"), "id": "3", "state": "completed"}]
    table = compare.run_table(runs)
    assert compare.filter_runs(table)["run"].tolist() == ["a", "b", "c"]
    assert compare.filter_runs(table, states=["completed"], archs=["resnet50"])["run"].tolist() == ["c"]
    assert compare.filter_runs(table, pretrained=[True])["run"].tolist() == ["b"]
    assert compare.filter_runs(table, text="LAB")["run"].tolist() == ["a"]  # tags, case-insensitive
    assert compare.filter_runs(table, states=["running"]).empty


# ----------------------------------------------------------------------------- test results (issue 10)

def predictions(split, labels, referable, *, grades=None, image_prefix="img", patients=None):
    """A hand-made predictions.csv: P(grade >= 2) = ``referable``, split between grades 0/2 by the label's side."""
    labels, referable = np.asarray(labels), np.asarray(referable, dtype=float)
    probs = np.zeros((len(labels), 5))
    probs[:, 0], probs[:, 2] = 1 - referable, referable
    grades = np.where(referable >= 0.5, 2, 0) if grades is None else np.asarray(grades)
    t = pd.DataFrame({"image": [f"{image_prefix}{i}" for i in range(len(labels))],
                      "patient": patients if patients is not None else [str(i // 2) for i in range(len(labels))],
                      "eye": ["left", "right"] * (len(labels) // 2) + ["left"] * (len(labels) % 2), "split": split,
                      "label": labels})
    for g in range(5):
        t[f"p{g}"] = probs[:, g]
    t["grade"], t["referable_score"] = grades, referable
    return t


# 3 referable (grade >= 2) and 4 not; at threshold 0.5: 2 of 3 found, 3 of 4 cleared
LABELS = [2, 3, 4, 0, 0, 1, 0]
SCORES = [0.9, 0.7, 0.4, 0.1, 0.3, 0.6, 0.2]


def test_roc_operating_point_is_the_val_threshold_applied_to_test():
    table = pd.concat([predictions("val", [0, 2], [0.2, 0.8]), predictions("test", LABELS, SCORES)])
    chosen = {"selected_on": "val", "temperature": 1.0, "operating_point": {"threshold": 0.5}}
    r = results.roc(table, chosen)
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(3 / 4)
    assert r["point"] == pytest.approx((0.25, 2 / 3)) and r["chosen_on"] == "val"
    # a threshold between two scores is a vertex of the empirical curve: the marker sits on it
    assert any(np.isclose(x, 0.25) and np.isclose(y, 2 / 3) for x, y in zip(r["fpr"], r["tpr"]))
    assert r["auc"] == pytest.approx(11 / 12)  # 11 of the 12 (referable, not) pairs ordered right
    high = results.roc(table, {**chosen, "operating_point": {"threshold": 0.8}})
    assert high["point"] == pytest.approx((0.0, 1 / 3))
    none = results.roc(table, {**chosen, "operating_point": {"threshold": None}})
    assert none["threshold"] == 0.5 and none["chosen_on"] is None  # as the test report: 0.5, said so
    with pytest.raises(ValueError, match="no test predictions"):
        results.roc(table[table["split"] == "val"], chosen)
    healthy = predictions("test", [0, 0, 1], [0.1, 0.2, 0.3])
    assert "no referable image" in results.roc(healthy, chosen)["error"]


def test_roc_point_agrees_with_the_test_report_after_temperature():
    """The page's point and the report's sensitivity/specificity read the same (calibrated) score."""
    from retino.evaluation import report
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 60)
    logits = rng.normal(size=(60, 5)) + 2.0 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    table = predictions("test", labels, probs[:, 2:].sum(1), patients=[str(i) for i in range(60)])
    for g in range(5):
        table[f"p{g}"] = probs[:, g]
    table["grade"] = probs.argmax(1)
    chosen = {"selected_on": "val", "temperature": 2.5, "operating_point": {"threshold": 0.4}}
    r = results.roc(table, chosen)
    rep = report.report(table, chosen, n_boot=50)
    assert r["sensitivity"] == pytest.approx(rep["metrics"]["sensitivity"]["value"])
    assert r["specificity"] == pytest.approx(rep["metrics"]["specificity"]["value"])
    assert r["auc"] == pytest.approx(rep["metrics"]["referable_auc"]["value"])
    rel = results.reliability(table, chosen)
    assert rel["ece"] == pytest.approx(rep["calibration"]["ece"], abs=1e-9)
    assert rel["ece_before"] == pytest.approx(rep["calibration"]["ece_before_temperature"], abs=1e-9)
    assert rel["ece"] != pytest.approx(rel["ece_before"])  # the temperature moved the probabilities
    assert rel["after"]["count"].sum() == 60 and len(rel["after"]) == 15
    regress = table.drop(columns=[f"p{g}" for g in range(5)]).assign(score=1.0)
    assert results.reliability(regress, chosen) is None


def report(qwk, acc, *, ece=0.05, n=400, where="val", threshold=0.3):
    entry = lambda v: {"value": v, "lo": v - 0.01, "hi": v + 0.011}  # noqa: E731
    return {"n_images": n, "selected_on": where, "epoch": 3,
            "metrics": {"qwk": entry(qwk), "accuracy": entry(acc), "macro_f1": entry(0.5),
                        "referable_auc": None, "sensitivity": entry(0.9), "specificity": entry(0.8)},
            "operating_point": {"threshold": threshold}, "calibration": {"ece": ece}}


def test_test_results_table_intervals_and_best_marks():
    runs = [{**run("a", []), "dataset": "synthetic · debe0a88", "report": report(0.842, 0.70, ece=0.08)},
            {**run("b", []), "dataset": "synthetic · debe0a88", "report": report(0.80, 0.75, ece=0.03)},
            {**run("old", [row(1, 0.5, 0.6)]), "dataset": "eyepacs", "report": report(0.70, 0.75, where="test",
                                                                                       threshold=None)},
            {**run("fresh", [row(1, 0.5, 0.6, val_qwk=0.4)]), "dataset": "eyepacs", "report": None}]
    table = results.test_results_table(runs).set_index("run")
    assert table.loc["a", "QWK"] == "0.842 [0.832-0.853]" + results.BEST_MARK  # the max point value
    assert table.loc["b", "QWK"] == "0.800 [0.790-0.811]"
    # accuracy ties between b and old: both marked; a is not
    assert table["accuracy"].str.endswith(results.BEST_MARK).tolist() == [False, True, True, False]
    assert table.loc["b", "ECE"] == "0.030" + results.BEST_MARK  # lowest is best
    assert not table["macro-F1"].str.contains("★").any()  # everyone ties: a marker would say nothing
    assert table.loc["a", "ref. AUC"] == "n/a"
    assert table.loc["a", "test images"] == "400" and table.loc["a", "data set"] == "synthetic · debe0a88"
    assert table.loc["a", "selected on"] == "val" and table.loc["old", "selected on"] == "chosen on test (older run)"
    assert table.loc["old", "threshold"] == "0.500 (default: none chosen)" and table.loc["a", "threshold"] == "0.300"
    assert table.loc["fresh", "QWK"] == "not evaluated" and table.loc["fresh", "selected on"] == "val"
    assert table.loc["fresh", "test images"] == "–"


def test_best_rows_max_min_ties_and_lone_values():
    values = pd.DataFrame({"QWK": [0.3, 0.9, float("nan"), 0.9], "ECE": [0.2, 0.1, 0.05, 0.3],
                           "lone": [float("nan"), 0.5, float("nan"), float("nan")]})
    best = results.best_rows(values)
    assert best == {"QWK": [1, 3], "ECE": [2], "lone": []}


def test_test_set_mismatch_names_counts_and_relabelled_images():
    a = predictions("test", LABELS, SCORES)
    assert results.test_set_mismatch({"a": a, "b": a.copy()}) is None
    assert results.test_set_mismatch({"a": a}) is None
    fewer = a.iloc[:5]
    text = results.test_set_mismatch({"a": a, "b": fewer})
    assert text.startswith("Not evaluated on the same test images") and "a: 7 images" in text
    assert "b: 5 images, 5 in common with a" in text and "--data DIR" in text
    relabelled = a.assign(label=[2, 3, 4, 0, 0, 1, 2])
    assert "7 in common with a (1 with other labels)" in results.test_set_mismatch({"a": a, "b": relabelled})
    other_val = pd.concat([a, predictions("val", [0], [0.1])])
    assert results.test_set_mismatch({"a": a, "b": other_val}) is None  # only test counts


def test_provenance_differences_and_config_diff_rows():
    code = {"commit": "77adeb0e59c1", "dirty": False}
    a = {**run("a", []), "code": code, "data_fingerprint": "debe0a885996c2d1"}
    same = {**run("b", []), "code": dict(code), "data_fingerprint": "debe0a885996c2d1"}
    assert results.provenance_differences([a, same]) == []
    assert compare.config_diff([a, same]).empty
    dirty = {**same, "code": {**code, "dirty": True}, "data_fingerprint": "0123456789abcdef"}
    older = {**run("old", []), "code": None, "data_fingerprint": None}
    warnings = results.provenance_differences([a, dirty, older])
    assert warnings[0] == ("The selected runs differ in code (git commit): a: 77adeb0; b: 77adeb0 + uncommitted "
                           "changes; old: not recorded.")
    assert "data (labels' fingerprint)" in warnings[1] and "b: 0123456789abcdef" in warnings[1]
    diff = compare.config_diff([a, dirty, older])
    assert diff.loc["code commit"].tolist() == ["77adeb0", "77adeb0 + uncommitted changes", "not recorded"]
    assert diff.loc["data fingerprint", "old"] == "not recorded"
    assert results.dataset_label({"dataset": {"path": "/data/eyepacs/"}, "data_fingerprint": "debe0a885996c2d1"}) \
        == "eyepacs · debe0a88"
    assert results.dataset_label({"train": {"data": "data\\synthetic"}}) == "synthetic"


def test_versus_table_and_sentence():
    result = {"a": "A", "b": "B", "n_images": 400, "n_patients": 200,
              "diff": {"qwk": {"value": 0.012, "lo": -0.01, "hi": 0.034, "p_b_better": 0.84},
                       "accuracy": {"value": 0.03, "lo": 0.01, "hi": 0.05, "p_b_better": 0.999}},
              "verdict": {"qwk": "no detectable difference: the interval includes 0",
                          "accuracy": "B is better: the interval excludes 0"}}
    table = results.versus_table(result)
    assert table["metric"].tolist() == ["QWK", "accuracy"]
    assert table.iloc[0, 1] == "0.012 [-0.010 to 0.034]" and table["p(B better)"].tolist() == ["84%", "100%"]
    assert results.versus_sentence(result) == (
        "QWK, B − A = 0.012 [-0.010 to 0.034] on 400 test images of 200 patients; B scores higher in 84% of the "
        "paired patient resamples. No detectable difference: the interval includes 0.")
    assert results.versus_sentence(result, "accuracy").endswith("B is better: the interval excludes 0.")


def test_worst_predictions_by_distance_then_probability_of_the_truth():
    t = predictions("test", [4, 4, 2, 0, 3, 1], [0.1, 0.2, 0.3, 0.1, 0.9, 0.2], grades=[0, 0, 0, 0, 3, 1])
    t.loc[1, "p4"], t.loc[1, "p0"] = 0.3, 0.5  # image 1: same distance as image 0, more faith in the truth
    worst = results.worst_predictions(t)
    assert worst["image"].tolist() == ["img0", "img1", "img2"]  # right answers left out
    assert worst["distance"].tolist() == [4, 4, 2] and worst["p_true"][1] == pytest.approx(0.3)
    assert len(results.worst_predictions(t, n=1)) == 1
    regress = t.drop(columns=[f"p{g}" for g in range(5)]).assign(score=[0.2, 0.4, 1.2, 0.0, 3.0, 1.0])
    assert results.worst_predictions(regress)["image"].tolist() == ["img0", "img1", "img2"]  # 0.2 is farther from 4


def test_roc_and_reliability_figures():
    table = predictions("test", LABELS, SCORES)
    chosen = {"selected_on": "val", "temperature": 1.0, "operating_point": {"threshold": 0.5}}
    rocs = {"a": results.roc(table, chosen), "b": {"error": "no referable image"}}
    fig = charts.roc_curves(rocs)
    marker = [t for t in fig.data if t.mode == "markers"]
    assert len(marker) == 1 and marker[0].x[0] == pytest.approx(0.25) and marker[0].y[0] == pytest.approx(2 / 3)
    assert "AUC 0.917" in fig.data[1].name
    rel = results.reliability(table, chosen)
    fig = charts.reliability_diagrams({"a": rel, "b": rel})
    assert [a.text.split("<br>")[1] for a in fig.layout.annotations][0] == \
        f"ECE {rel['ece']:.3f} (before T=1.00: {rel['ece_before']:.3f})"
    assert [t.line.dash for t in fig.data if t.name][:2] == ["dash", "solid"]
    frame = compare.curves_frame([run("a", [row(1, 0.1, 0.8, val_acc=0.7), row(2, 0.2, 0.8, val_acc=0.75)])])
    fig = charts.curves(frame, ["train_acc", "val_acc", "test_acc"], title="accuracy", yaxis="accuracy")
    assert [t.line.dash for t in fig.data] == ["dash", "dot", "solid"]
