"""Shared fixtures: every test gets its own runs folder and settings; images come from the generator."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, tmp_path_factory, monkeypatch):
    """Runs, settings and the image cache never touch the user's checkpoints/ or ~/.cache."""
    monkeypatch.setenv("RETINO_RUNS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("RETINO_SETTINGS", str(tmp_path / "settings.json"))
    monkeypatch.setenv("RETINO_CACHE", str(tmp_path_factory.getbasetemp() / "image-cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 60-image synthetic set at 64 px (Retino's own layout, with masks)."""
    from retino.data.synthetic import make_dataset
    return make_dataset(tmp_path_factory.mktemp("tiny") / "synthetic data", n=60, size=64, seed=0, progress=False)


def run_cli(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """``python -m retino ...`` in a fresh process, from the repo root."""
    return subprocess.run([sys.executable, "-m", "retino", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout, **kw)


TINY_TRAIN = ["--epochs", "2", "--image-size", "64", "--batch-size", "16", "--workers", "0", "--quiet"]


def wait_for(predicate, timeout=180, every=0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def raw_status(run: Path) -> dict:
    """status.json as written (no interrupted-derivation); {} while it does not exist yet."""
    from retino import runs
    try:
        return runs.read_json(run / "status.json")
    except runs.RunError:
        return {}
