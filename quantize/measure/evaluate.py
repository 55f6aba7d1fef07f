"""Stage 4, validate: top-1/top-5 of one or several models on the same labelled images, decoded once.

Decoding runs in `calibration.BatchStream`'s threads while ONNX Runtime runs the previous batch, and every
model sees exactly the same tensors, so FP32 and INT8 are compared pair-wise image by image (which is what
the paired confidence interval of the drop needs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from calibration import BatchStream, ImageDataset, PreprocessSpec, Sample
from calibration.errors import RqInputError
from calibration.loader import pad_batch
from calibration.progress import NO_PROGRESS, Progress
from quantize.exits import ort_reason
from quantize.measure import runtimes
from quantize.measure.runtimes import ort_session


@dataclass
class ModelAccuracy:
    """Per-image results of one model on the evaluated images (same order for every model)."""

    path: Path
    predictions: np.ndarray  # top-1 class index per image
    correct_top1: np.ndarray  # bool
    correct_top5: np.ndarray  # bool
    label_offset: int  # 1 when the model has a background class first (1001 outputs)
    inference_seconds: float
    precision: str | None = None  # what the runtime computed in ("f32", "int8+f32", …); None: not known

    @property
    def top1(self) -> float:
        return 100.0 * float(self.correct_top1.mean()) if len(self.correct_top1) else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * float(self.correct_top5.mean()) if len(self.correct_top5) else 0.0

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "top1": round(self.top1, 4),
            "top5": round(self.top5, 4),
            "images": len(self.correct_top1),
            "label_offset": self.label_offset,
            "inference_seconds": round(self.inference_seconds, 3),
        } | ({"precision": self.precision} if self.precision else {})


@dataclass
class EvalRun:
    """The result of evaluating models on one set of images."""

    models: list[ModelAccuracy]
    labels: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]]
    seconds: float
    batch_size: int
    notes: list[str] = field(default_factory=list)
    cluster: dict | None = None  # the Ray cluster that ran it (quantize.distributed); None: this machine
    runtime_version: str | None = None  # e.g. "openvino 2026.4.1"

    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def images_per_s(self) -> float:
        """Images per second of the whole pipeline (decode + every model)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return (
            {
                "images": self.images,
                "batch_size": self.batch_size,
                "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 2),
                "skipped": [[str(p), r] for p, r in self.skipped],
                "models": [m.to_dict() for m in self.models],
                "notes": list(self.notes),
            }
            | ({"cluster": dict(self.cluster)} if self.cluster else {})
            | ({"runtime_version": self.runtime_version} if self.runtime_version else {})
        )


def open_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An ORT CPU session, or a one-line RqInputError with ORT's reason."""
    path = Path(path)
    runtimes.check_model_file(path, f"model not found: {path}")
    try:
        return ort_session(path, threads=threads)
    except Exception as exc:
        raise RqInputError(f"onnxruntime cannot load {path.name}: {ort_reason(exc)}") from None


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model's input is fixed to, or None when the batch dimension is free."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def run_model(session: ort.InferenceSession, input_name: str, images: np.ndarray) -> np.ndarray:
    """First output of `session` for any number of images, also when the model's batch dimension is fixed.

    A fixed-batch model gets full batches: the images are cut into chunks and the last one is padded by
    repeating its last image; the padding's outputs are dropped.
    """
    return _in_fixed_batches(lambda x: session.run(None, {input_name: x})[0], images, fixed_batch(session))


def _in_fixed_batches(run, images: np.ndarray, batch: int | None) -> np.ndarray:
    """`run(images)`, or, for a model with a fixed batch, `run` on full chunks (the last one padded by repeating
    its last image; the padding's outputs dropped)."""
    if batch is None or len(images) == batch:
        return run(images)
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        outputs.append(run(pad_batch(chunk, batch))[: len(chunk)])
    return np.concatenate(outputs)


def _classes_and_offset(session, path: Path) -> tuple[str, int]:
    """(input name, label offset) of an ORT session or a quantize.measure.runtimes session, or a one-line error."""
    if hasattr(session, "get_inputs"):
        inputs = [(i.name, i.shape) for i in session.get_inputs()]
        output = session.get_outputs()[0]
        out_name, shape = output.name, output.shape
    else:
        inputs = [(session.input_name, session.input_shape)]
        out_name, shape = "output 0", session.output_shape
    if len(inputs) != 1 or len(inputs[0][1]) != 4:
        raise RqInputError(f"{path.name}: expected one 4-D image input")
    if len(shape) != 2:
        raise RqInputError(f"{path.name}: output '{out_name}' has shape {shape}, expected [N, classes]")
    classes = shape[1]
    # TF-slim style classifiers put a background class at index 0; ImageNet class k is output k+1.
    offset = 1 if classes == 1001 else 0
    if isinstance(classes, int) and classes not in (1000, 1001):
        raise RqInputError(
            f"{path.name}: {classes} output classes; rq evaluates ImageNet-1k classifiers (1000/1001)"
        )
    return inputs[0][0], offset


def _fixed_batch_of(session) -> int | None:
    first = session.input_shape[0] if session.input_shape else None
    return first if isinstance(first, int) and first > 0 else None


def _run_any(session, images: np.ndarray) -> np.ndarray:
    """`run_model` for a quantize.measure.runtimes session (fixed batch: full chunks, the last one padded)."""
    return _in_fixed_batches(session.run, images, _fixed_batch_of(session))


def prepare_for(session, images: int) -> None:
    """Let the session compile for the batch it is about to run (OpenVINO compiles per batch size), so the
    inference time measured next is inference only."""
    prepare = getattr(session, "prepare", None)
    if prepare is not None:
        prepare(_fixed_batch_of(session) or images)


def open_in_runtime(path: Path, runtime: str = "ort", threads: int | None = None):
    """A quantize.measure.runtimes session for evaluation (`model not found` / one-line load errors)."""
    return runtimes.get(runtime).open(path, threads)  # open says in one line why a file cannot be a model


def check_classifier_outputs(session: ort.InferenceSession, path: Path) -> None:
    """Raise the one-line error evaluation would raise, without evaluating anything."""
    _classes_and_offset(session, Path(path))


def require_labels(dataset: ImageDataset, samples: Sequence[Sample]) -> None:
    """Evaluation needs a label for every image; say how many are missing."""
    missing = sum(1 for s in samples if s.label is None)
    if missing == len(samples):
        raise RqInputError(
            f"{dataset.root} has no labels (layout: {dataset.layout}); use class folders named by wnid, "
            "<wnid>_*.JPEG names, or --labels val.txt"
        )
    if missing:
        raise RqInputError(f"labels are missing for {missing} of {len(samples)} images in {dataset.root}")


def check_evaluation_inputs(models: Sequence[Path], samples: Sequence[Sample], batch_size: int) -> None:
    if batch_size < 1:
        raise RqInputError("--batch must be ≥ 1")
    if not models:
        raise RqInputError("no model to evaluate")
    missing = sum(1 for s in samples if s.label is None)
    if missing:
        # BatchStream labels them -1: they would silently count as wrong predictions.
        raise RqInputError(f"labels are missing for {missing} of {len(samples)} images")


def read_model_outputs(path: Path) -> tuple[str, int]:
    """(input name, label offset) of a model rq can evaluate, or its one-line error."""
    return _classes_and_offset(open_session(Path(path)), Path(path))


def top5_indices(logits: np.ndarray, offset: int) -> np.ndarray:
    """The five best classes per image, best first (background column dropped when `offset` is 1)."""
    logits = logits[:, offset:] if offset else logits
    return np.argsort(-logits, axis=1)[:, :5]


def evaluation_result(
    models: Sequence[Path],
    top5: Sequence[np.ndarray],
    *,
    labels: np.ndarray,
    paths: list[Path],
    skipped: list[tuple[Path, str]],
    offsets: Sequence[int],
    infer_seconds: Sequence[float],
    seconds: float,
    batch_size: int,
    cluster: dict | None = None,
    notes: Sequence[str] = (),
    precisions: Sequence[str | None] | None = None,
    runtime_version: str | None = None,
) -> EvalRun:
    """The EvalRun of per-image top-5 indices: one code path for local and distributed runs."""
    results = []
    for i, path in enumerate(models):
        t5 = top5[i]
        p = t5[:, 0]
        results.append(
            ModelAccuracy(
                path=Path(path),
                predictions=p,
                correct_top1=p == labels,
                correct_top5=(t5 == labels[:, None]).any(axis=1),
                label_offset=offsets[i],
                inference_seconds=infer_seconds[i],
                precision=precisions[i] if precisions else None,
            )
        )
    notes = list(notes)
    if any(offsets):
        notes.append("1001-class output detected: index 0 treated as background and dropped")
    return EvalRun(
        models=results,
        labels=labels,
        paths=paths,
        skipped=skipped,
        seconds=seconds,
        batch_size=batch_size,
        notes=notes,
        cluster=cluster,
        runtime_version=runtime_version,
    )


def evaluate(
    models: Sequence[Path],
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    *,
    batch_size: int = 32,
    threads: int | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    ray=None,
    runtime: str = "ort",
    skip_unreadable: bool = False,
) -> EvalRun:
    """Run every model on the same decoded batches in `runtime` (quantize.measure.runtimes); per-image correctness.

    `skip_unreadable`: a model after the first that `runtime` cannot open or compile is left out of the run,
    with a note saying why (the first model is the reference every drop is measured against: its failure
    stays an error).

    `progress` (calibration.progress): ``total`` images, then ``advance`` as images are read (skipped ones
    included).
    `ray`: a `quantize.distributed.RayRunner` to run on a Ray cluster instead of this machine's threads
    (same result object, same statistics; ONNX Runtime only)."""
    progress = progress or NO_PROGRESS
    if ray is not None:
        if runtime != "ort":
            raise RqInputError("--ray runs models in onnxruntime only; drop --runtime or --ray")
        progress.total(len(samples))
        return ray.evaluate(models, samples, spec, batch_size=batch_size, progress=progress)
    check_evaluation_inputs(models, samples, batch_size)
    sessions, opened, notes = [], [], []
    for i, m in enumerate(models):
        try:
            session = open_in_runtime(Path(m), runtime, threads)
            prepare_for(session, min(batch_size, len(samples)))
        except RqInputError as exc:
            if not skip_unreadable or i == 0:
                raise
            notes.append(f"#{i + 1} {Path(m).name} not evaluated in {runtime}: {exc}")
            continue
        sessions.append(session)
        opened.append(m)
    models = opened
    io = [_classes_and_offset(s, Path(m)) for s, m in zip(sessions, models, strict=True)]
    top5: list[list[np.ndarray]] = [[] for _ in models]
    infer_seconds = [0.0 for _ in models]
    labels: list[np.ndarray] = []
    paths: list[Path] = []
    started = time.perf_counter()
    stream = BatchStream(samples, spec, batch_size=batch_size, workers=workers, progress=progress)
    with stream:
        for batch in stream:
            labels.append(batch.labels)
            paths.extend(batch.paths)
            for i, (session, (_name, offset)) in enumerate(zip(sessions, io, strict=True)):
                try:
                    prepare_for(session, len(batch.images))
                    t0 = time.perf_counter()
                    logits = _run_any(session, batch.images)
                except RqInputError:
                    raise
                except Exception as exc:
                    where = "onnxruntime" if runtime == "ort" else runtime
                    raise RqInputError(
                        f"{Path(models[i]).name} failed in {where}: {ort_reason(exc)}"
                    ) from None
                infer_seconds[i] += time.perf_counter() - t0
                top5[i].append(top5_indices(logits, offset))
    seconds = time.perf_counter() - started
    return evaluation_result(
        models,
        [np.concatenate(t) for t in top5],
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        paths=paths,
        skipped=list(stream.skipped),
        offsets=[offset for _, offset in io],
        infer_seconds=infer_seconds,
        seconds=seconds,
        batch_size=batch_size,
        notes=notes,
        # read after the run: OpenVINO's precision is what the compiled model reports
        precisions=[getattr(session, "precision", None) for session in sessions],
        runtime_version=_runtime_version(runtime),
    )


def _runtime_version(runtime: str) -> str | None:
    try:
        return runtimes.get(runtime).version()
    except Exception:  # a version string is for the table; never fail a finished evaluation over it
        return None


def inference_only_throughput(
    model: Path, images: np.ndarray, *, batch_size: int, threads: int | None = None
) -> float:
    """Images/s of ORT alone on pre-decoded tensors: the ceiling the eval pipeline is measured against."""
    session = open_session(model, threads)
    input_name = session.get_inputs()[0].name
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        session.run(None, {input_name: images[start : start + batch_size]})
    return len(images) / (time.perf_counter() - started)
