"""Label-free fidelity of INT8 to FP32: top-1 agreement, logits SQNR and the KL divergence of the softmax.

Accuracy needs labels; fidelity does not. Both models run on the same decoded images and their logits are
compared image by image:

- **agreement**: the share of images where INT8's top-1 class is FP32's (with an exact binomial interval).
  A top-1 drop can never exceed the disagreement rate, so 99% agreement bounds the drop by 1 point whatever
  the labels are;
- **logits SQNR** (dB): 10·log10(Σ fp32² / Σ (fp32 − int8)²) over all logits of all images;
- **softmax KL**: mean over images of KL(softmax(fp32) ‖ softmax(int8)), in nats.

Without a labelled `--val` set, rq measures these on *held-back calibration images*: images of the `--calib`
folder that calibration did not use (calibration reads a sample of it, 100 images by default), so the
figures are not flattered by the ranges having been fitted on the very same images.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import BatchStream, ImageDataset, PreprocessSpec, Sample
from calibration.errors import RqInputError
from calibration.progress import Progress
from quantize.graph.inspection import _Accumulator
from quantize.measure.evaluate import open_session, run_model
from quantize.measure.stats import agreement

#: Held-back calibration images measured by default when there is no --val (the time stays modest).
DEFAULT_HOLDOUT_IMAGES = 500


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """True when every row is a probability distribution (entries in [0, 1], summing to 1 within 1e-3): the
    output of a softmax, not logits (logits that happen to look like this carry no information anyway)."""
    x = np.asarray(outputs, dtype=np.float64)
    if x.ndim != 2 or x.size == 0 or x.min() < 0.0 or x.max() > 1.0 + 1e-6:
        return False
    return bool(np.all(np.abs(x.sum(axis=1) - 1.0) < 1e-3))


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    # A probability rounded to 0 would be −∞: floor it far below any real class probability.
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), 1e-30))


def softmax_kl(reference: np.ndarray, approximation: np.ndarray) -> np.ndarray:
    """Per-image KL(softmax(reference) ‖ softmax(approximation)) in nats, for [N, classes] logits."""
    ref = np.asarray(reference)
    approx = np.asarray(approximation)
    if ref.shape != approx.shape or ref.ndim != 2:
        raise RqInputError(
            f"logits must be two [N, classes] arrays of one shape, got {ref.shape}, {approx.shape}"
        )
    log_p = _log_softmax(ref)
    log_q = _log_softmax(approx)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=1), 0.0)


@dataclass(frozen=True)
class Fidelity:
    """How faithfully one model (INT8) reproduces another (FP32) on the same images; no labels involved."""

    source: str  # which images, in words
    images: int
    disagreements: int
    agreement_pct: float
    agreement_ci_low_pct: float
    agreement_ci_high_pct: float
    logits_sqnr_db: float
    softmax_kl: float  # mean over images, nats
    seconds: float = 0.0
    # "logits", or "probabilities" for a model that ends in a softmax: its outputs are then compared as
    # log-probabilities (logits up to a constant per image), since a softmax of probabilities would flatten
    # every difference (KL near 0, whatever INT8 did).
    outputs: str = "logits"

    def describe(self) -> str:
        sqnr = "logits SQNR" if self.outputs == "logits" else "log-probability SQNR"
        return (
            f"top-1 agreement {self.agreement_pct:.2f}% [{self.agreement_ci_low_pct:.1f}, "
            f"{self.agreement_ci_high_pct:.1f}] ({self.disagreements} of {self.images} predictions differ), "
            f"{sqnr} {self.logits_sqnr_db:.1f} dB, softmax KL {self.softmax_kl:.4f} on {self.source}"
            + (
                " (the model outputs probabilities: compared as log-probabilities)"
                if self.outputs != "logits"
                else ""
            )
        )

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "images": self.images,
            "disagreements": self.disagreements,
            "agreement_pct": round(self.agreement_pct, 4),
            "agreement_ci_low_pct": round(self.agreement_ci_low_pct, 4),
            "agreement_ci_high_pct": round(self.agreement_ci_high_pct, 4),
            "logits_sqnr_db": round(self.logits_sqnr_db, 3),
            "softmax_kl": round(self.softmax_kl, 6),
            "seconds": round(self.seconds, 3),
            "outputs": self.outputs,
        }


class FidelityAccumulator:
    """Streams batches of (reference, approximation) logits into the figures of :class:`Fidelity`."""

    def __init__(self) -> None:
        self.sqnr = _Accumulator()
        self.kl_sum = 0.0
        self.pred_a: list[np.ndarray] = []
        self.pred_b: list[np.ndarray] = []
        self.outputs: str | None = None

    def add(self, reference: np.ndarray, approximation: np.ndarray) -> None:
        if self.outputs is None:  # decided on the first batch, so every image is compared the same way
            self.outputs = "probabilities" if looks_like_probabilities(reference) else "logits"
        if self.outputs == "probabilities":
            reference, approximation = _log_probabilities(reference), _log_probabilities(approximation)
        self.sqnr.add(reference, approximation)
        self.kl_sum += float(softmax_kl(reference, approximation).sum())
        self.pred_a.append(np.argmax(reference, axis=1))
        self.pred_b.append(np.argmax(approximation, axis=1))

    @property
    def images(self) -> int:
        return sum(len(p) for p in self.pred_a)

    def result(self, source: str, seconds: float = 0.0) -> Fidelity:
        if not self.images:
            raise RqInputError(f"no readable image to measure fidelity on ({source})")
        agree = agreement(np.concatenate(self.pred_a), np.concatenate(self.pred_b))
        sqnr = self.sqnr.sqnr_db
        return Fidelity(
            source=source,
            images=agree.n,
            disagreements=agree.disagreements,
            agreement_pct=agree.agreement_pct,
            agreement_ci_low_pct=agree.ci_low_pct,
            agreement_ci_high_pct=agree.ci_high_pct,
            logits_sqnr_db=sqnr if math.isfinite(sqnr) else 999.0,
            softmax_kl=self.kl_sum / self.images,
            seconds=seconds,
            outputs=self.outputs or "logits",
        )


def compare_logits(
    reference: np.ndarray, approximation: np.ndarray, source: str = "given logits"
) -> Fidelity:
    """Fidelity of `approximation` to `reference`, two [N, classes] logits arrays (same images, same order)."""
    acc = FidelityAccumulator()
    acc.add(np.asarray(reference), np.asarray(approximation))
    return acc.result(source)


def measure_fidelity(
    reference: Path,
    candidate: Path,
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    *,
    source: str,
    batch_size: int = 32,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Fidelity:
    """Run both models on the same decoded batches of `samples` (labels are ignored) and compare their logits.

    `progress` (calibration.progress): ``total`` images, then ``advance`` as they are read."""
    if not samples:
        raise RqInputError(f"no images to measure fidelity on ({source})")
    sessions = [open_session(Path(reference)), open_session(Path(candidate))]
    names = [s.get_inputs()[0].name for s in sessions]
    acc = FidelityAccumulator()
    started = time.perf_counter()
    unlabelled = [Sample(s.path, None) for s in samples]
    stream = BatchStream(unlabelled, spec, batch_size=batch_size, workers=workers, progress=progress)
    with stream:
        for batch in stream:
            ref = run_model(sessions[0], names[0], batch.images)
            approx = run_model(sessions[1], names[1], batch.images)
            acc.add(ref, approx)
    return acc.result(source, time.perf_counter() - started)


def held_back_samples(
    dataset: ImageDataset, used: Sequence[Path], limit: int | None = DEFAULT_HOLDOUT_IMAGES, seed: int = 0
) -> list[Sample]:
    """Images of `dataset` that calibration did not read (at most `limit`, a seeded sample; sorted by path)."""
    if limit is not None and limit < 0:
        raise RqInputError(f"the held-back image count must be ≥ 0, got {limit}")
    taken = {Path(p) for p in used}
    rest = [s for s in dataset.samples if Path(s.path) not in taken]
    if limit is not None and len(rest) > limit:
        rest = random.Random(seed).sample(rest, limit)
    return sorted(rest, key=lambda s: s.path)
