"""What the dashboard's pages read from run folders, as plain values (no Streamlit, no page logic).

Pages never name a run folder's files: they ask here whether a run has a checkpoint to predict
with, which run is the best, whether a failed run can be resumed, what a live run is doing. Reads
go through :mod:`retino.runs`; the few ``os.stat`` calls here only make cache keys.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from . import choices, evaluate, report, runs
from .data import read_dataset

PREDICTABLE = ("completed", "stopped")  # states whose best checkpoint Predict offers
# Failed runs that resuming cannot help: the same config or weights fail the same way again.
# Matched against status.json's error_type (written by the CLI) or the "Type: message" the trainer writes.
_NOT_RESUMABLE_TYPES = ("ConfigError", "WeightsUnavailable", "UserError", "OutOfMemoryError")
_NOT_RESUMABLE_TEXT = re.compile(r"out of memory|became nan", re.IGNORECASE)


# ----------------------------------------------------------------------------- run folders

def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def checkpoint_stamp(run_dir, checkpoint: str = "best.pt") -> tuple[int, int] | None:
    """(mtime, size) of a run's checkpoint, a cache key that changes when it is rewritten; None if absent."""
    return _stamp(Path(run_dir) / checkpoint)


def metrics_stamp(run_dir) -> tuple[int, int] | None:
    """(mtime, size) of a run's per-epoch metrics, a cache key; None before its first epoch."""
    return _stamp(Path(run_dir) / "metrics.jsonl")


def step_log(run: runs.RunInfo) -> list[dict]:
    """The trainer's per-step records ``{step, loss, lr}``, oldest first; [] when it writes none.

    Read from status.json (``step_log``, or ``steps`` when it is a list) or from ``steps.jsonl``.
    """
    for key in ("step_log", "steps"):
        log = run.status.get(key)
        if isinstance(log, list):
            return [s for s in log if isinstance(s, dict)]
    rows = []
    try:
        text = (Path(run.path) / "steps.jsonl").read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return [r for r in rows if isinstance(r, dict)]


# ----------------------------------------------------------------------------- evaluations (issue 10)

EVALUATION_FILES = ("test.json", "predictions.csv", "evaluation.json")


def evaluation_stamp(run_dir) -> tuple:
    """(mtime, size) of each of a run's evaluation files (None where absent): a cache key for them."""
    return tuple(_stamp(Path(run_dir) / name) for name in EVALUATION_FILES)


def read_evaluation(run_dir) -> tuple | None:
    """(predictions table, choices made on val) as saved; None when either file is missing (nothing is run).

    Raises:
        RunError: a file is there but malformed.
    """
    run_dir = Path(run_dir)
    if not all((run_dir / name).is_file() for name in ("predictions.csv", "evaluation.json")):
        return None
    return report.read_predictions(run_dir), choices.read_evaluation(run_dir)


def read_test_report(run_dir) -> dict | None:
    """A run's test report (the ``evaluate --json`` shape): test.json, else computed from saved predictions.

    An older run evaluated once has predictions.csv and evaluation.json but no test.json; its report
    is the bootstrap over those (about a second), no model is run. None for a run never evaluated.

    Raises:
        RunError: a file is there but malformed.
    """
    path = Path(run_dir) / "test.json"
    if path.is_file():
        return runs.read_json(path)
    saved = read_evaluation(run_dir)
    if saved is None:
        return None
    table, chosen = saved
    return report.report(table, chosen, split="test", epoch=chosen.get("epoch"))


def evaluate_once(run_dir) -> dict:
    """Evaluate a run made before test.json existed: its checkpoint on its test split once (slow: runs the
    model), predictions.csv and evaluation.json saved (choices marked as made on test), then its report."""
    table, chosen = evaluate.ensure_predictions(run_dir)
    return report.report(table, chosen, split="test", epoch=chosen.get("epoch"))


def image_files(config: dict, split: str = "test") -> dict[str, str]:
    """Image name -> file, for one split of the data set a run was trained on (config.json's ``dataset``).

    Raises:
        DatasetError: that data set is no longer where the run found it, or no longer readable.
    """
    train = config.get("train") or {}
    path = (config.get("dataset") or {}).get("path") or train.get("data")
    ds = read_dataset(path, val_fraction=float(train.get("val_fraction") or 0.1))
    frame = ds.splits.get(split)
    return {} if frame is None else dict(zip(frame["image"].astype(str), frame["path"].astype(str)))


# ----------------------------------------------------------------------------- choosing runs

def qwk_key(rows) -> str:
    """The QWK a run is judged by: validation where its rows have it, else test (``runs.selected_on``)."""
    return f"{runs.selected_on(rows)}_qwk"


def best_qwk(rows) -> float:
    """A run's best QWK (validation, else test); NaN with no epoch."""
    key = qwk_key(rows)
    row = runs.best_row(rows) or {}
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def predict_candidates(infos) -> list[runs.RunInfo]:
    """Runs Predict can use: completed or stopped, with a best checkpoint."""
    return [r for r in infos if r.state in PREDICTABLE and checkpoint_stamp(r.path) is not None]


def best_completed(infos, metrics: dict | None = None) -> runs.RunInfo | None:
    """The completed run with the highest QWK (validation, else test); None when no run completed.

    ``metrics``: run path -> its rows, where the caller has them already.
    """
    scored = []
    for r in infos:
        if r.state == "completed":
            rows = (metrics or {}).get(r.path)
            qwk = best_qwk(rows if rows is not None else runs.read_metrics(r.path))
            scored.append((-math.inf if math.isnan(qwk) else qwk, -r.created, r))
    return max(scored, key=lambda t: t[:2])[2] if scored else None


def completed_count(infos) -> int:
    return sum(r.state == "completed" for r in infos)


def can_resume(run: runs.RunInfo) -> tuple[bool, str]:
    """Whether Resume can help this run, and why not when it cannot.

    Stopped and interrupted runs continue from their last checkpoint. A failed run can, unless its
    error is in its settings or weights (a config error, missing ImageNet weights, out of memory, a
    loss that diverged): resuming would fail the same way.
    """
    if run.state in ("stopped", "interrupted"):
        return True, ""
    if run.state != "failed":
        return False, ""
    error = str(run.status.get("error") or "")
    kind = str(run.status.get("error_type") or error.split(":", 1)[0].strip())
    if kind in _NOT_RESUMABLE_TYPES or _NOT_RESUMABLE_TEXT.search(error):
        return False, "Resuming would fail the same way: start a new run with other settings."
    return True, ""


# ----------------------------------------------------------------------------- live runs

def progress(status: dict) -> tuple[float, str]:
    """A live run's progress bar: (fraction done, what it is doing)."""
    state, phase = status.get("state"), status.get("phase")
    if state == "starting" or (state == "queued" and not status.get("started")):
        return 0.0, "starting: loading the data and the model"
    if state == "queued":
        return 0.0, "queued: waiting for the device (another run is training on it)"
    epochs = max(int(status.get("epochs") or 1), 1)
    epoch, step = int(status.get("epoch") or 0), int(status.get("step") or 0)
    steps = status.get("steps")
    steps = int(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else 0
    done = min(max((max(epoch - 1, 0) + (step / steps if steps else 0)) / epochs, 0.0), 1.0)
    if isinstance(phase, str) and phase.startswith("caching"):  # the first minutes on a new data set
        return done, f"{phase}: decoded once per data set and image size, then reused"
    where = f"epoch {epoch}/{status.get('epochs', '?')} · step {step}/{steps or '?'}"
    if isinstance(phase, str) and phase not in ("training", "starting"):
        where += f" · {phase}"
    return done, where


def clock(seconds) -> str:
    """``1:15`` or ``2:03:04``; a dash when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "–"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def ago(seconds: float) -> str:
    """``3 min ago``, ``2 days ago``, ``just now``."""
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now"
