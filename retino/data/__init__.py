"""Data sets: readers for every layout, preprocessing, validation, the synthetic default, loaders."""
from .formats import Dataset, DatasetError, read_dataset, split_by_patient, carve_val, parse_grade
from .preprocess import (MASK_FRACTION, MAX_ASPECT, ImageError, boundary_mask, ben_graham, crop_and_pad,
                         crop_to_square, exif_upright, fundus_bbox, load_and_preprocess, load_image, preprocess,
                         read_regular_file)
from .validate import scan_dataset, validate_dataset, find_leakage, stats

__all__ = ["Dataset", "DatasetError", "read_dataset", "split_by_patient", "carve_val", "parse_grade", "ImageError",
           "load_image", "preprocess", "load_and_preprocess", "crop_to_square", "crop_and_pad", "ben_graham",
           "boundary_mask", "exif_upright", "fundus_bbox", "read_regular_file", "MASK_FRACTION", "MAX_ASPECT",
           "scan_dataset", "validate_dataset", "find_leakage", "stats"]
