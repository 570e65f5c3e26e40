"""The run folder, ``checkpoints/<run-id>/``: the only module that reads or writes one.

Files: ``config.json`` (written once), ``metrics.jsonl`` (one line per epoch, appended),
``status.json`` (state and heartbeat, replaced atomically), ``last.pt`` (a plain dict with the optimizer
state, for resuming) and ``best.pt`` (weights, config and normalisation only, for predicting), each
written to a temporary file and renamed, ``meta.json`` (display name and tags, user-editable),
``train.log`` (timestamped lines as the run goes, and the dashboard trainer's own output). The final
evaluation adds ``predictions.csv``, ``evaluation.json``, ``test.json`` and ``ood.npz``; only with all
of them is a run complete. Every write is whole or absent, so a kill at any moment leaves a folder
that reads.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .fileio import json_safe, write_atomic, write_json
from .paths import REPO_ROOT, runs_root

ACTIVE = ("starting", "queued", "running")  # states of a run whose trainer should be alive
HEARTBEAT_STALE_S = 30.0  # a live trainer writes status at least every few seconds


class RunError(ValueError):
    """A run folder that is missing or not whole; the message names the file."""


def read_json(path: Path) -> dict:
    """A JSON object file; anything else (missing, not JSON, a list, null, a folder) is a RunError."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise RunError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(obj).__name__ if obj is not None else 'null'}")
    return obj


# ----------------------------------------------------------------------------- naming

def safe_name(name: str) -> str:
    """A run name as a folder-name fragment: no separators, no dots at the start, no NULs."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("\x00", "")).strip(".-_")
    return slug[:60] or "run"


def create_run_dir(root: Path | None, name: str) -> Path:
    """A new, empty, uniquely named folder under ``root`` (safe when two dashboards start at once)."""
    root = Path(root or runs_root())
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{safe_name(name)}"
    for i in range(1000):
        path = root / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()  # atomic: exactly one process wins each name
            return path
        except FileExistsError:
            continue
    raise RunError(f"{root}: could not find a free run folder name for {base!r}")


def resolve_run_dir(path, root: Path | None = None) -> Path:
    """A run folder given by the user, refused when it escapes ``root`` (``../``, absolute, NUL)."""
    text = str(path)
    if "\x00" in text:
        raise RunError(f"{text!r}: a run path cannot contain a NUL byte")
    root = Path(root or runs_root()).resolve()
    p = Path(text)
    full = (p if p.is_absolute() else (Path.cwd() / p)).resolve()
    if not full.is_relative_to(root):
        inside = (root / p).resolve()
        if p.is_absolute() or not inside.is_relative_to(root):
            raise RunError(f"{text}: run folders must be inside {root}")
        full = inside
    return full


# ----------------------------------------------------------------------------- status and metrics

def write_status(run_dir: Path, **fields) -> dict:
    """Merge ``fields`` into status.json with a fresh heartbeat (``updated``)."""
    path = Path(run_dir) / "status.json"
    try:
        status = read_json(path)
    except RunError:
        status = {}
    status.update(fields, updated=time.time())
    write_json(path, status)
    return status


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_status(run_dir: Path) -> dict:
    """status.json, with ``state`` = interrupted when an active run's process is gone or silent."""
    status = read_json(Path(run_dir) / "status.json")
    if status.get("state") in ACTIVE:
        stale = time.time() - _number(status.get("updated")) > HEARTBEAT_STALE_S
        if not _pid_alive(status.get("pid")) or stale:
            status["reported_state"] = status["state"]
            status["state"] = "interrupted"
    return status


def _number(value, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one epoch as one line, in one write, flushed to disk (NaN written as null)."""
    line = (json.dumps(json_safe(row), default=float, allow_nan=False) + "\n").encode()
    fd = os.open(Path(run_dir) / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every whole epoch line; a partial last line (a kill mid-write) is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def append_log(run_dir: Path, line: str) -> None:
    """One timestamped line at the end of train.log, written through at once, so the log can be
    followed while the run trains (the dashboard's trainer also sends its own output there)."""
    text = f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n".encode("utf-8", "replace")
    try:
        fd = os.open(Path(run_dir) / "train.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return  # the log is a courtesy: a run never fails for want of it
    try:
        os.write(fd, text)
    except OSError:
        pass
    finally:
        os.close(fd)


# The final evaluation writes these, in this order, after the last epoch; a run is complete only
# once all of them exist (then last.pt is removed unless kept, and status.json says completed).
FINAL_FILES = ("predictions.csv", "evaluation.json", "test.json", "ood.npz")


def final_missing(run_dir: Path) -> list[str]:
    """The final evaluation's files a run folder lacks. ``ood.npz`` is excused when the run recorded
    that its splits gave the OOD model nothing to fit (status ``ood_skipped``)."""
    run_dir = Path(run_dir)
    missing = [n for n in FINAL_FILES if not (run_dir / n).is_file()]
    if "ood.npz" in missing:
        try:
            if read_json(run_dir / "status.json").get("ood_skipped"):
                missing.remove("ood.npz")
        except RunError:
            pass
    return missing


def remove_final(run_dir: Path) -> None:
    """Before more epochs are trained, the previous final evaluation no longer describes the run."""
    for name in FINAL_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep the epochs up to ``last_epoch`` (a resume replays the later ones); drops torn lines."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        return  # nothing to keep: no empty file that would say an epoch had begun
    rows = [r for r in read_metrics(run_dir) if r["epoch"] <= last_epoch]
    write_atomic(Path(run_dir) / "metrics.jsonl",
                 "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows).encode())


def best_row(rows: list[dict]) -> dict | None:
    """The chosen epoch: highest val QWK (earliest on ties); runs from before the val split, by test QWK.

    The last epoch when no row has a value. A row's ``selected_on`` says which (``"test"`` marks an
    older run whose choice saw the test split).
    """
    key = "val_qwk" if any(_finite(r.get("val_qwk")) for r in rows) else "test_qwk"
    scored = [r for r in rows if _finite(r.get(key))]
    if not scored:
        return rows[-1] if rows else None
    return max(scored, key=lambda r: (float(r[key]), -int(r.get("epoch", 0))))


def selected_on(rows: list[dict]) -> str:
    """``"val"`` for runs that choose on val, ``"test"`` for runs made before the val split."""
    return "val" if any(_finite(r.get("val_qwk")) for r in rows) else "test"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reconcile(run_dir: Path, last: dict | None, for_predicting) -> None:
    """Make metrics.jsonl and best.pt agree with last.pt before a run continues (or starts over).

    Every epoch's save is three writes, metrics line -> last.pt -> best.pt; a kill or a full disk
    between two of them leaves:
    - metrics ahead of last.pt: the extra lines are dropped and their epochs replayed;
    - last.pt's own line torn off metrics.jsonl: restored from the copy last.pt carries;
    - best.pt behind last.pt's best epoch (killed before best.pt was written): rewritten from last.pt,
      whose weights are that epoch's.
    ``last`` None: no epoch is saved (killed in epoch 1, or last.pt deleted): metrics and best.pt of
    that attempt are cleared so the replay does not append after them.
    """
    run_dir = Path(run_dir)
    epoch = int(last["epoch"]) if last else 0
    truncate_metrics(run_dir, epoch)
    rows = read_metrics(run_dir)
    if last and last.get("row") and (not rows or rows[-1]["epoch"] < epoch):
        append_metrics(run_dir, last["row"])
        rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    if epochs != list(range(1, epoch + 1)):
        raise RunError(f"{run_dir / 'metrics.jsonl'}: holds epochs {epochs} but last.pt is at epoch {epoch}; "
                       f"the run cannot be resumed consistently (start a new run)")
    best = run_dir / "best.pt"
    if last is None:
        best.unlink(missing_ok=True)
        return
    best_epoch = int(last.get("best_epoch") or 0)
    if best_epoch == epoch:
        try:
            current = load_checkpoint(best).get("epoch")
        except RunError:
            current = None
        if current != epoch:
            save_checkpoint(best, for_predicting(last))


def git_commit(repo: Path) -> dict | None:
    """The code's git commit and whether the work tree had changes; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def labels_fingerprint(splits: dict) -> str:
    """A short hash of every split's (image, grade) pairs: two runs with the same labels share it."""
    h = hashlib.sha256()
    for name in sorted(splits):
        frame = splits[name]
        h.update(name.encode())
        for image, grade in sorted(zip(frame["image"].astype(str), frame["grade"].astype(int))):
            h.update(f"{image}\t{grade}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def write_config(run_dir: Path, train: dict, *, dataset: dict, norm, world: int, device: str,
                 data_fingerprint: str) -> None:
    """config.json: the TrainConfig, the data set and its split, versions, code commit, labels' fingerprint."""
    import sys
    import torch as _torch
    from . import __version__
    run_dir = Path(run_dir)
    try:
        created = float(read_json(run_dir / "config.json").get("created"))
    except (RunError, TypeError, ValueError):
        created = time.time()
    write_json(run_dir / "config.json", {
        "train": train, "dataset": dataset, "created": created,
        "versions": {"retino": __version__, "torch": _torch.__version__, "python": sys.version.split()[0]},
        "code": git_commit(REPO_ROOT), "data_fingerprint": data_fingerprint,
        "norm": {"mean": list(norm[0]), "std": list(norm[1])}, "world_size": world, "device": device})


def update_config(run_dir: Path, train: dict, changed: dict) -> None:
    """Record a resume's changed fields (``--epochs 3``): config.json says what the run now is."""
    config = read_json(Path(run_dir) / "config.json")
    history = list(config.get("resumed") or [])
    history.append({"time": time.time(), "changed": changed})
    write_json(Path(run_dir) / "config.json", {**config, "train": train, "resumed": history})


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save via a temporary file and rename: the previous checkpoint survives any failure."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(Path(path), buf.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint as plain tensors and containers; pickled code is refused (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a Python object torch refused: a damaged or foreign file
            raise RunError(f"{path}: not a loadable Retino checkpoint (not a torch.save file of tensors: "
                           f"damaged or something else)") from None
        # torch's own message advises weights_only=False, i.e. running whatever the file holds: never
        # repeat that to a user who may have been sent the file
        raise RunError(f"{path}: not a loadable Retino checkpoint: refused because it holds Python objects "
                       f"that could run code when loaded; get a trusted copy by training the run again or "
                       f"from the person who made it") from None
    except Exception as e:
        raise RunError(f"{path}: not a loadable Retino checkpoint ({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- listing

@dataclass
class RunInfo:
    path: Path
    id: str
    name: str
    state: str
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    created: float = 0.0
    problems: list = field(default_factory=list)


def read_meta(run_dir: Path) -> dict:
    try:
        return read_json(Path(run_dir) / "meta.json")
    except RunError:
        return {}


def load_run(run_dir: Path) -> RunInfo:
    """Everything the dashboard shows about a run; missing or broken files become ``problems``.

    Never raises for what is inside the folder: a list, null or a string where an object or a number
    belongs is a problem, shown next to the run, which can then be deleted.
    """
    run_dir = Path(run_dir)
    problems, config, status = [], {}, {}
    try:
        config = read_json(run_dir / "config.json")
    except RunError as e:
        problems.append(str(e))
    try:
        status = read_status(run_dir)
    except RunError as e:
        problems.append(str(e))
    meta = {}
    if (run_dir / "meta.json").exists():
        try:
            meta = read_json(run_dir / "meta.json")
        except RunError as e:
            problems.append(str(e))
    cfg = config.get("train") if isinstance(config.get("train"), dict) else {}
    if config and not cfg:
        problems.append(f"{run_dir / 'config.json'}: has no \"train\" object")
    name = next((str(v) for v in (meta.get("name"), cfg.get("name")) if isinstance(v, str) and v), run_dir.name)
    created = config.get("created")
    if created is not None and not _finite(created):
        problems.append(f"{run_dir / 'config.json'}: \"created\" is {created!r}, expected a Unix time")
    try:
        created = float(created) if _finite(created) else run_dir.stat().st_mtime
    except OSError:
        created = 0.0
    state = status.get("state") if isinstance(status.get("state"), str) else None
    state = state or ("unknown" if problems else "queued")
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
    return RunInfo(run_dir, run_dir.name, name, state, {**config, "train": cfg} if config else {}, status,
                   [str(t) for t in tags], created, problems)


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Every run folder under ``root``, newest first. Folders vanishing mid-read are skipped."""
    root = Path(root or runs_root())
    if not root.is_dir():
        return []
    runs = []
    for entry in root.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not any((entry / f).exists() for f in ("config.json", "status.json")):
            continue  # not a run folder (or deleted under our feet)
        try:
            runs.append(load_run(entry))
        except (OSError, ValueError):  # vanished mid-read, or a name the file system cannot encode
            continue
    return sorted(runs, key=lambda r: r.created, reverse=True)


def set_meta(run_dir: Path, *, name: str | None = None, tags: list[str] | None = None) -> dict:
    meta = read_meta(run_dir)
    if name is not None:
        meta["name"] = name.replace("\x00", "").strip()[:100]
    if tags is not None:
        meta["tags"] = sorted({t.strip()[:40] for t in tags if t.strip()})
    write_json(Path(run_dir) / "meta.json", meta)
    return meta


def delete_run(run_dir: Path, root: Path | None = None) -> None:
    """Delete a run folder (refused for a live one and for anything outside ``root``).

    A run that is a symlink to another folder loses the link only: the folder it points to may be
    another run, or another user's, and was never this entry's to delete.
    """
    link = _own_entry(run_dir, root)
    if link is not None:
        link.unlink()
        return
    run_dir = resolve_run_dir(run_dir, root)
    try:
        state = read_status(run_dir).get("state")
    except RunError:  # no or broken status.json: a half-copied folder, deletable
        state = None
    if state in ACTIVE:
        raise RunError(f"{run_dir.name}: is still {state}; stop it first")
    shutil.rmtree(run_dir)


def _own_entry(path, root: Path | None) -> Path | None:
    """``path`` itself (not what it points to) when it is a symlink whose own place is inside ``root``."""
    root = Path(root or runs_root()).resolve()
    p = Path(str(path))
    for entry in ([p] if p.is_absolute() else [Path.cwd() / p, root / p]):
        entry = Path(os.path.abspath(entry))
        if entry.is_symlink() and entry.parent.resolve().is_relative_to(root):
            return entry
    return None


def run_summary(run_dir: Path) -> dict:
    """State, epochs done and which checkpoints exist: what ``check-run`` prints beside whole / not whole."""
    run_dir = Path(run_dir)
    info = load_run(run_dir)
    rows = read_metrics(run_dir)
    epochs = info.config.get("train", {}).get("epochs")
    have = [n for n in ("best.pt", "last.pt", "test.json", "predictions.csv", "ood.npz") if (run_dir / n).is_file()]
    final = final_missing(run_dir)
    trained = isinstance(epochs, int) and len(rows) >= epochs
    if not (run_dir / "config.json").is_file():
        resume = "no config.json (stopped before it saved its settings): nothing to resume, start it again"
    elif trained and final and ("last.pt" in have or "best.pt" in have):
        resume = f"all epochs trained; a resume finishes the final evaluation ({', '.join(final)} missing)"
    elif info.state == "completed" and not final:
        resume = "completed: nothing to resume"
    elif "last.pt" in have:
        resume = "a resume continues from last.pt"
    else:
        resume = "no last.pt: a resume starts again from epoch 1"
    return {"state": info.state, "error": info.status.get("error"), "epochs_done": len(rows), "epochs": epochs,
            "files": have, "missing": [n for n in ("best.pt", "last.pt") if n not in have],
            "unfinished": final if trained or info.state == "completed" else [], "resume": resume}


def check_run(run_dir: Path) -> list[str]:
    """Problems that make a run folder not whole (empty list when whole)."""
    run_dir = Path(run_dir)
    problems = []
    if not run_dir.is_dir():
        return [f"{run_dir}: no such folder"]
    problems += load_run(run_dir).problems
    path = run_dir / "metrics.jsonl"
    if path.exists():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            lines = []
            problems.append(f"{path}: cannot be read ({e})")
        epochs = []
        for i, line in enumerate(lines, 1):
            try:
                epoch = json.loads(line)["epoch"]
                if not isinstance(epoch, int):
                    raise TypeError
                epochs.append(epoch)
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f"{path}, line {i}: not a whole metrics record")
        if epochs != list(range(1, len(epochs) + 1)):
            problems.append(f"{path}: epochs are {epochs}, expected consecutive from 1")
    if load_run(run_dir).state == "completed":
        problems += [f"{run_dir / n}: missing, though the run says completed; python -m retino train --resume "
                     f"{run_dir} finishes its final evaluation" for n in final_missing(run_dir)]
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            try:
                ckpt = load_checkpoint(run_dir / name)
                if "model" not in ckpt:
                    problems.append(f"{run_dir / name}: has no model state")
            except RunError as e:
                problems.append(str(e))
    return problems
