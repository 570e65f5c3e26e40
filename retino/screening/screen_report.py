"""The files a screen writes: the photo report, appended batch by batch and resumable, and the patient table.

``<name>.csv`` holds one row per photo (:data:`PHOTO_COLUMNS`), ``<name>.patients.csv`` one row per
patient (:data:`PATIENT_COLUMNS`), ``<name>.json`` what made the report (its ``key``: run,
checkpoint, folder, settings) and a summary. :func:`open_report` refuses to mix a report made with
another key and drops a last row cut short by a kill; rows are appended by :class:`Appender`, one
write a batch, flushed and fsynced.

Text cells that a spreadsheet would run as a formula are written
with a leading ``'`` (:func:`escape_cell`) and read back without it.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runs
from ..inference.choices import PROB_COLS, REFER_UNGRADED, STATUSES, eye_status
from ..data.names import parse_patient_eye
from .. import fileio

PROB_COLUMNS = PROB_COLS  # one definition of the probability columns (retino.inference.choices)
PHOTO_COLUMNS = ["image", "patient", "eye", "grade", *PROB_COLUMNS, "score", "referable_score", "referable",
                 "quality", "reasons", "error"]
PATIENT_COLUMNS = ["patient", "status", "referable", "worst_grade", "eyes", "photos", "ungraded"]
TEXT_COLUMNS = ("image", "patient", "eye", "quality", "reasons", "error", "status", "eyes")

# A patient's status. An eye that was not graded (unreadable, not a fundus) or was graded from an
# ungradable photo gives no evidence that the eye is healthy: screening programmes re-image or refer
# such a patient rather than pass them (README, "Screening a folder"), so Retino never says
# "no referral" for them.

# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV Injection"); "'"
# itself is escaped too, so that reading a cell back (dropping one "'") gives exactly what was written.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


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
        diff = _differences(old, fileio.json_safe(key))
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
        fileio.write_json(meta, {"key": key})
        fileio.write_atomic(photos, HEADER.encode())
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
    referable = photos["referable"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    status = [eye_status(graded, verdict, r) for graded, verdict, r in
              zip(photos["grade"].notna().to_numpy(), quality.to_numpy(), referable)]
    unsure = np.array([s == REFER_UNGRADED for s in status], dtype=bool) | (quality == "ungradable").to_numpy()
    grade = pd.to_numeric(photos["grade"], errors="coerce").astype(float)
    frame = pd.DataFrame({"patient": photos["patient"].to_numpy(), "referable": referable, "unsure": unsure,
                          "grade": grade.to_numpy(), "eye": photos["eye"].fillna("").astype(str).to_numpy(),
                          "rank": [STATUSES.index(s) for s in status]})
    by = frame.groupby("patient", sort=False)
    table = pd.DataFrame({
        "any_referable": by["referable"].any(),
        "any_unsure": by["unsure"].any(),
        "worst_grade": by["grade"].max(),  # NaN when no photo was graded
        "eyes": by["eye"].agg(lambda eyes: "+".join(sorted({e for e in eyes if e}))),
        "photos": by.size(),
        "ungraded": by["unsure"].sum(),
        "rank": by["rank"].min(),  # the patient takes the first status any eye has
    }).reset_index()
    table["status"] = [STATUSES[r] for r in table.pop("rank")]
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
    fileio.write_atomic(path, table_csv(table))
