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

from ..inference import choices
from ..evaluation import evaluate, report
from .. import runs
from ..data import read_dataset

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
    model), predictions.csv and evaluation.json saved (choices marked as made on test), then its report.

    Raises:
        RunError: the run is not finished (training, queued or failed): its folder is its trainer's, and
            an evaluation written there would be taken for the run's final one.
    """
    run = runs.load_run(Path(run_dir))
    if run.state not in PREDICTABLE:
        raise runs.RunError(f"{run.id} is {run.state}, not finished: it is evaluated when it completes, "
                            "not before")
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
    if not (run.path / "config.json").is_file():  # killed before it saved its settings
        return False, "Nothing to resume: it stopped before it saved its settings. Delete it and start it again."
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

def progress(status: dict, holder: str | None = None) -> tuple[float, str]:
    """A live run's progress bar: (fraction done, what it is doing).

    ``holder``: the label of the run a queued run waits for (:func:`device_holder`), named in the text.
    """
    state, phase = status.get("state"), status.get("phase")
    if state == "starting" or (state == "queued" and not status.get("started")):
        return 0.0, "starting: loading the data and the model"
    if state == "queued":
        who = f"`{holder}` is training on it" if holder else "another run is training on it"
        return 0.0, f"queued: waiting for the device ({who}); it starts when that run ends"
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


def device_holder(run: runs.RunInfo, infos, labels: dict | None = None) -> str | None:
    """The label (else id) of the run training on the device ``run`` queues for; None when none is seen.

    Runs on one device take turns (``lifecycle.device_queue``); the device is config.json's, where a
    run has not written it yet any running run is taken to hold it.
    """
    device = run.config.get("device")
    for other in infos:
        if other.id != run.id and other.state == "running" and (
                device is None or other.config.get("device") in (None, device)):
            return (labels or {}).get(other.id, other.id)
    return None


# ----------------------------------------------------------------------------- words for figures

SPLIT_METRICS = {"qwk": ("QWK", "{:.3f}"), "acc": ("accuracy", "{:.1%}")}


def value_text(row: dict | None, split: str, metric: str = "qwk") -> str:
    """A metric row's ``<split>_<metric>`` as text (``0.953``, ``91.2%``); a dash when it has none."""
    value = (row or {}).get(f"{split}_{metric}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return SPLIT_METRICS[metric][1].format(value) if ok else "–"


def figure(row: dict | None, split: str, metric: str = "qwk") -> str:
    """One figure named with its split, the same way on every page: ``val QWK 0.953``, ``test accuracy 91.2%``."""
    return f"{split} {SPLIT_METRICS[metric][0]} {value_text(row, split, metric)}"


def best_summary(rows) -> str:
    """A run's chosen epoch with its figures, each naming its split: what the Train card says."""
    row = runs.best_row(rows)
    if not row:
        return "no finished epoch"
    on = runs.selected_on(rows)
    figures = [figure(row, "val"), figure(row, "test"), figure(row, "test", "acc")] if on == "val" else \
        [figure(row, "test"), figure(row, "test", "acc")]
    return f"best epoch {row.get('epoch')} (chosen on {on}): " + ", ".join(figures)


def picker_label(label: str, state: str, rows) -> str:
    """A run picker's line: ``resnet18-demo · completed · val QWK 0.953`` (the QWK the run was chosen by).

    Short on purpose, so a narrow select box shows it whole; the folder name goes in the caption below.
    """
    return f"{label} · {state} · {figure(runs.best_row(rows), runs.selected_on(rows))}"


def probability_text(p) -> str:
    """A probability for people: ``0.734``, ``<0.001`` and ``>0.999`` rather than ``0.00000000000006``."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p):
        return "–"
    if p < 0.001:
        return "<0.001"
    return ">0.999" if p > 0.999 else f"{p:.3f}"


def calibration_note(calibration: dict | None) -> str | None:
    """A sentence when the temperature fitted on val made test calibration worse (ECE after > before); else None.

    Temperature scaling is fitted on val only, so on a small or shifted test split it can miss: a user
    reading "calibrated probabilities" should know when it did.
    """
    cal = calibration or {}
    before, after = cal.get("ece_before_temperature"), cal.get("ece")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (before, after)) or after <= before:
        return None
    return (f"temperature scaling did not help on test: ECE {before:.3f} before, {after:.3f} after "
            f"(temperature {cal.get('temperature', float('nan')):.2f}, fitted on val)")


# ----------------------------------------------------------------------------- unfinished runs

def _epochs_of(run: runs.RunInfo, rows) -> tuple[int, object]:
    """(the epoch it is in or stopped in, the epochs planned) from its status, else its metric rows."""
    s = run.status
    epoch = s.get("epoch")
    epoch = int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and epoch > 0 \
        else len(rows or []) + (run.state in runs.ACTIVE)
    return epoch, s.get("epochs") or run.config.get("train", {}).get("epochs") or "?"


def provisional_note(run: runs.RunInfo, rows) -> str | None:
    """Why a run's figures are not final (``still training, epoch 3 of 6: provisional``); None when completed."""
    if run.state == "completed":
        return None
    epoch, epochs = _epochs_of(run, rows)
    if run.state in ("starting", "queued"):
        return f"{run.state}, no epoch trained yet: nothing to compare"
    what = {"running": "still training", "failed": "failed"}.get(run.state, run.state)
    where = f"epoch {epoch} of {epochs}" if run.state == "running" else f"in epoch {epoch} of {epochs}"
    return f"{what}, {where}: provisional, its best epoch so far"


def resume_point(run: runs.RunInfo, rows) -> str:
    """Where a stopped or interrupted run is, and where Resume continues it.

    A stop saves the epoch as far as it got (step included), so Resume continues that epoch at that
    step; a process killed without a stop only has the checkpoint of its last finished epoch.
    """
    s = run.status
    epochs = s.get("epochs") or run.config.get("train", {}).get("epochs") or "?"
    done = len(rows or [])
    epoch, step, steps = (s.get(k) for k in ("epoch", "step", "steps"))
    if run.state == "stopped" and isinstance(epoch, int) and epoch > 0 and isinstance(step, int):
        if isinstance(steps, int) and step >= steps:
            return f"stopped after epoch {epoch} of {epochs}: Resume continues from epoch {epoch + 1}"
        of = f" of {steps}" if isinstance(steps, int) else ""
        return (f"stopped in epoch {epoch} of {epochs} at step {step}{of}: Resume continues epoch {epoch} "
                f"from step {step}")
    verb = "stopped" if run.state == "stopped" else "ended"
    if not done:
        return f"{verb} before its first epoch finished: Resume starts from epoch 1"
    return f"{verb} after epoch {done} of {epochs}: Resume continues from epoch {done + 1}"


def explain_note(explained: int, grade: int) -> str | None:
    """Why a Grad-CAM map of grade 0 is (nearly) empty, and what to ask instead; None for other grades.

    Grade 0 is the absence of lesions, so nothing in a photo raises its score in one place: its map
    has little to point at, whichever grade the photo got. Explaining the referable grade (2) shows
    what, if anything, pushes the photo towards referral.
    """
    if explained != 0:
        return None
    got = "this photo's grade" if grade == 0 else f"not this photo's grade ({grade})"
    return ("Grade 0 (no DR) is " + got + ": it means no lesions, so no spot raises it and its map is mostly "
            "empty. Explain grade 2 (moderate, the first referable grade) to see what pushes this photo "
            "towards referral.")
