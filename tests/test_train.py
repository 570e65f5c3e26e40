"""The training engine end to end on a tiny synthetic set: files, resume, DDP, CLI errors."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TRAIN, copy_run, raw_status, run_cli, wait_for
from retino import runs
from retino.config import ARCHS, ConfigError, TrainConfig
from retino.models import list_models

REQUIRED = {"epoch", "train_loss", "train_acc", "seconds", "selected_on"} | {
    f"{split}_{k}" for split in ("val", "test") for k in ("loss", "acc", "qwk", "macro_f1", "confusion",
                                                          "balanced_acc", "recall", "precision", "ref_auc",
                                                          "ref_sens_at_90spec")}
TIMING = {"seconds", "train_images_per_s"}


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_config_choices_follow_the_registry():
    assert list(ARCHS) == list_models()


@pytest.mark.parametrize("change, field", [({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"),
                                           ({"lr": 0.0}, "lr"), ({"arch": "vgg"}, "arch"),
                                           ({"head": "regress", "loss": "ce"}, "regress")])
def test_config_refuses_out_of_range(change, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(TrainConfig(), **change).validate()


@pytest.mark.slow
def test_run_writes_every_file(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--keep-last", "true", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    rows = runs.read_metrics(run)
    assert [x["epoch"] for x in rows] == [1, 2]
    for row in rows:
        assert REQUIRED <= set(row)
        assert len(row["test_confusion"]) == 5 and all(len(c) == 5 for c in row["test_confusion"])
        assert sum(map(sum, row["test_confusion"])) == row["test_n"]
    status = runs.read_status(run)
    assert status["state"] == "completed" and status["epoch"] == 2 and status["error"] is None
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["dataset"]["layout"] == "retino"
    assert config["versions"]["torch"] == torch.__version__
    last = torch.load(run / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(last)
    best_ckpt = torch.load(run / "best.pt", weights_only=True)
    assert {"model", "epoch", "config", "norm", "thresholds"} <= set(best_ckpt)
    assert "optimizer" not in best_ckpt  # weights only: predicting never needs the optimizer's moments
    assert (run / "best.pt").stat().st_size < 0.5 * (run / "last.pt").stat().st_size
    best = max(rows, key=lambda x: (x["val_qwk"], -x["epoch"]))  # chosen on val, never on test
    assert best_ckpt["epoch"] == best["epoch"] and best_ckpt["selected_on"] == "val"
    assert {"predictions.csv", "evaluation.json", "test.json"} <= {p.name for p in run.iterdir()}
    assert config["data_fingerprint"] and "code" in config
    assert set(config["dataset"]["sizes"]) == {"train", "val", "test"}
    assert runs.check_run(run) == []


@pytest.mark.slow
def test_regression_head_writes_thresholds(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--head", "regress", "--loss", "smoothl1",
                "--sampler", "balanced", "--augment", "lab+color", "--optimizer", "sgd", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    row = runs.read_metrics(run)[-1]
    assert len(row["thresholds"]) == 4 and row["thresholds"] == sorted(row["thresholds"])






@pytest.mark.slow
def test_stop_mid_epoch_then_resume_equals_unbroken_run(tiny_data, tmp_path):
    args = ["--data", tiny_data, "--epochs", "3", "--image-size", "64", "--batch-size", "8", "--workers", "0",
            "--quiet"]
    straight = tmp_path / "straight"
    assert run_cli("train", *args, "--run-dir", straight).returncode == 0
    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "retino", "train", *map(str, args), "--run-dir", str(broken)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: raw_status(broken).get("epoch") == 2 and raw_status(broken).get("step", 0) >= 1)
    proc.send_signal(signal.SIGTERM)  # graceful: finish the step, save, state stopped
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert runs.read_status(broken)["state"] == "stopped"
    assert len(runs.read_metrics(broken)) < 3
    r = run_cli("train", "--resume", broken, "--quiet")
    assert r.returncode == 0, r.stderr
    assert runs.read_status(broken)["state"] == "completed"
    assert _comparable(runs.read_metrics(broken)) == _comparable(runs.read_metrics(straight))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_data, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc-per-node=2", "--master-port", "29517", "-m", "retino", "train",
                        "--data", str(tiny_data), "--run-dir", str(run), "--device", "cpu", *TINY_TRAIN],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = runs.read_metrics(run)
    assert [x["epoch"] for x in rows] == [1, 2]  # rank 0 alone wrote: one line per epoch
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert runs.read_status(run)["state"] == "completed"


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet99"], "invalid choice: 'resnet99'"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--batch-size", "-1"], "batch_size must be at least 1"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
])
def test_train_cli_rejects_bad_arguments(tiny_data, tmp_path, args, message):
    r = run_cli("train", "--data", tiny_data, "--run-dir", tmp_path / "r", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()  # refused before any run folder is made


def test_train_cli_bad_data_is_one_line(tmp_path):
    r = run_cli("train", "--data", tmp_path / "nowhere")
    assert r.returncode == 2 and "no such folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_evaluate_json(trained_classify, tmp_path):
    """The issue's exact keys; the test report is the chosen (val) epoch's, from predictions.csv."""
    run = copy_run(trained_classify, tmp_path / "run")  # evaluate writes its report into the run
    r = run_cli("evaluate", run, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"split", "selected_on", "epoch", "n_images", "n_patients", "metrics", "operating_point", "patient",
            "calibration"} <= set(out)
    assert out["selected_on"] == "val" and out["split"] == "test"
    assert out["epoch"] == runs.best_row(runs.read_metrics(run))["epoch"]
    for name in ("qwk", "accuracy", "macro_f1", "referable_auc", "sensitivity", "specificity"):
        entry = out["metrics"][name]
        assert {"value", "lo", "hi"} <= set(entry)
        if entry["value"] is not None:
            assert entry["lo"] <= entry["value"] <= entry["hi"]
    best = runs.best_row(runs.read_metrics(run))
    assert out["metrics"]["qwk"]["value"] == pytest.approx(best["test_qwk"])
    assert out["metrics"]["accuracy"]["value"] == pytest.approx(best["test_acc"])
    assert {"referable_auc", "sensitivity", "specificity"} <= set(out["patient"])
    assert {"threshold", "target_sensitivity"} <= set(out["operating_point"])
    assert {"ece", "ece_before_temperature", "temperature"} <= set(out["calibration"])
    same = json.loads(run_cli("compare", run, run, "--json").stdout)
    assert same["diff"]["qwk"]["value"] == 0 and same["diff"]["qwk"]["lo"] == same["diff"]["qwk"]["hi"] == 0


def test_heartbeat_throttles_step_writes_but_never_loses_the_last(tmp_path, monkeypatch):
    from retino.training import lifecycle
    writes = []
    real_write = runs.write_status

    def counting_write(run_dir, **fields):
        writes.append(fields["step"])
        return real_write(run_dir, **fields)
    monkeypatch.setattr(runs, "write_status", counting_write)
    beat = lifecycle.Heartbeat(tmp_path, {"state": "running", "step": 0}, progress_every=60)
    beat.progress(step=1)  # the first step is written at once: the page shows progress immediately
    for step in range(2, 201):
        beat.progress(step=step)
    assert writes == [1]
    assert raw_status(tmp_path)["step"] == 1
    beat.update(state="stopped")  # a state change writes everything recorded since
    assert writes == [1, 200]
    status = raw_status(tmp_path)
    assert (status["state"], status["step"]) == ("stopped", 200)
