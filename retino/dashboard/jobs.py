"""Training jobs as their own processes: launched, stopped and resumed from the dashboard.

A job is ``python -m retino train`` in a new session, so closing the browser tab or restarting
Streamlit does not stop it. It talks to the dashboard only through its run folder.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from .. import runs
from ..config import TrainConfig
from ..fileio import resolve_data_path
from ..paths import REPO_ROOT, runs_root
from .. import fileio


def config_to_args(cfg: TrainConfig) -> list[str]:
    """The CLI flags that reproduce ``cfg`` exactly."""
    args = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        args += ["--" + f.name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _spawn(run_dir: Path, argv: list[str]) -> int:
    log = open(run_dir / "train.log", "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retino", "train", *argv], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env, start_new_session=True)
    log.close()
    # The trainer is our child: when it exits it stays a zombie (<defunct>) until we wait for it,
    # which would be when Streamlit exits. A daemon thread waits for it instead; the trainer itself
    # lives in its own session, so neither a closed tab nor this thread's end stops it.
    threading.Thread(target=proc.wait, name=f"reap-trainer-{proc.pid}", daemon=True).start()
    return proc.pid


def launch(cfg: TrainConfig, root: Path | None = None) -> Path:
    """Validate ``cfg``, make its run folder and start training it in the background."""
    cfg.validate()
    cfg = dataclasses.replace(cfg, data=str(resolve_data_path(cfg.data).resolve()),
                              weights=str(resolve_data_path(cfg.weights).resolve()) if cfg.weights else "")
    root = Path(root or runs_root()).resolve()
    run_dir = runs.create_run_dir(root, cfg.display_name())
    # a provisional config so the dashboard can name the run before training writes the full one
    # "provisional": the trainer recognises its own launch and may write into this non-empty folder
    fileio.write_json(run_dir / "config.json", {"train": cfg.to_dict(), "created": time.time(), "provisional": True})
    runs.write_status(run_dir, state="starting", pid=None, epoch=0, step=0, epochs=cfg.epochs)
    pid = _spawn(run_dir, config_to_args(cfg) + ["--run-dir", str(run_dir), "--quiet"])
    runs.write_status(run_dir, pid=pid)
    return run_dir


def resume(run_dir: Path) -> int:
    """Continue a stopped, failed or interrupted run from its last whole checkpoint."""
    run_dir = Path(run_dir)
    status = runs.read_status(run_dir)
    if status.get("state") in runs.ACTIVE:
        raise runs.RunError(f"{run_dir.name}: is still {status['state']}; nothing to resume")
    pid = _spawn(run_dir, ["--resume", str(run_dir), "--quiet"])
    runs.write_status(run_dir, state="starting", pid=pid, error=None, note=None, resume_from=status.get("state"))
    return pid


def _is_retino_process(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return False
    return b"retino" in cmd and b"train" in cmd


def stop(run_dir: Path) -> bool:
    """Ask a run to stop gracefully (SIGTERM: it finishes the step, saves last.pt, state stopped)."""
    status = runs.read_status(Path(run_dir))
    pid = status.get("pid")
    if status.get("state") not in runs.ACTIVE or not isinstance(pid, int) or not _is_retino_process(pid):
        return False  # never signal a process that is not this run's trainer (pids get reused)
    os.kill(pid, signal.SIGTERM)
    return True


def active_runs(root: Path | None = None) -> list[runs.RunInfo]:
    return [r for r in runs.list_runs(root) if r.state in runs.ACTIVE]
