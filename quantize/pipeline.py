"""`quantize_model`: the one verb that runs prepare → calibrate → quantize and publishes a checked INT8 model.

The CLI is a thin layer over this function; tests and scripts call it directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from calibration import BatchStream, ImageDataset, PreprocessSpec, Sample, discover_dataset, select_samples
from calibration.errors import RqInputError
from quantize import __version__
from quantize.backends.ort import QuantizedOps, count_quantized, quantize_with_ort
from quantize.bias_correction import BiasCorrectionReport, correct_biases
from quantize.calibrate import CalibrationRanges, calibrate
from quantize.exits import QuantizerError, is_environment_error
from quantize.files import atomic_output, work_folder
from quantize.graph.placement import place, require_something
from quantize.graph.prepare import ModelError, PreparedModel, load_model, prepare_model
from quantize.measure.cpu import CpuInfo, IntegerKernelAdvice, advise_int8, detect_cpu
from quantize.measure.evaluate import evaluate
from quantize.measure.fidelity import held_back_samples
from quantize.recipe import LEGACY_OP_TYPES, METADATA_KEY, QuantRecipe
from quantize.tune import TuneReport, TuneRequest, TuneStep, tune_fallback

PREPROCESS_METADATA_KEY = "rq.preprocess"


class QuantizationFailed(QuantizerError):
    """The quantizer crashed or the quantized model did not pass rq's own checks; nothing was written.

    Not the user's input: its own exit code (4, quantize/exits.py), not 2.
    """


@dataclass
class Progress:
    """Callbacks the CLI uses to draw progress; all optional."""

    stage: Callable[[str], None] | None = None
    calibration_start: Callable[[int], None] | None = None  # number of images to read
    calibration_advance: Callable[[int], None] | None = None  # images consumed (skipped included)


@dataclass
class QuantizeResult:
    """Everything `rq quantize` reports, in one place."""

    output: Path
    recipe: QuantRecipe
    spec: PreprocessSpec
    cpu: CpuInfo
    advice: IntegerKernelAdvice
    reduce_range_source: str  # "cpu" (rq decided) or "user"
    prepared: PreparedModel
    calibration_dataset: ImageDataset
    calibration_files: list[Path]
    images_used: int
    skipped: list[tuple[Path, str]]
    ranges: CalibrationRanges
    quantized_ops: QuantizedOps
    fp32_bytes: int
    int8_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    tuning: TuneReport | None = None
    bias_correction: BiasCorrectionReport | None = None

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "recipe": self.recipe.to_dict(),
            "preprocess": self.spec.to_dict(),
            "cpu": self.cpu.to_dict(),
            "advice": self.advice.to_dict(),
            "reduce_range_source": self.reduce_range_source,
            "preparation": self.prepared.to_dict(),
            "calibration": {
                "folder": str(self.calibration_dataset.root),
                "layout": self.calibration_dataset.layout,
                "notes": list(self.calibration_dataset.notes),
                "images_available": len(self.calibration_dataset.samples),
                "images_requested": len(self.calibration_files),
                "images_used": self.images_used,
                "skipped": [[str(p), reason] for p, reason in self.skipped],
                "method": self.recipe.calibration,
                # INC calibrates inside its own run: rq has no range table to count then.
                "tensors": len(self.ranges.tensors.data) if self.ranges else None,
                "file_list_sha256": file_list_sha256(self.calibration_files, self.calibration_dataset.root),
                "seconds": round(self.seconds.get("calibrate", 0.0), 3),
            },
            "quantized_ops": self.quantized_ops.to_dict(),
            "size_bytes": {"fp32": self.fp32_bytes, "int8": self.int8_bytes},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "tuning": self.tuning.to_dict() if self.tuning else None,
            "bias_correction": self.bias_correction.to_dict() if self.bias_correction else None,
        }


def file_list_sha256(files: list[Path], root: Path) -> str:
    """sha256 of the sorted calibration file list (paths relative to its folder), to tell runs apart."""
    # No resolve(): a symlinked image may point outside the folder; its name inside the folder is what counts.
    names = sorted(Path(os.path.relpath(os.path.abspath(f), os.path.abspath(root))).as_posix() for f in files)
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def default_output_path(model: Path, directory: Path | None = None) -> Path:
    """`resnet50-v2-7.onnx` → `resnet50-v2-int8.onnx`: the zoo's trailing `-<opset>` is dropped."""
    stem = re.sub(r"-\d+$", "", Path(model).stem) or Path(model).stem
    return (directory or Path.cwd()) / f"{stem}-int8.onnx"


def check_output_path(output: Path) -> None:
    """Fail before any expensive work when the output cannot be written."""
    directory = output.parent
    if output.exists() and output.is_dir():
        raise RqInputError(f"output path is a folder: {output}")
    if directory.exists() and not directory.is_dir():
        raise RqInputError(f"output folder is a file, not a folder: {directory}")
    if not directory.is_dir():
        raise RqInputError(f"output folder does not exist: {directory}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        raise RqInputError(f"output folder is not writable: {directory}") from None


def resolve_recipe(recipe: QuantRecipe, cpu: CpuInfo) -> tuple[QuantRecipe, IntegerKernelAdvice, str]:
    """Fill the CPU-dependent choices the user left open (reduce_range=None)."""
    advice = advise_int8(cpu)
    if recipe.reduce_range is None:
        return recipe.with_changes(reduce_range=advice.reduce_range), advice, "cpu"
    return recipe, advice, "user"


def _padded(images: np.ndarray, batch: int) -> np.ndarray:
    """Models with a fixed batch dimension need full batches: repeat the last image to fill one."""
    if len(images) == batch:
        return images
    fill = np.repeat(images[-1:], batch - len(images), axis=0)
    return np.concatenate([images, fill])


def _stamp_metadata(model: onnx.ModelProto, recipe: QuantRecipe, spec: PreprocessSpec, source: Path) -> None:
    import json

    entries = {
        METADATA_KEY: recipe.to_json(),
        PREPROCESS_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True),
        "rq.version": __version__,
        "rq.source_model": source.name,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _smoke_test(path: Path, input_name: str, sample: np.ndarray, fp32_path: Path) -> None:
    """The INT8 model must load and run in ONNX Runtime and give finite outputs of the FP32 model's shape."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {input_name: sample})[0]
    except Exception as exc:  # ORT raises its own exception types
        raise QuantizationFailed(
            f"the quantized model fails in onnxruntime: {str(exc).splitlines()[0]}"
        ) from None
    reference = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(
        None, {input_name: sample}
    )[0]
    if out.shape != reference.shape or not np.all(np.isfinite(out)):
        raise QuantizationFailed(
            f"the quantized model gives output {out.shape}, FP32 gives {reference.shape}"
        )


def check_spec_matches(signature, spec: PreprocessSpec) -> None:
    """The preprocessing must produce the image size the model takes."""
    channels = signature.input_shape[1]
    height, width = signature.spatial
    expected = spec.input_shape(1)[1:]
    actual = (channels, height, width) if spec.layout == "NCHW" else (height, width, channels)
    if any(isinstance(a, int) and a != e for a, e in zip(actual, expected, strict=True)):
        raise RqInputError(
            f"model input {signature.input_name} expects {list(actual)} per image, preprocessing gives "
            f"{list(expected)}: adjust --crop/--preset"
        )


def check_recipe_matches(prepared: PreparedModel, recipe: QuantRecipe) -> None:
    """The recipe must name op types and nodes the model has: a typo would quantize nothing, or silently less."""
    model = load_model(prepared.path, load_weights=False)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in recipe.exclude_nodes if n not in names]
    if unknown:
        raise RqInputError(f"--exclude-nodes names node(s) the model does not have: {', '.join(unknown[:5])}")
    require_something(model, place(model, recipe), recipe)


@dataclass
class CalibrationRun:
    """Calibration images read and the activation ranges they gave."""

    dataset: ImageDataset
    samples: list[Sample]
    ranges: CalibrationRanges | None  # None for the INC backend, which calibrates by itself
    used: int
    skipped: list[tuple[Path, str]]
    smoke_sample: np.ndarray  # a couple of real images, to check the INT8 model runs
    seconds: float
    bias_correction: BiasCorrectionReport | None = None  # of the last model quantized with these ranges
    # Input means bias correction computed with these ranges: tuning's steps reuse them.
    bias_statistics: dict = field(default_factory=dict)
    # Image-decoding processes (`--workers`): INC's own calibration passes use them too.
    workers: int | None = None

    def files(self) -> list[Path]:
        return [s.path for s in self.samples]


def calibration_key(recipe: QuantRecipe) -> tuple:
    """Recipes with the same key share calibration ranges (format, per-channel, reduce_range do not matter)."""
    return (
        recipe.backend,  # INC calibrates by itself: its CalibrationRun carries no ranges
        recipe.calibration,
        recipe.percentile,
        recipe.bins,
        recipe.samples,
        recipe.seed,
        recipe.op_types,
    )


def run_calibration(
    prepared: PreparedModel,
    dataset: ImageDataset,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    workdir: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> CalibrationRun:
    """Stream a deterministic sample of `dataset` through the prepared model's calibrator."""
    progress = progress or Progress()
    started = time.perf_counter()
    signature = prepared.signature
    samples = select_samples(dataset, recipe.samples, recipe.seed)
    batch = signature.fixed_batch or recipe.batch_size
    stream = BatchStream(
        samples, spec, batch_size=batch, workers=workers, on_image=progress.calibration_advance
    )
    if progress.calibration_start:
        progress.calibration_start(len(samples))
    first_batch: list[np.ndarray] = []

    def batches():
        for item in stream:
            images = item.images
            if not first_batch:
                first_batch.append(images[: min(len(images), 2)].copy())
            yield _padded(images, batch) if signature.fixed_batch else images

    if recipe.backend == "inc":
        # INC calibrates by itself (quantize_prepared hands it the same samples); only a smoke-test sample
        # is read here.
        with contextlib.closing(stream):
            next(batches())
        ranges = None
    else:
        with contextlib.closing(stream):
            ranges = calibrate(prepared.path, signature.input_name, batches(), recipe, workdir)
    sample = first_batch[0]
    if signature.fixed_batch:
        sample = _padded(sample[:1], signature.fixed_batch)
    return CalibrationRun(
        dataset=dataset,
        samples=samples,
        ranges=ranges,
        used=stream.used,
        skipped=list(stream.skipped),
        smoke_sample=sample,
        seconds=time.perf_counter() - started,
        workers=workers,
    )


def _inc_batches(
    prepared: PreparedModel, calibration: CalibrationRun, recipe: QuantRecipe, spec: PreprocessSpec
):
    """A factory of fresh calibration passes for INC (it reads the images again for every trial)."""
    batch = prepared.signature.fixed_batch or recipe.batch_size

    def make_batches():
        stream = BatchStream(calibration.samples, spec, batch_size=batch, workers=calibration.workers)
        with stream:
            for item in stream:
                yield _padded(item.images, batch) if prepared.signature.fixed_batch else item.images
            calibration.used, calibration.skipped = stream.used, list(stream.skipped)

    return make_batches, batch


def produce_int8(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    scratch: Path,
    workdir: Path,
    *,
    eval_func: Callable[[Path], float] | None = None,
    tune: TuneRequest | None = None,
    log: Callable[[str], None] = lambda _m: None,
):
    """Run the recipe's backend into `scratch`. Returns INC's outcome for the INC backend, else None."""
    if recipe.backend == "inc":
        from quantize.backends.inc import quantize_with_inc

        make_batches, batch = _inc_batches(prepared, calibration, recipe, spec)
        return quantize_with_inc(
            prepared.path,
            make_batches,
            recipe,
            scratch,
            workdir,
            batch_size=batch,
            eval_func=eval_func,
            max_drop_pt=tune.max_drop_pt if tune else None,
            max_trials=tune.max_trials if tune else 20,
            log=log,
        )
    try:
        quantize_with_ort(prepared.path, calibration.ranges, recipe, scratch, workdir)
    except RqInputError:
        raise
    except Exception as exc:
        if is_environment_error(exc):
            raise  # a full disk under the quantizer is the machine's failure, not the quantizer's
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise QuantizationFailed(f"onnxruntime's quantizer failed: {type(exc).__name__}: {reason}") from None
    if recipe.bias_correction and recipe.format == "qoperator":
        calibration.bias_correction = BiasCorrectionReport(
            note="skipped: bias correction applies to QDQ models (this one is in QOperator format)"
        )
    elif recipe.bias_correction:
        calibration.bias_correction = _correct_biases(prepared, calibration, recipe, spec, scratch)
    else:
        calibration.bias_correction = None
    return None


def _correct_biases(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    scratch: Path,
) -> BiasCorrectionReport:
    """Fold INT8's mean output shift of each Conv/Gemm channel into its bias, on the calibration images."""
    batch = prepared.signature.fixed_batch or recipe.batch_size

    def batches():
        with BatchStream(calibration.samples, spec, batch_size=batch) as stream:
            for item in stream:
                yield _padded(item.images, batch) if prepared.signature.fixed_batch else item.images

    int8 = load_model(scratch)
    report = correct_biases(
        load_model(prepared.path),
        int8,
        prepared.signature.input_name,
        batches(),
        cache=calibration.bias_statistics,
    )
    onnx.save_model(int8, str(scratch))
    return report


def publish_int8(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    scratch: Path,
    output: Path,
    *,
    tuning_fallback: tuple[str, ...] = (),
) -> QuantizedOps:
    """Stamp the recipe and spec, check (onnx.checker + a real inference), publish atomically at `output`."""
    int8 = load_model(scratch)
    _stamp_metadata(int8, recipe, spec, prepared.source)
    try:
        onnx.checker.check_model(int8)
    except onnx.checker.ValidationError as exc:
        raise QuantizationFailed(
            f"the quantized model fails onnx.checker: {str(exc).splitlines()[0]}"
        ) from None
    ops = count_quantized(load_model(prepared.path), int8, recipe, tuning_fallback=tuning_fallback)
    if ops.quantized == 0:
        raise QuantizationFailed(
            f"nothing was quantized: none of the {ops.candidates} candidate node(s) of the model was converted "
            "(check --op-types and --exclude-nodes)"
        )
    onnx.save_model(int8, str(scratch))
    _smoke_test(scratch, prepared.signature.input_name, calibration.smoke_sample, prepared.path)
    # Not atomic_save: its up-front folder checks would call a permission lost mid-run bad input (exit 2);
    # check_output_path checked the folder before the work, so a failure now is the machine's (exit 5).
    with atomic_output(output) as tmp:
        onnx.save_model(int8, str(tmp))
    scratch.unlink()
    return ops


def quantize_prepared(
    prepared: PreparedModel,
    calibration: CalibrationRun,
    recipe: QuantRecipe,
    spec: PreprocessSpec,
    output: Path,
    workdir: Path,
    *,
    tuning_fallback: tuple[str, ...] = (),
) -> QuantizedOps:
    """Quantize a prepared model with the recipe's backend, check the result, publish it atomically at `output`.

    `tuning_fallback`: the recipe's excluded nodes that tuning (not the user) chose, for the FP32 reasons.
    """
    scratch = workdir / f"int8-{recipe.digest()}.onnx"
    produce_int8(prepared, calibration, recipe, spec, scratch, workdir)
    return publish_int8(prepared, calibration, recipe, spec, scratch, output, tuning_fallback=tuning_fallback)


def _inc_tune_report(outcome, tune: TuneRequest) -> TuneReport:
    """INC's trials in the shape of rq's own tuning report."""
    report = TuneReport(
        backend="inc",
        max_drop_pt=tune.max_drop_pt,
        tune_images=len(tune.tune_samples),
        fp32_top1=outcome.baseline_accuracy if outcome.baseline_accuracy is not None else float("nan"),
        goal_met=bool(outcome.goal_met),
        notes=list(outcome.notes),
        seconds=outcome.seconds,
    )
    best = None
    for trial in outcome.trials:
        accuracy = trial.get("accuracy")
        step = TuneStep(
            step=int(trial["trial"]),
            fallback=list(trial.get("fp32_nodes") or []),
            added=None,
            top1=float("nan") if accuracy is None else float(accuracy),
            drop_pt=float("nan") if trial.get("drop_pt") is None else float(trial["drop_pt"]),
            seconds=0.0,
            error=trial.get("error"),
        )
        report.steps.append(step)
        if accuracy is not None and (best is None or accuracy > best.top1):
            best = step
    report.chosen = best.step if best is not None else (report.steps[0].step if report.steps else 0)
    report.notes.append("INC keeps only its best trial's model, so the speed of each trial was not measured")
    return report


def quantize_model(
    model: Path | str,
    calib: Path | str,
    *,
    output: Path | str | None = None,
    recipe: QuantRecipe | None = None,
    spec: PreprocessSpec | None = None,
    labels: Path | str | None = None,
    cpu: CpuInfo | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    tune: TuneRequest | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> QuantizeResult:
    """Quantize `model` with images from `calib`; write the INT8 model to `output` atomically.

    With `tune`, nodes are fallen back to FP32 until the top-1 drop on `tune.tune_samples` fits
    `tune.max_drop_pt` (see quantize.tune); the published model is the step chosen there.

    Raises RqInputError (or a subclass) with a one-line message for anything the user can fix. Nothing is
    written at `output` unless every stage succeeded and the result runs in ONNX Runtime.
    """
    model = Path(model)
    recipe = recipe or QuantRecipe()
    spec = spec or PreprocessSpec()
    progress = progress or Progress()
    cpu = cpu or detect_cpu()
    output = Path(output) if output is not None else default_output_path(model)
    if recipe.backend == "inc":
        from quantize.backends.inc import require_inc

        require_inc()  # fail before any work when the extra is not installed
    if not model.is_file():
        raise ModelError(
            f"model not found: {model}" if not model.exists() else f"model path is not a file: {model}"
        )
    check_output_path(output)
    if output.resolve() == model.resolve():
        raise RqInputError("output path is the input model; choose another --out")
    recipe, advice, rr_source = resolve_recipe(recipe, cpu)
    if recipe.backend == "inc":
        # Placement from the graph and bias correction are ort-backend steps: INC gets the op types it always
        # had, and the recipe recorded with its model says that no bias correction was done.
        recipe = recipe.with_changes(op_types=recipe.op_types or LEGACY_OP_TYPES, bias_correction=False)
    dataset = discover_dataset(calib, labels)  # before the slow stages: a bad folder fails at once
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        if progress.stage:
            progress.stage(name)

    with work_folder("rq-") as workdir:
        stage("prepare")
        prepared = prepare_model(model, workdir)
        seconds["prepare"] = prepared.seconds
        check_spec_matches(prepared.signature, spec)
        check_recipe_matches(prepared, recipe)
        stage("calibrate")
        calibration = run_calibration(
            prepared, dataset, recipe, spec, workdir, workers=workers, progress=progress
        )
        seconds["calibrate"] = calibration.seconds
        tuning = None
        user_excluded = recipe.exclude_nodes
        if tune is not None and recipe.backend == "inc":
            stage("tune")
            started = time.perf_counter()
            scratch = workdir / "int8-inc-tuned.onnx"
            outcome = produce_int8(
                prepared,
                calibration,
                recipe,
                spec,
                scratch,
                workdir,
                eval_func=lambda path: (
                    evaluate(
                        [path],
                        list(tune.tune_samples),
                        spec,
                        batch_size=tune.eval_batch,
                        workers=workers,
                        ray=tune.ray,
                    )
                    .models[0]
                    .top1
                ),
                tune=tune,
                log=log,
            )
            tuning = _inc_tune_report(outcome, tune)
            recipe = recipe.with_changes(exclude_nodes=recipe.exclude_nodes + tuple(outcome.fallback_nodes))
            seconds["tune"] = time.perf_counter() - started
            stage("quantize")
            ops = publish_int8(
                prepared,
                calibration,
                recipe,
                spec,
                scratch,
                output,
                tuning_fallback=tuple(n for n in recipe.exclude_nodes if n not in user_excluded),
            )
        elif tune is not None:
            stage("tune")
            recipe, tuning = tune_fallback(
                quantize_to=lambda r, path: quantize_prepared(prepared, calibration, r, spec, path, workdir),
                prepared_path=prepared.path,
                fp32_path=model,
                input_name=prepared.signature.input_name,
                recipe=recipe,
                spec=spec,
                request=tune,
                sensitivity_samples=calibration.samples,
                holdout_samples=held_back_samples(
                    dataset, calibration.files(), tune.holdout_images, recipe.seed
                ),
                workdir=workdir,
                workers=workers,
                eval_batch=tune.eval_batch,
                log=log,
            )
            seconds["tune"] = tuning.seconds
        if tuning is None or tuning.backend != "inc":
            stage("quantize")
            started = time.perf_counter()
            fallback = tuple(n for n in recipe.exclude_nodes if n not in user_excluded) if tuning else ()
            ops = quantize_prepared(
                prepared, calibration, recipe, spec, output, workdir, tuning_fallback=fallback
            )
            seconds["quantize"] = time.perf_counter() - started

    return QuantizeResult(
        output=output,
        recipe=recipe,
        spec=spec,
        cpu=cpu,
        advice=advice,
        reduce_range_source=rr_source,
        prepared=prepared,
        calibration_dataset=dataset,
        calibration_files=calibration.files(),
        images_used=calibration.used,
        skipped=calibration.skipped,
        ranges=calibration.ranges,
        quantized_ops=ops,
        fp32_bytes=model.stat().st_size,
        int8_bytes=output.stat().st_size,
        seconds=seconds,
        tuning=tuning,
        bias_correction=calibration.bias_correction,
    )


def read_model_metadata(path: Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file (rq stores its recipe and preprocessing spec there)."""
    model = load_model(path, load_weights=False)
    return {p.key: p.value for p in model.metadata_props}


__all__ = [
    "ModelError",
    "Progress",
    "QuantizationFailed",
    "QuantizeResult",
    "default_output_path",
    "quantize_model",
    "read_model_metadata",
]
