"""Problems and statistics of a data set, without decoding every image.

A 35,000-image folder must be summarised in seconds, so the scan reads each file's header (size,
format) and its last bytes (a JPEG ends with the EOI marker, a PNG with IEND): that finds empty,
non-image and truncated files. ``deep=True`` decodes every image as well. ``find_leakage`` reports
images and patients found in more than one split (by name, by patient, and by identical bytes).
"""
from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .formats import Dataset, shown_path
from .preprocess import ImageError, file_kind, load_image, read_regular_file

_TAILS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}


def scan_image(path: str, *, deep: bool = False) -> dict:
    """Header facts of one image file, and ``error`` (None when it looks whole)."""
    row = {"path": path, "width": None, "height": None, "bytes": None, "format": None, "error": None}
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block Image.open forever (issue 15)
            raise ImageError(f"{p.name}: is {file_kind(st.st_mode)}, not a regular file")
        row["bytes"] = st.st_size
        if row["bytes"] == 0:
            raise ImageError(f"{p.name}: the file is empty (0 bytes)")
        with Image.open(p) as im:
            row["width"], row["height"], row["format"] = im.size[0], im.size[1], im.format
        tails = _TAILS.get(row["format"])
        if tails:
            with open(p, "rb") as f:
                f.seek(max(0, row["bytes"] - 64))
                end = f.read().rstrip(b"\x00\r\n ")  # some writers pad after the end marker
            if not end.endswith(tails):
                raise ImageError(f"{p.name}: the file is truncated (no {row['format']} end marker)")
        if deep:
            load_image(p)
    except ImageError as e:
        row["error"] = str(e)
    except Exception as e:  # PIL raises many types for garbage; each is a problem to list, not to crash on
        row["error"] = f"{p.name}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return row


def scan_dataset(ds: Dataset, *, deep: bool = False, workers: int = 8) -> pd.DataFrame:
    """One row per image of every split: split, image, grade, eye, width, height, bytes, format, error."""
    frames = []
    for split, df in ds.splits.items():
        frames.append(df.assign(split=split))
    all_rows = pd.concat(frames, ignore_index=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # I/O bound: threads overlap the reads
        scanned = list(pool.map(lambda p: scan_image(p, deep=deep), all_rows["path"]))
    facts = pd.DataFrame(scanned).drop(columns=["path"])
    return pd.concat([all_rows, facts], axis=1)


def validate_dataset(ds: Dataset, *, deep: bool = False, scan: pd.DataFrame | None = None) -> list[dict]:
    """Problems found in the images: ``[{"file": path, "error": message, "kind": "unreadable"}]``
    (empty when all look whole)."""
    scan = scan_dataset(ds, deep=deep) if scan is None else scan
    bad = scan[scan["error"].notna()]
    return [{"file": f, "error": e, "kind": "unreadable"} for f, e in zip(bad["path"], bad["error"])]


def _sha1(path: str) -> str | None:
    try:
        return hashlib.sha1(read_regular_file(path)).hexdigest()
    except ImageError:  # unreadable: listed by the scan already
        return None


def _same_bytes(rows: pd.DataFrame, sizes: dict) -> list[tuple[dict, dict]]:
    """(earlier, later) rows of different images in different splits whose files are identical.

    Only files of equal size are hashed (sha1), so a 35,000-image set costs a few hashes, not 35,000.
    """
    rows = rows.assign(bytes=[sizes.get(p) for p in rows["path"]]).dropna(subset=["bytes"])
    rows = rows[rows.groupby("bytes")["split"].transform("nunique") > 1]
    digests = {p: _sha1(p) for p in rows["path"].unique()}
    rows = rows.assign(sha1=[digests[p] for p in rows["path"]]).dropna(subset=["sha1"])
    pairs = []
    for _, group in rows.groupby("sha1", sort=False):
        first = group.iloc[0]  # rows are in split order: the earliest split's copy is the original
        for _, later in group.iloc[1:].iterrows():
            if later["split"] != first["split"] and later["path"] != first["path"] \
                    and later["image"] != first["image"]:
                pairs.append((first.to_dict(), later.to_dict()))
    return pairs


def find_leakage(ds: Dataset, *, scan: pd.DataFrame | None = None) -> tuple[dict, list[dict]]:
    """Images and patients found in more than one split (issue 15): a copied test.csv, or train and
    test folders holding the same photos under the same or other names.

    Returns:
        ``(summary, problems)``: summary ``{"images", "patients", "same_bytes", "between":
        {"train/test": {"images", "patients", "same_bytes"}, ...}}`` (pairs with a leak only), and one
        problem (``kind`` "leakage") per leaked image, identical file, or patient not already named.
    """
    names = list(ds.splits)
    between: dict[str, dict] = {}
    images, patients, problems = set(), set(), []

    def cell(a, b):
        return between.setdefault(f"{a}/{b}", {"images": 0, "patients": 0, "same_bytes": 0})

    for i, a in enumerate(names):
        for b in names[i + 1:]:
            first, second = ds.splits[a], ds.splits[b]
            shared = set(first["image"].tolist()) & set(second["image"].tolist())
            leaked = second[second["image"].isin(shared)]
            for image, path in zip(leaked["image"].tolist(), leaked["path"].tolist()):
                problems.append({"file": shown_path(path), "kind": "leakage",
                                 "error": f"{shown_path(path)}: image {image!r} is in both {a} and {b}"})
            common = set(first["patient"].tolist()) & set(second["patient"].tolist())
            other = common - set(leaked["patient"].tolist())  # patients not named through a shared image
            seen_a = first[first["patient"].isin(other)].groupby("patient")["image"].agg(list).to_dict()
            seen_b = second[second["patient"].isin(other)].groupby("patient")["path"].first().to_dict()
            for patient in sorted(other, key=str):
                shown = shown_path(seen_b[patient])
                problems.append({"file": shown, "kind": "leakage",
                                 "error": f"{shown}: patient {patient!r} is in both {a} "
                                          f"({', '.join(seen_a[patient][:3])}) and {b}"})
            if shared or common:
                cell(a, b).update(images=len(shared), patients=len(common))
            images |= shared
            patients |= common
    rows = pd.concat([df[["image", "path", "patient"]].assign(split=s) for s, df in ds.splits.items()],
                     ignore_index=True)
    if scan is not None:
        sizes = dict(zip(scan["path"], scan["bytes"]))
    else:
        sizes = {}
        for path in rows["path"].unique():
            try:
                sizes[path] = os.stat(path).st_size
            except OSError:
                pass
    pairs = _same_bytes(rows, sizes)
    for earlier, later in pairs:
        cell(earlier["split"], later["split"])["same_bytes"] += 1
        shown = shown_path(later["path"])
        problems.append({"file": shown, "kind": "leakage",
                         "error": f"{shown}: the same bytes as {shown_path(earlier['path'])} "
                                  f"({earlier['split']}): one photo in both {earlier['split']} and {later['split']}"})
    summary = {"images": len(images), "patients": len(patients), "same_bytes": len(pairs), "between": between}
    return summary, problems


def majority_share(counts) -> tuple[int, float]:
    """The most frequent grade and the accuracy of always predicting it."""
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    return int(counts.argmax()), float(counts.max() / total) if total else 0.0


def stats(ds: Dataset, *, deep: bool = False, scan: pd.DataFrame | None = None) -> dict:
    """Per-split grade counts, shares, majority baseline, eyes, image sizes, leakage between the
    splits, and the problems found: entries skipped while listing, unreadable images, leaks."""
    scan = scan_dataset(ds, deep=deep) if scan is None else scan
    out = {"layout": ds.layout, "path": str(ds.root), "split": ds.split, "splits": {}}
    for split, df in scan.groupby("split", sort=False):
        counts = np.bincount(df["grade"].astype(int), minlength=5)[:5]
        grade, acc = majority_share(counts)
        sizes = df[["width", "height"]].dropna()
        out["splits"][split] = {
            "n": int(len(df)),
            "counts": [int(c) for c in counts],
            "shares": [float(c / max(len(df), 1)) for c in counts],
            "majority_grade": grade,
            "majority_acc": acc,
            "eyes": {e: int((df["eye"] == e).sum()) for e in ("left", "right")},
            "unreadable": int(df["error"].notna().sum()),
            "size": {"min": [int(sizes["width"].min()), int(sizes["height"].min())] if len(sizes) else None,
                     "median": [int(sizes["width"].median()), int(sizes["height"].median())] if len(sizes) else None,
                     "max": [int(sizes["width"].max()), int(sizes["height"].max())] if len(sizes) else None},
        }
    out["leakage"], leaks = find_leakage(ds, scan=scan)
    out["problems"] = list(ds.problems) + validate_dataset(ds, scan=scan) + leaks
    return out
