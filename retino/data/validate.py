"""Problems and statistics of a data set, without decoding every image.

A 35,000-image folder must be summarised in seconds, so the scan reads each file's header (size,
format) and its last bytes (a JPEG ends with the EOI marker, a PNG with IEND): that finds empty,
non-image and truncated files. ``deep=True`` decodes every image as well.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .formats import Dataset
from .preprocess import ImageError, load_image

_TAILS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",)}


def scan_image(path: str, *, deep: bool = False) -> dict:
    """Header facts of one image file, and ``error`` (None when it looks whole)."""
    row = {"path": path, "width": None, "height": None, "bytes": None, "format": None, "error": None}
    p = Path(path)
    try:
        row["bytes"] = p.stat().st_size
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
    """Problems found in the images: ``[{"file": path, "error": message}]`` (empty when all look whole)."""
    scan = scan_dataset(ds, deep=deep) if scan is None else scan
    bad = scan[scan["error"].notna()]
    return [{"file": f, "error": e} for f, e in zip(bad["path"], bad["error"])]


def majority_share(counts) -> tuple[int, float]:
    """The most frequent grade and the accuracy of always predicting it."""
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    return int(counts.argmax()), float(counts.max() / total) if total else 0.0


def stats(ds: Dataset, *, deep: bool = False, scan: pd.DataFrame | None = None) -> dict:
    """Per-split grade counts, shares, majority baseline, eyes, image sizes, and the problems found."""
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
    out["problems"] = validate_dataset(ds, scan=scan)
    return out
