"""Readers for the fundus data-set layouts people have on disk.

Every reader returns the same thing, a :class:`Dataset`: per split (train, val, test) a table of
image paths and grades 0-4 (plus patient id and eye where the names allow). Anything that does not
fit raises :class:`DatasetError` naming the file, line or column and what was expected; entries that
cannot even be listed (a symlink loop, a name that is not UTF-8) are skipped into ``Dataset.problems``.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .names import IMAGE_EXTS
from .preprocess import file_kind

SPLIT_SEED = 0          # the seed of every split Retino makes itself; recorded in each run
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1      # share of train's patients carved into val when a data set has no val of its own
# ICDR names accepted as labels (lower-case); numbers are accepted too ("2", "2.0").
GRADE_NAMES = {
    "no dr": 0, "no_dr": 0, "none": 0, "no apparent retinopathy": 0, "normal": 0,
    "mild": 1, "mild npdr": 1,
    "moderate": 2, "moderate npdr": 2,
    "severe": 3, "severe npdr": 3,
    "proliferative": 4, "proliferative dr": 4, "proliferate_dr": 4, "pdr": 4,
}
_EYE_RE = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)
# ASCII digits only: float() also takes "0_2" and Arabic-Indic or full-width digits (issue 15)
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?")


class DatasetError(ValueError):
    """A data set that cannot be read; the message names the file and what was expected."""


@dataclass
class Dataset:
    """A labelled data set: ``splits[name]`` (train, val, test) has columns image, path, grade, patient, eye."""

    root: Path
    layout: str
    splits: dict[str, pd.DataFrame]
    split: dict = field(default_factory=dict)  # how the splits came about: {"method", "seed", "val_method", ...}
    problems: list[dict] = field(default_factory=list)  # entries skipped while listing: {"file", "error", "kind"}

    def describe(self) -> dict:
        """The JSON-safe summary a run records in its config."""
        return {"path": str(self.root), "layout": self.layout, "split": self.split,
                "sizes": {k: int(len(v)) for k, v in self.splits.items()}}


# ----------------------------------------------------------------------------- parsing helpers

def parse_grade(value, *, where: str) -> int:
    """A label as an int 0-4; accepts "2", "2.0", " 2 " (ASCII digits) and ICDR names like "moderate"."""
    text = str(value).strip()
    key = text.lower()
    if key in GRADE_NAMES:
        return GRADE_NAMES[key]
    if not _NUMBER_RE.fullmatch(text):
        raise DatasetError(f"{where}: label {text!r} is not a grade; expected an integer 0-4 "
                           f"(or an ICDR name such as 'moderate')")
    number = float(text)
    if not number.is_integer() or not 0 <= number <= 4:
        raise DatasetError(f"{where}: label {text!r} is outside the ICDR grades; expected an integer 0-4")
    return int(number)


def _strip_ext(name: str) -> str:
    name = str(name).strip()
    root, ext = os.path.splitext(name)
    return root if ext.lower() in IMAGE_EXTS else name


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV as strings: BOMs, Windows line ends and surrounding spaces are tolerated."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DatasetError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _labelled_table(path: Path, image_col: str, label_col: str) -> pd.DataFrame:
    """Read ``image_col,label_col`` from a CSV into columns image, grade (validated)."""
    df = _read_csv(path)
    for col in (image_col, label_col):
        if col not in df.columns:
            raise DatasetError(f"{path}: missing column {col!r}; expected columns "
                               f"{image_col!r} and {label_col!r}, found {list(df.columns)}")
    # line numbers as a user sees them in an editor: header is line 1
    grades = [parse_grade(v, where=f"{path}, line {i + 2}, column {label_col!r}")
              for i, v in enumerate(df[label_col])]
    out = pd.DataFrame({"image": [_strip_ext(v) for v in df[image_col]], "grade": grades})
    return _dedupe(out, path)


def _dedupe(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Drop exact duplicate rows; the same image with two different grades is an error."""
    df = df.drop_duplicates(ignore_index=True)
    dup = df["image"].duplicated(keep=False)
    if dup.any():
        name = df.loc[dup, "image"].iloc[0]
        grades = sorted(df.loc[df["image"] == name, "grade"].tolist())
        raise DatasetError(f"{path}: image {name!r} is listed with different grades {grades}; "
                           f"expected one grade per image")
    return df


def shown_path(path) -> str:
    """A path as text that any UTF-8 writer accepts: undecodable bytes become ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _skipped(path, reason: str) -> dict:
    shown = shown_path(path)
    return {"file": shown, "error": f"{shown}: {reason}; skipped", "kind": "skipped"}


def _index_images(folder: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Map stem -> path for the images in a folder (one directory listing, not one stat per image),
    and stem -> problem for the image-named entries that cannot be used (issue 15: a symlink loop
    or a name that is not UTF-8 broke every page)."""
    out: dict[str, Path] = {}
    bad: dict[str, dict] = {}
    if not folder.is_dir():
        return out, bad
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        raise DatasetError(f"{shown_path(folder)}: cannot be listed ({e.strerror}); "
                           f"expected a readable folder") from None
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        try:
            entry.name.encode("utf-8")
            if not entry.is_file():  # follows symlinks: a loop raises ELOOP here
                bad.setdefault(stem, _skipped(entry.path, f"is {file_kind(entry.stat().st_mode)}, not a regular file"))
                continue
        except UnicodeEncodeError:
            bad.setdefault(stem, _skipped(entry.path, "the file name is not valid UTF-8 (rename it)"))
            continue
        except OSError as e:
            bad.setdefault(stem, _skipped(entry.path, f"cannot be read ({e.strerror})"))
            continue
        out.setdefault(stem, Path(entry.path))
    return out, bad


def _attach_paths(df: pd.DataFrame, folders: list[Path], listed_in: Path, problems: list) -> pd.DataFrame:
    index: dict[str, Path] = {}
    bad: dict[str, dict] = {}
    for folder in reversed(folders):  # earlier folders win
        found, skipped = _index_images(folder)
        index.update(found)
        bad.update(skipped)
    unusable = [n for n in dict.fromkeys(df["image"]) if n not in index and n in bad]
    problems.extend(bad[n] for n in unusable)  # listed but unusable: dropped, named, not fatal
    df = df[~df["image"].isin(unusable)]
    missing = [n for n in df["image"] if n not in index]
    if missing:
        where = " or ".join(str(f) for f in folders)
        raise DatasetError(f"{listed_in}: {len(missing)} listed image(s) do not exist in {where}, "
                           f"e.g. {missing[0]!r}; expected <name>{IMAGE_EXTS[0]} (or .jpg/.png)")
    df = df.copy()
    df["path"] = [str(index[n]) for n in df["image"]]
    return _with_patient(df)


def _with_patient(df: pd.DataFrame) -> pd.DataFrame:
    """Add patient and eye from Kaggle-style ``<patient>_<left|right>`` names (None otherwise)."""
    matches = [_EYE_RE.match(n) for n in df["image"]]
    df["patient"] = [m["patient"] if m else n for m, n in zip(matches, df["image"])]
    df["eye"] = [m["eye"].lower() if m else None for m in matches]
    return df[["image", "path", "grade", "patient", "eye"]].reset_index(drop=True)


def split_by_patient(df: pd.DataFrame, *, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified train/test split by patient: both eyes of a person land on the same side.

    Patients are stratified by their worst eye's grade, so rare grades appear in both splits.
    """
    is_test = df["patient"].isin(_pick_patients(df, test_fraction, seed))
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def carve_val(train: pd.DataFrame, fraction: float = VAL_FRACTION, *,
              seed: int = SPLIT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): ``fraction`` of train's patients moved to val, stratified and by patient as
    :func:`split_by_patient` (both eyes together, by the worse eye's grade, seeded)."""
    is_val = train["patient"].isin(_pick_patients(train, fraction, seed))
    return train[~is_val].reset_index(drop=True), train[is_val].reset_index(drop=True)


def _pick_patients(df: pd.DataFrame, fraction: float, seed: int) -> set:
    """``fraction`` of the patients, stratified by their worst eye's grade (seeded)."""
    rng = np.random.default_rng(seed)
    worst = df.groupby("patient", sort=True)["grade"].max()
    # Systematic sampling over the patients ordered by stratum: each grade gets its share of the
    # split (rounding spread across strata), and even tiny sets get a non-empty split.
    order = []
    for grade in sorted(worst.unique()):
        patients = np.array(sorted(worst.index[worst == grade]), dtype=object)
        rng.shuffle(patients)
        order.extend(patients.tolist())
    pos = np.arange(len(order)) * fraction + rng.uniform()
    picked = np.floor(pos + fraction) > np.floor(pos)
    if len(order) >= 2 and not picked.any():
        picked[rng.integers(len(order))] = True
    return {p for p, take in zip(order, picked) if take}


def _single_split(root: Path, layout: str, df: pd.DataFrame, problems: list) -> Dataset:
    train, test = split_by_patient(df)
    return Dataset(root, layout, {"train": train, "test": test},
                   {"method": "stratified-by-patient", "seed": SPLIT_SEED, "test_fraction": TEST_FRACTION},
                   problems)


def _with_val(ds: Dataset, val_fraction: float) -> Dataset:
    """Add val (carved from train unless the data set gave one) and record how, patients per split."""
    if "val" in ds.splits:
        train, val = ds.splits["train"], ds.splits["val"]
        ds.split.update(val_method="given", val_given=True)
    else:
        train, val = carve_val(ds.splits["train"], val_fraction)
        if val.empty and not train.empty:
            raise DatasetError(f"{ds.root}: the train split's {train['patient'].nunique()} patient(s) are too "
                               f"few to carve a val split from; expected at least 2, or a val split of its own")
        ds.split.update(val_method="stratified-by-patient", val_fraction=val_fraction, val_seed=SPLIT_SEED,
                        val_given=False)
    ds.split.setdefault("seed", SPLIT_SEED)
    ds.splits = {"train": train, "val": val, "test": ds.splits["test"]}
    ds.split["patients"] = {s: int(df["patient"].nunique()) for s, df in ds.splits.items()}
    return ds


# ----------------------------------------------------------------------------- the layouts

def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = list(csv.reader(io.StringIO(text)))
    return [r[0].strip() for r in rows if r and r[0].strip()]


def _is_grade(text: str) -> bool:
    try:
        parse_grade(text, where="")
        return True
    except DatasetError:
        return False


def read_lab(root: Path, problems: list) -> Dataset:
    """The lab report's layout: {train,test}_img.csv and {train,test}_label.csv, one value a line;
    val_img.csv and val_label.csv when the set has its own val split."""
    splits = {}
    folders = [root, root / "images"]
    has_val = (root / "val_img.csv").is_file() or (root / "val_label.csv").is_file()
    for split in ("train", "val", "test") if has_val else ("train", "test"):
        img_file, lab_file = root / f"{split}_img.csv", root / f"{split}_label.csv"
        for f in (img_file, lab_file):
            if not f.is_file():
                raise DatasetError(f"{f}: missing; the lab-report layout needs train_img.csv, "
                                   f"train_label.csv, test_img.csv and test_label.csv (and both "
                                   f"val_img.csv and val_label.csv for a val split)")
        names, labels = _read_lines(img_file), _read_lines(lab_file)
        first_label = 1
        if labels and not _is_grade(labels[0]):  # a header line
            labels, first_label = labels[1:], 2
        header_word = names and names[0].lower() in {"image", "img", "name", "id", "file", "filename", "id_code"}
        if header_word or (first_label == 2 and len(names) == len(labels) + 1):
            names = names[1:]
        if len(names) != len(labels):
            raise DatasetError(f"{img_file} lists {len(names)} images but {lab_file} has {len(labels)} "
                               f"labels; expected one label per image, line by line")
        grades = [parse_grade(v, where=f"{lab_file}, line {i + first_label}") for i, v in enumerate(labels)]
        df = _dedupe(pd.DataFrame({"image": [_strip_ext(n) for n in names], "grade": grades}), img_file)
        splits[split] = _attach_paths(df, folders, img_file, problems)
    return Dataset(root, "lab", splits, {"method": "given"}, problems)


def read_kaggle(root: Path, problems: list) -> Dataset:
    """Kaggle EyePACS: trainLabels.csv (image,level) + train/; test labels when present."""
    train = _attach_paths(_labelled_table(root / "trainLabels.csv", "image", "level"),
                          [root / "train"], root / "trainLabels.csv", problems)
    for name in ("retinopathy_solution.csv", "testLabels.csv"):
        if (root / name).is_file() and (root / "test").is_dir():
            test = _attach_paths(_labelled_table(root / name, "image", "level"), [root / "test"], root / name,
                                 problems)
            return Dataset(root, "kaggle", {"train": train, "test": test}, {"method": "given"}, problems)
    return _single_split(root, "kaggle", train, problems)


def read_aptos(root: Path, problems: list) -> Dataset:
    """APTOS 2019: train.csv (id_code,diagnosis) + train_images/<id_code>.png."""
    df = _labelled_table(root / "train.csv", "id_code", "diagnosis")
    return _single_split(root, "aptos", _attach_paths(df, [root / "train_images"], root / "train.csv", problems),
                         problems)


def read_retino(root: Path, problems: list) -> Dataset:
    """Retino's own layout (what ``synth`` writes): train.csv, test.csv (image,level) + images/;
    val.csv too when the set has its own val split."""
    names = ("train", "val", "test") if (root / "val.csv").is_file() else ("train", "test")
    splits = {s: _attach_paths(_labelled_table(root / f"{s}.csv", "image", "level"),
                               [root / "images"], root / f"{s}.csv", problems) for s in names}
    return Dataset(root, "retino", splits, {"method": "given"}, problems)


def _grade_folders(base: Path, problems: list) -> pd.DataFrame | None:
    dirs = [base / str(g) for g in range(5)]
    if not any(d.is_dir() for d in dirs):
        return None
    rows = []
    for g, d in enumerate(dirs):
        found, skipped = _index_images(d)
        rows.extend((stem, g, str(p)) for stem, p in sorted(found.items()))
        problems.extend(skipped[k] for k in sorted(skipped))
    df = pd.DataFrame(rows, columns=["image", "grade", "path"])
    return _with_patient(df)


def read_folders(root: Path, problems: list) -> Dataset:
    """One folder per grade: 0/ ... 4/, optionally under train/ and test/ (and val/)."""
    train, test = _grade_folders(root / "train", problems), _grade_folders(root / "test", problems)
    val = _grade_folders(root / "val", problems) if train is not None else None
    if train is not None and test is not None:
        splits = {"train": train, "test": test} | ({"val": val} if val is not None else {})
        return Dataset(root, "folders", splits, {"method": "given"}, problems)
    df = train if train is not None else _grade_folders(root, problems)
    if df is None or df.empty:
        raise DatasetError(f"{root}: grade folders 0/ ... 4/ hold no images ({', '.join(IMAGE_EXTS)})")
    ds = _single_split(root, "folders", df, problems)
    if val is not None:  # train/ and val/ given, test/ not: test is cut from train as before
        ds.splits["val"] = val
    return ds


# (name, how it is recognised, reader, description for the error message)
LAYOUTS = [
    ("retino", lambda r: (r / "train.csv").is_file() and (r / "test.csv").is_file() and (r / "images").is_dir(),
     read_retino, "retino: train.csv + test.csv (image,level) and images/"),
    ("lab", lambda r: (r / "train_img.csv").is_file() or (r / "train_label.csv").is_file(),
     read_lab, "lab: train_img.csv, train_label.csv, test_img.csv, test_label.csv"),
    ("kaggle", lambda r: (r / "trainLabels.csv").is_file(),
     read_kaggle, "kaggle: trainLabels.csv (image,level) and train/"),
    ("aptos", lambda r: (r / "train.csv").is_file() and (r / "train_images").is_dir(),
     read_aptos, "aptos: train.csv (id_code,diagnosis) and train_images/"),
    ("folders", lambda r: any((b / str(g)).is_dir() for b in (r, r / "train") for g in range(5)),
     read_folders, "folders: 0/ ... 4/ (optionally under train/ and test/)"),
]


def read_dataset(path, val_fraction: float = VAL_FRACTION) -> Dataset:
    """Recognise a data-set folder by its files and read it into train, val and test.

    Args:
        val_fraction: share of train's patients carved into val when the set has no val split of its
            own (``val.csv``, ``val/``, ``val_img.csv`` + ``val_label.csv``); test is never touched.

    Raises:
        DatasetError: the folder is missing, matches no layout, or its files do not fit the layout.
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise DatasetError(f"val_fraction {val_fraction!r} is not a share; expected a number between 0 and 1 "
                           f"(e.g. {VAL_FRACTION}: a tenth of train's patients)")
    if "\x00" in str(path):
        raise DatasetError(f"{path!r}: a path cannot contain a NUL byte")
    try:
        root = Path(path).expanduser()
    except RuntimeError:  # ~nosuchuser/...: pathlib cannot find that home folder
        raise DatasetError(f"{path}: no such user to expand ~ for; expected a data-set folder") from None
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; expected a data-set folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; expected a data-set folder")
    root = root.resolve()
    for _name, matches, reader, _desc in LAYOUTS:
        if matches(root):
            ds = _with_val(reader(root, []), float(val_fraction))
            for split, df in ds.splits.items():
                if df.empty:
                    raise DatasetError(f"{root}: the {split} split has no images")
            return ds
    tried = "; ".join(desc for *_, desc in LAYOUTS)
    raise DatasetError(f"{root}: matches no data-set layout. Tried: {tried}")
