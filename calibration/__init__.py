"""Calibration data for rq: ImageNet synsets, image preprocessing, dataset discovery, batched
background decoding, and an onnxruntime calibration data reader.

This package must not import from ``quantize`` (the dependency goes the other way).
"""

from calibration.datasets import (
    IMAGE_EXTENSIONS,
    LAYOUT_FLAT_LABELS,
    LAYOUT_UNLABELED,
    LAYOUT_WNID_FOLDERS,
    LAYOUT_WNID_PREFIXED,
    LAYOUTS,
    ImageDataset,
    Sample,
    Spares,
    discover_dataset,
    is_image_file,
    select_samples,
    select_with_spares,
)
from calibration.errors import DatasetError, RqInputError
from calibration.loader import Batch, BatchStream
from calibration.preprocess import (
    INTERPOLATIONS,
    PRESETS,
    ImageDecodeError,
    PreprocessSpec,
    load_image,
    preset,
)
from calibration.reader import ImageCalibrationReader
from calibration.synsets import Synset, class_name, load_synsets, wnid_to_index

__all__ = [
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "LAYOUTS",
    "LAYOUT_FLAT_LABELS",
    "LAYOUT_UNLABELED",
    "LAYOUT_WNID_FOLDERS",
    "LAYOUT_WNID_PREFIXED",
    "PRESETS",
    "Batch",
    "BatchStream",
    "DatasetError",
    "ImageCalibrationReader",
    "ImageDataset",
    "ImageDecodeError",
    "PreprocessSpec",
    "RqInputError",
    "Sample",
    "Spares",
    "Synset",
    "class_name",
    "discover_dataset",
    "is_image_file",
    "load_image",
    "load_synsets",
    "preset",
    "select_samples",
    "select_with_spares",
    "wnid_to_index",
]
