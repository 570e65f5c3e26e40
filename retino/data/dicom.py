"""Fundus photographs as clinics' cameras write them: DICOM (Ophthalmic Photography), read with pydicom.

:func:`retino.data.preprocess.load_image` hands any file that starts like a DICOM file (the "DICM"
magic at byte 128) to :func:`read_dicom` and decodes what it returns, so training, Predict and Screen
read DICOM with no change of their own. This module knows DICOM, not images: it never imports the
decoder that calls it. What is read:

- one frame of uncompressed or JPEG-baseline pixel data, RGB, YBR_FULL or YBR_FULL_422 (or grey);
  a JPEG-baseline frame is decoded by Pillow exactly as a ``.jpeg`` file (draft mode included), so a
  photo screens the same whether the camera exported it as JPEG or as DICOM;
- the patient and the eye from the tags (:func:`patient_eye_from_dicom`): PatientID, and
  ImageLaterality, else Laterality; the file-name rule (``<patient>_<left|right>``) where they are empty.

Refused, with the reason: more than one frame (a video or a stereo pair: which one is the photo?),
no pixel data (a report or a structured document), and a Modality other than a photograph
(OP: ophthalmic photography, XC: external-camera photography; an OCT scan is OPT, not a fundus photo).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .names import parse_patient_eye

PHOTO_MODALITIES = ("OP", "XC")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
GREY = ("MONOCHROME1", "MONOCHROME2")
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_EYES = {"L": "left", "R": "right"}


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


class DicomError(ValueError):
    """Why a DICOM file is not one fundus photograph Retino can read (``load_image`` names the file)."""


def _read(src, *, pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src,
                               stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DicomError(f"not a DICOM file Retino can read ({reason})") from None


def check_photo(ds, max_pixels: int, max_aspect: float) -> None:
    """Refuse what is not one fundus photograph, before any pixel is decoded."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality not in PHOTO_MODALITIES:
        found = f"Modality {modality}" if modality else "no Modality"
        raise DicomError(f"DICOM with {found} is not a photograph; expected OP (ophthalmic "
                               f"photography) or XC")
    if "PixelData" not in ds:
        raise DicomError("the DICOM file holds no pixel data (a report or document, not a photograph)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"the DICOM file holds {frames} frames (a video or a series); expected a "
                               f"single photograph: export each frame on its own")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in COLOUR + GREY:
        raise DicomError(f"DICOM photometric interpretation {photometric or '(none)'} is not supported; "
                               f"expected one of {', '.join(COLOUR + GREY)}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols == 0:
        raise DicomError("the DICOM file gives no image size (Rows / Columns)")
    if rows * cols > max_pixels:
        raise DicomError(f"{cols} x {rows} pixels is larger than the {max_pixels / 1e6:.0f} MP limit "
                               f"for a fundus photograph")
    if max(rows, cols) > max_aspect * min(rows, cols):
        raise DicomError(f"{cols} x {rows} pixels is not a fundus photograph: its sides differ by more "
                               f"than {max_aspect}:1")


def read_dicom(data: bytes, *, max_pixels: int, max_aspect: float) -> bytes | np.ndarray:
    """One DICOM photograph's frame: the JPEG bytes of a JPEG-baseline frame in its own YCbCr (to be
    decoded exactly as a ``.jpeg`` file, draft mode included), else its pixels as an (H, W, 3) uint8
    array, or (H, W) grey (int32 where wider than 8 bits).

    Raises:
        DicomError: not readable, not a photograph, more than one frame, no pixels, too large.
    """
    ds = _read(data)
    check_photo(ds, max_pixels, max_aspect)
    photometric = str(ds.PhotometricInterpretation).strip()
    if ds.file_meta.get("TransferSyntaxUID") == JPEG_BASELINE and photometric != "RGB":
        from pydicom.encaps import generate_frames
        return bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    try:
        arr = ds.pixel_array  # YBR_* is converted to RGB by pydicom (its as_rgb default)
    except Exception as e:  # noqa: BLE001 - pydicom raises RuntimeError, NotImplementedError, ValueError ...
        syntax = ds.file_meta.get("TransferSyntaxUID")
        what = getattr(syntax, "name", None) or str(syntax)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DicomError(f"DICOM pixel data ({what}) cannot be decoded: {reason}; expected uncompressed "
                         f"or JPEG baseline") from None
    arr = np.asarray(arr)
    if photometric == "MONOCHROME1":  # 0 is white there
        arr = arr.max() - arr
    if arr.ndim == 3 and arr.dtype != np.uint8:
        hi = float(arr.max()) if arr.size else 0.0
        arr = (arr * (255.0 / hi) if hi > 255 else arr).clip(0, 255).astype(np.uint8)
    elif arr.ndim == 2 and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int32)  # PIL's "I" mode; the decoder scales the range used to 8 bits
    return arr


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def patient_eye_from_dicom(path, image: str | None = None) -> tuple[str, str | None]:
    """(patient, "left" | "right" | None) from a DICOM file's tags, the file-name rule where they are empty.

    ``image`` is the name the file-name rule reads (the report's relative path); default the path.
    Tags that cannot be read at all give the file-name rule's answer.
    """
    name = str(path) if image is None else image
    by_name = parse_patient_eye(name)
    try:
        ds = _read(os.fspath(path), pixels=False)
    except DicomError:
        return by_name
    patient = _text(ds, "PatientID")
    eye = _EYES.get(_text(ds, "ImageLaterality").upper()) or _EYES.get(_text(ds, "Laterality").upper())
    if not patient:
        return by_name[0], eye or by_name[1]
    return patient, eye or (by_name[1] if by_name[0] != name else None)


def patient_eye(image: str, path) -> tuple[str, str | None]:
    """Screen's patient and eye: from the tags for a ``.dcm`` file, else from the file name."""
    if Path(path).suffix.lower() == ".dcm":
        return patient_eye_from_dicom(path, image)
    return parse_patient_eye(image)
