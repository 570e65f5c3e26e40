"""The run folder, ``checkpoints/<run-id>/``: the only module that reads or writes one.

Files: ``config.json`` (written once), ``metrics.jsonl`` (one line per epoch, appended),
``status.json`` (state and heartbeat, replaced atomically), ``last.pt`` (a plain dict with the optimizer
state, for resuming) and ``best.pt`` (weights, config and normalisation only, for predicting), each
written to a temporary file and renamed, ``meta.json`` (display name and tags, user-editable),
``train.log`` (the process's output). Every write is whole or absent, so a kill at any moment leaves
a folder that reads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .fileio import write_atomic, write_json  # noqa: F401  (runs.write_json stays the run folder's writer)

DEFAULT_ROOT = Path("checkpoints")
STATES = ("queued", "running", "completed", "failed", "stopped", "interrupted")
ACTIVE = ("queued", "running")
HEARTBEAT_STALE_S = 30.0  # a live trainer writes status at least every few seconds


class RunError(ValueError):
    """A run folder that is missing or not whole; the message names the file."""


def runs_root() -> Path:
    return Path(os.environ.get("RETINO_RUNS", DEFAULT_ROOT))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


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
        stale = time.time() - float(status.get("updated", 0)) > HEARTBEAT_STALE_S
        if not _pid_alive(status.get("pid")) or stale:
            status["reported_state"] = status["state"]
            status["state"] = "interrupted"
    return status


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one epoch as one line, in one write, flushed to disk."""
    line = (json.dumps(row, default=float) + "\n").encode()
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
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep the epochs up to ``last_epoch`` (a resume replays the later ones)."""
    rows = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= last_epoch]
    write_atomic(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


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
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a loadable Retino checkpoint ({first})") from None


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
    """Everything the dashboard shows about a run; missing or broken files become ``problems``."""
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
    meta = read_meta(run_dir)
    cfg = config.get("train", {})
    name = meta.get("name") or cfg.get("name") or run_dir.name
    try:
        created = float(config.get("created") or run_dir.stat().st_mtime)
    except OSError:
        created = 0.0
    state = status.get("state", "unknown" if problems else "queued")
    return RunInfo(run_dir, run_dir.name, name, state, config, status, meta.get("tags", []), created, problems)


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
        except OSError:
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
    """Delete a run folder (refused for a live one and for anything outside ``root``)."""
    run_dir = resolve_run_dir(run_dir, root)
    try:
        state = read_status(run_dir).get("state")
    except RunError:  # no or broken status.json: a half-copied folder, deletable
        state = None
    if state in ACTIVE:
        raise RunError(f"{run_dir.name}: is still {state}; stop it first")
    shutil.rmtree(run_dir)


def check_run(run_dir: Path) -> list[str]:
    """Problems that make a run folder not whole (empty list when whole)."""
    run_dir = Path(run_dir)
    problems = []
    if not run_dir.is_dir():
        return [f"{run_dir}: no such folder"]
    for name in ("config.json", "status.json"):
        try:
            read_json(run_dir / name)
        except RunError as e:
            problems.append(str(e))
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().splitlines()
        epochs = []
        for i, line in enumerate(lines, 1):
            try:
                epochs.append(json.loads(line)["epoch"])
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f"{path}, line {i}: not a whole metrics record")
        if epochs != list(range(1, len(epochs) + 1)):
            problems.append(f"{path}: epochs are {epochs}, expected consecutive from 1")
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            try:
                ckpt = load_checkpoint(run_dir / name)
                if "model" not in ckpt:
                    problems.append(f"{run_dir / name}: has no model state")
            except RunError as e:
                problems.append(str(e))
    return problems
