"""The files a screen writes: the photo report, appended batch by batch and resumable, and the patient table.

``<name>.csv`` holds one row per photo (:data:`PHOTO_COLUMNS`), ``<name>.patients.csv`` one row per
patient (:data:`PATIENT_COLUMNS`), ``<name>.json`` what made the report (its ``key``: run,
checkpoint, folder, settings) and a summary. :func:`open_report` refuses to mix a report made with
another key and drops a last row cut short by a kill; rows are appended by :class:`Appender`, one
write a batch, flushed and fsynced.

Where a report may go is checked before anything is written (:func:`check_out`): never into a run
folder or a system folder, never over a file a screen did not write; :func:`report_lock` keeps a
second screen off the same report. Text cells that a spreadsheet would run as a formula are written
with a leading ``'`` (:func:`escape_cell`) and read back without it.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import runs
from .stats import parse_patient_eye

PROB_COLUMNS = [f"p{g}" for g in range(5)]
PHOTO_COLUMNS = ["image", "patient", "eye", "grade", *PROB_COLUMNS, "score", "referable_score", "referable",
                 "quality", "reasons", "error"]
PATIENT_COLUMNS = ["patient", "status", "referable", "worst_grade", "eyes", "photos", "ungraded"]
TEXT_COLUMNS = ("image", "patient", "eye", "quality", "reasons", "error", "status", "eyes")

# A patient's status. An eye that was not graded (unreadable, not a fundus) or was graded from an
# ungradable photo gives no evidence that the eye is healthy: screening programmes re-image or refer
# such a patient rather than pass them (README, "Screening a folder"), so Retino never says
# "no referral" for them.
REFER, REFER_UNGRADED, NO_REFERRAL = "refer", "refer: ungraded eye", "no referral"
STATUSES = (REFER, REFER_UNGRADED, NO_REFERRAL)

# Folders that hold the system, not photographs: screening them walks devices and /proc, and a report
# written there could replace system files. Refused with everything under them; "/" itself too.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys")
NAME_MAX, PATH_MAX = 255, 4095  # bytes, as Linux file systems allow (limits.h)
# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV Injection"); "'"
# itself is escaped too, so that reading a cell back (dropping one "'") gives exactly what was written.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
RUN_FILES = ("config.json", "best.pt", "status.json", "last.pt", "metrics.jsonl")


class ScreenError(ValueError):
    """A folder or report the screen cannot use: one line naming it and what was expected."""


def error_row(image: str, reason: str, quality: dict | None = None) -> dict:
    """A row that could not be graded: ``error`` says why (``"<image>: <reason>"``).

    ``image`` ending in "/" is a folder that could not be searched: it belongs to no patient.
    """
    patient, eye = parse_patient_eye(image) if not image.endswith("/") else ("", None)  # a folder: no patient
    row = {"image": image, "patient": patient, "eye": eye or "", "error": reason if reason.startswith(image) else
           f"{image}: {reason}"}
    if quality:
        row.update(quality=quality["verdict"], reasons="; ".join(quality["reasons"]))
    return row


# ----------------------------------------------------------------------------- the report files

def report_paths(out) -> tuple[Path, Path, Path]:
    """``(photos, patients, meta)``: ``x.csv``, ``x.patients.csv`` and ``x.json`` for ``out`` = ``x.csv``."""
    out = Path(out)
    if out.suffix.lower() != ".csv" or out.name.lower().endswith(".patients.csv"):
        raise ScreenError(f"{out}: expected a report file name ending in .csv (e.g. report.csv); the patient "
                          f"table is written beside it as <name>.patients.csv")
    stem = out.name[:-len(out.suffix)]
    return out, out.with_name(f"{stem}.patients.csv"), out.with_name(f"{stem}.json")


def default_report(folder, run_dir) -> Path:
    """``<runs>/screens/<folder name>-<hash>/screen-<run id>.csv``: one place a folder's screens resume from.

    Under the runs folder, not beside the photos: the folder screened may be read-only, shared, or a
    place a report must not land. The hash of the folder's full path keeps two folders of one name apart.
    """
    full = os.path.realpath(os.path.expanduser(str(folder)))
    tag = hashlib.sha1(os.fsencode(full)).hexdigest()[:8]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(full).name)[:60].lstrip(".") or "root"
    return runs.runs_root() / "screens" / f"{name}-{tag}" / f"screen-{Path(run_dir).name}.csv"


def short(path) -> str:
    """A path shortened for a one-line message (a 5,000-character path stays one readable line)."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}…{text[-40:]} ({len(text):,} characters)"


def path_problem(path) -> str | None:
    """Why the file system cannot take ``path`` (a name or the whole path too long), or None."""
    long = next((p for p in Path(path).parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long is not None:
        return f"a name in the path is {len(os.fsencode(long)):,} bytes long; at most {NAME_MAX} are allowed"
    if len(os.fsencode(str(path))) > PATH_MAX:
        return f"the path is {len(os.fsencode(str(path))):,} bytes long; at most {PATH_MAX} are allowed"
    return None


def system_folder(path) -> str | None:
    """The system folder ``path`` is (or is under), following links; None for an ordinary folder."""
    real = os.path.realpath(path)
    if real == "/":
        return "/"
    return next((s for s in SYSTEM_FOLDERS if real == s or real.startswith(s + "/")), None)


def escape_cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows as text: ``'`` before a leading ``= + - @`` tab, CR or ``'``."""
    return "'" + text if text.startswith(FORMULA_START) else text


def unescape_cell(text: str) -> str:
    """What :func:`escape_cell` was given."""
    return text[1:] if text.startswith("'") else text


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, str):
        return escape_cell(value)
    return str(value)


def _csv_lines(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([[_cell(row.get(c)) for c in PHOTO_COLUMNS] for row in rows])
    return buf.getvalue()


HEADER = ",".join(PHOTO_COLUMNS) + "\n"


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in new if old.get(k) != new.get(k)]


def check_out(paths: tuple[Path, Path, Path]) -> None:
    """Refuse a report that would land in a run folder or a system folder, or replace a file no screen wrote.

    A resumed report (its ``.csv`` and ``.json`` both there) is checked further by :func:`open_report`.
    """
    photos, patients, meta = paths
    for p in paths:
        why = path_problem(p)
        if why:
            raise ScreenError(f"{short(p)}: cannot be a report file: {why}")
    parent = photos.parent if str(photos.parent) else Path(".")
    system = system_folder(parent)
    if system:
        raise ScreenError(f"{short(photos)}: {system} is a system folder; write the report elsewhere")
    present = [f for f in RUN_FILES if (parent / f).exists()]
    if present:
        raise ScreenError(f"{short(photos)}: {short(parent)} is a run folder (it holds {present[0]}); a report "
                          f"written there could replace the run's files: choose another folder for --out")
    for p in paths:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ScreenError(f"{short(p)}: is {'a link' if p.is_symlink() else 'not a file'}; a report is "
                              f"written only to plain files: choose another report file")
    if not photos.exists():
        foreign = [p.name for p in (patients, meta) if p.exists()]
        if foreign:
            raise ScreenError(f"{short(photos)}: {' and '.join(foreign)} already exist beside it and this screen did "
                              f"not write them; choose another report file")


@contextlib.contextmanager
def report_lock(paths: tuple[Path, Path, Path]):
    """Hold ``.<name>.csv.lock`` beside the report while screening: a second screen on it is refused.

    Two screens appending to one report would interleave their rows (every photo twice). flock is
    released by the kernel when its holder dies, so a killed screen never locks its report.
    """
    photos = paths[0]
    lock = photos.with_name(f".{photos.name}.lock")
    try:
        photos.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise ScreenError(f"{short(photos)}: cannot write the report there ({e.strerror or e}); choose another --out")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ScreenError(f"{short(photos)}: is being written by another screen ({holder}); wait for it to "
                              f"finish or choose another report file") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def open_report(paths: tuple[Path, Path, Path], key: dict) -> set[str]:
    """The images already in the report (to skip); a new report starts with its header.

    A report made with another ``key`` (run, checkpoint, folder, settings) is refused. A last row
    cut short by a kill is dropped: that photo is graded again.
    """
    photos, _, meta = paths
    if photos.exists():
        if not meta.is_file():
            raise ScreenError(f"{photos}: exists but {meta.name} is not beside it, so it was not written by "
                              f"retino screen; choose another report file")
        try:
            old = runs.read_json(meta).get("key") or {}
        except runs.RunError as e:
            raise ScreenError(f"{meta}: cannot tell how {photos.name} was made ({e}); choose another report file")
        diff = _differences(old, runs.json_safe(key))
        if diff:
            raise ScreenError(f"{photos}: was made with {'; '.join(diff)}; re-run with the same settings to "
                              f"resume it, or choose another report file")
        try:
            data = photos.read_bytes()
        except OSError as e:
            raise ScreenError(f"{photos}: cannot be read ({e.strerror})")
        if not data.startswith(HEADER.encode()):
            raise ScreenError(f"{photos}: its first line is not the screen report's header ({HEADER.strip()})")
        if not data.endswith(b"\n"):  # the last batch's write was cut short: keep the whole rows
            with open(photos, "r+b") as f:
                f.truncate(data.rindex(b"\n") + 1)
            data = data[:data.rindex(b"\n") + 1]
        lines = data.decode("utf-8", "replace").splitlines()[1:]
        return {unescape_cell(row[0]) for row in csv.reader(lines) if row}
    try:
        photos.parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(meta, {"key": key})
        runs.write_atomic(photos, HEADER.encode())
    except OSError as e:
        raise ScreenError(f"{photos}: cannot write the report there ({e.strerror or e}); choose another --out")
    return set()


class Appender:
    """Rows appended to the report, each batch one write, flushed and fsynced before the next."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8", newline="")

    def write(self, rows: list[dict]) -> None:
        if rows:
            self.file.write(_csv_lines(rows))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def read_report(path) -> pd.DataFrame:
    """A photo report as a typed table (grade Int64, probabilities float, referable boolean)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    missing = [c for c in PHOTO_COLUMNS if c not in table.columns]
    if missing:
        raise ScreenError(f"{path}: not a screen report (missing columns {', '.join(missing)})")
    for col in ("grade",):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    for col in (*PROB_COLUMNS, "score", "referable_score"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype(float)
    table["referable"] = table["referable"].map({"True": True, "False": False}).astype("boolean")
    for col in ("image", "patient", "eye", "quality", "reasons", "error"):
        table[col] = table[col].map(unescape_cell)
    return table[PHOTO_COLUMNS]


def patient_table(photos: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, with the ``status`` a clinic acts on.

    ``status`` is "refer" when any eye is referable; else "refer: ungraded eye" when any of the
    patient's photos was not graded (unreadable, not a fundus) or was ungradable, since such an eye
    gives no evidence that it is healthy; else "no referral". ``referable`` is the model's answer on
    the graded photos, empty where it cannot speak for the patient (no eye referable but an eye not
    graded); ``worst_grade`` the highest grade given; ``ungraded`` counts the photos not graded or
    ungradable. Rows by status (refer first), then by worst grade, then by patient.
    """
    photos = photos[photos["patient"].astype(str) != ""]  # folders that could not be searched
    if photos.empty:
        return pd.DataFrame(columns=PATIENT_COLUMNS)
    quality = photos["quality"].astype(str) if "quality" in photos else pd.Series("", index=photos.index)
    unsure = photos["grade"].isna().to_numpy() | (quality == "ungradable").to_numpy()
    referable = photos["referable"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    grade = pd.to_numeric(photos["grade"], errors="coerce").astype(float)
    frame = pd.DataFrame({"patient": photos["patient"].to_numpy(), "referable": referable, "unsure": unsure,
                          "grade": grade.to_numpy(), "eye": photos["eye"].fillna("").astype(str).to_numpy()})
    by = frame.groupby("patient", sort=False)
    table = pd.DataFrame({
        "any_referable": by["referable"].any(),
        "any_unsure": by["unsure"].any(),
        "worst_grade": by["grade"].max(),  # NaN when no photo was graded
        "eyes": by["eye"].agg(lambda eyes: "+".join(sorted({e for e in eyes if e}))),
        "photos": by.size(),
        "ungraded": by["unsure"].sum(),
    }).reset_index()
    table["status"] = np.select([table["any_referable"], table["any_unsure"]], [REFER, REFER_UNGRADED], NO_REFERRAL)
    table["referable"] = pd.array([True if r else (None if u else False)
                                   for r, u in zip(table["any_referable"], table["any_unsure"])], dtype="boolean")
    table["worst_grade"] = pd.array([None if math.isnan(g) else int(g) for g in table["worst_grade"]], dtype="Int64")
    table["ungraded"] = table["ungraded"].astype(int)
    table = table.assign(_rank=table["status"].map({s: i for i, s in enumerate(STATUSES)}),
                         _worst=table["worst_grade"].fillna(-1).astype(int))
    table = table.sort_values(["_rank", "_worst", "patient"], ascending=[True, False, True], kind="stable")
    return table[PATIENT_COLUMNS].reset_index(drop=True)


def table_csv(table: pd.DataFrame) -> bytes:
    """A report table as the CSV bytes written to its file (what the page's download buttons give)."""
    table = table.copy()
    for col in table.columns:  # text columns only: a negative score stays a number
        if col in TEXT_COLUMNS or table[col].dtype == object:
            table[col] = table[col].map(lambda v: escape_cell(v) if isinstance(v, str) else v)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def write_table(path: Path, table: pd.DataFrame) -> None:
    """A table as CSV, written atomically (readers see the old file or the new)."""
    runs.write_atomic(path, table_csv(table))
