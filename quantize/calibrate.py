"""Stage 2, calibrate: run calibration batches through the prepared model and compute activation ranges.

rq drives ONNX Runtime's calibrators itself rather than through `quantize_static`, for three reasons:
- streaming: ORT's histogram calibrators keep every intermediate activation of every batch until the end
  (≈130 MB per ResNet-50 image). Feeding them one batch per `collect_data` call merges each batch into the
  histograms (or min/max) and frees it, so memory is bounded by one batch whatever the sample count;
- real entropy: `quantize_static` fixes entropy at 128 bins / 128 quantized bins, which leaves KL divergence a
  single candidate, the full min/max range. Here histogram methods get real bin counts (2048 by default);
- reuse: the computed ranges (`TensorsData`) are kept, so tuning and sweeps re-quantize without recalibrating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import TensorData, TensorsData

from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize.measure.runtimes import quiet
from quantize.recipe import QuantRecipe

logger = logging.getLogger(__name__)

ORT_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    # rq's own estimators, on top of ORT's collectors (see `calibrate`):
    "mean-minmax": CalibrationMethod.MinMax,  # MinMax's running average, weighted 1/k: the mean over batches
    "mse": CalibrationMethod.Entropy,  # Entropy's streamed signed histogram; thresholds chosen here
}
# Candidate clipping ranges of the mse estimator: [s·min, s·max] for these s.
MSE_SCALES = np.linspace(0.02, 1.0, 50)


@dataclass
class CalibrationRanges:
    """Activation ranges computed for one prepared model and one calibration method."""

    method: str
    tensors: TensorsData
    batches: int
    images: int
    seconds: float

    def ranges(self) -> dict[str, tuple[float, float]]:
        # MinMax ranges are shape-(1,) arrays (ORT reshapes its ReduceMin/ReduceMax outputs to [-1]), and
        # numpy 2 refuses float() of a 1-D array: read the single element instead.
        return {
            name: (float(np.ravel(d.range_value[0])[0]), float(np.ravel(d.range_value[1])[0]))
            for name, d in self.tensors.items()
        }


class _SingleBatchReader(CalibrationDataReader):
    """Hands ORT's calibrator exactly one batch, so each `collect_data` call processes and frees one batch."""

    def __init__(self, feed: dict[str, np.ndarray]):
        self._feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self._feed = self._feed, None
        return feed


def calibrator_options(recipe: QuantRecipe) -> dict:
    """The `extra_options` for ORT's `create_calibrator` that implement the recipe's method faithfully."""
    if recipe.calibration == "minmax":
        # Asymmetric ranges: symmetric ones waste half the uint8 codes on ReLU outputs, which are never negative.
        return {"symmetric": False, "moving_average": False}
    if recipe.calibration == "mean-minmax":
        # ORT's moving average is old + c·(new − old); `calibrate` sets c = 1/k before the k-th batch, which
        # makes it the plain mean of the per-batch minima and maxima.
        return {"symmetric": False, "moving_average": True, "averaging_constant": 1.0}
    if recipe.calibration == "mse":
        # Only the histogram is used (KL is never computed): `mse_ranges` picks the thresholds.
        return {"num_bins": recipe.bins, "num_quantized_bins": 128, "symmetric": False}
    if recipe.calibration == "entropy":
        return {"num_bins": recipe.bins, "num_quantized_bins": 128, "symmetric": False}
    return {"num_bins": recipe.bins, "percentile": recipe.percentile, "symmetric": False}


def mse_range(hist: np.ndarray, edges: np.ndarray, low: float, high: float, levels: int = 256) -> tuple:
    """The clipping range [s·low, s·high] that minimizes the expected uint8 quantization error of a histogram.

    Inside the range the rounding error is uniform (step²/12 per value); outside it is the clipping distance.
    `low`/`high` are the observed extremes (low ≤ 0 ≤ high after ORT's own widening to include zero).
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0 or hist.sum() == 0:
        return low, high
    centers = (edges[:-1] + edges[1:]) / 2
    lows = (MSE_SCALES * low)[:, None]
    highs = (MSE_SCALES * high)[:, None]
    clipped = np.clip(centers[None, :], lows, highs)
    weights = hist[None, :].astype(np.float64)
    clip_error = ((centers[None, :] - clipped) ** 2 * weights).sum(axis=1)
    inside = (weights * ((centers[None, :] >= lows) & (centers[None, :] <= highs))).sum(axis=1)
    step = (highs[:, 0] - lows[:, 0]) / (levels - 1)
    error = clip_error + inside * step**2 / 12
    best = int(np.argmin(error))
    return float(lows[best, 0]), float(highs[best, 0])


def mse_ranges(histograms: dict) -> TensorsData:
    """`mse_range` of every tensor of ORT's streamed histograms (hist, edges, min, max, threshold)."""
    ranges = {}
    for name, (hist, edges, low, high, *_rest) in histograms.items():
        lo, hi = mse_range(np.asarray(hist), np.asarray(edges), float(low), float(high))
        ranges[name] = TensorData(lowest=np.float32(lo), highest=np.float32(hi))
    return TensorsData(CalibrationMethod.MinMax, ranges)


def _clamp_to_observed(
    tensors: TensorsData, observed: dict[str, tuple[np.ndarray, np.ndarray]]
) -> TensorsData:
    """Never let a range extend past the values actually seen.

    ORT's KL search works on a histogram centred on zero and returns a symmetric threshold pair (-t, t). For a
    ReLU output (never negative) that puts the uint8 zero point at 128 and throws away half the codes; clamping
    the lower bound to the observed minimum keeps the KL-optimal upper threshold and the full code range.
    """
    fixed = {}
    for name, data in tensors.items():
        low, high = data.range_value
        if name in observed:
            seen_low, seen_high = observed[name]
            low = np.maximum(low, seen_low).astype(np.float32)
            high = np.minimum(high, seen_high).astype(np.float32)
        kwargs = {"lowest": np.asarray(low, np.float32), "highest": np.asarray(high, np.float32)}
        for extra in ("hist", "bins", "hist_edges"):
            if hasattr(data, extra):
                kwargs[extra] = getattr(data, extra)
        fixed[name] = TensorData(**kwargs)
    return TensorsData(tensors.calibration_method, fixed)


def calibrate(
    model_path: Path,
    input_name: str,
    batches: Iterable[np.ndarray],
    recipe: QuantRecipe,
    workdir: Path,
    *,
    progress: Progress | None = None,
) -> CalibrationRanges:
    """Stream `batches` (float32 arrays shaped like the model input) through ORT's calibrator for `recipe`;
    ``progress.advance(len(batch))`` after each batch is merged.

    Tensors of the recipe's op types (or, with placement from the graph, of every op type placement may
    quantize) are calibrated (their inputs and outputs), as `quantize_static` would.
    """
    from quantize.graph.placement import calibration_op_types

    progress = progress or NO_PROGRESS
    started = time.perf_counter()
    with quiet():
        calibrator = create_calibrator(
            Path(model_path),
            list(calibration_op_types(recipe)),
            augmented_model_path=str(workdir / f"augmented-{recipe.calibration}.onnx"),
            calibrate_method=ORT_METHODS[recipe.calibration],
            extra_options=calibrator_options(recipe),
        )
    n_batches = n_images = 0
    try:
        for images in batches:
            if recipe.calibration == "mean-minmax":
                calibrator.averaging_constant = 1.0 / (n_batches + 1)
            with quiet():
                calibrator.collect_data(_SingleBatchReader({input_name: images}))
            n_batches += 1
            n_images += len(images)
            progress.advance(len(images))
        if n_batches == 0:
            raise RqInputError("calibration received no images")
        collector = getattr(calibrator, "collector", None)
        if recipe.calibration == "mse":
            tensors = mse_ranges(collector.histogram_dict)
        else:
            with quiet():
                tensors = calibrator.compute_data()
        if collector is not None and recipe.calibration != "mse":
            # histogram_dict values are (hist, edges, observed min, observed max)
            observed = {name: (h[2], h[3]) for name, h in collector.histogram_dict.items()}
            tensors = _clamp_to_observed(tensors, observed)
    finally:
        del calibrator
    seconds = time.perf_counter() - started
    logger.debug(
        "calibrated %d tensors (%s) on %d images in %d batches, %.1f s",
        len(tensors.data),
        recipe.calibration,
        n_images,
        n_batches,
        seconds,
    )
    return CalibrationRanges(
        method=recipe.calibration, tensors=tensors, batches=n_batches, images=n_images, seconds=seconds
    )
