"""TensorBoard: a run's event files, read back with TensorBoard's own reader, equal its run folder."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retino import runs
from retino.training import tracking
from conftest import TINY_TRAIN, run_cli


def _events(run):
    acc = EventAccumulator(str(run / tracking.TB_DIR), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_events_equal_metrics_jsonl(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    acc = _events(run)
    rows = runs.read_metrics(run)
    tags = set(acc.Tags()["scalars"])
    expected = {}
    for row in rows:
        for tag, value in tracking.scalar_tags(row).items():
            expected.setdefault(tag, {})[row["epoch"]] = value
    assert {"val/qwk", "val/acc", "test/qwk", "train/loss", "epoch/lr"} <= set(expected)
    assert set(expected) <= tags
    for tag, by_epoch in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(got) == set(by_epoch), tag
        for epoch, value in by_epoch.items():
            assert got[epoch] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, epoch)
    # the per-step loss: one point per log step, ending at the last step of the last epoch
    loss = acc.Scalars("step/loss")
    assert len(loss) >= 2 and [e.step for e in loss] == sorted({e.step for e in loss})
    assert loss[-1].value == pytest.approx(rows[-1]["train_loss"], rel=1e-5)
    # the chosen epoch's confusion matrices as images, and the final test metrics with intervals
    assert {"confusion/val", "confusion/test"} <= set(acc.Tags()["images"])
    test = runs.read_json(run / "test.json")
    for name in ("qwk", "accuracy"):
        m = test["metrics"][name]
        for suffix, part in (("", "value"), ("_lo", "lo"), ("_hi", "hi")):
            (point,) = acc.Scalars(f"final/test_{name}{suffix}")
            assert point.value == pytest.approx(m[part], rel=1e-6)
    assert "_hparams_/session_start_info" in acc.summary_metadata


def test_scalar_tags_skip_what_metrics_jsonl_leaves_undefined():
    row = {"epoch": 3, "train_loss": 0.5, "lr": 0.01, "val_referable_auc": None, "val_qwk": float("nan"),
           "val_confusion": [[1]], "selected_on": "val", "test_acc": 0.25, "thresholds": None}
    assert tracking.scalar_tags(row) == {"train/loss": 0.5, "epoch/lr": 0.01, "test/acc": 0.25}


def test_final_metrics_names_value_and_interval():
    test = {"metrics": {"qwk": {"value": 0.5, "lo": 0.25, "hi": 0.75, "n_boot": 10},
                        "referable_auc": {"value": None, "lo": None, "hi": None, "n_boot": 0}}}
    assert tracking.final_metrics(test) == {"final/test_qwk": 0.5, "final/test_qwk_lo": 0.25,
                                            "final/test_qwk_hi": 0.75}
