"""Files and paths shared by the package: atomic writes, the repository root, data-set paths.

Every file Retino replaces (a run's status and checkpoints, the dashboard's settings) is written
to a temporary file in the same folder, flushed and renamed over the old one: a reader sees the old
file or the new, never half of one, and a full disk leaves the previous file in place.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .paths import REPO_ROOT



def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to ``path.tmp-<pid>`` then rename: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the previous file in place
        raise
    _fsync_dir(path.parent)


def json_safe(obj):
    """``obj`` with NaN and infinities as None: strict JSON (a bare NaN is not JSON), numpy scalars as numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy / torch scalars
        try:
            obj = obj.item()
        except (ValueError, RuntimeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """``obj`` as indented, strict JSON (``json_safe``), written atomically; other values as text."""
    write_atomic(path, (json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False) + "\n").encode())


def resolve_data_path(path) -> Path:
    """A data-set path as typed, made absolute.

    ``~`` is expanded; a relative path is taken from the working directory when it exists there,
    else from the repository root (so the default ``data/synthetic`` is found from any directory).
    """
    p = Path(str(path).strip())
    try:
        p = p.expanduser()
    except RuntimeError:  # ~nosuchuser: kept as typed, so the reader says the folder does not exist
        pass
    if p.is_absolute():
        return p
    here = Path.cwd() / p
    try:
        found = here.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a folder here either
        found = False
    return here if found else REPO_ROOT / p
