"""Which run folder a ``train`` command may write into, decided before anything in it is touched.

A new dated folder; a ``--run-dir`` that is empty or the dashboard's own provisional launch; or, with
``--resume``, the same run, with only the settings a resume may change (how and where it runs, never
what is trained). Everything else is refused with one line and the folder left as it was (issue 15).
"""
from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

from .. import runs
from ..config import TrainConfig


class RunRefused(runs.RunError):
    """A run folder the command will not touch (busy, not ours, contradicting flags): left as it was."""


# fields a resume may change: how and where it runs, not what is trained
RESUME_MAY_CHANGE = ("epochs", "device", "workers", "eval_batch_size", "log_every", "keep_last", "compile", "name",
                     "amp")


def user_path(text: str, what: str) -> Path:
    """``~`` expanded; ``~nosuchuser/x`` and NUL bytes refused in one line (Path.expanduser raises)."""
    text = str(text)
    if "\x00" in text:
        raise runs.RunError(f"{what}: a path cannot contain a NUL byte")
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise runs.RunError(f"{what} {text}: no such user {text.split('/')[0][1:]!r} to expand ~ for")
    return Path(expanded)


def given_fields(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def resume_config(run_dir: Path, args):
    """The saved config with the flags a resume may change; refuses contradictions before touching anything."""
    if not run_dir.is_dir():
        raise RunRefused(f"cannot resume {run_dir}: no such run folder")
    if not (run_dir / "config.json").exists():
        again = " (this folder may be given as --run-dir)" if never_configured(run_dir) else " in a new folder"
        raise RunRefused(f"cannot resume {run_dir}: nothing to resume: it stopped before it saved its settings "
                         f"(no config.json); start it again{again}")
    try:
        saved = TrainConfig.from_dict(runs.read_json(run_dir / "config.json")["train"])
    except (runs.RunError, KeyError, TypeError) as e:
        raise RunRefused(f"cannot resume {run_dir}: {e}")
    given = given_fields(args)
    clash = {k: v for k, v in given.items() if k not in RESUME_MAY_CHANGE and v != getattr(saved, k)}
    if clash:
        k, v = next(iter(clash.items()))
        raise RunRefused(f"cannot resume {run_dir}: --{k.replace('_', '-')} {v} contradicts the run's "
                         f"{getattr(saved, k)!r}; a resume continues the same model (start a new run instead)")
    last = run_dir / "last.pt"
    if last.is_file():
        ckpt_cfg = runs.load_checkpoint(last).get("config") or {}
        drift = [k for k, v in ckpt_cfg.items() if k not in RESUME_MAY_CHANGE and getattr(saved, k, v) != v]
        if drift:
            k = drift[0]
            raise RunRefused(f"cannot resume {run_dir}: config.json says {k}={getattr(saved, k)!r} but last.pt was "
                             f"trained with {k}={ckpt_cfg[k]!r}; restore config.json")
    cfg = replace(saved, **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}).validate()
    changed = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE and v != getattr(saved, k)}
    return saved, cfg, changed


def fresh_run_dir(args, cfg) -> Path:
    """--run-dir as given (refused when it holds anything but this run's launch) or a new dated folder."""
    if not args.run_dir:
        if int(os.environ.get("RANK", "0")) != 0:
            raise runs.RunError("under torchrun, pass --run-dir so every process writes to the same run")
        return runs.create_run_dir(None, cfg.display_name())
    run_dir = user_path(args.run_dir, "--run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise runs.RunError(f"--run-dir {run_dir}: is a file, expected a folder for the run")
    if (int(os.environ.get("RANK", "0")) == 0 and run_dir.is_dir() and not launched_here(run_dir)
            and not never_configured(run_dir)):
        try:
            entries = sorted(p.name for p in run_dir.iterdir())
        except OSError as e:
            raise runs.RunError(f"--run-dir {run_dir}: cannot be read ({e.strerror})")
        if entries:
            hint = (f"; to continue that run: python -m retino train --resume {run_dir}"
                    if "config.json" in entries else "")
            raise RunRefused(f"--run-dir {run_dir}: is not empty (holds {', '.join(entries[:3])}"
                             f"{', ...' if len(entries) > 3 else ''}); give a new folder{hint}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise runs.RunError(f"--run-dir {run_dir}: cannot write there ({e.strerror or e})")
    return run_dir


def launched_here(run_dir: Path) -> bool:
    """The dashboard's launch: a provisional config.json and status, nothing trained yet."""
    try:
        config = runs.read_json(run_dir / "config.json")
    except runs.RunError:
        return False
    trained = any((run_dir / n).exists() for n in ("metrics.jsonl", "last.pt", "best.pt"))
    return bool(config.get("provisional")) and not trained


def never_configured(run_dir: Path) -> bool:
    """A trainer's folder from before it saved its settings: status.json (and its log and lock) only,
    its trainer gone. Nothing in it can be resumed; it may be started again in place."""
    try:
        names = {p.name for p in Path(run_dir).iterdir()}
        state = runs.read_status(run_dir).get("state")
    except (OSError, runs.RunError):
        return False
    return "status.json" in names and names <= {"status.json", "train.log", ".train.lock"} and state not in runs.ACTIVE
