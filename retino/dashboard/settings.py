"""The dashboard's persisted choices: which data-set folder is in use.

A small JSON file, ``.retino/settings.json`` in the repository root (git-ignored), or wherever
``RETINO_SETTINGS`` points. A missing or unreadable file means the defaults; writes are atomic, so
two dashboards saving at once leave one whole file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import TrainConfig
from ..data import Dataset, read_dataset
from ..data.names import IMAGE_EXTS
from ..fileio import resolve_data_path, write_json
from ..paths import settings_path

DEFAULT_DATA = TrainConfig().data  # the embedded synthetic set that `make run` generates, as training's default


def read_settings() -> dict:
    """The saved settings; ``{}`` when the file is missing or not valid JSON (never raises)."""
    try:
        saved = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def data_path() -> Path:
    """The data-set folder in use (the synthetic set unless the user chose another)."""
    value = read_settings().get("data")
    return resolve_data_path(value if isinstance(value, str) and value.strip() else DEFAULT_DATA)


def is_default_data(path) -> bool:
    """Whether ``path`` is the default data set (the synthetic one ``make data`` generates)."""
    return Path(path) == resolve_data_path(DEFAULT_DATA)


def use_dataset(path: str) -> Dataset:
    """Read the folder at ``path`` and, only if it reads, save it as the data set in use.

    Raises:
        DatasetError: the folder is missing or matches no layout (the saved choice is unchanged).
    """
    ds = read_dataset(resolve_data_path(path))
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    write_json(settings_path(), {**read_settings(), "data": str(ds.root)})
    return ds


def folder_fingerprint(path) -> tuple:
    """Changes when files are added, removed or replaced anywhere in a data-set layout.

    A cache key for anything derived from a data set: the mtimes of the folder, of its files other
    than images (a CSV rewritten) and of folders two levels down (``images/``, ``train/0/``), whose
    mtime changes when an image is added or removed. No image file is stat-ed, so a flat
    35,000-image folder costs one directory listing.
    """
    root = Path(path)
    marks = []

    def walk(folder: Path, depth: int) -> None:
        marks.append((str(folder.relative_to(root)), folder.stat().st_mtime_ns))
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir():
                    if depth < 2:
                        walk(Path(entry.path), depth + 1)
                elif not entry.name.lower().endswith(IMAGE_EXTS):
                    marks.append((str(Path(entry.path).relative_to(root)), entry.stat().st_mtime_ns))

    try:
        walk(root, 0)
    except OSError:  # vanished or unreadable: the key still differs from the readable folder's
        return (str(root), None)
    return (str(root), tuple(sorted(marks)))


def is_synthetic(path) -> bool:
    """Whether the folder at ``path`` is a set Retino drew itself (``synth`` writes ``synth.json`` last)."""
    return (Path(path) / "synth.json").is_file()


def split_text(split: dict) -> str:
    """How a data set's splits came about, in words, from ``Dataset.split`` (as ``stats`` reports it).

    ``val_given`` decides the val half: a val carved from train is never called "given".
    """
    test = ("train and test given" if split.get("method", "given") == "given" else
            f"test cut from the labelled photos by patient ({split.get('test_fraction', 0.2):.0%}, "
            f"seed {split.get('seed', 0)})")
    if split.get("val_given"):
        return f"{test}, val given"
    if "val_fraction" not in split:
        return test
    return (f"{test}, val carved from train by patient ({float(split['val_fraction']):.0%} of its patients, "
            f"seed {split.get('val_seed', 0)})")
