"""A folder of a clinic's photos through the one grading path into a per-photo and a per-patient report."""
