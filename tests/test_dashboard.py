"""retino.dashboard.runs_view and retino.dashboard.plan on hand-made run folders: no training, no Streamlit."""
import json
import math
import time

import pytest
import torch

from retino.dashboard import runs_view as dashboard, plan
from retino import runs
from retino.config import TrainConfig
from retino import fileio


def make_run(root, name, *, state="completed", rows=(), created=0.0, **status):
    path = root / name
    path.mkdir(parents=True)
    fileio.write_json(path / "config.json", {"train": TrainConfig().to_dict(), "created": created})
    fileio.write_json(path / "status.json", {"state": state, "updated": 0, **status})
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


# ----------------------------------------------------------------------------- what a new user trips over

def test_item1_unfinished_runs_are_marked_provisional(tmp_path):
    import os
    rows = [{"epoch": e, "val_qwk": 0.5} for e in (1, 2)]
    live = make_run(tmp_path, "live", state="running", pid=os.getpid(), updated=time.time(), rows=rows, epoch=3, epochs=6)
    assert dashboard.provisional_note(live, rows) == "still training, epoch 3 of 6: provisional, its best epoch so far"
    failed = make_run(tmp_path, "failed", state="failed", rows=rows[:1], epoch=2, epochs=6)
    assert dashboard.provisional_note(failed, rows[:1]).startswith("failed, in epoch 2 of 6: provisional")
    queued = make_run(tmp_path, "queued", state="queued", pid=os.getpid(), updated=time.time(), epochs=6)
    assert "nothing to compare" in dashboard.provisional_note(queued, [])
    assert dashboard.provisional_note(make_run(tmp_path, "done", rows=rows, epochs=2), rows) is None


def test_item1_a_running_run_is_never_evaluated_into_its_own_folder(tmp_path):
    import os
    live = make_run(tmp_path, "live", state="running", pid=os.getpid(), updated=time.time(), rows=[{"epoch": 1, "val_qwk": 0.5}],
                    epoch=2, epochs=6)
    runs.save_checkpoint(live.path / "best.pt", {"model": {}})
    with pytest.raises(runs.RunError, match="live is running, not finished"):
        dashboard.evaluate_once(live.path)
    assert not any((live.path / name).exists() for name in dashboard.EVALUATION_FILES)


def test_item2_every_figure_names_its_split():
    rows = [{"epoch": 1, "val_qwk": 0.9, "test_qwk": 0.95, "test_acc": 0.8},
            {"epoch": 2, "val_qwk": 0.953, "test_qwk": 0.969, "test_acc": 0.912}]
    assert dashboard.best_summary(rows) == ("best epoch 2 (chosen on val): val QWK 0.953, test QWK 0.969, "
                                            "test accuracy 91.2%")
    older = [{"epoch": 1, "test_qwk": 0.7, "test_acc": 0.6}]  # made before runs had a val split
    assert dashboard.best_summary(older) == "best epoch 1 (chosen on test): test QWK 0.700, test accuracy 60.0%"
    assert dashboard.best_summary([]) == "no finished epoch"
    assert dashboard.picker_label("demo", "completed", rows) == "demo · completed · val QWK 0.953"
    assert dashboard.figure(None, "val") == "val QWK –" and dashboard.value_text(rows[0], "test", "acc") == "80.0%"


def _cpu_run(root, name, *, arch, size, rate, state="completed", device="cpu"):
    path = root / name
    path.mkdir(parents=True)
    fileio.write_json(path / "config.json", {"train": {**TrainConfig().to_dict(), "arch": arch, "image_size": size},
                                           "device": device, "created": 0})
    fileio.write_json(path / "status.json", {"state": state, "images_per_s": rate})
    return runs.load_run(path)


def test_item3_estimates_come_from_what_this_machine_measured(tmp_path):
    infos = [_cpu_run(tmp_path, "gpu", arch="resnet18", size=128, rate=900.0, device="cuda"),  # newest first
             _cpu_run(tmp_path, "failed", arch="resnet18", size=128, rate=50.0, state="failed"),
             _cpu_run(tmp_path, "r18", arch="resnet18", size=128, rate=4.0),
             _cpu_run(tmp_path, "older", arch="resnet18", size=128, rate=40.0)]
    rate, source = plan.measured_images_per_s("resnet18", 256, infos)
    assert rate == pytest.approx(4.0 / 4) and source == "r18"  # a quarter of the pixels' rate at twice the side
    assert plan.measured_images_per_s("resnet50", 256, infos) is None
    cfg = TrainConfig(arch="resnet18", image_size=128, epochs=3)
    seconds, said = plan.estimate([cfg], 400, 90, infos)
    assert seconds == pytest.approx(3 * (400 / 4.0 + 90 / (plan.EVAL_SPEEDUP * 4.0))) and "`r18`" in said
    seconds, said = plan.estimate([TrainConfig(arch="resnet50", image_size=224, epochs=1)], 62, 0, infos)
    assert seconds == pytest.approx(10.0) and "BENCHMARKS.md" in said and "no finished run" in said


def test_item3_probe_times_real_training_steps_and_scales_to_the_run_size(monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(time, "perf_counter", lambda: 0.5 * next(ticks))   # every step takes half a second
    calls = []
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (calls.append(self.item()),
                                                                         real_backward(self, *a, **k))[1])
    rate = plan.probe_images_per_s("resnet18", 2 * plan.PROBE_SIZE, steps=2, batch=2)
    assert rate == pytest.approx(2 / 0.5 / 4)   # 2 images a half-second step, a quarter of the pixels' rate
    assert len(calls) == 3 and all(math.isfinite(c) and c > 0 for c in calls)   # one untimed step, two timed


def test_item3_estimate_takes_the_probe_when_no_run_was_measured(tmp_path):
    infos = [_cpu_run(tmp_path, "r18", arch="resnet18", size=128, rate=4.0)]
    asked = []

    def probe(arch, size):
        asked.append((arch, size))
        if arch == "resnet50":
            raise RuntimeError("no memory")
        return 3.0

    cfgs = [TrainConfig(arch="resnet18", image_size=128, epochs=1), TrainConfig(arch="resnet50", image_size=224,
                                                                                epochs=1)]
    seconds, said = plan.estimate(cfgs, 60, 0, infos, probe=probe)
    assert asked == [("resnet50", 224)]   # the measured run answers for resnet18
    assert seconds == pytest.approx(60 / 4.0 + 60 / 6.2) and "`r18`" in said and "BENCHMARKS.md" in said
    seconds, said = plan.estimate(cfgs[1:], 60, 0, [], probe=lambda arch, size: 3.0)
    assert seconds == pytest.approx(20.0) and "resnet50 timed on this machine just now" in said
    assert "BENCHMARKS.md" not in said


def test_item3_the_button_counts_what_start_launches(monkeypatch):
    from retino.config import expand_preset
    configs = expand_preset("lab-report", TrainConfig())
    missing = {"resnet18": "/hub/r18.pth", "resnet50": "/hub/r50.pth"}
    assert len(plan.runs_to_start(configs, {}, "scratch")) == 4
    assert [c.pretrained for c in plan.runs_to_start(configs, missing, "scratch")] == [False, False]
    assert plan.runs_to_start(configs, missing, "none") == []


def test_item4_a_stopped_run_says_where_resume_continues(tmp_path):
    rows = [{"epoch": e, "val_qwk": 0.5} for e in (1, 2)]
    mid = make_run(tmp_path, "mid", state="stopped", rows=rows, epoch=3, step=40, steps=100, epochs=6)
    assert dashboard.resume_point(mid, rows) == ("stopped in epoch 3 of 6 at step 40 of 100: Resume continues "
                                                 "epoch 3 from step 40")
    end = make_run(tmp_path, "end", state="stopped", rows=rows, epoch=2, step=100, steps=100, epochs=6)
    assert dashboard.resume_point(end, rows).endswith("Resume continues from epoch 3")
    early = make_run(tmp_path, "early", state="stopped", epoch=0, step=0, epochs=6)
    assert dashboard.resume_point(early, []) == "stopped before its first epoch finished: Resume starts from epoch 1"
    killed = make_run(tmp_path, "killed", state="interrupted", rows=rows, epoch=3, step=7, epochs=6)
    assert dashboard.resume_point(killed, rows) == "ended after epoch 2 of 6: Resume continues from epoch 3"


def test_item4_the_queue_message_names_the_run_it_waits_for(tmp_path):
    import os
    holder = make_run(tmp_path, "holder", state="running", pid=os.getpid(), updated=time.time())
    waiting = make_run(tmp_path, "waiting", state="queued", pid=os.getpid(), updated=time.time(), started=1.0)
    assert dashboard.device_holder(waiting, [holder, waiting], {"holder": "resnet18-demo"}) == "resnet18-demo"
    _, text = dashboard.progress(waiting.status, "resnet18-demo")
    assert text.startswith("queued: waiting for the device (`resnet18-demo` is training on it)")
    assert dashboard.device_holder(waiting, [waiting]) is None


@pytest.mark.parametrize("split, text", [
    ({"method": "given", "val_method": "given", "val_given": True}, "train and test given, val given"),
    ({"val_method": "stratified-by-patient", "val_fraction": 0.1, "val_seed": 0, "val_given": False},
     "train and test given, val carved from train by patient (10% of its patients, seed 0)"),
    ({"method": "stratified-by-patient", "seed": 0, "test_fraction": 0.2, "val_fraction": 0.15, "val_given": False},
     "test cut from the labelled photos by patient (20%, seed 0), val carved from train by patient (15%"),
])
def test_item5_split_given_only_when_val_was_given(split, text):
    from retino.dashboard import settings
    assert settings.split_text(split).startswith(text)


def test_item5_small_probabilities_and_unhelpful_calibration_in_words():
    assert [dashboard.probability_text(p) for p in (6e-14, 0.0004, 0.25, 0.9996, None)] == [
        "<0.001", "<0.001", "0.250", ">0.999", "–"]
    note = dashboard.calibration_note({"temperature": 3.11, "ece": 0.029, "ece_before_temperature": 0.019})
    assert note.startswith("temperature scaling did not help on test: ECE 0.019 before, 0.029 after")
    assert dashboard.calibration_note({"temperature": 1.2, "ece": 0.01, "ece_before_temperature": 0.02}) is None
    assert dashboard.calibration_note({"ece": None, "ece_before_temperature": 0.02}) is None


def test_item5_explaining_grade_0_says_why_its_map_is_empty():
    assert "Explain grade 2" in dashboard.explain_note(0, 0) and "this photo's grade" in dashboard.explain_note(0, 0)
    assert "not this photo's grade (3)" in dashboard.explain_note(0, 3)
    assert dashboard.explain_note(2, 0) is None
