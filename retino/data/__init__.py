"""Data sets: readers for every layout, preprocessing, validation, the synthetic default, loaders."""
import importlib

# preprocess is imported now: it is light (cv2, numpy, PIL), and its function ``preprocess`` must win
# over the submodule of the same name, which the import system would otherwise leave in its place.
from .preprocess import (MASK_FRACTION, MAX_ASPECT, ImageError, boundary_mask, ben_graham, crop_and_pad,
                         crop_to_square, exif_upright, fundus_bbox, load_and_preprocess, load_image, preprocess,
                         read_regular_file)

# Readers and validation pull in pandas (about half a second): loaded on first use, so grading a photo,
# which only decodes and preprocesses, never pays for them.
_LAZY = {
    "Dataset": "formats", "DatasetError": "formats", "read_dataset": "formats", "split_by_patient": "formats",
    "carve_val": "formats", "parse_grade": "formats",
    "scan_dataset": "validate", "validate_dataset": "validate", "find_leakage": "validate", "stats": "validate",
}

__all__ = ["Dataset", "DatasetError", "read_dataset", "split_by_patient", "carve_val", "parse_grade", "ImageError",
           "load_image", "preprocess", "load_and_preprocess", "crop_to_square", "crop_and_pad", "ben_graham",
           "boundary_mask", "exif_upright", "fundus_bbox", "read_regular_file", "MASK_FRACTION", "MAX_ASPECT",
           "scan_dataset", "validate_dataset", "find_leakage", "stats"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
