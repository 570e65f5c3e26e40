"""Faults and hostile input: kills, crashes, full disks, races, pickles and path escapes lose nothing."""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_TRAIN, copy_run, raw_status, run_cli, wait_for
from retino import fileio, runs
from retino.dashboard import jobs
from retino.config import TrainConfig
from retino.data import load_image






ARGS = ["--epochs", "3", "--image-size", "64", "--batch-size", "8", "--workers", "0", "--quiet"]


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_images_per_s")} for r in rows]


# ----------------------------------------------------------------------------- faults

@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tiny_data, tmp_path):
    """SIGKILL mid-run, several trials: the folder stays whole, shows interrupted, and resumes."""
    straight = tmp_path / "straight"
    assert run_cli("train", "--data", tiny_data, "--run-dir", straight, *ARGS).returncode == 0
    rng = random.Random(1234)
    for trial in range(3):
        run = tmp_path / f"killed-{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "retino", "train", "--data", str(tiny_data),
                                 "--run-dir", str(run), *ARGS], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # somewhere in epochs 1-3: wait for a random (epoch, step) and kill without warning
        target = (rng.randint(1, 3), rng.randint(1, 6))
        wait_for(lambda: (raw_status(run).get("epoch", 0), raw_status(run).get("step", 0)) >= target
                  or proc.poll() is not None)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # whole on disk: every file parses, metrics lines are whole and consecutive
        assert runs.read_status(run)["state"] == "interrupted"  # pid gone: not "running" forever
        problems = runs.check_run(run)
        assert problems == [], problems
        r = run_cli("train", "--resume", run, "--quiet")
        assert r.returncode == 0, r.stderr
        assert runs.read_status(run)["state"] == "completed"
        assert _comparable(runs.read_metrics(run)) == _comparable(runs.read_metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_the_whole_process_group_still_stops_gracefully(tiny_data, tmp_path, sig):
    """Ctrl-C in a terminal, systemd or ``pkill -f`` signal the data-loader workers as well."""
    run = tmp_path / "run"
    args = ["--data", tiny_data, "--epochs", "4", "--image-size", "80", "--batch-size", "4", "--workers", "2",
            "--cache", "false", "--quiet", "--run-dir", run]  # uncached: a CPU run reads a cache without workers
    proc = subprocess.Popen([sys.executable, "-m", "retino", "train", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert wait_for(lambda: raw_status(run).get("step", 0) >= 2)
    os.killpg(proc.pid, sig)  # the group: the trainer and its worker processes
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    status = runs.read_status(run)
    assert (status["state"], status["error"]) == ("stopped", None), status
    assert runs.check_run(run) == []
    resumed = run_cli("train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert runs.read_status(run)["state"] == "completed"
    assert [row["epoch"] for row in runs.read_metrics(run)] == [1, 2, 3, 4]


def test_stale_heartbeat_reads_as_interrupted(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    fileio.write_json(run / "status.json", {"state": "running", "pid": os.getpid(),
                                          "updated": time.time() - runs.HEARTBEAT_STALE_S - 5})
    assert runs.read_status(run)["state"] == "interrupted"
    runs.write_status(run, state="running", pid=os.getpid())
    assert runs.read_status(run)["state"] == "running"


@pytest.mark.slow
def test_unreadable_image_with_cache_false_is_left_out_and_named(tiny_data, tmp_path):
    """Issue 15: --cache false with one unreadable image used to kill the run at step 0."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "images").glob("*.jpeg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    run = tmp_path / "run"
    r = run_cli("train", "--data", data, "--run-dir", run, "--cache", "false", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert runs.read_status(run)["state"] == "completed"
    skipped = runs.read_json(run / "config.json")["dataset"]["skipped"]
    assert [Path(s["file"]).name for s in skipped] == [victim.name]


@pytest.mark.slow
def test_out_of_memory_says_what_to_lower(tiny_data, tmp_path, monkeypatch):
    import retino.training.train as train

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "build_model", lambda *a, **k: Exploding())
    cfg = TrainConfig(data=str(tiny_data), epochs=1, image_size=64, batch_size=16, workers=0)
    with pytest.raises(torch.OutOfMemoryError):
        train.fit(cfg, tmp_path / "run", progress=False)
    status = runs.read_status(tmp_path / "run")
    assert status["state"] == "failed"
    assert "--batch-size" in status["error"] and "--image-size" in status["error"]


class _FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    from retino import fileio  # where the atomic writer lives
    monkeypatch.setattr(fileio, "open", lambda p, mode="r": _FullDisk(p, "w"), raising=False)
    with pytest.raises(OSError, match="No space"):
        runs.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2})
    monkeypatch.undo()
    ckpt = runs.load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_half_copied_and_vanishing_run_folders_are_listed_with_problems(tmp_path):
    root = tmp_path / "checkpoints"
    good = runs.create_run_dir(root, "good")
    fileio.write_json(good / "config.json", {"train": TrainConfig().to_dict()})
    runs.write_status(good, state="completed")
    half = runs.create_run_dir(root, "half")
    (half / "config.json").write_text('{"train": {"arch": "resn')  # cut off mid-copy
    listed = {r.id: r for r in runs.list_runs(root)}
    assert set(listed) == {good.name, half.name}
    assert listed[good.name].problems == []
    assert any("config.json" in p for p in listed[half.name].problems)
    assert any("status.json" in p for p in listed[half.name].problems)
    import shutil
    shutil.rmtree(good)
    assert [r.id for r in runs.list_runs(root)] == [half.name]


@pytest.mark.slow
def test_launches_get_their_own_folders_and_queue_on_one_device(tiny_data, tmp_path):
    root = tmp_path / "checkpoints"
    cfg = TrainConfig(data=str(tiny_data), epochs=2, image_size=64, batch_size=16, workers=0, device="cpu")
    launched = [jobs.launch(cfg, root) for _ in range(3)]
    assert len(set(launched)) == 3
    # whichever run waits for the device first is stopped there: it leaves the queue without training
    waiting = []

    def one_queued():
        waiting[:] = [r for r in launched if runs.read_status(r)["state"] == "queued"
                      and runs.read_status(r).get("started")]  # queued by its trainer, not just launched
        return bool(waiting)

    assert wait_for(one_queued)
    victim = waiting[0]
    assert wait_for(lambda: jobs.stop(victim) or runs.read_status(victim)["state"] != "queued", timeout=30)
    assert wait_for(lambda: runs.read_status(victim)["state"] == "stopped", timeout=60)
    assert runs.read_metrics(victim) == []
    others = [r for r in launched if r != victim]
    both_running, saw_queued = False, False

    def done():
        nonlocal both_running, saw_queued
        states = [runs.read_status(r)["state"] for r in others]
        both_running |= states == ["running", "running"]
        saw_queued |= "queued" in states and "running" in states
        return all(s in ("completed", "failed", "interrupted") for s in states)

    assert wait_for(done, timeout=240, every=0.1)
    assert [runs.read_status(r)["state"] for r in others] == ["completed", "completed"]
    assert saw_queued and not both_running


def test_check_run_cli(trained_classify, tmp_path):
    run = copy_run(trained_classify, tmp_path / "run")  # torn below
    ok = run_cli("check-run", run, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["whole"] is True
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a torn line
    (run / "last.pt").write_bytes(b"garbage")
    bad = run_cli("check-run", run)
    assert bad.returncode == 1
    assert "metrics.jsonl" in bad.stdout and "last.pt" in bad.stdout


# ----------------------------------------------------------------------------- hostile input

class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused(tmp_path):
    from retino.inference.trained import load_trained
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "payload": _Boom()}, run / "best.pt")
    with pytest.raises(runs.RunError, match="not a loadable"):
        runs.load_checkpoint(run / "best.pt")
    with pytest.raises(runs.RunError):
        load_trained(run)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../etc/evil", "/abs/path", "a\x00b", "..", ""])
def test_run_names_cannot_escape(tmp_path, name):
    root = tmp_path / "checkpoints"
    path = runs.create_run_dir(root, name)
    assert path.parent == root and "\x00" not in str(path)


@pytest.mark.parametrize("path", ["../outside", "/etc", "x\x00y", "a/../../b"])
def test_run_paths_cannot_escape(tmp_path, path):
    with pytest.raises(runs.RunError):
        runs.resolve_run_dir(path, tmp_path / "checkpoints")
    with pytest.raises(runs.RunError):
        runs.delete_run(path, tmp_path / "checkpoints")


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((200, 0, 0), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.size == (40, 40) and np.asarray(img)[..., 0].mean() > 150


def test_dashboard_config_is_local_and_bounded():
    conf = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert conf["server"]["address"] in ("127.0.0.1", "localhost")
    assert 1 <= conf["server"]["maxUploadSize"] <= 200
