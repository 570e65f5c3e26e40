"""Data sets: readers for every layout, preprocessing, validation, the synthetic default, loaders."""
from .formats import Dataset, DatasetError, read_dataset, split_by_patient, parse_grade
from .preprocess import ImageError, load_image, preprocess, load_and_preprocess, crop_to_square, ben_graham
from .validate import scan_dataset, validate_dataset, stats

__all__ = ["Dataset", "DatasetError", "read_dataset", "split_by_patient", "parse_grade", "ImageError",
           "load_image", "preprocess", "load_and_preprocess", "crop_to_square", "ben_graham",
           "scan_dataset", "validate_dataset", "stats"]
