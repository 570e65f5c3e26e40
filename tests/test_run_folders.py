"""Issue 15, run folders: nothing a kill, a full disk, a reused --run-dir or a bad resume does loses a run.

Each test is named after the failure it reproduces. Kills fall deterministically between two writes
(``RETINO_KILL_AT=<save point>:<epoch>``, see retino.training.lifecycle.save_point).
"""
import errno
import hashlib
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TRAIN, copy_run, raw_status, run_cli, wait_for
from retino import runs
from retino import fileio

TIMING = {"seconds", "train_images_per_s"}


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _epochs(run):
    return [r["epoch"] for r in runs.read_metrics(run)]


def _digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
            and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """An unbroken 2-epoch run, kept (--keep-last) so tests can copy and resume it."""
    run = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--keep-last", "true", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    return run


def _copy(run, dest):
    shutil.copytree(run, dest, copy_function=lambda s, d: shutil.copy2(s, d))
    (dest / ".train.lock").unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------- kills between writes

@pytest.mark.parametrize("point, epoch", [("before-metrics", 1), ("before-last", 1), ("before-best", 1),
                                          ("before-last", 2)])
@pytest.mark.slow
def test_sigkill_between_two_writes_leaves_a_whole_folder_and_resume_keeps_epochs_consecutive(
        tiny_data, tmp_path, straight, point, epoch):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN, env={"RETINO_KILL_AT": f"{point}:{epoch}"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert runs.check_run(run) == [], runs.check_run(run)
    assert runs.read_status(run)["state"] == "interrupted"
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _epochs(run) == [1, 2]
    assert _comparable(runs.read_metrics(run)) == _comparable(runs.read_metrics(straight))
    best = runs.best_row(runs.read_metrics(run))
    assert runs.load_checkpoint(run / "best.pt")["epoch"] == best["epoch"]
    assert runs.check_run(run) == [] and runs.read_status(run)["state"] == "completed"


@pytest.mark.slow
def test_last_pt_deleted_by_hand_then_resume_starts_over_without_duplicate_epochs(tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    (run / "last.pt").unlink()
    (run / "test.json").unlink()
    runs.write_status(run, state="stopped")
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _epochs(run) == [1, 2]
    assert _comparable(runs.read_metrics(run)) == _comparable(runs.read_metrics(straight))


@pytest.mark.slow
def test_torn_last_metrics_line_is_restored_from_last_pt_on_resume(tiny_data, tmp_path, straight):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN, env={"RETINO_KILL_AT": "before-best:1"})
    assert r.returncode == -signal.SIGKILL
    path = run / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-40])  # epoch 1's line torn, as by a crash mid-write
    assert _epochs(run) == []
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _comparable(runs.read_metrics(run)) == _comparable(runs.read_metrics(straight))


@pytest.mark.slow
def test_full_disk_while_saving_best_pt_then_resume_once_space_is_back(tiny_data, tmp_path, straight, monkeypatch):
    from retino.training import train
    from retino.config import TrainConfig
    real = runs.save_checkpoint

    def full_for_best(path, state):
        if path.name == "best.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)
    monkeypatch.setattr(runs, "save_checkpoint", full_for_best)
    cfg = TrainConfig(data=str(tiny_data), epochs=2, image_size=64, batch_size=16, workers=0)
    run = tmp_path / "run"
    with pytest.raises(OSError):
        train.fit(cfg, run, progress=False)
    status = runs.read_status(run)
    assert status["state"] == "failed" and "no space left" in status["error"]
    monkeypatch.undo()
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _comparable(runs.read_metrics(run)) == _comparable(runs.read_metrics(straight))
    assert (run / "best.pt").is_file()


# ----------------------------------------------------------------------------- folders that are not ours

@pytest.mark.slow
def test_run_dir_at_an_existing_run_without_resume_is_refused(tiny_data, tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    before = _digest(run)
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not empty" in r.stderr and "--resume" in r.stderr
    assert _digest(run) == before


def test_run_dir_at_a_users_folder_leaves_their_config_json(tiny_data, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    r = run_cli("train", "--data", tiny_data, "--run-dir", folder, *TINY_TRAIN)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (folder / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize("where", ["file", "proc"])
def test_run_dir_at_a_file_or_under_proc_is_one_line(tiny_data, tmp_path, where):
    target = tmp_path / "a-file"
    target.write_text("x")
    path = target if where == "file" else "/proc/retino-run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", path, *TINY_TRAIN)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_second_trainer_on_the_same_run_dir_refuses(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--epochs", "30", "--image-size", "64", "--batch-size", "4", "--workers", "0",
            "--quiet", "--run-dir", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "retino", "train", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: raw_status(run).get("state") == "running" and raw_status(run).get("step", 0) >= 1)
        r = run_cli("train", "--resume", run, "--quiet")
        assert r.returncode == 2 and "is being trained by" in r.stderr, r.stderr
        assert raw_status(run)["state"] == "running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(120)
    assert runs.read_status(run)["state"] == "stopped"
    assert _epochs(run) == list(range(1, len(_epochs(run)) + 1))


# ----------------------------------------------------------------------------- resumes

@pytest.mark.parametrize("flags", [["--arch", "resnet50"], ["--head", "regress", "--loss", "mse"],
                                   ["--image-size", "96"]])
@pytest.mark.slow
def test_contradicting_resume_is_refused_before_touching_the_run(tmp_path, straight, flags):
    run = _copy(straight, tmp_path / "run")
    before = _digest(run)
    r = run_cli("train", "--resume", run, *flags)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "contradicts" in r.stderr, r.stderr
    assert _digest(run) == before and runs.read_status(run)["state"] == "completed"


@pytest.mark.slow
def test_resume_with_an_edited_config_json_is_refused(tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["arch"] = "resnet50"
    (run / "config.json").write_text(json.dumps(config))
    r = run_cli("train", "--resume", run)
    assert r.returncode == 2 and "last.pt was trained with arch='resnet18'" in r.stderr, r.stderr
    assert runs.read_status(run)["state"] == "completed"


@pytest.mark.slow
def test_resume_with_more_epochs_records_them_in_config_json(tmp_path, straight):
    run = _copy(straight, tmp_path / "run")
    r = run_cli("train", "--resume", run, "--epochs", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert _epochs(run) == [1, 2, 3]
    config = runs.read_json(run / "config.json")
    assert config["train"]["epochs"] == 3 and config["resumed"][-1]["changed"] == {"epochs": 3}


def test_resume_of_a_completed_run_says_there_is_nothing_to_resume(trained_classify, tmp_path):
    run = copy_run(trained_classify, tmp_path / "run")
    assert not (run / "last.pt").exists()  # deleted on completion without --keep-last
    r = run_cli("train", "--resume", run)
    assert r.returncode == 0 and "nothing to resume" in r.stderr
    r = run_cli("train", "--resume", run, "--epochs", "3")
    assert r.returncode == 2 and "--keep-last" in r.stderr


# ----------------------------------------------------------------------------- bad inputs to a run

@pytest.mark.slow
def test_diverging_regression_run_fails_with_a_nan_message_and_valid_json(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--lr", "10", "--optimizer", "sgd", "--momentum",
                "0.99", "--head", "regress", "--loss", "mse", *TINY_TRAIN)
    assert r.returncode == 1 and "loss became NaN" in r.stderr and "lower --lr" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    status = json.loads((run / "status.json").read_text())  # strict JSON: no bare NaN
    assert status["state"] == "failed" and "loss became NaN" in status["error"]


def test_all_test_images_unreadable_is_refused_before_training(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for line in (data / "test.csv").read_text().splitlines()[1:]:
        name = line.split(",")[0]
        for p in (data / "images").glob(f"{name}.*"):
            p.write_bytes(b"not an image")
    run = tmp_path / "run"
    r = run_cli("train", "--data", data, "--run-dir", run, *TINY_TRAIN)
    assert r.returncode == 2 and "test images are unreadable" in r.stderr, r.stderr
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("seed", ["-1", "5000000000"])
def test_out_of_range_seed_is_one_line(tiny_data, tmp_path, seed):
    r = run_cli("train", "--data", tiny_data, "--run-dir", tmp_path / "run", "--seed", seed, *TINY_TRAIN)
    assert r.returncode == 2 and "seed" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tiny_data, tmp_path):
    r = run_cli("train", "--data", tiny_data, "--run-dir", tmp_path / "run", "--device", "cuda", *TINY_TRAIN)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- the dashboard's view

@pytest.mark.parametrize("file, text", [("meta.json", "[]"), ("meta.json", "null"), ("status.json", "[]"),
                                        ("config.json", "[]"), ("config.json", '{"created": "yesterday"}')])
def test_one_bad_run_folder_is_listed_with_its_problem_and_can_be_deleted(tmp_path, file, text):
    root = tmp_path / "checkpoints"
    for name in ("good", "bad"):
        (root / name).mkdir(parents=True)
        fileio.write_json(root / name / "config.json", {"train": {"name": name}, "created": 1.0})
        fileio.write_json(root / name / "status.json", {"state": "completed", "updated": 1.0})
    (root / "bad" / file).write_text(text)
    listed = {r.id: r for r in runs.list_runs(root)}
    assert set(listed) == {"good", "bad"}
    assert listed["good"].problems == [] and listed["bad"].problems
    assert file in " ".join(listed["bad"].problems)
    assert runs.check_run(root / "bad")
    runs.delete_run(root / "bad", root)
    assert [r.id for r in runs.list_runs(root)] == ["good"]


@pytest.mark.parametrize("flag", ["--run-dir", "--data"])
def test_a_path_of_an_unknown_user_is_one_line(tiny_data, flag):
    args = ["--data", tiny_data, "--run-dir", "~nosuchuser-retino/x"] if flag == "--run-dir" else \
        ["--data", "~nosuchuser-retino/x"]
    r = run_cli("train", *args, *TINY_TRAIN)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (REPO / "~nosuchuser-retino").exists()
