"""retino.compare on hand-made metric rows: the best-epoch table, the config diff, seed groups."""
import math

import numpy as np
import pandas as pd
import pytest

from retino import charts, compare, metrics
from retino.config import TrainConfig

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
    assert compare.best_row(rows)["epoch"] == 2
    assert compare.pick_row(rows, "last")["epoch"] == 3
    assert compare.best_row([row(1, 0.5, 0.7), row(2, 0.5, 0.9)])["epoch"] == 1  # ties: the earliest
    assert compare.best_row([]) is None
    chosen_on_val = [row(1, 0.9, 0.8, val_qwk=0.2), row(2, 0.1, 0.7, val_qwk=0.5)]
    assert compare.best_row(chosen_on_val)["epoch"] == 2  # validation decides, even where test disagrees
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
    assert frame.shape == (3, 8) and frame["run"].tolist() == ["a", "a", "b"]
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
