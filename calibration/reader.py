"""Feeding calibration batches to onnxruntime's static quantizer.

rq reads every calibration pass through this reader (quantize.pipeline.ModelBatches: rq's own calibrator,
bias correction, INC's calibration loader), and users who call `onnxruntime.quantization.quantize_static`
themselves can hand it over directly (README, "Calibration data reader").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.errors import RqInputError
from calibration.loader import Batch, BatchStream, pad_batch


class ImageCalibrationReader(CalibrationDataReader):
    """A :class:`CalibrationDataReader` over a :class:`BatchStream`.

    ``get_next()`` returns ``{input_name: images}`` for each batch and None once the stream is
    exhausted (and keeps returning None until :meth:`rewind`). The model's batch dimension must
    accept the stream's batch size: a dynamic ``N``, or a fixed one — then pass ``fixed_batch=N`` (with
    a stream of ``batch_size=N``): a short last batch is filled up by repeating its last image.
    """

    def __init__(self, stream: BatchStream, input_name: str, *, fixed_batch: int | None = None) -> None:
        if not isinstance(stream, BatchStream):
            raise RqInputError(f"stream must be a BatchStream, got {type(stream).__name__}")
        if not isinstance(input_name, str) or not input_name:
            raise RqInputError(f"input name must be a non-empty string, got {input_name!r}")
        if fixed_batch is not None and (
            isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1
        ):
            raise RqInputError(f"fixed_batch must be a positive integer or None, got {fixed_batch!r}")
        self.stream = stream
        self.input_name = input_name
        self.fixed_batch = fixed_batch
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
        images = batch.images if self.fixed_batch is None else pad_batch(batch.images, self.fixed_batch)
        return {self.input_name: images}

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
