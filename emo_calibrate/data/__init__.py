"""Calibration sets: the paper's ~25k sentences, built deterministically from any text source (see docs/data.md).

`build_calibration_set(source, output_dir, ...)` reads a source, segments it into sentences, filters and removes
duplicates, holds out whole documents for evaluation, samples N sentences with a seed and saves a `DatasetDict`
(splits `train`/`test`, column `text`) plus `manifest.json`. `load_calibration_set(path)` loads it back.
"""

from .arguments import DataArguments, DataError
from .build import build_calibration_set, build_from_arguments, is_calibration_set, load_calibration_set


__all__ = [
    "DataArguments",
    "DataError",
    "build_calibration_set",
    "build_from_arguments",
    "is_calibration_set",
    "load_calibration_set",
]
