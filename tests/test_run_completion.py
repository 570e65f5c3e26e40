"""Run folders that are whole or say why not: a run fails before its work, is complete only with every
file of its final evaluation, says the same about resuming everywhere, logs as it trains, and its
trainer processes are reaped.

Kills fall deterministically at named save points (``RETINO_KILL_AT=<point>:<epoch>``, see
retino.training.lifecycle.save_point).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import REPO, TINY_TRAIN, raw_status, run_cli, wait_for
from retino import __main__ as cli
from retino.training import admission
from retino.dashboard import runs_view as dashboard, jobs
from retino import models, runs
from retino.config import TrainConfig
from retino import fileio

RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: the ImageNet weights are not on this machine."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    monkeypatch.setattr(models, "_reachable", lambda *a, **k: False)
    yield hub
    torch.hub.set_dir(old)


def _cache_entries() -> list[str]:
    root = Path(os.environ["RETINO_CACHE"])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------- fail before the work

def test_pretrained_without_weights_fails_before_caching_and_writes_no_run_dir(tiny_data, tmp_path, empty_hub,
                                                                             capsys):
    run = tmp_path / "run"
    cached = _cache_entries()
    code = cli.main(["train", "--data", str(tiny_data), "--run-dir", str(run), "--pretrained", "true",
                     *TINY_TRAIN, "--image-size", "72"])  # a size nothing cached yet
    err = capsys.readouterr().err
    assert code == 2, err
    assert RESNET18_FILE in err and str(empty_hub / "checkpoints") in err  # which file, and where it goes
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()  # nothing written: the --run-dir stays free
    assert _cache_entries() == cached  # and no image was cached


def test_pretrained_without_weights_in_fit_fails_before_caching_and_leaves_the_folder_reusable(
        tiny_data, tmp_path, empty_hub):
    """The dashboard's trainer reaches fit() without the CLI's check: it too fails before caching."""
    from retino.training.train import fit
    run = tmp_path / "run"
    cached = _cache_entries()
    cfg = TrainConfig(data=str(tiny_data), pretrained=True, epochs=1, image_size=72, batch_size=16, workers=0)
    with pytest.raises(models.WeightsUnavailable, match=RESNET18_FILE):
        fit(cfg, run, progress=False)
    assert _cache_entries() == cached
    status = runs.read_status(run)
    assert status["state"] == "failed" and RESNET18_FILE in status["error"]
    assert not (run / "config.json").exists()
    args = type("Args", (), {"run_dir": str(run)})()
    assert admission.fresh_run_dir(args, cfg) == run  # accepted again as --run-dir


@pytest.mark.slow
def test_pretrained_with_the_weights_file_in_the_hub_cache_trains_into_the_failed_run_dir(
        tiny_data, tmp_path, empty_hub):
    from retino.training.train import fit
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(tiny_data), pretrained=True, epochs=1, image_size=64, batch_size=16, workers=0)
    with pytest.raises(models.WeightsUnavailable):
        fit(cfg, run, progress=False)  # the weights missing: a failed, settings-less folder
    hub = tmp_path / "torch" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), hub / "checkpoints" / RESNET18_FILE)
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--pretrained", "true", "--epochs", "1",
                *TINY_TRAIN[2:], env={"TORCH_HOME": str(tmp_path / "torch")})
    assert r.returncode == 0, r.stderr
    assert runs.read_status(run)["state"] == "completed" and runs.check_run(run) == []


# ----------------------------------------------------------------------------- complete means every file

@pytest.mark.slow
def test_kill_after_test_json_before_ood_npz_is_not_complete_and_resume_finishes_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN, env={"RETINO_KILL_AT": "before-ood:2"})
    assert r.returncode == -9, r.stderr
    assert (run / "test.json").is_file() and not (run / "ood.npz").exists() and (run / "last.pt").is_file()
    assert runs.read_status(run)["state"] == "interrupted"
    out = run_cli("check-run", run, "--json")
    summary = json.loads(out.stdout)
    assert summary["unfinished"] == ["ood.npz"] and "ood.npz" in summary["resume"]
    assert "finishes the final evaluation" in run_cli("check-run", run).stdout

    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "nothing to resume" not in r.stderr
    assert (run / "ood.npz").is_file()
    assert not (run / "last.pt").exists()  # --keep-last is false: removed once the run is complete
    assert runs.read_status(run)["state"] == "completed" and runs.check_run(run) == []
    assert [row["epoch"] for row in runs.read_metrics(run)] == [1, 2]  # nothing trained again

    # a completed run that lost a file of its final evaluation says so, and resume redoes it from best.pt
    (run / "ood.npz").unlink()
    problems = runs.check_run(run)
    assert any("ood.npz: missing" in p for p in problems), problems
    assert run_cli("check-run", run).returncode == 1
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (run / "ood.npz").is_file() and runs.check_run(run) == []
    assert [row["epoch"] for row in runs.read_metrics(run)] == [1, 2]


@pytest.mark.slow
def test_kill_after_ood_npz_before_last_pt_removed_resume_removes_it(tiny_data, tmp_path):
    """A kill after the final files but before the completion marker: resume only tidies up."""
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN, env={"RETINO_KILL_AT": "before-ood:2"})
    assert r.returncode == -9
    r = run_cli("train", "--resume", run, "--keep-last", "true", "--quiet")  # this time it is kept
    assert r.returncode == 0, r.stderr
    assert (run / "last.pt").is_file() and (run / "ood.npz").is_file()
    runs.write_status(run, state="running", pid=999999999)  # as if killed before status said completed
    r = run_cli("train", "--resume", run, "--keep-last", "false")
    assert r.returncode == 0 and "nothing to resume" in r.stderr
    assert not (run / "last.pt").exists() and runs.read_status(run)["state"] == "completed"


# ----------------------------------------------------------------------------- killed while caching

@pytest.mark.slow
def test_killed_while_caching_check_run_resume_and_page_agree_that_resume_works(tiny_data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, *TINY_TRAIN, env={"RETINO_KILL_AT": "caching:0"})
    assert r.returncode == -9
    assert (run / "config.json").is_file()  # its settings are saved before the cache is built
    assert "a resume starts again from epoch 1" in json.loads(run_cli("check-run", run, "--json").stdout)["resume"]
    assert dashboard.can_resume(runs.load_run(run)) == (True, "")
    r = run_cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    assert runs.read_status(run)["state"] == "completed" and [x["epoch"] for x in runs.read_metrics(run)] == [1, 2]


def test_a_folder_with_only_status_json_says_nothing_to_resume_everywhere(tiny_data, tmp_path):
    """A run killed while caching by an older Retino (before config.json came first)."""
    run = tmp_path / "run"
    run.mkdir()
    fileio.write_json(run / "status.json", {"state": "running", "pid": 999999999, "updated": time.time(),
                                          "phase": "caching test images"})
    assert "nothing to resume" in runs.run_summary(run)["resume"]
    ok, why = dashboard.can_resume(runs.load_run(run))
    assert not ok and "Nothing to resume" in why and "start it again" in why
    r = run_cli("train", "--resume", run)
    assert r.returncode == 2 and "nothing to resume" in r.stderr and "start it again" in r.stderr
    args = type("Args", (), {"run_dir": str(run)})()
    assert admission.fresh_run_dir(args, TrainConfig(data=str(tiny_data))) == run  # started again in place


def test_a_live_status_only_folder_is_not_taken_over(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fileio.write_json(run / "status.json", {"state": "running", "pid": os.getpid(), "updated": time.time()})
    args = type("Args", (), {"run_dir": str(run)})()
    with pytest.raises(admission.RunRefused, match="is not empty"):
        admission.fresh_run_dir(args, TrainConfig(data=str(tiny_data)))


# ----------------------------------------------------------------------------- train.log as it trains

@pytest.mark.slow
def test_train_log_is_written_while_training_not_only_at_the_end(tiny_data, tmp_path):
    run = tmp_path / "run"
    log = run / "train.log"
    args = ["--data", tiny_data, "--run-dir", run, "--epochs", "2", "--image-size", "64", "--batch-size", "4",
            "--workers", "0", "--quiet"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "retino", "train", *map(str, args)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        def step_logged():
            return log.is_file() and "epoch 1/2 step" in log.read_text()
        assert wait_for(lambda: step_logged() or proc.poll() is not None, timeout=600)
        assert step_logged(), f"no step line while training; log: {log.read_text() if log.exists() else None}"
        assert not (run / "test.json").exists()  # seen before the run's end
        assert wait_for(lambda: "epoch 1/2  train_loss" in log.read_text() or proc.poll() is not None, timeout=600)
        assert "epoch 1/2  train_loss" in log.read_text()
        assert proc.wait(timeout=900) == 0, (tmp_path / "stderr.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "caching train images" in text and "epoch 2/2  train_loss" in text
    assert text.rstrip().endswith("completed")


# ----------------------------------------------------------------------------- trainers are reaped

@pytest.mark.slow
def test_trainers_started_from_the_dashboard_are_reaped_when_they_exit(tmp_path):
    run = tmp_path / "checkpoints" / "old"
    run.mkdir(parents=True)
    fileio.write_json(run / "status.json", {"state": "stopped", "updated": time.time()})  # nothing to resume
    pid = jobs.resume(run)
    assert os.getsid(pid) != os.getsid(0)  # its own session: a closed tab or Streamlit's end does not stop it
    assert wait_for(lambda: _is_zombie_or_gone(pid), timeout=120)  # it exits at once (nothing to resume)
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10), "exited but left <defunct>"
    assert "nothing to resume" in (run / "train.log").read_text()


# ----------------------------------------------------------------------------- a checkpoint that could run code

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_without_torchs_advice_to_load_it_anyway(tmp_path):
    _Payload.marker = tmp_path / "ran"
    torch.save({"model": {}, "payload": _Payload()}, tmp_path / "best.pt")
    with pytest.raises(runs.RunError) as info:
        runs.load_checkpoint(tmp_path / "best.pt")
    message = str(info.value)
    assert "weights_only" not in message and "False" not in message
    assert "could run code" in message and "trusted copy" in message and "training the run again" in message
    assert len(message.splitlines()) == 1 and not _Payload.marker.exists()


def test_damaged_checkpoint_is_called_damaged_not_dangerous(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(runs.RunError, match="damaged") as info:
        runs.load_checkpoint(tmp_path / "best.pt")
    assert "could run code" not in str(info.value) and "weights_only" not in str(info.value)
