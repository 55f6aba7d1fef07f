"""Validation of an INT8 model against its FP32 source: same images, decoded once, paired statistics, gate."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration import ImageDataset, PreprocessSpec, Sample, discover_dataset, select_samples
from calibration.errors import RqInputError
from calibration.progress import Progress
from quantize.manifest import sha256_file
from quantize.measure.evaluate import EvalRun, evaluate, require_labels
from quantize.measure.stats import PairedDrop, images_to_confirm, paired_drop

#: What the gate compares with --max-drop: the measured drop, or the upper bound of its 95% interval.
GATE_ON = ("point", "ci")


@dataclass
class Validation:
    """FP32 vs INT8 on the same validation images."""

    dataset: ImageDataset
    run: EvalRun
    drop: PairedDrop
    overlap_with_calibration: int

    @property
    def fp32(self):
        return self.run.models[0]

    @property
    def int8(self):
        return self.run.models[1]

    def to_dict(self) -> dict:
        return {
            "folder": str(self.dataset.root),
            "layout": self.dataset.layout,
            "images": self.run.images,
            "skipped": [[str(p), r] for p, r in self.run.skipped],
            "overlap_with_calibration": self.overlap_with_calibration,
            "images_per_s": round(self.run.images_per_s, 2),
            "seconds": round(self.run.seconds, 3),
            "batch_size": self.run.batch_size,
            "notes": list(self.dataset.notes) + list(self.run.notes),
        } | ({"cluster": dict(self.run.cluster)} if self.run.cluster else {})


@dataclass(frozen=True)
class Gate:
    """The accuracy gate: INT8 may lose at most `max_drop_pt` top-1 points against FP32.

    ``gate_on="point"`` (default) compares the measured drop with the limit; ``gate_on="ci"`` compares the
    upper bound of its confidence interval, so a pass means these images *show* the drop is within the
    limit. Either way, when the upper bound exceeds the limit the message says so in words, and roughly how
    many images would confirm the goal (:func:`quantize.measure.stats.images_to_confirm`).

    With tuning, the drop is measured on the images held out from tuning, and the gate also fails when the
    tuner found no configuration within the goal on its own images: the best model seen is still written,
    but the run says it missed the goal and exits with the gate's code.
    """

    max_drop_pt: float
    drop_pt: float
    exit_code: int
    variant: str = "INT8"
    tuning_goal_met: bool | None = None  # None: no tuning
    tuning_best_drop_pt: float | None = None
    gate_on: str = "point"
    ci_high_pt: float | None = None  # upper bound of the drop's interval; None: not known
    confidence: float = 0.95
    images: int | None = None
    images_needed: int | None = None  # images that would confirm the goal; None: none would (or not known)
    runtimes: tuple[str, ...] = ()  # where the INT8 model was validated; the gate reads the worst of them

    def __post_init__(self) -> None:
        if self.gate_on not in GATE_ON:
            raise RqInputError(f"--gate-on must be one of {', '.join(GATE_ON)}, not {self.gate_on!r}")
        if self.gate_on == "ci" and self.ci_high_pt is None:
            raise RqInputError("--gate-on ci needs the drop's confidence interval")

    @classmethod
    def from_drop(
        cls,
        max_drop_pt: float,
        drop: PairedDrop,
        exit_code: int,
        variant: str = "INT8",
        *,
        gate_on: str = "point",
        tuning_goal_met: bool | None = None,
        tuning_best_drop_pt: float | None = None,
        runtimes: tuple[str, ...] = (),
    ) -> Gate:
        """The gate for a measured paired drop (point estimate, interval and counts from `drop`)."""
        needed = None
        if drop.ci_high_pt > max_drop_pt:
            needed = images_to_confirm(
                drop.a_only, drop.b_only, drop.n, max_drop_pt, confidence=drop.confidence
            )
        return cls(
            max_drop_pt,
            drop.drop_pt,
            exit_code,
            variant,
            tuning_goal_met=tuning_goal_met,
            tuning_best_drop_pt=tuning_best_drop_pt,
            gate_on=gate_on,
            ci_high_pt=drop.ci_high_pt,
            confidence=drop.confidence,
            images=drop.n,
            images_needed=needed,
            runtimes=runtimes,
        )

    @property
    def gated_value(self) -> float:
        return self.ci_high_pt if self.gate_on == "ci" and self.ci_high_pt is not None else self.drop_pt

    @property
    def confirmed(self) -> bool | None:
        """Whether the interval's upper bound is within the limit (None when the interval is not known)."""
        return None if self.ci_high_pt is None else self.ci_high_pt <= self.max_drop_pt

    @property
    def passed(self) -> bool:
        return self.gated_value <= self.max_drop_pt and self.tuning_goal_met is not False

    def _caveat(self) -> str:
        """The words for an interval reaching past the limit: these images cannot confirm the goal."""
        if self.confirmed is not False or self.drop_pt > self.max_drop_pt:
            return ""  # confirmed, or plainly missed: nothing for more images to settle
        pct = f"{100 * self.confidence:g}%"
        on = f"these {self.images} images" if self.images else "these images"
        text = f"the {pct} interval reaches {self.ci_high_pt:.2f} pt, so {on} cannot confirm the goal"
        if self.images_needed is not None:
            text += f"; about {self.images_needed} images would, at the disagreement rate seen here"
        if self.gate_on == "point":
            text += " (--gate-on ci gates on the upper bound)"
        return text

    @property
    def message(self) -> str:
        text = self._verdict()
        if len(self.runtimes) > 1:
            text += f" [validated in {', '.join(self.runtimes)}; the gate reads {self.variant}, the worst]"
        return text

    def _verdict(self) -> str:
        caveat = self._caveat()
        tail = f"; {caveat}" if caveat else ""
        if self.passed:
            if self.gate_on == "ci":
                return (
                    f"PASSED: the {100 * self.confidence:g}% interval of the INT8 top-1 drop reaches "
                    f"{self.ci_high_pt:.2f} pt ≤ {self.max_drop_pt:.2f} pt (drop {self.drop_pt:.2f} pt)"
                )
            return f"PASSED: INT8 top-1 drop {self.drop_pt:.2f} pt ≤ {self.max_drop_pt:.2f} pt{tail}"
        if self.gated_value > self.max_drop_pt:
            if self.gate_on == "ci" and not caveat:
                return (
                    f"FAILED (--gate-on ci): INT8 top-1 drop {self.drop_pt:.2f} pt and the upper bound of its "
                    f"{100 * self.confidence:g}% interval {self.ci_high_pt:.2f} pt both exceed "
                    f"{self.max_drop_pt:.2f} pt (exit code {self.exit_code})"
                )
            if self.gate_on == "ci":
                return (
                    f"FAILED (--gate-on ci): INT8 top-1 drop {self.drop_pt:.2f} pt; {caveat} "
                    f"(limit {self.max_drop_pt:.2f} pt; exit code {self.exit_code})"
                )
            return (
                f"FAILED: INT8 top-1 drop {self.drop_pt:.2f} pt > {self.max_drop_pt:.2f} pt{tail} "
                f"(exit code {self.exit_code})"
            )
        best = "" if self.tuning_best_drop_pt is None else f" (best {self.tuning_best_drop_pt:.2f} pt)"
        return (
            f"FAILED: tuning found no configuration within {self.max_drop_pt:.2f} pt on its tuning images{best}; "
            f"the best model seen was written (held-out drop {self.drop_pt:.2f} pt; exit code {self.exit_code})"
        )

    def to_dict(self) -> dict:
        return {
            "variant": self.variant,
            "max_drop_pt": self.max_drop_pt,
            "drop_pt": round(self.drop_pt, 4),
            "gate_on": self.gate_on,
            "ci_high_pt": None if self.ci_high_pt is None else round(self.ci_high_pt, 4),
            "confirmed": self.confirmed,
            "images": self.images,
            "images_to_confirm": self.images_needed,
            "tuning_goal_met": self.tuning_goal_met,
            "runtimes": list(self.runtimes),
            "passed": self.passed,
            "exit_code": 0 if self.passed else self.exit_code,
            "message": self.message,
        }


def _identity(path: Path) -> tuple:
    """Two paths name the same image if they resolve to the same file (hard links and copies by inode)."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return (str(Path(path).resolve()),)


def _content_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def count_overlap(calibration_files: Sequence[Path], validation_files: Sequence[Path]) -> int:
    """Validation images that are also calibration images: the same file (path, link) or a copy of one.

    Copies count: a validation folder copied from the calibration one measures nothing new. Only files whose
    size matches a calibration file's are hashed, so two unrelated folders cost one stat per file."""
    calib = {_identity(p) for p in calibration_files}
    by_size: dict[int, list[Path]] = {}
    for p in calibration_files:
        with contextlib.suppress(OSError):
            by_size.setdefault(os.stat(p).st_size, []).append(Path(p))
    hashes: dict[Path, str | None] = {}

    def digest(path: Path) -> str | None:
        if path not in hashes:
            hashes[path] = _content_sha256(path)
        return hashes[path]

    count = 0
    for p in validation_files:
        if _identity(p) in calib:
            count += 1
            continue
        try:
            same_size = by_size.get(os.stat(p).st_size, [])
        except OSError:
            continue
        if same_size and (h := digest(Path(p))) is not None and any(digest(c) == h for c in same_size):
            count += 1
    return count


def validation_samples(
    folder: Path | str, labels: Path | str | None, limit: int | None, seed: int = 0
) -> tuple[ImageDataset, list[Sample]]:
    if limit is not None and limit < 1:
        raise RqInputError(f"the validation image limit (--limit / --val-limit) must be ≥ 1, got {limit}")
    dataset = discover_dataset(folder, labels)
    samples = select_samples(dataset, limit, seed) if limit is not None else list(dataset.samples)
    require_labels(dataset, samples)
    return dataset, samples


def validate(
    fp32: Path,
    int8: Path,
    dataset: ImageDataset,
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    *,
    batch_size: int = 32,
    calibration_files: Sequence[Path] = (),
    workers: int | None = None,
    progress: Progress | None = None,
    ray=None,
    runtime: str = "ort",
) -> Validation:
    """Evaluate FP32 and INT8 on `samples` in one pass (see `validation_samples`) and compare them pair-wise,
    both run in `runtime` (quantize.measure.runtimes). `progress`: as `evaluate`'s."""
    run = evaluate(
        [fp32, int8],
        samples,
        spec,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        ray=ray,
        runtime=runtime,
    )
    a, b = run.models
    drop = paired_drop(
        a.correct_top1, b.correct_top1, disagreements=int((a.predictions != b.predictions).sum())
    )
    overlap = count_overlap(calibration_files, run.paths)
    return Validation(dataset=dataset, run=run, drop=drop, overlap_with_calibration=overlap)
