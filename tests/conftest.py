"""Shared fixtures: every test gets its own runs folder and settings; images come from the generator.

Two tiny trained runs (``trained_classify``, ``trained_regress``) are trained once per session and
shared: a test that only reads a finished run takes one; a test that writes into a run works on
``copy_run(...)``. Every test that uses them is marked ``slow`` here (its session trains).
"""
import inspect
import os
import re
import shutil
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


# What the shared runs are trained with. Classify sees plain photos (tests look at the brightness of what
# the model saw); regress keeps the default Ben Graham normalisation, so both preprocessings are covered.
CLASSIFY_FLAGS = [*TINY_TRAIN, "--ben-graham", "false"]
REGRESS_FLAGS = [*TINY_TRAIN, "--head", "regress", "--loss", "mse"]
# The fixtures that train: a test requesting one (directly or through another fixture) is slow.
TRAINING_FIXTURES = {"trained_classify", "trained_regress"}


# A test whose own body starts another Python process (the CLI, torchrun ranks, a spawn pool) pays
# torch's import in each: seconds apiece, most of the inner loop's time. `make test` runs them all.
_STARTS_A_PROCESS = re.compile(r"\b(run_cli|subprocess\.|Popen|torchrun|mp\.spawn|spawn_context|get_context\(\"spawn)")


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames) or _starts_a_process(item):
            item.add_marker(pytest.mark.slow)


def _starts_a_process(item) -> bool:
    fn = getattr(item, "function", None)
    try:
        return bool(fn and _STARTS_A_PROCESS.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


def _train_shared(tiny_data: Path, tmp_path_factory, name: str, flags: list) -> Path:
    """One tiny run under the session's shared-runs folder, trained by the CLI as a user would.

    The folder sits outside every test's RETINO_RUNS (session fixtures are set up before the autouse
    ``isolated_dirs``), so the environment is given explicitly: nothing reaches ~/.cache or checkpoints/.
    """
    base = tmp_path_factory.getbasetemp()
    run_dir = base / "shared-runs" / name
    env = {"RETINO_RUNS": str(run_dir.parent), "RETINO_CACHE": str(base / "image-cache"),
           "RETINO_SETTINGS": str(base / "shared-settings.json")}
    result = run_cli("train", "--data", tiny_data, *flags, "--run-dir", run_dir, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="session")
def trained_classify(tiny_data, tmp_path_factory) -> Path:
    """A completed 2-epoch classify run on ``tiny_data`` (64 px). Read it; never write into it."""
    return _train_shared(tiny_data, tmp_path_factory, "20260101-000000-classify", CLASSIFY_FLAGS)


@pytest.fixture(scope="session")
def trained_regress(tiny_data, tmp_path_factory) -> Path:
    """A completed 2-epoch regress run (MSE, Ben Graham) on ``tiny_data``. Read it; never write into it."""
    return _train_shared(tiny_data, tmp_path_factory, "20260101-000001-regress", REGRESS_FLAGS)


def _link_checkpoints(src, dst):
    # metrics.jsonl is appended in place (O_APPEND), so only checkpoints, which are replaced by rename, are shared
    if str(src).endswith(".pt"):
        try:
            return os.link(src, dst)
        except OSError:
            pass
    shutil.copy2(src, dst)


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a run folder at ``dst`` that a test may change without touching the shared original.

    Checkpoints are hard-linked, not copied (fifty copies of one would fill a CI disk): Retino replaces
    them by rename and never writes into one. A run stores its data set by absolute path and nothing about
    its own folder, so the copy needs no re-pointing.
    """
    shutil.copytree(run, dst, copy_function=_link_checkpoints)
    (dst / ".train.lock").unlink(missing_ok=True)
    return dst


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
