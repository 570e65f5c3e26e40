"""retino.dashboard and retino.plan on hand-made run folders: no training, no Streamlit."""
import json
import math

import pytest

from retino import dashboard, plan, runs
from retino.config import TrainConfig


def make_run(root, name, *, state="completed", rows=(), created=0.0, **status):
    path = root / name
    path.mkdir(parents=True)
    runs.write_json(path / "config.json", {"train": TrainConfig().to_dict(), "created": created})
    runs.write_json(path / "status.json", {"state": state, "updated": 0, **status})
    for row in rows:
        runs.append_metrics(path, row)
    return runs.load_run(path)


@pytest.mark.parametrize("state, status, expected", [
    ("stopped", {}, True),
    ("interrupted", {}, True),
    ("completed", {}, False),
    ("failed", {"error": "OSError: [Errno 28] No space left on device"}, True),
    ("failed", {"error": "ConfigError: lr must be in (0, 10], got 20.0"}, False),
    ("failed", {"error": "Download the weights ...", "error_type": "WeightsUnavailable"}, False),
    ("failed", {"error": "WeightsUnavailable: ImageNet weights for resnet50 are not available offline"}, False),
    ("failed", {"error": "CUDA out of memory at batch size 64 and image size 512: lower --batch-size"}, False),
    ("failed", {"error": "FloatingPointError: loss became NaN at epoch 2 step 7: lower --lr"}, False),
    ("failed", {"error": "RuntimeError: DataLoader worker (pid 123) is killed by signal: Bus error"}, True),
])
def test_resume_is_offered_only_where_it_can_help(tmp_path, state, status, expected):
    ok, why = dashboard.can_resume(make_run(tmp_path, "r", state=state, **status))
    assert ok is expected
    assert bool(why) == (state == "failed" and not expected)


def test_best_completed_run_prefers_validation_qwk(tmp_path):
    a = make_run(tmp_path, "a", rows=[{"epoch": 1, "test_qwk": 0.9, "val_qwk": 0.2}], created=1)
    b = make_run(tmp_path, "b", rows=[{"epoch": 1, "test_qwk": 0.1, "val_qwk": 0.5}], created=2)
    c = make_run(tmp_path, "c", state="stopped", rows=[{"epoch": 1, "test_qwk": 0.99}], created=3)
    d = make_run(tmp_path, "d", rows=[], created=4)  # completed, no epoch: scored last
    assert dashboard.best_completed([a, b, c, d]).id == "b"
    assert dashboard.best_completed([c]) is None
    assert dashboard.best_qwk([{"epoch": 1, "test_qwk": 0.3}, {"epoch": 2, "test_qwk": 0.4}]) == 0.4
    assert math.isnan(dashboard.best_qwk([]))
    assert dashboard.completed_count([a, b, c, d]) == 3


def test_predict_candidates_need_a_best_checkpoint(tmp_path):
    with_ckpt = make_run(tmp_path, "with", state="stopped")
    runs.save_checkpoint(with_ckpt.path / "best.pt", {"model": {}})
    without = make_run(tmp_path, "without")
    failed = make_run(tmp_path, "failed", state="failed")
    runs.save_checkpoint(failed.path / "best.pt", {"model": {}})
    assert [r.id for r in dashboard.predict_candidates([with_ckpt, without, failed])] == ["with"]
    stamp = dashboard.checkpoint_stamp(with_ckpt.path)
    runs.save_checkpoint(with_ckpt.path / "best.pt", {"model": {}, "epoch": 2})  # rewritten: a new cache key
    assert dashboard.checkpoint_stamp(with_ckpt.path) != stamp and dashboard.metrics_stamp(without.path) is None


@pytest.mark.parametrize("status, fraction, text", [
    ({"state": "starting"}, 0.0, "starting"),
    ({"state": "queued"}, 0.0, "starting"),  # launched, its process not yet up
    ({"state": "queued", "started": 1.0}, 0.0, "queued: waiting for the device"),
    ({"state": "running", "started": 1.0, "epoch": 0, "phase": "caching train images"}, 0.0,
     "caching train images: decoded once per data set and image size"),
    ({"state": "running", "epoch": 2, "epochs": 4, "step": 1, "steps": 4, "phase": "training"}, 0.3125,
     "epoch 2/4 · step 1/4"),
    ({"state": "running", "epoch": 2, "epochs": 4, "step": 4, "steps": 4, "phase": "validating"}, 0.5,
     "epoch 2/4 · step 4/4 · validating"),
])
def test_progress_says_what_a_live_run_is_doing(status, fraction, text):
    got, said = dashboard.progress(status)
    assert got == pytest.approx(fraction) and said.startswith(text)


def test_step_log_from_status_or_steps_file(tmp_path):
    in_status = make_run(tmp_path, "s", step_log=[{"step": 1, "loss": 2.0, "lr": 0.1}, "junk"])
    assert dashboard.step_log(in_status) == [{"step": 1, "loss": 2.0, "lr": 0.1}]
    in_file = make_run(tmp_path, "f", steps=12)  # status "steps" is the epoch's step count, not a log
    (in_file.path / "steps.jsonl").write_text(json.dumps({"step": 1, "loss": 1.5, "lr": 0.01}) + "\n{\"step\": 2, ")
    assert dashboard.step_log(in_file) == [{"step": 1, "loss": 1.5, "lr": 0.01}]
    assert dashboard.step_log(make_run(tmp_path, "none")) == []


def test_clock_and_ago():
    assert [dashboard.clock(s) for s in (75, 3725, None, math.inf)] == ["1:15", "1:02:05", "–", "–"]
    assert [dashboard.ago(s) for s in (5, 120, 7200, 3 * 86400)] == ["just now", "2 min ago", "2 h ago", "3 days ago"]


def test_cpu_rate_scales_with_pixels_from_the_nearest_measurement():
    assert plan.cpu_images_per_s("resnet18", 512) == 3.9 and plan.cpu_images_per_s("resnet50", 224) == 6.2
    assert plan.cpu_images_per_s("resnet18", 128) == pytest.approx(19.6 * (224 / 128) ** 2)
    assert plan.cpu_images_per_s("resnet50", 384) == pytest.approx(1.3 * (512 / 384) ** 2)
    cfg = TrainConfig(arch="resnet18", image_size=512, epochs=2)
    assert plan.cpu_seconds(cfg, 39, 70) == pytest.approx(2 * (10 + 70 / (plan.EVAL_SPEEDUP * 3.9)))
    assert [plan.duration_text(s) for s in (20, 600, 3 * 3600 + 59 * 60 + 40, 5 * 86400)] == [
        "under a minute", "about 10 min", "about 4 h 00 min", "about 5 days"]


def test_missing_weights_only_for_pretrained_runs_without_a_file(monkeypatch):
    monkeypatch.setattr(plan, "weights_available", lambda arch: (arch == "resnet18", f"/hub/{arch}.pth"))
    configs = [TrainConfig(arch="resnet50"), TrainConfig(arch="resnet18", pretrained=True),
               TrainConfig(arch="resnet50", pretrained=True, weights="/mine.pth")]
    assert plan.missing_weights(configs) == {}
    needing = TrainConfig(arch="resnet50", pretrained=True)
    missing = plan.missing_weights(configs + [needing])
    assert missing == {"resnet50": "/hub/resnet50.pth"}
    assert [plan.needs_missing_weights(c, missing) for c in configs + [needing]] == [False, False, False, True]
