"""Readers for the fundus data-set layouts people have on disk.

Every reader returns the same thing, a :class:`Dataset`: per split a table of image paths and
grades 0-4 (plus patient id and eye where the names allow). Anything that does not fit raises
:class:`DatasetError` naming the file, line or column and what was expected.
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

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_SEED = 0          # the seed of every split Retino makes itself; recorded in each run
TEST_FRACTION = 0.2
# ICDR names accepted as labels (lower-case); numbers are accepted too ("2", "2.0").
GRADE_NAMES = {
    "no dr": 0, "no_dr": 0, "none": 0, "no apparent retinopathy": 0, "normal": 0,
    "mild": 1, "mild npdr": 1,
    "moderate": 2, "moderate npdr": 2,
    "severe": 3, "severe npdr": 3,
    "proliferative": 4, "proliferative dr": 4, "proliferate_dr": 4, "pdr": 4,
}
_EYE_RE = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)


class DatasetError(ValueError):
    """A data set that cannot be read; the message names the file and what was expected."""


@dataclass
class Dataset:
    """A labelled data set: ``splits[name]`` has columns image, path, grade, patient, eye."""

    root: Path
    layout: str
    splits: dict[str, pd.DataFrame]
    split: dict = field(default_factory=dict)  # how train/test came about: {"method", "seed", ...}

    def describe(self) -> dict:
        """The JSON-safe summary a run records in its config."""
        return {"path": str(self.root), "layout": self.layout, "split": self.split,
                "sizes": {k: int(len(v)) for k, v in self.splits.items()}}


# ----------------------------------------------------------------------------- parsing helpers

def parse_grade(value, *, where: str) -> int:
    """A label as an int 0-4; accepts "2", "2.0", " 2 ", and ICDR names like "moderate"."""
    text = str(value).strip()
    key = text.lower()
    if key in GRADE_NAMES:
        return GRADE_NAMES[key]
    try:
        number = float(text)
    except ValueError:
        raise DatasetError(f"{where}: label {text!r} is not a grade; expected an integer 0-4 "
                           f"(or an ICDR name such as 'moderate')") from None
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


def _index_images(folder: Path) -> dict[str, Path]:
    """Map stem -> path for the images in a folder (one directory listing, not one stat per image)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    with os.scandir(folder) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTS and entry.is_file():
                out.setdefault(stem, Path(entry.path))
    return out


def _attach_paths(df: pd.DataFrame, folders: list[Path], listed_in: Path) -> pd.DataFrame:
    index: dict[str, Path] = {}
    for folder in reversed(folders):  # earlier folders win
        index.update(_index_images(folder))
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
    rng = np.random.default_rng(seed)
    worst = df.groupby("patient", sort=True)["grade"].max()
    # Systematic sampling over the patients ordered by stratum: each grade gets its share of the
    # test split (rounding spread across strata), and even tiny sets get a non-empty test split.
    order = []
    for grade in sorted(worst.unique()):
        patients = np.array(sorted(worst.index[worst == grade]), dtype=object)
        rng.shuffle(patients)
        order.extend(patients.tolist())
    pos = np.arange(len(order)) * test_fraction + rng.uniform()
    picked = np.floor(pos + test_fraction) > np.floor(pos)
    if len(order) >= 2 and not picked.any():
        picked[rng.integers(len(order))] = True
    test_patients = {p for p, take in zip(order, picked) if take}
    is_test = df["patient"].isin(test_patients)
    return df[~is_test].reset_index(drop=True), df[is_test].reset_index(drop=True)


def _single_split(root: Path, layout: str, df: pd.DataFrame) -> Dataset:
    train, test = split_by_patient(df)
    return Dataset(root, layout, {"train": train, "test": test},
                   {"method": "stratified-by-patient", "seed": SPLIT_SEED, "test_fraction": TEST_FRACTION})


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


def read_lab(root: Path) -> Dataset:
    """The lab report's layout: {train,test}_img.csv and {train,test}_label.csv, one value a line."""
    splits = {}
    folders = [root, root / "images"]
    for split in ("train", "test"):
        img_file, lab_file = root / f"{split}_img.csv", root / f"{split}_label.csv"
        for f in (img_file, lab_file):
            if not f.is_file():
                raise DatasetError(f"{f}: missing; the lab-report layout needs train_img.csv, "
                                   f"train_label.csv, test_img.csv and test_label.csv")
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
        splits[split] = _attach_paths(df, folders, img_file)
    return Dataset(root, "lab", splits, {"method": "given"})


def read_kaggle(root: Path) -> Dataset:
    """Kaggle EyePACS: trainLabels.csv (image,level) + train/; test labels when present."""
    train = _attach_paths(_labelled_table(root / "trainLabels.csv", "image", "level"),
                          [root / "train"], root / "trainLabels.csv")
    for name in ("retinopathy_solution.csv", "testLabels.csv"):
        if (root / name).is_file() and (root / "test").is_dir():
            test = _attach_paths(_labelled_table(root / name, "image", "level"), [root / "test"], root / name)
            return Dataset(root, "kaggle", {"train": train, "test": test}, {"method": "given"})
    return _single_split(root, "kaggle", train)


def read_aptos(root: Path) -> Dataset:
    """APTOS 2019: train.csv (id_code,diagnosis) + train_images/<id_code>.png."""
    df = _labelled_table(root / "train.csv", "id_code", "diagnosis")
    return _single_split(root, "aptos", _attach_paths(df, [root / "train_images"], root / "train.csv"))


def read_retino(root: Path) -> Dataset:
    """Retino's own layout (what ``synth`` writes): train.csv, test.csv (image,level) + images/."""
    splits = {s: _attach_paths(_labelled_table(root / f"{s}.csv", "image", "level"),
                               [root / "images"], root / f"{s}.csv") for s in ("train", "test")}
    return Dataset(root, "retino", splits, {"method": "given"})


def _grade_folders(base: Path) -> pd.DataFrame | None:
    dirs = [base / str(g) for g in range(5)]
    if not any(d.is_dir() for d in dirs):
        return None
    rows = [(stem, g, str(p)) for g, d in enumerate(dirs) for stem, p in sorted(_index_images(d).items())]
    df = pd.DataFrame(rows, columns=["image", "grade", "path"])
    return _with_patient(df)


def read_folders(root: Path) -> Dataset:
    """One folder per grade: 0/ ... 4/, optionally under train/ and test/."""
    train, test = _grade_folders(root / "train"), _grade_folders(root / "test")
    if train is not None and test is not None:
        return Dataset(root, "folders", {"train": train, "test": test}, {"method": "given"})
    df = train if train is not None else _grade_folders(root)
    if df is None or df.empty:
        raise DatasetError(f"{root}: grade folders 0/ ... 4/ hold no images ({', '.join(IMAGE_EXTS)})")
    return _single_split(root, "folders", df)


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


def read_dataset(path) -> Dataset:
    """Recognise a data-set folder by its files and read it.

    Raises:
        DatasetError: the folder is missing, matches no layout, or its files do not fit the layout.
    """
    root = Path(path).expanduser()
    if "\x00" in str(path):
        raise DatasetError(f"{path!r}: a path cannot contain a NUL byte")
    if not root.exists():
        raise DatasetError(f"{root}: no such folder; expected a data-set folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; expected a data-set folder")
    root = root.resolve()
    for _name, matches, reader, _desc in LAYOUTS:
        if matches(root):
            ds = reader(root)
            for split, df in ds.splits.items():
                if df.empty:
                    raise DatasetError(f"{root}: the {split} split has no images")
            return ds
    tried = "; ".join(desc for *_, desc in LAYOUTS)
    raise DatasetError(f"{root}: matches no data-set layout. Tried: {tried}")
