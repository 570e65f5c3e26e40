"""Where Retino keeps things: the one definition of each storage root, read by every layer.

- ``REPO_ROOT``: the checkout, where relative data paths and the trainer's working folder resolve;
- :func:`runs_root`: run folders, ``$RETINO_RUNS`` or ``checkpoints/`` (relative to the working folder);
- :func:`cache_root`: the decode-once image cache, ``$RETINO_CACHE`` or ``~/.cache/retino``;
- :func:`settings_path`: the dashboard's settings file, ``$RETINO_SETTINGS`` or ``.retino/settings.json``.

Functions, not constants: tests and the dashboard's trainers point them elsewhere through the
environment after import.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = Path("checkpoints")


def runs_root() -> Path:
    return Path(os.environ.get("RETINO_RUNS", DEFAULT_RUNS))


def cache_root() -> Path:
    return Path(os.environ.get("RETINO_CACHE", Path.home() / ".cache" / "retino"))


def settings_path() -> Path:
    return Path(os.environ.get("RETINO_SETTINGS") or REPO_ROOT / ".retino" / "settings.json")
