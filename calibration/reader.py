"""Feeding calibration batches to onnxruntime's static quantizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.errors import RqInputError
from calibration.loader import Batch, BatchStream


class ImageCalibrationReader(CalibrationDataReader):
    """A :class:`CalibrationDataReader` over a :class:`BatchStream`.

    ``get_next()`` returns ``{input_name: images}`` for each batch and None once the stream is
    exhausted (and keeps returning None until :meth:`rewind`). The model's batch dimension must
    accept the stream's batch size (a dynamic ``N``, or a fixed one equal to ``batch_size`` — note
    the last batch may be shorter, so fixed-batch models need ``batch_size=1``).
    """

    def __init__(self, stream: BatchStream, input_name: str) -> None:
        if not isinstance(stream, BatchStream):
            raise RqInputError(f"stream must be a BatchStream, got {type(stream).__name__}")
        if not isinstance(input_name, str) or not input_name:
            raise RqInputError(f"input name must be a non-empty string, got {input_name!r}")
        self.stream = stream
        self.input_name = input_name
        self._it: Iterator[Batch] | None = None
        self._done = False
        self.batches_read = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._done:
            return None
        if self._it is None:
            self._it = iter(self.stream)
        try:
            batch = next(self._it)
        except StopIteration:
            self._done = True
            self._it = None
            return None
        self.batches_read += 1
        return {self.input_name: batch.images}

    def rewind(self) -> None:
        """Start again from the first batch (stops the current pass and its decode threads)."""
        self.stream.close()
        self._it = None
        self._done = False
        self.batches_read = 0

    def close(self) -> None:
        """Stop the current pass and release the decode threads."""
        self.stream.close()
        self._it = None

    def __len__(self) -> int:
        """Number of batches in a full pass (fewer if whole batches fail to decode)."""
        return self.stream.num_batches

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """Images that could not be decoded in the current pass: ``(path, reason)``."""
        return self.stream.skipped

    @property
    def used(self) -> int:
        """Images handed to onnxruntime so far in the current pass."""
        return self.stream.used


__all__ = ["ImageCalibrationReader"]
