"""What a photo's file name says: which files are photos, and whose eye a photo shows.

The one definition of each, shared by the data-set readers, Screen, DICOM's fallback and the
patient-level statistics, so a photo is found and grouped by the same rule everywhere.
"""
from __future__ import annotations

import re
from pathlib import PurePath

# Every photo Retino reads, in data sets, Predict and Screen (.dcm: DICOM, decoded by data/dicom.py)
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".dcm")
_EYE = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)


def parse_patient_eye(image_name: str) -> tuple[str, str | None]:
    """(patient, "left" | "right") from an EyePACS-style ``<patient>_left.jpeg``; else (name, None).

    Directories and the extension are ignored for the match. A name that does not pair eyes is its
    own patient: its text without an image extension (APTOS's ``000c1434d8d7.png`` is patient
    ``000c1434d8d7``, the id the data set's CSV uses), its folders kept so two folders never merge.
    """
    name = str(image_name)
    match = _EYE.match(PurePath(name).stem)
    if match is None:
        suffix = PurePath(name).suffix
        return (name[:-len(suffix)] if suffix.lower() in IMAGE_EXTS and PurePath(name).stem else name), None
    return match["patient"], match["eye"].lower()
